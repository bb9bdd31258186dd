package broker

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	"github.com/mongo-broker/mongo-broker/clients/go/brokerv1"
)

// RetryPolicy is how a Client retries calls that failed transiently. The
// rules are the Python client's:
//
//   - What: UNAVAILABLE (no broker listening, broker draining, database
//     unreachable) and RESOURCE_EXHAUSTED with the reason POOL_EXHAUSTED
//     (the broker's wait queue is full). Also CANCELLED when the caller's
//     context was not cancelled: a gRPC server that stops cancels the calls
//     it had received but not yet handed to the broker
//     (https://github.com/grpc/grpc/issues/41785), calls that never ran.
//     Nothing else changes by retrying.
//   - Which calls: Ping, Stats, FindOne, CountDocuments,
//     EstimatedDocumentCount, and Find, Distinct and Aggregate until their
//     first message arrives (restarting a stream later would hand documents
//     over twice); an Aggregate with an $out or $merge stage never.
//     InsertOne and InsertMany only when every _id was made here: a retry
//     that meets a duplicate key of those new ObjectIDs asks the broker
//     which are stored, so nothing is stored twice (an _id of the caller's
//     could be another's, so such an insert is sent once). Updates,
//     deletes, FindOneAnd* and BulkWrite are never retried: they are not
//     idempotent, and a lost answer does not say whether they ran.
//   - Where: on a tier (a "dns:" target or NewClientForAddresses), gRPC's
//     round_robin gives each attempt the next ready replica, so a retry
//     after a replica refused (draining: UNAVAILABLE, SHUTTING_DOWN) or
//     went away lands on another one. Calls do not wait for a replica to
//     be ready (no wait-for-ready): with none ready, an attempt fails
//     UNAVAILABLE at once and the pause below comes before the next.
//   - The pause: "full jitter", a uniform random pause in [0, cap] with
//     cap = min(MaxBackoff, InitialBackoff * Multiplier^(n-1)) before the
//     n-th retry, so that many workers that failed together do not retry
//     together. A RetryInfo delay from the broker is the least pause.
//   - The deadline: the call's context deadline covers every attempt and
//     pause; no retry starts unless, after its pause, some time is left.
type RetryPolicy struct {
	// MaxAttempts is how many times a call is tried, the first included;
	// 1 means no retries.
	MaxAttempts int
	// InitialBackoff caps the pause before the first retry.
	InitialBackoff time.Duration
	// MaxBackoff is the largest cap on any pause (a RetryInfo delay from the
	// broker may exceed it).
	MaxBackoff time.Duration
	// Multiplier is how much the cap grows with each retry (at least 1).
	Multiplier float64
}

// DefaultRetryPolicy is the clients' default: three tries, pauses of at most
// 50 and 100 ms.
var DefaultRetryPolicy = RetryPolicy{MaxAttempts: 3, InitialBackoff: 50 * time.Millisecond, MaxBackoff: time.Second, Multiplier: 2}

// NoRetries makes every call exactly once.
var NoRetries = RetryPolicy{MaxAttempts: 1}

// WithRetryPolicy sets how the client retries reads and inserts with
// client-made _ids (default DefaultRetryPolicy; NoRetries for none).
func WithRetryPolicy(policy RetryPolicy) Option {
	return func(o *options) { o.retries = policy }
}

// minAttempt is the least time left, after a pause, that a retry is worth:
// with less, it could only end in DEADLINE_EXCEEDED and hide the error that
// caused it.
const minAttempt = 10 * time.Millisecond

func (p RetryPolicy) validate() error {
	switch {
	case p.MaxAttempts < 1:
		return fmt.Errorf("broker: RetryPolicy.MaxAttempts must be at least 1 (1 means no retries), not %d", p.MaxAttempts)
	case p.MaxAttempts == 1:
		return nil
	case p.InitialBackoff < 0:
		return fmt.Errorf("broker: RetryPolicy.InitialBackoff must not be negative, not %v", p.InitialBackoff)
	case p.MaxBackoff < p.InitialBackoff:
		return fmt.Errorf("broker: RetryPolicy.MaxBackoff (%v) must be at least InitialBackoff (%v)", p.MaxBackoff, p.InitialBackoff)
	case p.Multiplier < 1 || math.IsNaN(p.Multiplier) || math.IsInf(p.Multiplier, 0):
		return fmt.Errorf("broker: RetryPolicy.Multiplier must be a finite number of at least 1, not %v", p.Multiplier)
	}
	return nil
}

