package broker

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/mongo-broker/mongo-broker/clients/go/brokerv1"
)

// Domain is the google.rpc.ErrorInfo domain of the broker's errors.
const Domain = "mongo-broker"

// Error is a failed call: the gRPC status and what the broker put in its
// google.rpc.Status details. Use errors.As to get at it:
//
//	var e *broker.Error
//	if errors.As(err, &e) && e.HasReason(brokerv1.ErrorReason_DUPLICATE_KEY) { ... }
//
// status.Code(err) and status.FromError(err) work on it too, and
// errors.Is(err, context.DeadlineExceeded) holds for DeadlineExceeded (and
// context.Canceled for Canceled).
type Error struct {
	// Code is the gRPC status code.
	Code codes.Code
	// Message is the status message, written for a person.
	Message string
	// Reason is the broker's ErrorInfo reason, the name of a
	// brokerv1.ErrorReason value (e.g. "DUPLICATE_KEY"), or "" when the
	// status came from gRPC itself (no broker listening). See HasReason.
	Reason string
	// MongoCode is MongoDB's error code (e.g. 11000), 0 when it gave none.
	MongoCode int
	// Metadata is the ErrorInfo metadata: database, mongo_code,
	// mongo_code_name, mongo_labels and, for a write that failed part-way,
	// inserted_count, matched_count, modified_count, deleted_count,
	// upserted_count, failed_index, write_errors, write_errors_total,
	// upserted_ids and write_concern_error (which WriteException and
	// BulkWriteException decode).
	Metadata map[string]string
	// RetryAfter is how long the broker asks the caller to wait before
	// retrying (google.rpc.RetryInfo), 0 when it did not say.
	RetryAfter time.Duration
	// Details are every google.rpc.Status detail, unpacked where the type
	// is known (*errdetails.ErrorInfo, *errdetails.RetryInfo, ...).
	Details []any
	// Attempts is how many times the call was sent before it failed with
	// this error: 1, or more when it was retried (see RetryPolicy).
	Attempts int

	status *status.Status
}

// HasReason reports whether the broker gave this reason: the contract's
// enum, compared by its name, which is what ErrorInfo carries on the wire.
func (e *Error) HasReason(reason brokerv1.ErrorReason) bool {
	return e != nil && e.Reason != "" && e.Reason == reason.String()
}

func (e *Error) Error() string {
	where := e.Code.String()
	if e.Reason != "" {
		where += ", " + e.Reason
	}
	return fmt.Sprintf("broker: %s (%s)", e.Message, where)
}

// GRPCStatus lets status.FromError and status.Code see the original status.
func (e *Error) GRPCStatus() *status.Status { return e.status }

// Is makes errors.Is(err, context.DeadlineExceeded) and
// errors.Is(err, context.Canceled) hold for the matching codes.
func (e *Error) Is(target error) bool {
	switch target {
	case context.DeadlineExceeded:
		return e.Code == codes.DeadlineExceeded
	case context.Canceled:
		return e.Code == codes.Canceled
	}
	return false
}

// MongoCodeName is MongoDB's code name (e.g. "DuplicateKey"), "" if none.
func (e *Error) MongoCodeName() string { return e.Metadata["mongo_code_name"] }

// Database is the configured database the failed call used, "" if unknown.
func (e *Error) Database() string { return e.Metadata["database"] }

// Labels are MongoDB's error labels (e.g. "RetryableWriteError").
func (e *Error) Labels() []string {
	var labels []string
	for _, label := range strings.Split(e.Metadata["mongo_labels"], ",") {
		if label = strings.TrimSpace(label); label != "" {
			labels = append(labels, label)
		}
	}
	return labels
}

// HasErrorLabel reports whether MongoDB gave the error this label.
func (e *Error) HasErrorLabel(label string) bool {
	for _, l := range e.Labels() {
		if l == label {
			return true
		}
	}
	return false
}

// InsertedCount is, for a failed insert, how many documents landed before
// the failure; ok is false when the broker did not say.
func (e *Error) InsertedCount() (n int, ok bool) { return e.intMetadata("inserted_count") }

