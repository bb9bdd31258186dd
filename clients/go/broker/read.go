package broker

import (
	"context"
	"errors"
	"fmt"
	"io"

	"go.mongodb.org/mongo-driver/v2/bson"
	"google.golang.org/grpc"

	"github.com/mongo-broker/mongo-broker/clients/go/brokerv1"
)

// CountDocuments counts the documents filter matches (nil: every
// document), with Skip, Limit, Hint, Collation, MaxTime, Comment and the
// read options. Retried as RetryPolicy says.
func (c *Collection) CountDocuments(ctx context.Context, filter any, opts ...CountOption) (int64, error) {
	if ctx == nil {
		return 0, ErrNilContext
	}
	o := collect(opts)
	if err := checkCount("Skip", o.skip); err != nil {
		return 0, err
	}
	if err := checkCount("Limit", o.limit); err != nil {
		return 0, err
	}
	request, err := c.countRequest(&o)
	if err != nil {
		return 0, err
	}
	request.Skip, request.Limit = o.skip, o.limit
	if request.Filter, err = marshalDocument("filter", filter); err != nil {
		return 0, err
	}
	name, keys, err := hintParts(o.hint)
	switch {
	case err != nil:
		return 0, err
	case name != "":
		request.Hint = &brokerv1.CountRequest_HintName{HintName: name}
	case keys != nil:
		request.Hint = &brokerv1.CountRequest_HintKeys{HintKeys: keys}
	}
	return c.count(ctx, request)
}

// EstimatedDocumentCount is the collection's size from its metadata: fast,
// without a filter. It takes MaxTime, Comment and the read options; the
// options of a filtered count (Skip, Limit, Hint, Collation) are refused.
func (c *Collection) EstimatedDocumentCount(ctx context.Context, opts ...CountOption) (int64, error) {
	if ctx == nil {
		return 0, ErrNilContext
	}
	o := collect(opts)
	if o.skip != 0 || o.limit != 0 || o.hint != nil || o.collation != nil {
		return 0, errors.New("broker: EstimatedDocumentCount takes no Skip, Limit, Hint or Collation (use CountDocuments)")
	}
	request, err := c.countRequest(&o)
	if err != nil {
		return 0, err
	}
	request.Estimated = true
	return c.count(ctx, request)
}

func (c *Collection) countRequest(o *callSettings) (*brokerv1.CountRequest, error) {
	read, err := encodeRead(o)
	if err != nil {
		return nil, err
	}
	return &brokerv1.CountRequest{
		Database:       c.db.name,
		Collection:     c.name,
		Collation:      read.collation,
		MaxTimeMs:      read.maxTimeMs,
		Comment:        o.comment,
		ReadPreference: read.readPreference,
		ReadConcern:    read.readConcern,
	}, nil
}

func (c *Collection) count(ctx context.Context, request *brokerv1.CountRequest) (int64, error) {
	client := c.db.client
	response, err := unary(ctx, client, true, client.stub.Count, request)
	if err != nil {
		return 0, err
	}
	return response.GetCount(), nil
}

// DistinctResult is what Distinct returns: the distinct values as one BSON
// array. Decode it into a slice, as the Go driver's mongo.DistinctResult.
type DistinctResult struct {
	values bson.RawArray
	err    error
}

// Err is the error of the Distinct, nil on success.
func (r *DistinctResult) Err() error { return r.err }

// Raw is the values as a BSON array, or the error.
func (r *DistinctResult) Raw() (bson.RawArray, error) {
	if r.err != nil {
		return nil, r.err
	}
	return r.values, nil
}

// Decode unmarshals the values into v, a pointer to a slice ([]string,
// []any, []int32, ...), or returns the error.
func (r *DistinctResult) Decode(v any) error {
	if r.err != nil {
		return r.err
	}
	return bson.RawValue{Type: bson.TypeArray, Value: r.values}.Unmarshal(v)
}

