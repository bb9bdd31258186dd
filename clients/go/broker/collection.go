package broker

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"reflect"

	"go.mongodb.org/mongo-driver/v2/bson"
	"google.golang.org/grpc"

	"github.com/mongo-broker/mongo-broker/clients/go/brokerv1"
)

// ErrNoDocuments is returned by SingleResult.Decode and Err when FindOne or
// a FindOneAnd* matched nothing.
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
// the Go driver does. A document MongoDB refuses is a WriteException.
//
// Only an insert whose _id was made here is retried (see RetryPolicy): a
// retry that meets a duplicate key of that new ObjectID asks the broker
// whether it is stored, and if so the earlier attempt stored it, and the
// insert succeeded. A document with an _id of the caller's is sent once.
func (c *Collection) InsertOne(ctx context.Context, document any, opts ...InsertOption) (*InsertOneResult, error) {
	if ctx == nil {
		return nil, ErrNilContext
	}
	raw, made, err := prepareInsert(document)
	if err != nil {
		return nil, err
	}
	ids, err := c.insert(ctx, [][]byte{raw}, made, false, opts)
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
// an _id gets a new ObjectID here first. When MongoDB refuses documents,
// the error is a BulkWriteException (WriteErrors by index, PartialResult
// with the ids that landed), wrapping the *Error whose InsertedCount and
// FailedIndex say the same. It is retried as InsertOne is, only when every
// _id was made here.
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
	allMade := true
	for i := range encoded {
		raw, made, err := prepareInsert(value.Index(i).Interface())
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", i, err)
		}
		encoded[i] = raw
		allMade = allMade && made
	}
	ids, err := c.insert(ctx, encoded, allMade, true, opts)
	if err != nil {
		return nil, err
	}
	return &InsertManyResult{InsertedIDs: ids}, nil
}

// insert sends an Insert of documents; allMade says every _id was made
// here, which makes it safe to retry (see insertWithRetries).
func (c *Collection) insert(ctx context.Context, documents [][]byte, allMade, many bool, opts []InsertOption) ([]any, error) {
	o := collect(opts)
	ordered := o.ordered == nil || *o.ordered
	request := &brokerv1.InsertRequest{
		Database:                 c.db.name,
		Collection:               c.name,
		Documents:                documents,
		Ordered:                  &ordered,
		BypassDocumentValidation: o.bypassDocumentValidation,
	}
	var err error
	if request.WriteConcern, err = writeConcernProto(o.writeConcern); err != nil {
		return nil, err
	}
	client := c.db.client
	var response *brokerv1.InsertResponse
	// w=0 (which the broker refuses) would confirm nothing to check.
	if allMade && acknowledged(request.WriteConcern) {
		var ids []any
		if ids, err = idsOf(documents); err == nil {
			if err = c.insertWithRetries(ctx, request, ids); err == nil {
				return ids, nil
			}
		}
	} else {
		response, err = unary(ctx, client, false, client.stub.Insert, request)
	}
	if err != nil {
		if !many {
			return nil, asWriteException(err)
		}
		return nil, insertManyException(err, documents, ordered)
	}
	ids := make([]any, 0, len(response.GetInsertedIds()))
	for _, raw := range response.GetInsertedIds() {
		id, err := idOf(raw)
		if err != nil {
			return nil, err
		}
		ids = append(ids, id)
	}
	return ids, nil
}

// marshalForInsert encodes a document and, when it has no _id, puts a new
// ObjectID first, as the Go driver does.
func marshalForInsert(document any) ([]byte, error) {
	raw, _, err := prepareInsert(document)
	return raw, err
}