// FailedIndex is, for a failed insert or bulk write, the index of the
// first document or operation that failed; ok is false when the broker did
// not say.
func (e *Error) FailedIndex() (n int, ok bool) { return e.intMetadata("failed_index") }

func (e *Error) intMetadata(key string) (int, bool) {
	value, present := e.Metadata[key]
	if !present {
		return 0, false
	}
	n, err := strconv.Atoi(value)
	return n, err == nil
}

// fromRPC turns an error from a gRPC call into an *Error. An error that
// carries no gRPC status (which gRPC never returns) is wrapped as Unknown.
func fromRPC(err error) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		st = status.New(codes.Unknown, err.Error())
	}
	return fromStatus(st)
}

func fromStatus(st *status.Status) *Error {
	e := &Error{Code: st.Code(), Message: st.Message(), Metadata: map[string]string{}, Attempts: 1, status: st}
	for _, detail := range st.Details() {
		e.Details = append(e.Details, detail)
		switch d := detail.(type) {
		case *errdetails.ErrorInfo:
			// The first ErrorInfo of our domain is the broker's.
			if d.GetDomain() == Domain && e.Reason == "" {
				e.Reason = d.GetReason()
				for k, v := range d.GetMetadata() {
					e.Metadata[k] = v
				}
			}
		case *errdetails.RetryInfo:
			e.RetryAfter = d.GetRetryDelay().AsDuration()
		}
	}
	if code, err := strconv.Atoi(e.Metadata["mongo_code"]); err == nil {
		e.MongoCode = code
	}
	return e
}

// AsError returns the *Error in err's chain, or nil.
func AsError(err error) *Error {
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	return nil
}

// Code returns the gRPC code of err: OK for nil, Unknown for an error that
// did not come from a call.
func Code(err error) codes.Code {
	if err == nil {
		return codes.OK
	}
	if e := AsError(err); e != nil {
		return e.Code
	}
	return status.Code(err)
}

// IsDuplicateKey reports a duplicate key (ALREADY_EXISTS, MongoDB 11000).
// For a retried insert with a client-made _id it means the first attempt
// landed.
func IsDuplicateKey(err error) bool {
	e := AsError(err)
	return e != nil && (e.Code == codes.AlreadyExists || e.MongoCode == 11000)
}

// IsUnavailable reports that the broker or its database could not be
// reached (UNAVAILABLE): retry with backoff; writes only with client-made
// _ids.
func IsUnavailable(err error) bool { return Code(err) == codes.Unavailable }

// IsTimeout reports that the call's time limit ran out (DEADLINE_EXCEEDED).
func IsTimeout(err error) bool { return Code(err) == codes.DeadlineExceeded }

// IsResourceExhausted reports that the broker's pool or queue is saturated
// or a size limit was hit (RESOURCE_EXHAUSTED): back off, or send less.
func IsResourceExhausted(err error) bool { return Code(err) == codes.ResourceExhausted }

// IsUnknownDatabase reports a database name the broker has not configured
// (NOT_FOUND).
func IsUnknownDatabase(err error) bool { return Code(err) == codes.NotFound }

// IsInvalidArgument reports a malformed or refused request (INVALID_ARGUMENT).
func IsInvalidArgument(err error) bool { return Code(err) == codes.InvalidArgument }

// IsPermissionDenied reports a token, database or query that is not allowed
// (PERMISSION_DENIED).
func IsPermissionDenied(err error) bool { return Code(err) == codes.PermissionDenied }

// IsUnauthenticated reports a missing or wrong token (UNAUTHENTICATED).
func IsUnauthenticated(err error) bool { return Code(err) == codes.Unauthenticated }

// IsRetryable reports errors worth retrying after a pause: UNAVAILABLE and
// RESOURCE_EXHAUSTED other than a size limit.
func IsRetryable(err error) bool {
	switch Code(err) {
	case codes.Unavailable:
		return true
	case codes.ResourceExhausted:
		e := AsError(err)
		return e != nil && !e.HasReason(brokerv1.ErrorReason_LIMIT_EXCEEDED) && !strings.Contains(e.Message, "larger than max")
	}
	return false
}
