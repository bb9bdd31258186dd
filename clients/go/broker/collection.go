package broker

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"reflect"

	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/mongo-broker/mongo-broker/clients/go/brokerv1"
)

// ErrNoDocuments is returned by SingleResult.Decode and Err when FindOne
// matched nothing.
var ErrNoDocuments = errors.New("broker: no documents in result")

// Collection is a collection of a database configured on the broker.
type Collection struct {
	db   *Database
	name string
}

// Name is the collection's name.
func (c *Collection) Name() string { return c.name }

// Database is the database this collection belongs to.
func (c *Collection) Database() *Database { return c.db }

// InsertOneResult is what InsertOne returns.
type InsertOneResult struct {
	// InsertedID is the document's _id: the one it had, or the ObjectID
	// generated for it here.
	InsertedID any
}

// InsertManyResult is what InsertMany returns.
type InsertManyResult struct {
	// InsertedIDs are the documents' _id values, in the order given.
	InsertedIDs []any
}

// InsertOne inserts one document (bson.D, bson.M, bson.Raw or a struct).
// A document without an _id gets a new ObjectID here, before it is sent, as
// the Go driver does; so a retried insert that had already landed shows up
// as a duplicate key (IsDuplicateKey).
func (c *Collection) InsertOne(ctx context.Context, document any, opts ...InsertOption) (*InsertOneResult, error) {
	if ctx == nil {
		return nil, ErrNilContext
	}
	raw, err := marshalForInsert(document)
	if err != nil {
		return nil, err
	}
	ids, err := c.insert(ctx, [][]byte{raw}, opts)
	if err != nil {
		return nil, err
	}
	result := &InsertOneResult{}
	if len(ids) > 0 {
		result.InsertedID = ids[0]
	}
	return result, nil
}

// InsertMany inserts documents in one call. documents is a slice of any
// document type ([]bson.D, []any, []MyStruct, ...). Each document without
// an _id gets a new ObjectID here first. On error, the *Error's
// InsertedCount and FailedIndex say what happened.
func (c *Collection) InsertMany(ctx context.Context, documents any, opts ...InsertOption) (*InsertManyResult, error) {
	if ctx == nil {
		return nil, ErrNilContext
	}
	value := reflect.ValueOf(documents)
	if value.Kind() != reflect.Slice && value.Kind() != reflect.Array {
		return nil, fmt.Errorf("broker: InsertMany needs a slice of documents, not %T", documents)
	}
	if value.Len() == 0 {
		return nil, errors.New("broker: InsertMany needs at least one document")
	}
	encoded := make([][]byte, value.Len())
	for i := range encoded {
		raw, err := marshalForInsert(value.Index(i).Interface())
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", i, err)
		}
		encoded[i] = raw
	}
	ids, err := c.insert(ctx, encoded, opts)
	if err != nil {
		return nil, err
	}
	return &InsertManyResult{InsertedIDs: ids}, nil
}

func (c *Collection) insert(ctx context.Context, documents [][]byte, opts []InsertOption) ([]any, error) {
	o := insertOptions{ordered: true}
	for _, opt := range opts {
		opt(&o)
	}
	request := &brokerv1.InsertRequest{
		Database:                 c.db.name,
		Collection:               c.name,
		Documents:                documents,
		Ordered:                  &o.ordered,
		BypassDocumentValidation: o.bypassDocumentValidation,
	}
	if o.writeConcern != nil {
		wc, err := writeConcernProto(*o.writeConcern)
		if err != nil {
			return nil, err
		}
		request.WriteConcern = wc
	}
	client := c.db.client
	ctx, cancel := client.callContext(ctx)
	defer cancel()
	response, err := client.stub.Insert(ctx, request)
	if err != nil {
		return nil, fromRPC(err)
	}
	ids := make([]any, 0, len(response.GetInsertedIds()))
	for _, raw := range response.GetInsertedIds() {
		value, err := bson.Raw(raw).LookupErr("_id")
		if err != nil {
			return nil, fmt.Errorf("broker: an inserted id is not a {_id: value} document: %w", err)
		}
		var id any
		if err := value.Unmarshal(&id); err != nil {
			return nil, fmt.Errorf("broker: decoding an inserted id: %w", err)
		}
		ids = append(ids, id)
	}
	return ids, nil
}

func writeConcernProto(wc WriteConcern) (*brokerv1.WriteConcern, error) {
	out := &brokerv1.WriteConcern{J: wc.Journal, WtimeoutMs: wc.WTimeout.Milliseconds()}
	switch w := wc.W.(type) {
	case nil:
	case int:
		out.W = &brokerv1.WriteConcern_WNodes{WNodes: int32(w)}
	case int32:
		out.W = &brokerv1.WriteConcern_WNodes{WNodes: w}
	case string:
		out.W = &brokerv1.WriteConcern_WTag{WTag: w}
	default:
		return nil, fmt.Errorf("broker: WriteConcern.W must be an int or a string, not %T", wc.W)
	}
	return out, nil
}

// marshalForInsert encodes a document and, when it has no _id, puts a new
// ObjectID first, as the Go driver does.
func marshalForInsert(document any) ([]byte, error) {
	raw, err := marshalDocument("document", document)
	if err != nil {
		return nil, err
	}
	if raw == nil {
		return nil, errors.New("broker: document must not be nil")
	}
	if _, err := bson.Raw(raw).LookupErr("_id"); err == nil {
		return raw, nil
	}
	id := bson.NewObjectID()
	// int32 length | 0x07 "_id" 0x00 | 12 id bytes | the old elements and
	// the terminating 0x00.
	out := make([]byte, 4, len(raw)+17)
	out = append(out, 0x07, '_', 'i', 'd', 0x00)
	out = append(out, id[:]...)
	out = append(out, raw[4:]...)
	binary.LittleEndian.PutUint32(out, uint32(len(out)))
	return out, nil
}