// prepareInsert is marshalForInsert, also saying whether the _id was made
// here.
func prepareInsert(document any) ([]byte, bool, error) {
	raw, err := marshalDocument("document", document)
	if err != nil {
		return nil, false, err
	}
	if raw == nil {
		return nil, false, errors.New("broker: document must not be nil")
	}
	if _, err := bson.Raw(raw).LookupErr("_id"); err == nil {
		return raw, false, nil
	}
	id := bson.NewObjectID()
	// int32 length | 0x07 "_id" 0x00 | 12 id bytes | the old elements and
	// the terminating 0x00.
	out := make([]byte, 4, len(raw)+17)
	out = append(out, 0x07, '_', 'i', 'd', 0x00)
	out = append(out, id[:]...)
	out = append(out, raw[4:]...)
	binary.LittleEndian.PutUint32(out, uint32(len(out)))
	return out, true, nil
}

// insertManyException is InsertMany's BulkWriteException: every document
// is an insert model, and has its _id (marshalForInsert made sure).
func insertManyException(err error, documents [][]byte, ordered bool) error {
	models := make([]WriteModel, len(documents))
	ids := make(map[int64]any, len(documents))
	for i, raw := range documents {
		models[i] = NewInsertOneModel().SetDocument(bson.Raw(raw))
		if id, err := idOf(raw); err == nil {
			ids[int64(i)] = id
		}
	}
	return asBulkWriteException(err, models, ids, ordered)
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
	return client.openCursor(ctx, true, func(ctx context.Context) (grpc.ServerStreamingClient[brokerv1.FindResponse], error) {
		return client.stub.Find(ctx, request)
	})
}

func (c *Collection) findRequest(filter any, opts []FindOption) (*brokerv1.FindRequest, error) {
	o := collect(opts)
	for _, c := range []struct {
		name string
		n    int64
	}{{"Skip", o.skip}, {"Limit", o.limit}, {"BatchSize", int64(o.batchSize)}} {
		if err := checkCount(c.name, c.n); err != nil {
			return nil, err
		}
	}
	read, err := encodeRead(&o)
	if err != nil {
		return nil, err
	}
	request := &brokerv1.FindRequest{
		Database:       c.db.name,
		Collection:     c.name,
		Skip:           o.skip,
		Limit:          o.limit,
		BatchSize:      o.batchSize,
		MaxTimeMs:      read.maxTimeMs,
		Comment:        o.comment,
		Collation:      read.collation,
		ReadPreference: read.readPreference,
		ReadConcern:    read.readConcern,
	}
	if request.Filter, err = marshalDocument("filter", filter); err != nil {
		return nil, err
	}
	if request.Projection, err = marshalDocument("projection", o.projection); err != nil {
		return nil, err
	}
	if request.Sort, err = marshalDocument("sort", o.sort); err != nil {
		return nil, err
	}
	name, keys, err := hintParts(o.hint)
	switch {
	case err != nil:
		return nil, err
	case name != "":
		request.Hint = &brokerv1.FindRequest_HintName{HintName: name}
	case keys != nil:
		request.Hint = &brokerv1.FindRequest_HintKeys{HintKeys: keys}
	}
	return request, nil
}

// SingleResult is what FindOne and the FindOneAnd* return: Decode it, or
// check Err.
type SingleResult struct {
	raw bson.Raw
	err error
}

// Err is the error of the call, ErrNoDocuments when nothing matched.
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
// Limit is always 1. It is one unary call (retried as RetryPolicy says);
// its errors are returned as the broker (or gRPC) gives them.
func (c *Collection) FindOne(ctx context.Context, filter any, opts ...FindOption) *SingleResult {
	if ctx == nil {
		return &SingleResult{err: ErrNilContext}
	}
	request, err := c.findRequest(filter, append(opts, FindOption(Limit(1))))
	if err != nil {
		return &SingleResult{err: err}
	}
	client := c.db.client
	response, err := unary(ctx, client, true, client.stub.FindOne, request)
	if err != nil {
		return &SingleResult{err: err}
	}
	if documents := response.GetDocuments(); len(documents) > 0 {
		return &SingleResult{raw: bson.Raw(documents[0])}
	}
	return &SingleResult{err: ErrNoDocuments}
}
