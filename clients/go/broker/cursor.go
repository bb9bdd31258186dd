package broker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"reflect"

	"go.mongodb.org/mongo-driver/v2/bson"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	"github.com/mongo-broker/mongo-broker/clients/go/brokerv1"
)

// Cursor iterates over the documents of a Find or an Aggregate, one gRPC
// message (one MongoDB batch) at a time. It is not safe for concurrent use.
//
//	defer cur.Close(ctx)
//	for cur.Next(ctx) { ... cur.Decode(&v) ... }
//	if err := cur.Err(); err != nil { ... }
type Cursor struct {
	// Current is the document Next moved to. It stays valid after the
	// next call to Next.
	Current bson.Raw

	stream  grpc.ServerStreamingClient[brokerv1.FindResponse]
	cancel  context.CancelFunc
	batch   [][]byte
	batches int
	done    bool
	err     error
}

// Next moves to the next document, reading the next batch from the stream
// when the current one is used up. It returns false at the end of the
// results or on an error (see Err). If ctx is done while Next waits for a
// batch, the stream is cancelled and Err reports it; a nil ctx ends the
// cursor with ErrNilContext.
func (c *Cursor) Next(ctx context.Context) bool {
	if ctx == nil {
		c.finish(ErrNilContext)
		c.Current = nil
		return false
	}
	for len(c.batch) == 0 {
		if c.done || !c.fetch(ctx) {
			c.Current = nil
			return false
		}
	}
	c.Current = bson.Raw(c.batch[0])
	c.batch = c.batch[1:]
	return true
}

// fetch reads the next message; false at the end of the stream or on error.
func (c *Cursor) fetch(ctx context.Context) bool {
	if ctx.Err() != nil {
		// Done already: fail now rather than race Recv against the cancel.
		c.finish(fromStatus(status.FromContextError(ctx.Err())))
		return false
	}
	if ctx.Done() != nil {
		// The stream lives on Find's context; a Next context that ends
		// while Recv waits cancels it too.
		stop := context.AfterFunc(ctx, c.cancel)
		defer stop()
	}
	message, err := c.stream.Recv()
	if errors.Is(err, io.EOF) {
		c.finish(nil)
		return false
	}
	if err != nil {
		c.finish(fromRPC(err))
		return false
	}
	c.batch = message.GetDocuments()
	c.batches++
	return true
}

func (c *Cursor) finish(err error) {
	c.done = true
	c.batch = nil
	if c.err == nil {
		c.err = err
	}
	c.cancel()
}

// Decode unmarshals the current document into v (a pointer to a struct,
// bson.D, bson.M, ...).
func (c *Cursor) Decode(v any) error {
	if c.Current == nil {
		return errors.New("broker: Decode called without a current document (call Next first)")
	}
	return bson.Unmarshal(c.Current, v)
}

// Err is the error that ended the iteration, nil at a normal end.
func (c *Cursor) Err() error { return c.err }

// RemainingBatchLength is the number of documents left in the current batch.
func (c *Cursor) RemainingBatchLength() int { return len(c.batch) }

// Batches is the number of messages (MongoDB batches) received so far.
func (c *Cursor) Batches() int { return c.batches }

// All decodes every remaining document into results, a pointer to a slice
// (*[]bson.D, *[]MyStruct, ...), and closes the cursor.
func (c *Cursor) All(ctx context.Context, results any) error {
	defer c.Close(ctx)
	if ctx == nil {
		return ErrNilContext
	}
	target := reflect.ValueOf(results)
	if target.Kind() != reflect.Pointer || target.IsNil() || target.Elem().Kind() != reflect.Slice {
		return fmt.Errorf("broker: All needs a pointer to a slice, not %T", results)
	}
	slice := target.Elem()
	elemType := slice.Type().Elem()
	for c.Next(ctx) {
		elem := reflect.New(elemType)
		if err := bson.Unmarshal(c.Current, elem.Interface()); err != nil {
			return fmt.Errorf("broker: decoding document %d: %w", slice.Len(), err)
		}
		slice = reflect.Append(slice, elem.Elem())
	}
	target.Elem().Set(slice)
	return c.Err()
}

// Close stops the stream if it is still running (the broker then closes
// the server cursor). Closing twice is harmless. Given a nil ctx it closes
// all the same, and returns ErrNilContext.
func (c *Cursor) Close(ctx context.Context) error {
	if !c.done {
		c.done = true
		c.batch = nil
		c.cancel()
	}
	if ctx == nil {
		return ErrNilContext
	}
	return nil
}