// pause is the wait before retry number retry (1 for the first).
func (p RetryPolicy) pause(retry int, err error) time.Duration {
	limit := float64(p.InitialBackoff) * math.Pow(p.Multiplier, float64(min(retry-1, 64)))
	limit = min(limit, float64(p.MaxBackoff))
	pause := time.Duration(rand.Float64() * limit)
	if e := AsError(err); e != nil && e.RetryAfter > pause {
		pause = e.RetryAfter
	}
	return pause
}

// shouldRetry is the rule of which errors of a call on ctx a retry may cure.
func shouldRetry(ctx context.Context, err error) bool {
	e := AsError(err)
	if e == nil {
		return false
	}
	return e.Code == codes.Unavailable ||
		(e.Code == codes.ResourceExhausted && e.HasReason(brokerv1.ErrorReason_POOL_EXHAUSTED)) ||
		// Not the caller's cancel: the server's (see RetryPolicy).
		(e.Code == codes.Canceled && ctx.Err() == nil)
}

// final marks an attempt's error as one not to retry, whatever its code: a
// stream that failed after its first message.
type final struct{ err error }

func (f final) Error() string { return f.err.Error() }

// retry runs attempt until it succeeds, fails for good, runs out of
// attempts or would outlast ctx. ctx is the call's context, with the
// deadline that covers every attempt.
func (c *Client) retry(ctx context.Context, attempt func() error) error {
	for n := 1; ; n++ {
		err := attempt()
		var f final
		if errors.As(err, &f) {
			return attempted(f.err, n)
		}
		if err == nil || n >= c.retries.MaxAttempts || !shouldRetry(ctx, err) {
			return attempted(err, n)
		}
		pause := c.retries.pause(n, err)
		if deadline, ok := ctx.Deadline(); ok && time.Until(deadline) < pause+minAttempt {
			return attempted(err, n)
		}
		timer := time.NewTimer(pause)
		select {
		case <-ctx.Done():
			timer.Stop()
			return attempted(err, n)
		case <-timer.C:
		}
		c.retried.Add(1)
	}
}

// attempted records on a call's final *Error how many attempts it made.
func attempted(err error, n int) error {
	if e := AsError(err); e != nil {
		e.Attempts = n
	}
	return err
}

// unary makes one unary call with the client's metadata and deadline,
// retried when retryable, and turns its error into an *Error.
func unary[Req, Resp any](ctx context.Context, c *Client, retryable bool,
	rpc func(context.Context, Req, ...grpc.CallOption) (Resp, error), request Req,
) (Resp, error) {
	ctx, cancel := c.callContext(ctx)
	defer cancel()
	var response Resp
	attempt := func() error {
		var err error
		response, err = rpc(ctx, request)
		return fromRPC(err)
	}
	if !retryable {
		return response, attempt()
	}
	return response, c.retry(ctx, attempt)
}

// openCursor opens a Find-framed stream (Find, Aggregate) and reads its
// first message, retrying both when retryable. ctx is the caller's; the
// stream lives on a call context derived from it until the cursor ends.
func (c *Client) openCursor(ctx context.Context, retryable bool,
	open func(context.Context) (grpc.ServerStreamingClient[brokerv1.FindResponse], error),
) (*Cursor, error) {
	streamCtx, cancel := c.callContext(ctx)
	var cursor *Cursor
	attempt := func() error {
		// Each attempt has its own stream context, so that ending a failed
		// stream leaves the call's deadline for the next one.
		attemptCtx, attemptCancel := context.WithCancel(streamCtx)
		stream, err := open(attemptCtx)
		if err != nil {
			attemptCancel()
			return fromRPC(err)
		}
		cursor = &Cursor{stream: stream, cancel: attemptCancel}
		if !cursor.fetch(ctx) && cursor.err != nil {
			return cursor.err
		}
		return nil
	}
	var err error
	if retryable {
		err = c.retry(streamCtx, attempt)
	} else {
		err = attempt()
	}
	if err != nil {
		cancel()
		return nil, err
	}
	stop := cursor.cancel
	cursor.cancel = func() { stop(); cancel() }
	if cursor.done {
		cancel()
	}
	return cursor, nil
}