// Distinct returns the distinct values of fieldName (dot notation:
// "address.city") among the documents filter matches (nil: all). The
// broker may split a large result over several messages; they are read
// whole before Distinct returns. Retried as RetryPolicy says until the
// first message arrives.
func (c *Collection) Distinct(ctx context.Context, fieldName string, filter any, opts ...DistinctOption) *DistinctResult {
	if ctx == nil {
		return &DistinctResult{err: ErrNilContext}
	}
	o := collect(opts)
	read, err := encodeRead(&o)
	if err != nil {
		return &DistinctResult{err: err}
	}
	request := &brokerv1.DistinctRequest{
		Database:       c.db.name,
		Collection:     c.name,
		Key:            fieldName,
		Collation:      read.collation,
		MaxTimeMs:      read.maxTimeMs,
		Comment:        o.comment,
		ReadPreference: read.readPreference,
		ReadConcern:    read.readConcern,
	}
	if request.Filter, err = marshalDocument("filter", filter); err != nil {
		return &DistinctResult{err: err}
	}
	client := c.db.client
	callCtx, cancel := client.callContext(ctx)
	defer cancel()
	var messages [][]byte
	attempt := func() error {
		attemptCtx, attemptCancel := context.WithCancel(callCtx)
		defer attemptCancel()
		messages = messages[:0]
		stream, err := client.stub.Distinct(attemptCtx, request)
		if err != nil {
			return fromRPC(err)
		}
		for {
			message, err := stream.Recv()
			if errors.Is(err, io.EOF) {
				return nil
			}
			if err != nil {
				if len(messages) > 0 {
					return final{fromRPC(err)}
				}
				return fromRPC(err)
			}
			messages = append(messages, message.GetValues())
		}
	}
	if err := client.retry(callCtx, attempt); err != nil {
		return &DistinctResult{err: err}
	}
	values, err := joinValues(messages)
	return &DistinctResult{values: values, err: err}
}

// joinValues concatenates the "values" arrays of a Distinct's messages.
func joinValues(messages [][]byte) (bson.RawArray, error) {
	arrays := make([]bson.RawArray, len(messages))
	for i, raw := range messages {
		value, err := bson.Raw(raw).LookupErr("values")
		if err != nil {
			return nil, fmt.Errorf("broker: a Distinct message is not a {values: [...]} document: %w", err)
		}
		array, ok := value.ArrayOK()
		if !ok {
			return nil, fmt.Errorf("broker: a Distinct message's values are a %v, not an array", value.Type)
		}
		arrays[i] = array
	}
	if len(arrays) == 1 {
		return arrays[0], nil
	}
	var all bson.A
	for _, array := range arrays {
		values, err := array.Values()
		if err != nil {
			return nil, fmt.Errorf("broker: a Distinct message's values: %w", err)
		}
		for _, value := range values {
			all = append(all, value)
		}
	}
	if all == nil {
		all = bson.A{}
	}
	raw, err := bson.Marshal(bson.D{{Key: "values", Value: all}})
	if err != nil {
		return nil, fmt.Errorf("broker: joining Distinct's values: %w", err)
	}
	return bson.Raw(raw).Lookup("values").Array(), nil
}

// Aggregate runs pipeline (broker.Pipeline, []bson.D, bson.A: one document
// per stage) and returns a cursor over its results, streamed as Find's are.
// It is retried as RetryPolicy says until the first batch arrives, unless a
// stage is $out or $merge: a pipeline that writes is never retried.
func (c *Collection) Aggregate(ctx context.Context, pipeline any, opts ...AggregateOption) (*Cursor, error) {
	if ctx == nil {
		return nil, ErrNilContext
	}
	stages, err := marshalPipeline("pipeline", pipeline)
	if err != nil {
		return nil, err
	}
	if len(stages) == 0 {
		return nil, errors.New("broker: Aggregate needs a pipeline of at least one stage")
	}
	o := collect(opts)
	if err := checkCount("BatchSize", int64(o.batchSize)); err != nil {
		return nil, err
	}
	read, err := encodeRead(&o)
	if err != nil {
		return nil, err
	}
	request := &brokerv1.AggregateRequest{
		Database:                 c.db.name,
		Collection:               c.name,
		Pipeline:                 stages,
		AllowDiskUse:             o.allowDiskUse,
		BatchSize:                o.batchSize,
		Collation:                read.collation,
		Comment:                  o.comment,
		MaxTimeMs:                read.maxTimeMs,
		ReadPreference:           read.readPreference,
		ReadConcern:              read.readConcern,
		BypassDocumentValidation: o.bypassDocumentValidation,
	}
	if request.Let, err = marshalDocument("let", o.let); err != nil {
		return nil, err
	}
	if request.WriteConcern, err = writeConcernProto(o.writeConcern); err != nil {
		return nil, err
	}
	name, keys, err := hintParts(o.hint)
	switch {
	case err != nil:
		return nil, err
	case name != "":
		request.Hint = &brokerv1.AggregateRequest_HintName{HintName: name}
	case keys != nil:
		request.Hint = &brokerv1.AggregateRequest_HintKeys{HintKeys: keys}
	}
	client := c.db.client
	return client.openCursor(ctx, !hasWriteStage(stages), func(ctx context.Context) (grpc.ServerStreamingClient[brokerv1.FindResponse], error) {
		return client.stub.Aggregate(ctx, request)
	})
}