// marshalDocument encodes a filter, projection, sort or document. nil gives
// nil (the contract's "empty bytes": match all, all fields, no sort).
func marshalDocument(what string, document any) ([]byte, error) {
	switch d := document.(type) {
	case nil:
		return nil, nil
	case bson.Raw:
		if err := d.Validate(); err != nil {
			return nil, fmt.Errorf("broker: %s is not valid BSON: %w", what, err)
		}
		return d, nil
	case []byte:
		if err := bson.Raw(d).Validate(); err != nil {
			return nil, fmt.Errorf("broker: %s is not valid BSON: %w", what, err)
		}
		return d, nil
	}
	if v := reflect.ValueOf(document); (v.Kind() == reflect.Map || v.Kind() == reflect.Pointer) && v.IsNil() {
		return nil, nil
	}
	raw, err := bson.Marshal(document)
	if err != nil {
		return nil, fmt.Errorf("broker: %s: %w", what, err)
	}
	return raw, nil
}

// Find returns a cursor over the matching documents. filter is a document
// (bson.D, bson.M, a struct) or nil for all. The first batch is fetched
// before Find returns, so a bad request or an unknown database fails here;
// later batches are read as Next reaches them. ctx bounds the whole stream:
// keep it alive until the cursor is done, and Close the cursor.
func (c *Collection) Find(ctx context.Context, filter any, opts ...FindOption) (*Cursor, error) {
	if ctx == nil {
		return nil, ErrNilContext
	}
	request, err := c.findRequest(filter, opts)
	if err != nil {
		return nil, err
	}
	return c.find(ctx, request)
}

func (c *Collection) find(ctx context.Context, request *brokerv1.FindRequest) (*Cursor, error) {
	client := c.db.client
	streamCtx, cancel := client.callContext(ctx)
	stream, err := client.stub.Find(streamCtx, request)
	if err != nil {
		cancel()
		return nil, fromRPC(err)
	}
	cursor := &Cursor{stream: stream, cancel: cancel}
	if !cursor.fetch(ctx) && cursor.err != nil {
		return nil, cursor.err
	}
	return cursor, nil
}

func (c *Collection) findRequest(filter any, opts []FindOption) (*brokerv1.FindRequest, error) {
	var o findOptions
	for _, opt := range opts {
		opt(&o)
	}
	for _, c := range []struct {
		name string
		n    int64
	}{{"Skip", o.skip}, {"Limit", o.limit}, {"BatchSize", int64(o.batchSize)}, {"MaxTime", int64(o.maxTime)}} {
		if err := checkCount(c.name, c.n); err != nil {
			return nil, err
		}
	}
	request := &brokerv1.FindRequest{
		Database:   c.db.name,
		Collection: c.name,
		Skip:       o.skip,
		Limit:      o.limit,
		BatchSize:  o.batchSize,
		MaxTimeMs:  o.maxTime.Milliseconds(),
		Comment:    o.comment,
	}
	var err error
	if request.Filter, err = marshalDocument("filter", filter); err != nil {
		return nil, err
	}
	if request.Projection, err = marshalDocument("projection", o.projection); err != nil {
		return nil, err
	}
	if request.Sort, err = marshalDocument("sort", o.sort); err != nil {
		return nil, err
	}
	switch hint := o.hint.(type) {
	case nil:
	case string:
		request.Hint = &brokerv1.FindRequest_HintName{HintName: hint}
	default:
		keys, err := marshalDocument("hint", hint)
		if err != nil {
			return nil, err
		}
		request.Hint = &brokerv1.FindRequest_HintKeys{HintKeys: keys}
	}
	return request, nil
}

// SingleResult is what FindOne returns: Decode it, or check Err.
type SingleResult struct {
	raw bson.Raw
	err error
}

// Err is the error of the FindOne, ErrNoDocuments when nothing matched.
func (r *SingleResult) Err() error { return r.err }

// Raw is the document's BSON, or the error.
func (r *SingleResult) Raw() (bson.Raw, error) { return r.raw, r.err }

// Decode unmarshals the document into v, or returns the error.
func (r *SingleResult) Decode(v any) error {
	if r.err != nil {
		return r.err
	}
	return bson.Unmarshal(r.raw, v)
}

// FindOne returns the first matching document. Its options are Find's;
// Limit is always 1. It is one unary call; its errors are returned as the
// broker (or gRPC) gives them.
func (c *Collection) FindOne(ctx context.Context, filter any, opts ...FindOption) *SingleResult {
	if ctx == nil {
		return &SingleResult{err: ErrNilContext}
	}
	request, err := c.findRequest(filter, append(opts, Limit(1)))
	if err != nil {
		return &SingleResult{err: err}
	}
	client := c.db.client
	ctx, cancel := client.callContext(ctx)
	defer cancel()
	response, err := client.stub.FindOne(ctx, request)
	if err != nil {
		return &SingleResult{err: fromRPC(err)}
	}
	if documents := response.GetDocuments(); len(documents) > 0 {
		return &SingleResult{raw: bson.Raw(documents[0])}
	}
	return &SingleResult{err: ErrNoDocuments}
}
