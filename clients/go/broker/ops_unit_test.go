package broker

// Unit tests of the operations beyond Find and Insert, against an in-test
// gRPC server: which request each call and option builds, what the client
// refuses before sending, how write errors are read from the ErrorInfo
// metadata, and which calls are retried.

import (
	"context"
	"errors"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/mongo-broker/mongo-broker/clients/go/brokerv1"
)

// opsServer answers every operation: with the next of its queued errors for
// the method, or else with its canned response. It keeps each method's
// last request and counts its calls.
type opsServer struct {
	findOnlyServer

	state    sync.Mutex
	requests map[string]proto.Message
	calls    map[string]int
	errs     map[string][]error

	update    *brokerv1.UpdateResponse
	deleted   int64
	modified  []byte
	count     int64
	distinct  [][]byte
	batches   [][][]byte
	bulkWrite *brokerv1.BulkWriteResponse
	// midStream, when set, ends every stream with it after one message.
	midStream error
}

func newOpsServer() *opsServer {
	return &opsServer{
		requests:  map[string]proto.Message{},
		calls:     map[string]int{},
		errs:      map[string][]error{},
		update:    &brokerv1.UpdateResponse{},
		bulkWrite: &brokerv1.BulkWriteResponse{},
	}
}

// failWith queues errors for method's next calls, one per call.
func (s *opsServer) failWith(method string, errs ...error) {
	s.state.Lock()
	defer s.state.Unlock()
	s.errs[method] = append(s.errs[method], errs...)
}

func (s *opsServer) called(method string) int {
	s.state.Lock()
	defer s.state.Unlock()
	return s.calls[method]
}

func (s *opsServer) last(method string) proto.Message {
	s.state.Lock()
	defer s.state.Unlock()
	return s.requests[method]
}

func (s *opsServer) take(method string, request proto.Message) error {
	s.state.Lock()
	defer s.state.Unlock()
	s.requests[method] = request
	s.calls[method]++
	if queued := s.errs[method]; len(queued) > 0 {
		s.errs[method] = queued[1:]
		return queued[0]
	}
	return nil
}

func (s *opsServer) Find(request *brokerv1.FindRequest, stream grpc.ServerStreamingServer[brokerv1.FindResponse]) error {
	if err := s.take("Find", request); err != nil {
		return err
	}
	return s.sendBatches(stream)
}

func (s *opsServer) FindOne(_ context.Context, request *brokerv1.FindRequest) (*brokerv1.FindResponse, error) {
	if err := s.take("FindOne", request); err != nil {
		return nil, err
	}
	return &brokerv1.FindResponse{}, nil
}

func (s *opsServer) Aggregate(request *brokerv1.AggregateRequest, stream grpc.ServerStreamingServer[brokerv1.FindResponse]) error {
	if err := s.take("Aggregate", request); err != nil {
		return err
	}
	return s.sendBatches(stream)
}

func (s *opsServer) sendBatches(stream grpc.ServerStreamingServer[brokerv1.FindResponse]) error {
	for _, batch := range s.batches {
		if err := stream.Send(&brokerv1.FindResponse{Documents: batch}); err != nil {
			return err
		}
		if s.midStream != nil {
			return s.midStream
		}
	}
	return nil
}

func (s *opsServer) Update(_ context.Context, request *brokerv1.UpdateRequest) (*brokerv1.UpdateResponse, error) {
	if err := s.take("Update", request); err != nil {
		return nil, err
	}
	return s.update, nil
}

func (s *opsServer) Delete(_ context.Context, request *brokerv1.DeleteRequest) (*brokerv1.DeleteResponse, error) {
	if err := s.take("Delete", request); err != nil {
		return nil, err
	}
	return &brokerv1.DeleteResponse{DeletedCount: s.deleted}, nil
}

func (s *opsServer) FindOneAndModify(_ context.Context, request *brokerv1.FindOneAndModifyRequest) (*brokerv1.FindOneAndModifyResponse, error) {
	if err := s.take("FindOneAndModify", request); err != nil {
		return nil, err
	}
	return &brokerv1.FindOneAndModifyResponse{Document: s.modified}, nil
}

func (s *opsServer) Count(_ context.Context, request *brokerv1.CountRequest) (*brokerv1.CountResponse, error) {
	if err := s.take("Count", request); err != nil {
		return nil, err
	}
	return &brokerv1.CountResponse{Count: s.count}, nil
}

func (s *opsServer) Distinct(request *brokerv1.DistinctRequest, stream grpc.ServerStreamingServer[brokerv1.DistinctResponse]) error {
	if err := s.take("Distinct", request); err != nil {
		return err
	}
	for _, values := range s.distinct {
		if err := stream.Send(&brokerv1.DistinctResponse{Values: values}); err != nil {
			return err
		}
		if s.midStream != nil {
			return s.midStream
		}
	}
	return nil
}

func (s *opsServer) BulkWrite(_ context.Context, request *brokerv1.BulkWriteRequest) (*brokerv1.BulkWriteResponse, error) {
	if err := s.take("BulkWrite", request); err != nil {
		return nil, err
	}
	return s.bulkWrite, nil
}

// quickRetries retries as the default does, with pauses too short to slow
// the tests.
var quickRetries = RetryPolicy{MaxAttempts: 3, InitialBackoff: time.Millisecond, MaxBackoff: 2 * time.Millisecond, Multiplier: 2}

func serveOps(t *testing.T, opts ...Option) (*opsServer, *Collection) {
	t.Helper()
	srv := newOpsServer()
	client := serveBroker(t, srv, &srv.findOnlyServer, append([]Option{WithRetryPolicy(quickRetries)}, opts...)...)
	return srv, client.Database("appdb").Collection("items")
}

// brokerError is a status as the broker sends it: code, reason, metadata.
func brokerError(t *testing.T, code codes.Code, reason brokerv1.ErrorReason, message string, metadata map[string]string) error {
	t.Helper()
	st, err := status.New(code, message).WithDetails(&errdetails.ErrorInfo{Domain: Domain, Reason: reason.String(), Metadata: metadata})
	if err != nil {
		t.Fatal(err)
	}
	return st.Err()
}

func doc(t *testing.T, v any) []byte {
	t.Helper()
	return mustMarshal(t, v)
}

func sameBSON(t *testing.T, what string, got []byte, want any) {
	t.Helper()
	if !reflect.DeepEqual(got, doc(t, want)) {
		t.Errorf("%s = %v, want %v", what, bson.Raw(got), bson.Raw(doc(t, want)))
	}
}

func TestUpdateRequestsCarryEveryOption(t *testing.T) {
	srv, coll := serveOps(t)
	ctx := context.Background()
	journal := true
	filter := bson.D{{Key: "sku", Value: "a"}}
	update := bson.D{{Key: "$set", Value: bson.D{{Key: "e.$[x].qty", Value: 1}}}}
	arrayFilter := bson.D{{Key: "x.qty", Value: bson.D{{Key: "$gt", Value: 5}}}}
	collation := bson.D{{Key: "locale", Value: "fr"}}
	let := bson.D{{Key: "v", Value: 3}}
	if _, err := coll.UpdateOne(ctx, filter, update, Upsert(true), ArrayFilters(arrayFilter), Hint("sku_1"),
		Collation(collation), Let(let), Comment("why"), BypassDocumentValidation(true), MaxTime(1500*time.Millisecond),
		WithWriteConcern(WriteConcern{W: "majority", Journal: &journal, WTimeout: 2 * time.Second})); err != nil {
		t.Fatalf("UpdateOne: %v", err)
	}
	request := srv.last("Update").(*brokerv1.UpdateRequest)
	if request.GetDatabase() != "appdb" || request.GetCollection() != "items" || request.GetMulti() || !request.GetUpsert() ||
		request.GetHintName() != "sku_1" || request.GetComment() != "why" || !request.GetBypassDocumentValidation() ||
		request.GetMaxTimeMs() != 1500 || len(request.GetArrayFilters()) != 1 || request.GetReplacement() != nil {
		t.Fatalf("UpdateOne request: %v", request)
	}
	sameBSON(t, "filter", request.GetFilter(), filter)
	sameBSON(t, "update", request.GetUpdate(), update)
	sameBSON(t, "array filter", request.GetArrayFilters()[0], arrayFilter)
	sameBSON(t, "collation", request.GetCollation(), collation)
	sameBSON(t, "let", request.GetLet(), let)
	if wc := request.GetWriteConcern(); wc.GetWTag() != "majority" || !wc.GetJ() || wc.GetWtimeoutMs() != 2000 {
		t.Errorf("write concern %v", wc)
	}

	if _, err := coll.UpdateMany(ctx, nil, update, Hint(bson.D{{Key: "sku", Value: 1}})); err != nil {
		t.Fatalf("UpdateMany: %v", err)
	}
	request = srv.last("Update").(*brokerv1.UpdateRequest)
	if !request.GetMulti() || request.GetUpsert() || request.GetFilter() != nil || request.GetWriteConcern() != nil {
		t.Fatalf("UpdateMany request: %v", request)
	}
	sameBSON(t, "hint keys", request.GetHintKeys(), bson.D{{Key: "sku", Value: 1}})

	pipeline := Pipeline{{{Key: "$set", Value: bson.D{{Key: "n", Value: "$$v"}}}}}
	if _, err := coll.UpdateOne(ctx, filter, pipeline); err != nil {
		t.Fatalf("UpdateOne with a pipeline: %v", err)
	}
	request = srv.last("Update").(*brokerv1.UpdateRequest)
	if request.GetUpdate() != nil || len(request.GetUpdatePipeline()) != 1 {
		t.Fatalf("pipeline update request: %v", request)
	}
	sameBSON(t, "pipeline stage", request.GetUpdatePipeline()[0], pipeline[0])

	replacement := bson.D{{Key: "sku", Value: "b"}, {Key: "qty", Value: 2}}
	if _, err := coll.ReplaceOne(ctx, filter, replacement, Upsert(true)); err != nil {
		t.Fatalf("ReplaceOne: %v", err)
	}
	request = srv.last("Update").(*brokerv1.UpdateRequest)
	if request.GetMulti() || !request.GetUpsert() || request.GetUpdate() != nil || request.GetUpdatePipeline() != nil {
		t.Fatalf("ReplaceOne request: %v", request)
	}
	sameBSON(t, "replacement", request.GetReplacement(), replacement)
}

func TestUpdateResultReadsTheUpsertedID(t *testing.T) {
	srv, coll := serveOps(t)
	id := bson.NewObjectID()
	srv.update = &brokerv1.UpdateResponse{MatchedCount: 0, ModifiedCount: 0, UpsertedId: doc(t, bson.D{{Key: "_id", Value: id}})}
	result, err := coll.UpdateOne(context.Background(), bson.D{{Key: "a", Value: 1}}, bson.D{{Key: "$inc", Value: bson.D{{Key: "n", Value: 1}}}}, Upsert(true))
	if err != nil {
		t.Fatal(err)
	}
	if result.UpsertedCount != 1 || result.UpsertedID != id {
		t.Fatalf("got %+v, want the upserted id %v", result, id)
	}
	srv.update = &brokerv1.UpdateResponse{MatchedCount: 3, ModifiedCount: 2}
	result, err = coll.UpdateMany(context.Background(), nil, bson.D{{Key: "$inc", Value: bson.D{{Key: "n", Value: 1}}}})
	if err != nil {
		t.Fatal(err)
	}
	if *result != (UpdateResult{MatchedCount: 3, ModifiedCount: 2}) {
		t.Fatalf("got %+v", result)
	}
}

func TestUpdatesAndReplacementsAreCheckedBeforeSending(t *testing.T) {
	srv, coll := serveOps(t)
	ctx := context.Background()
	plain := bson.D{{Key: "qty", Value: 1}}
	mixed := bson.D{{Key: "$set", Value: bson.D{{Key: "a", Value: 1}}}, {Key: "b", Value: 2}}
	operator := bson.D{{Key: "$set", Value: bson.D{{Key: "a", Value: 1}}}}
	for name, call := range map[string]func() error{
		"UpdateOne plain":  func() error { _, err := coll.UpdateOne(ctx, nil, plain); return err },
		"UpdateMany mixed": func() error { _, err := coll.UpdateMany(ctx, nil, mixed); return err },
		"UpdateOne bson.M": func() error { _, err := coll.UpdateOne(ctx, nil, bson.M{"qty": 1}); return err },
		"FindOneAndUpdate": func() error { return coll.FindOneAndUpdate(ctx, nil, plain).Err() },
		"BulkWrite UpdateOneModel": func() error {
			_, err := coll.BulkWrite(ctx, []WriteModel{NewUpdateOneModel().SetUpdate(plain)})
			return err
		},
		"BulkWrite UpdateManyModel": func() error {
			_, err := coll.BulkWrite(ctx, []WriteModel{NewInsertOneModel().SetDocument(plain), NewUpdateManyModel().SetUpdate(mixed)})
			return err
		},
	} {
		if err := call(); !errors.Is(err, ErrNonOperatorUpdate) || !strings.Contains(err.Error(), "update only works with $ operators") {
			t.Errorf("%s: got %v, want ErrNonOperatorUpdate", name, err)
		}
	}
	for name, call := range map[string]func() error{
		"ReplaceOne":        func() error { _, err := coll.ReplaceOne(ctx, nil, operator); return err },
		"FindOneAndReplace": func() error { return coll.FindOneAndReplace(ctx, nil, mixed).Err() },
		"ReplaceOneModel": func() error {
			_, err := coll.BulkWrite(ctx, []WriteModel{NewReplaceOneModel().SetReplacement(operator)})
			return err
		},
	} {
		if err := call(); !errors.Is(err, ErrOperatorReplacement) || !strings.Contains(err.Error(), "replacement can not include $ operators") {
			t.Errorf("%s: got %v, want ErrOperatorReplacement", name, err)
		}
	}
	for name, call := range map[string]func() error{
		"empty update":             func() error { _, err := coll.UpdateOne(ctx, nil, bson.D{}); return err },
		"nil update":               func() error { _, err := coll.UpdateOne(ctx, nil, nil); return err },
		"empty pipeline":           func() error { _, err := coll.UpdateOne(ctx, nil, Pipeline{}); return err },
		"replacement pipeline":     func() error { _, err := coll.ReplaceOne(ctx, nil, bson.A{operator}); return err },
		"array filters on replace": func() error { _, err := coll.ReplaceOne(ctx, nil, plain, ArrayFilters(plain)); return err },
		"upsert on delete":         func() error { return coll.FindOneAndDelete(ctx, nil, Upsert(true)).Err() },
		"after on delete":          func() error { return coll.FindOneAndDelete(ctx, nil, WithReturnDocument(After)).Err() },
		"empty hint":               func() error { _, err := coll.DeleteOne(ctx, nil, Hint("")); return err },
		"estimated with a skip":    func() error { _, err := coll.EstimatedDocumentCount(ctx, Skip(1)); return err },
		"negative limit":           func() error { _, err := coll.CountDocuments(ctx, nil, Limit(-1)); return err },
		"no models":                func() error { _, err := coll.BulkWrite(ctx, nil); return err },
		"a nil model":              func() error { _, err := coll.BulkWrite(ctx, []WriteModel{nil}); return err },
		"a document pipeline":      func() error { _, err := coll.Aggregate(ctx, bson.D{{Key: "$match", Value: bson.D{}}}); return err },
		"an empty pipeline":        func() error { _, err := coll.Aggregate(ctx, Pipeline{}); return err },
		"a bad read preference":    func() error { _, err := coll.Find(ctx, nil, WithReadPreference(ReadPreference{})); return err },
		"a bad read concern":       func() error { _, err := coll.CountDocuments(ctx, nil, WithReadConcern("most")); return err },
	} {
		if err := call(); err == nil || AsError(err) != nil {
			t.Errorf("%s: got %v, want a client-side error", name, err)
		}
	}
	if calls := srv.seen(); len(calls) != 0 {
		t.Fatalf("refused calls went out: %v", calls)
	}
}

func TestDeleteRequests(t *testing.T) {
	srv, coll := serveOps(t)
	srv.deleted = 4
	ctx := context.Background()
	filter := bson.D{{Key: "writer", Value: "go"}}
	result, err := coll.DeleteMany(ctx, filter, Hint(bson.D{{Key: "writer", Value: 1}}), Collation(bson.M{"locale": "en"}),
		Let(bson.M{"x": 1}), Comment("cleanup"), MaxTime(time.Second), WithWriteConcern(WriteConcern{W: 1}))
	if err != nil || result.DeletedCount != 4 {
		t.Fatalf("DeleteMany: %+v, %v", result, err)
	}
	request := srv.last("Delete").(*brokerv1.DeleteRequest)
	if !request.GetMulti() || request.GetComment() != "cleanup" || request.GetMaxTimeMs() != 1000 ||
		request.GetWriteConcern().GetWNodes() != 1 || request.GetLet() == nil || request.GetCollation() == nil {
		t.Fatalf("DeleteMany request: %v", request)
	}
	sameBSON(t, "filter", request.GetFilter(), filter)
	sameBSON(t, "hint keys", request.GetHintKeys(), bson.D{{Key: "writer", Value: 1}})
	if _, err := coll.DeleteOne(ctx, filter, Hint("writer_1")); err != nil {
		t.Fatal(err)
	}
	if request := srv.last("Delete").(*brokerv1.DeleteRequest); request.GetMulti() || request.GetHintName() != "writer_1" {
		t.Fatalf("DeleteOne request: %v", request)
	}
}

func TestFindOneAndModifyRequests(t *testing.T) {
	srv, coll := serveOps(t)
	ctx := context.Background()
	srv.modified = doc(t, bson.D{{Key: "_id", Value: 7}, {Key: "qty", Value: int32(3)}})
	var got struct {
		ID  int32 `bson:"_id"`
		Qty int32 `bson:"qty"`
	}
	update := bson.D{{Key: "$inc", Value: bson.D{{Key: "qty", Value: 1}}}}
	err := coll.FindOneAndUpdate(ctx, bson.D{{Key: "_id", Value: 7}}, update,
		Projection(bson.D{{Key: "qty", Value: 1}}), Sort(bson.D{{Key: "qty", Value: -1}}), Upsert(true),
		WithReturnDocument(After), ArrayFilters(bson.M{"x": 1}), Hint("qty_1"), Collation(bson.M{"locale": "fr"}),
		Let(bson.M{"v": 1}), Comment("c"), MaxTime(time.Second), BypassDocumentValidation(true)).Decode(&got)
	if err != nil || got.ID != 7 || got.Qty != 3 {
		t.Fatalf("FindOneAndUpdate: %+v, %v", got, err)
	}
	request := srv.last("FindOneAndModify").(*brokerv1.FindOneAndModifyRequest)
	if !request.GetUpsert() || request.GetReturnDocument() != brokerv1.ReturnDocument_RETURN_DOCUMENT_AFTER ||
		request.GetHintName() != "qty_1" || len(request.GetArrayFilters()) != 1 || request.GetRemove() ||
		request.GetReplacement() != nil || request.GetComment() != "c" || request.GetMaxTimeMs() != 1000 ||
		!request.GetBypassDocumentValidation() || request.GetLet() == nil || request.GetCollation() == nil {
		t.Fatalf("FindOneAndUpdate request: %v", request)
	}
	sameBSON(t, "update", request.GetUpdate(), update)
	sameBSON(t, "sort", request.GetSort(), bson.D{{Key: "qty", Value: -1}})
	sameBSON(t, "projection", request.GetProjection(), bson.D{{Key: "qty", Value: 1}})

	replacement := bson.D{{Key: "qty", Value: 0}}
	if err := coll.FindOneAndReplace(ctx, nil, replacement).Err(); err != nil {
		t.Fatal(err)
	}
	request = srv.last("FindOneAndModify").(*brokerv1.FindOneAndModifyRequest)
	if request.GetReturnDocument() != brokerv1.ReturnDocument_RETURN_DOCUMENT_BEFORE || request.GetUpdate() != nil || request.GetRemove() {
		t.Fatalf("FindOneAndReplace request: %v", request)
	}
	sameBSON(t, "replacement", request.GetReplacement(), replacement)

	srv.modified = nil
	if err := coll.FindOneAndDelete(ctx, bson.D{{Key: "qty", Value: 0}}, Sort(bson.D{{Key: "_id", Value: 1}})).Err(); !errors.Is(err, ErrNoDocuments) {
		t.Fatalf("FindOneAndDelete of nothing: got %v, want ErrNoDocuments", err)
	}
	request = srv.last("FindOneAndModify").(*brokerv1.FindOneAndModifyRequest)
	if !request.GetRemove() || request.GetUpdate() != nil || request.GetReplacement() != nil || request.GetSort() == nil {
		t.Fatalf("FindOneAndDelete request: %v", request)
	}
}

func TestReadsCarryCollationReadPreferenceAndReadConcern(t *testing.T) {
	srv, coll := serveOps(t)
	ctx := context.Background()
	rp := ReadPreference{Mode: SecondaryPreferredMode, TagSets: []any{bson.D{{Key: "dc", Value: "east"}}, bson.D{}}, MaxStaleness: 120 * time.Second}
	collation := bson.D{{Key: "locale", Value: "fr"}, {Key: "strength", Value: 2}}
	check := func(what string, c []byte, p *brokerv1.ReadPreference, level brokerv1.ReadConcernLevel) {
		t.Helper()
		sameBSON(t, what+" collation", c, collation)
		if p.GetMode() != brokerv1.ReadPreferenceMode_READ_PREFERENCE_SECONDARY_PREFERRED || p.GetMaxStalenessS() != 120 || len(p.GetTagSets()) != 2 {
			t.Errorf("%s read preference: %v", what, p)
		} else {
			sameBSON(t, what+" tag set", p.GetTagSets()[0], bson.D{{Key: "dc", Value: "east"}})
			sameBSON(t, what+" empty tag set", p.GetTagSets()[1], bson.D{})
		}
		if level != brokerv1.ReadConcernLevel_READ_CONCERN_MAJORITY {
			t.Errorf("%s read concern: %v", what, level)
		}
	}
	read := []FindOption{Collation(collation), WithReadPreference(rp), WithReadConcern(ReadConcernMajority)}
	cursor, err := coll.Find(ctx, nil, read...)
	if err != nil {
		t.Fatal(err)
	}
	_ = cursor.Close(ctx)
	find := srv.last("Find").(*brokerv1.FindRequest)
	check("Find", find.GetCollation(), find.GetReadPreference(), find.GetReadConcern())

	srv.count = 12
	n, err := coll.CountDocuments(ctx, bson.D{{Key: "a", Value: 1}}, Skip(2), Limit(20), Hint("a_1"), MaxTime(time.Second), Comment("n"),
		Collation(collation), WithReadPreference(rp), WithReadConcern(ReadConcernMajority))
	if err != nil || n != 12 {
		t.Fatalf("CountDocuments: %d, %v", n, err)
	}
	count := srv.last("Count").(*brokerv1.CountRequest)
	if count.GetSkip() != 2 || count.GetLimit() != 20 || count.GetHintName() != "a_1" || count.GetEstimated() ||
		count.GetMaxTimeMs() != 1000 || count.GetComment() != "n" {
		t.Fatalf("Count request: %v", count)
	}
	sameBSON(t, "count filter", count.GetFilter(), bson.D{{Key: "a", Value: 1}})
	check("Count", count.GetCollation(), count.GetReadPreference(), count.GetReadConcern())

	if n, err := coll.EstimatedDocumentCount(ctx, MaxTime(time.Second), WithReadConcern(ReadConcernLocal)); err != nil || n != 12 {
		t.Fatalf("EstimatedDocumentCount: %d, %v", n, err)
	}
	count = srv.last("Count").(*brokerv1.CountRequest)
	if !count.GetEstimated() || count.GetFilter() != nil || count.GetReadConcern() != brokerv1.ReadConcernLevel_READ_CONCERN_LOCAL {
		t.Fatalf("estimated Count request: %v", count)
	}

	srv.distinct = [][]byte{doc(t, bson.D{{Key: "values", Value: bson.A{"a", "b"}}})}
	if err := coll.Distinct(ctx, "sku", nil, Collation(collation), WithReadPreference(rp), WithReadConcern(ReadConcernMajority)).Err(); err != nil {
		t.Fatal(err)
	}
	distinct := srv.last("Distinct").(*brokerv1.DistinctRequest)
	check("Distinct", distinct.GetCollation(), distinct.GetReadPreference(), distinct.GetReadConcern())

	cursor, err = coll.Aggregate(ctx, Pipeline{{{Key: "$match", Value: bson.D{}}}}, Collation(collation), WithReadPreference(rp), WithReadConcern(ReadConcernMajority))
	if err != nil {
		t.Fatal(err)
	}
	_ = cursor.Close(ctx)
	aggregate := srv.last("Aggregate").(*brokerv1.AggregateRequest)
	check("Aggregate", aggregate.GetCollation(), aggregate.GetReadPreference(), aggregate.GetReadConcern())

	// Without read options, nothing is set: the database's defaults apply.
	if _, err := coll.CountDocuments(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if count := srv.last("Count").(*brokerv1.CountRequest); count.GetReadPreference() != nil || count.GetReadConcern() != 0 || count.GetCollation() != nil {
		t.Fatalf("a plain Count request has read options: %v", count)
	}
}

func TestDistinctJoinsEveryMessage(t *testing.T) {
	srv, coll := serveOps(t)
	srv.distinct = [][]byte{
		doc(t, bson.D{{Key: "values", Value: bson.A{"a", "b"}}}),
		doc(t, bson.D{{Key: "values", Value: bson.A{}}}),
		doc(t, bson.D{{Key: "values", Value: bson.A{"c"}}}),
	}
	filter := bson.D{{Key: "qty", Value: bson.D{{Key: "$gt", Value: 1}}}}
	result := coll.Distinct(context.Background(), "tags.name", filter, MaxTime(time.Second), Comment("d"))
	var values []string
	if err := result.Decode(&values); err != nil {
		t.Fatal(err)
	}
	if strings.Join(values, ",") != "a,b,c" {
		t.Fatalf("values %v, want a, b, c", values)
	}
	raw, err := result.Raw()
	if err != nil {
		t.Fatal(err)
	}
	if all, _ := raw.Values(); len(all) != 3 {
		t.Fatalf("Raw has %d values", len(all))
	}
	request := srv.last("Distinct").(*brokerv1.DistinctRequest)
	if request.GetKey() != "tags.name" || request.GetMaxTimeMs() != 1000 || request.GetComment() != "d" {
		t.Fatalf("Distinct request: %v", request)
	}
	sameBSON(t, "filter", request.GetFilter(), filter)

	srv.distinct = nil
	var none []any
	if err := coll.Distinct(context.Background(), "sku", nil).Decode(&none); err != nil || len(none) != 0 {
		t.Fatalf("Distinct of nothing: %v, %v", none, err)
	}
	srv.failWith("Distinct", brokerError(t, codes.NotFound, brokerv1.ErrorReason_UNKNOWN_DATABASE, "no such database", nil))
	if err := coll.Distinct(context.Background(), "sku", nil).Decode(&none); !IsUnknownDatabase(err) {
		t.Fatalf("a failed Distinct decodes: %v", err)
	}
}

func TestAggregateStreamsAsFind(t *testing.T) {
	srv, coll := serveOps(t)
	ctx := context.Background()
	srv.batches = [][][]byte{
		{doc(t, bson.D{{Key: "n", Value: int32(1)}}), doc(t, bson.D{{Key: "n", Value: int32(2)}})},
		{doc(t, bson.D{{Key: "n", Value: int32(3)}})},
	}
	pipeline := []bson.D{{{Key: "$match", Value: bson.D{{Key: "a", Value: 1}}}}, {{Key: "$project", Value: bson.D{{Key: "n", Value: 1}}}}}
	cursor, err := coll.Aggregate(ctx, pipeline, AllowDiskUse(true), BatchSize(2), Hint(bson.D{{Key: "a", Value: 1}}),
		Let(bson.M{"v": 1}), Comment("agg"), MaxTime(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if cursor.Batches() != 1 || cursor.RemainingBatchLength() != 2 {
		t.Fatalf("after Aggregate: %d batches, %d buffered", cursor.Batches(), cursor.RemainingBatchLength())
	}
	var all []struct {
		N int32 `bson:"n"`
	}
	if err := cursor.All(ctx, &all); err != nil || len(all) != 3 || all[2].N != 3 {
		t.Fatalf("All: %+v, %v", all, err)
	}
	request := srv.last("Aggregate").(*brokerv1.AggregateRequest)
	if !request.GetAllowDiskUse() || request.AllowDiskUse == nil || request.GetBatchSize() != 2 || request.GetComment() != "agg" ||
		request.GetMaxTimeMs() != 2000 || request.GetLet() == nil || len(request.GetPipeline()) != 2 {
		t.Fatalf("Aggregate request: %v", request)
	}
	sameBSON(t, "stage 0", request.GetPipeline()[0], pipeline[0])
	sameBSON(t, "hint keys", request.GetHintKeys(), bson.D{{Key: "a", Value: 1}})
	// bson.A of bson.M is a pipeline too; allowDiskUse unset stays unset.
	cursor, err = coll.Aggregate(ctx, bson.A{bson.M{"$match": bson.M{}}})
	if err != nil {
		t.Fatal(err)
	}
	_ = cursor.Close(ctx)
	if request := srv.last("Aggregate").(*brokerv1.AggregateRequest); request.AllowDiskUse != nil || len(request.GetPipeline()) != 1 {
		t.Fatalf("plain Aggregate request: %v", request)
	}
}

func TestBulkWriteRequestAndResult(t *testing.T) {
	srv, coll := serveOps(t)
	upserted := bson.NewObjectID()
	srv.bulkWrite = &brokerv1.BulkWriteResponse{
		InsertedCount: 2, MatchedCount: 3, ModifiedCount: 2, DeletedCount: 4, UpsertedCount: 1,
		UpsertedIds: []*brokerv1.IndexedId{{Index: 3, Id: doc(t, bson.D{{Key: "_id", Value: upserted}})}},
	}
	models := []WriteModel{
		NewInsertOneModel().SetDocument(bson.D{{Key: "sku", Value: "new"}}),
		NewInsertOneModel().SetDocument(bson.D{{Key: "_id", Value: "mine"}}),
		NewUpdateOneModel().SetFilter(bson.D{{Key: "sku", Value: "a"}}).SetUpdate(bson.D{{Key: "$set", Value: bson.D{{Key: "e.$[x]", Value: 1}}}}).
			SetUpsert(true).SetArrayFilters([]any{bson.D{{Key: "x", Value: 0}}}).SetHint("sku_1").SetCollation(bson.M{"locale": "fr"}),
		NewUpdateManyModel().SetFilter(nil).SetUpdate(Pipeline{{{Key: "$set", Value: bson.D{{Key: "n", Value: 1}}}}}).SetUpsert(true),
		NewReplaceOneModel().SetFilter(bson.D{{Key: "sku", Value: "b"}}).SetReplacement(bson.D{{Key: "sku", Value: "c"}}).
			SetHint(bson.D{{Key: "sku", Value: 1}}),
		NewDeleteOneModel().SetFilter(bson.D{{Key: "sku", Value: "d"}}).SetHint("sku_1"),
		NewDeleteManyModel().SetFilter(bson.D{{Key: "sku", Value: "e"}}).SetCollation(bson.M{"locale": "en"}),
	}
	result, err := coll.BulkWrite(context.Background(), models, Ordered(false), Comment("bulk"), Let(bson.M{"v": 1}),
		BypassDocumentValidation(true), WithWriteConcern(WriteConcern{W: "majority"}))
	if err != nil {
		t.Fatal(err)
	}
	request := srv.last("BulkWrite").(*brokerv1.BulkWriteRequest)
	if request.Ordered == nil || request.GetOrdered() || request.GetComment() != "bulk" || request.GetLet() == nil ||
		!request.GetBypassDocumentValidation() || request.GetWriteConcern().GetWTag() != "majority" || len(request.GetOperations()) != 7 {
		t.Fatalf("BulkWrite request: %v", request)
	}
	ops := request.GetOperations()
	first := bson.Raw(ops[0].GetInsertOne().GetDocument())
	madeID, ok := first.Lookup("_id").ObjectIDOK()
	if !ok {
		t.Fatalf("the insert without an _id was sent without an ObjectID: %v", first)
	}
	if id := bson.Raw(ops[1].GetInsertOne().GetDocument()).Lookup("_id").StringValue(); id != "mine" {
		t.Errorf("the insert's own _id became %q", id)
	}
	if u := ops[2].GetUpdateOne(); u == nil || !u.GetUpsert() || u.GetHintName() != "sku_1" || len(u.GetArrayFilters()) != 1 || u.GetCollation() == nil || u.GetUpdate() == nil {
		t.Errorf("update_one model: %v", ops[2])
	}
	if u := ops[3].GetUpdateMany(); u == nil || !u.GetUpsert() || len(u.GetUpdatePipeline()) != 1 || u.GetFilter() != nil {
		t.Errorf("update_many model: %v", ops[3])
	}
	if r := ops[4].GetReplaceOne(); r == nil || r.GetHintKeys() == nil || r.GetUpsert() {
		t.Errorf("replace_one model: %v", ops[4])
	} else {
		sameBSON(t, "replacement", r.GetReplacement(), bson.D{{Key: "sku", Value: "c"}})
	}
	if d := ops[5].GetDeleteOne(); d == nil || d.GetHintName() != "sku_1" {
		t.Errorf("delete_one model: %v", ops[5])
	}
	if d := ops[6].GetDeleteMany(); d == nil || d.GetCollation() == nil {
		t.Errorf("delete_many model: %v", ops[6])
	} else {
		sameBSON(t, "delete_many filter", d.GetFilter(), bson.D{{Key: "sku", Value: "e"}})
	}
	want := BulkWriteResult{InsertedCount: 2, MatchedCount: 3, ModifiedCount: 2, DeletedCount: 4, UpsertedCount: 1,
		UpsertedIDs: map[int64]any{3: upserted}, InsertedIDs: map[int64]any{0: madeID, 1: "mine"}}
	if !reflect.DeepEqual(*result, want) {
		t.Fatalf("result\n %+v\nwant %+v", *result, want)
	}
	// Ordered is the default, and said explicitly.
	if _, err := coll.BulkWrite(context.Background(), models[5:]); err != nil {
		t.Fatal(err)
	}
	if request := srv.last("BulkWrite").(*brokerv1.BulkWriteRequest); request.Ordered == nil || !request.GetOrdered() {
		t.Fatalf("default BulkWrite is not ordered: %v", request)
	}
}

func TestBulkWriteExceptionFromMetadata(t *testing.T) {
	srv, coll := serveOps(t)
	upserted := bson.NewObjectID()
	srv.failWith("BulkWrite", brokerError(t, codes.AlreadyExists, brokerv1.ErrorReason_DUPLICATE_KEY, "E11000 duplicate key error", map[string]string{
		"mongo_code": "11000", "mongo_code_name": "DuplicateKey", "failed_index": "3",
		"inserted_count": "1", "matched_count": "1", "modified_count": "1", "deleted_count": "0", "upserted_count": "1",
		"write_errors":       `[{"index": 3, "code": 11000, "codeName": "DuplicateKey", "errmsg": "E11000 duplicate key error collection: items"}]`,
		"write_errors_total": "1",
		"upserted_ids":       `[{"index": {"$numberInt": "2"}, "_id": {"$oid": "` + upserted.Hex() + `"}}]`,
	}))
	models := []WriteModel{
		NewInsertOneModel().SetDocument(bson.D{{Key: "_id", Value: 1}}),
		NewUpdateOneModel().SetFilter(bson.D{{Key: "_id", Value: 1}}).SetUpdate(bson.D{{Key: "$set", Value: bson.D{{Key: "a", Value: 1}}}}),
		NewUpdateOneModel().SetFilter(bson.D{{Key: "_id", Value: 9}}).SetUpdate(bson.D{{Key: "$set", Value: bson.D{{Key: "a", Value: 1}}}}).SetUpsert(true),
		NewInsertOneModel().SetDocument(bson.D{{Key: "_id", Value: 1}}),
		NewInsertOneModel().SetDocument(bson.D{{Key: "_id", Value: 5}}),
	}
	_, err := coll.BulkWrite(context.Background(), models)
	var bwe BulkWriteException
	if !errors.As(err, &bwe) {
		t.Fatalf("got %T %v, want a BulkWriteException", err, err)
	}
	if len(bwe.WriteErrors) != 1 || bwe.WriteErrorsTotal != 1 || bwe.WriteConcernError != nil {
		t.Fatalf("write errors %+v (total %d)", bwe.WriteErrors, bwe.WriteErrorsTotal)
	}
	we := bwe.WriteErrors[0]
	if we.Index != 3 || we.Code != 11000 || we.CodeName != "DuplicateKey" || !strings.Contains(we.Message, "E11000") || we.Request != models[3] {
		t.Fatalf("write error %+v", we)
	}
	want := BulkWriteResult{InsertedCount: 1, MatchedCount: 1, ModifiedCount: 1, UpsertedCount: 1,
		UpsertedIDs: map[int64]any{2: upserted}, InsertedIDs: map[int64]any{0: int32(1)}}
	if !reflect.DeepEqual(*bwe.PartialResult, want) {
		t.Fatalf("partial result\n %+v\nwant %+v", *bwe.PartialResult, want)
	}
	if !bwe.HasErrorCode(11000) || bwe.HasErrorCode(121) {
		t.Error("HasErrorCode disagrees with the write errors")
	}
	// The *Error is still there, with its reason, for the existing checks.
	var e *Error
	if !errors.As(err, &e) || !e.HasReason(brokerv1.ErrorReason_DUPLICATE_KEY) || !IsDuplicateKey(err) || status.Code(err) != codes.AlreadyExists {
		t.Fatalf("the *Error of %v is lost", err)
	}
	if err.Error() != e.Error() {
		t.Errorf("Error() %q, want the *Error's %q", err.Error(), e.Error())
	}
	if srv.called("BulkWrite") != 1 {
		t.Fatal("BulkWrite was sent again")
	}
}

func TestUnorderedBulkWriteExceptionKnowsWhichInsertsLanded(t *testing.T) {
	srv, coll := serveOps(t)
	srv.failWith("BulkWrite", brokerError(t, codes.AlreadyExists, brokerv1.ErrorReason_DUPLICATE_KEY, "dup", map[string]string{
		"inserted_count": "2", "failed_index": "1", "write_errors_total": "1",
		"write_errors": `[{"index": 1, "code": 11000, "codeName": "DuplicateKey", "errmsg": "dup"}]`,
	}))
	models := []WriteModel{
		NewInsertOneModel().SetDocument(bson.D{{Key: "_id", Value: "a"}}),
		NewInsertOneModel().SetDocument(bson.D{{Key: "_id", Value: "a"}}),
		NewInsertOneModel().SetDocument(bson.D{{Key: "_id", Value: "b"}}),
	}
	_, err := coll.BulkWrite(context.Background(), models, Ordered(false))
	var bwe BulkWriteException
	if !errors.As(err, &bwe) {
		t.Fatalf("got %v", err)
	}
	if want := map[int64]any{0: "a", 2: "b"}; !reflect.DeepEqual(bwe.PartialResult.InsertedIDs, want) {
		t.Fatalf("inserted ids %v, want %v", bwe.PartialResult.InsertedIDs, want)
	}
	// A cut list of write errors does not say which of the rest landed.
	srv.failWith("BulkWrite", brokerError(t, codes.AlreadyExists, brokerv1.ErrorReason_DUPLICATE_KEY, "dup", map[string]string{
		"inserted_count": "1", "write_errors_total": "2",
		"write_errors": `[{"index": 1, "code": 11000, "codeName": "DuplicateKey", "errmsg": "dup"}]`,
	}))
	_, err = coll.BulkWrite(context.Background(), models, Ordered(false))
	if !errors.As(err, &bwe) || bwe.WriteErrorsTotal != 2 || len(bwe.PartialResult.InsertedIDs) != 0 {
		t.Fatalf("cut write errors: %+v", bwe)
	}
}

func TestSingleWritesFailWithAWriteException(t *testing.T) {
	srv, coll := serveOps(t)
	ctx := context.Background()
	dup := func() error {
		return brokerError(t, codes.AlreadyExists, brokerv1.ErrorReason_DUPLICATE_KEY, "E11000 duplicate key", map[string]string{
			"mongo_code": "11000", "mongo_code_name": "DuplicateKey",
			"write_errors": `[{"index": 0, "code": 11000, "codeName": "DuplicateKey", "errmsg": "E11000 duplicate key"}]`,
		})
	}
	srv.failWith("Update", dup())
	srv.failWith("FindOneAndModify", dup())
	upsert := bson.D{{Key: "$set", Value: bson.D{{Key: "a", Value: 1}}}}
	_, updateErr := coll.UpdateOne(ctx, nil, upsert, Upsert(true))
	findErr := coll.FindOneAndUpdate(ctx, nil, upsert, Upsert(true)).Err()
	for name, err := range map[string]error{"UpdateOne": updateErr, "FindOneAndUpdate": findErr} {
		var we WriteException
		if !errors.As(err, &we) || len(we.WriteErrors) != 1 || we.WriteErrors[0].Code != 11000 || we.WriteErrors[0].Index != 0 {
			t.Errorf("%s: got %T %v, want a WriteException", name, err, err)
			continue
		}
		if !IsDuplicateKey(err) || AsError(err).Reason != "DUPLICATE_KEY" || !we.HasErrorCode(11000) {
			t.Errorf("%s: the *Error of %v is lost", name, err)
		}
	}
	srv.failWith("Delete", brokerError(t, codes.Unavailable, brokerv1.ErrorReason_DATABASE_UNAVAILABLE, "write concern", map[string]string{
		"write_concern_error": "waiting for replication timed out",
	}))
	_, err := coll.DeleteOne(ctx, nil)
	var we WriteException
	if !errors.As(err, &we) || we.WriteConcernError == nil || we.WriteConcernError.Message != "waiting for replication timed out" || len(we.WriteErrors) != 0 {
		t.Fatalf("DeleteOne with a write concern error: %T %v", err, err)
	}
	// Without a list of write errors, MongoDB's code is the one write error.
	srv.failWith("Update", brokerError(t, codes.AlreadyExists, brokerv1.ErrorReason_DUPLICATE_KEY, "E11000 duplicate key", map[string]string{
		"mongo_code": "11000", "mongo_code_name": "DuplicateKey",
	}))
	_, err = coll.ReplaceOne(ctx, nil, bson.D{}, Upsert(true))
	if !errors.As(err, &we) || len(we.WriteErrors) != 1 || we.WriteErrors[0] != (WriteError{Code: 11000, CodeName: "DuplicateKey", Message: "E11000 duplicate key"}) {
		t.Fatalf("ReplaceOne duplicate without write_errors: %T %v", err, err)
	}
	srv.failWith("Update", brokerError(t, codes.Unavailable, brokerv1.ErrorReason_DATABASE_UNAVAILABLE, "not primary", map[string]string{
		"mongo_code": "10107",
	}))
	if _, err = coll.UpdateOne(ctx, nil, upsert); errors.As(err, &we) || !IsUnavailable(err) {
		t.Fatalf("an unreachable database is not a write error: %T %v", err, err)
	}
	// An error that is not MongoDB refusing the write stays a plain *Error.
	srv.failWith("Update", brokerError(t, codes.InvalidArgument, brokerv1.ErrorReason_INVALID_REQUEST, "bad", nil))
	_, err = coll.UpdateOne(ctx, nil, upsert)
	if _, isError := err.(*Error); !isError || !IsInvalidArgument(err) {
		t.Fatalf("a refused request: %T %v, want a plain *Error", err, err)
	}
}

func TestRetryRules(t *testing.T) {
	ctx := context.Background()
	unavailable := func() error { return status.Error(codes.Unavailable, "connection refused") }
	poolExhausted := func() error {
		return brokerError(t, codes.ResourceExhausted, brokerv1.ErrorReason_POOL_EXHAUSTED, "queue full", nil)
	}
	set := bson.D{{Key: "$set", Value: bson.D{{Key: "a", Value: 1}}}}
	cases := []struct {
		name   string
		method string
		errs   []error
		calls  int
		ok     bool
		call   func(*Collection) error
	}{
		{"Count retried", "Count", []error{unavailable(), poolExhausted()}, 3, true,
			func(c *Collection) error { _, err := c.CountDocuments(ctx, nil); return err }},
		{"Count gives up after MaxAttempts", "Count", []error{unavailable(), unavailable(), unavailable(), unavailable()}, 3, false,
			func(c *Collection) error { _, err := c.CountDocuments(ctx, nil); return err }},
		{"Count not retried for a bad request", "Count", []error{status.Error(codes.InvalidArgument, "bad")}, 1, false,
			func(c *Collection) error { _, err := c.CountDocuments(ctx, nil); return err }},
		{"EstimatedDocumentCount retried", "Count", []error{unavailable()}, 2, true,
			func(c *Collection) error { _, err := c.EstimatedDocumentCount(ctx); return err }},
		{"Find retried", "Find", []error{unavailable()}, 2, true,
			func(c *Collection) error { _, err := c.Find(ctx, nil); return err }},
		{"FindOne retried", "FindOne", []error{unavailable()}, 2, true,
			func(c *Collection) error {
				if err := c.FindOne(ctx, nil).Err(); !errors.Is(err, ErrNoDocuments) {
					return err
				}
				return nil
			}},
		{"Distinct retried", "Distinct", []error{unavailable()}, 2, true,
			func(c *Collection) error { return c.Distinct(ctx, "a", nil).Err() }},
		{"Aggregate retried", "Aggregate", []error{poolExhausted()}, 2, true,
			func(c *Collection) error {
				_, err := c.Aggregate(ctx, Pipeline{{{Key: "$match", Value: bson.D{}}}})
				return err
			}},
		{"Aggregate with $out never retried", "Aggregate", []error{unavailable()}, 1, false,
			func(c *Collection) error {
				_, err := c.Aggregate(ctx, Pipeline{{{Key: "$match", Value: bson.D{}}}, {{Key: "$out", Value: "other"}}})
				return err
			}},
		{"Aggregate with $merge never retried", "Aggregate", []error{unavailable()}, 1, false,
			func(c *Collection) error {
				_, err := c.Aggregate(ctx, bson.A{bson.M{"$merge": bson.M{"into": "other"}}})
				return err
			}},
		{"UpdateOne never retried", "Update", []error{unavailable()}, 1, false,
			func(c *Collection) error { _, err := c.UpdateOne(ctx, nil, set); return err }},
		{"UpdateMany never retried", "Update", []error{poolExhausted()}, 1, false,
			func(c *Collection) error { _, err := c.UpdateMany(ctx, nil, set); return err }},
		{"ReplaceOne never retried", "Update", []error{unavailable()}, 1, false,
			func(c *Collection) error { _, err := c.ReplaceOne(ctx, nil, bson.D{}); return err }},
		{"DeleteMany never retried", "Delete", []error{unavailable()}, 1, false,
			func(c *Collection) error { _, err := c.DeleteMany(ctx, nil); return err }},
		{"FindOneAndDelete never retried", "FindOneAndModify", []error{unavailable()}, 1, false,
			func(c *Collection) error { return c.FindOneAndDelete(ctx, nil).Err() }},
		{"BulkWrite never retried", "BulkWrite", []error{unavailable()}, 1, false,
			func(c *Collection) error { _, err := c.BulkWrite(ctx, []WriteModel{NewDeleteOneModel()}); return err }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			srv, coll := serveOps(t)
			srv.modified = doc(t, bson.D{{Key: "_id", Value: 1}})
			srv.failWith(tc.method, tc.errs...)
			err := tc.call(coll)
			if got := srv.called(tc.method); got != tc.calls {
				t.Errorf("%s was called %d times, want %d (error %v)", tc.method, got, tc.calls, err)
			}
			if tc.ok && err != nil {
				t.Errorf("failed after its retries: %v", err)
			}
			if !tc.ok && err == nil {
				t.Error("succeeded, want the error")
			}
		})
	}
}

func TestStreamsAreNotRetriedAfterTheirFirstMessage(t *testing.T) {
	srv, coll := serveOps(t)
	ctx := context.Background()
	srv.batches = [][][]byte{{doc(t, bson.D{{Key: "n", Value: 1}})}, {doc(t, bson.D{{Key: "n", Value: 2}})}}
	srv.distinct = [][]byte{doc(t, bson.D{{Key: "values", Value: bson.A{1}}}), doc(t, bson.D{{Key: "values", Value: bson.A{2}}})}
	srv.midStream = status.Error(codes.Unavailable, "connection lost")
	for _, method := range []string{"Find", "Aggregate"} {
		var cursor *Cursor
		var err error
		if method == "Find" {
			cursor, err = coll.Find(ctx, nil)
		} else {
			cursor, err = coll.Aggregate(ctx, Pipeline{{{Key: "$match", Value: bson.D{}}}})
		}
		if err != nil {
			t.Fatalf("%s: %v", method, err)
		}
		n := 0
		for cursor.Next(ctx) {
			n++
		}
		if n != 1 || !IsUnavailable(cursor.Err()) || srv.called(method) != 1 {
			t.Errorf("%s: %d documents, error %v, %d calls; want 1 document, Unavailable, 1 call", method, n, cursor.Err(), srv.called(method))
		}
	}
	if err := coll.Distinct(ctx, "n", nil).Err(); !IsUnavailable(err) || srv.called("Distinct") != 1 {
		t.Errorf("Distinct: %v after %d calls; want Unavailable after 1", err, srv.called("Distinct"))
	}
}

func TestNoRetriesAndTheDeadlineStopRetrying(t *testing.T) {
	srv, coll := serveOps(t, WithRetryPolicy(NoRetries))
	srv.failWith("Count", status.Error(codes.Unavailable, "down"))
	if _, err := coll.CountDocuments(context.Background(), nil); !IsUnavailable(err) || srv.called("Count") != 1 {
		t.Fatalf("NoRetries: %v after %d calls", err, srv.called("Count"))
	}
	// A pause that would outlast the deadline (here the broker's RetryInfo)
	// is not taken: the error comes at once.
	srv, coll = serveOps(t, WithRetryPolicy(RetryPolicy{MaxAttempts: 5, Multiplier: 1}))
	pause, _ := status.New(codes.ResourceExhausted, "queue full").WithDetails(
		&errdetails.ErrorInfo{Domain: Domain, Reason: "POOL_EXHAUSTED"},
		&errdetails.RetryInfo{RetryDelay: durationpb.New(time.Hour)})
	srv.failWith("Count", pause.Err(), pause.Err())
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := coll.CountDocuments(ctx, nil)
	if !IsResourceExhausted(err) || time.Since(start) > 150*time.Millisecond || srv.called("Count") != 1 {
		t.Fatalf("got %v after %v and %d calls, want the POOL_EXHAUSTED at once", err, time.Since(start), srv.called("Count"))
	}
}

func TestRetryPolicyIsValidated(t *testing.T) {
	for _, bad := range []RetryPolicy{
		{},
		{MaxAttempts: 2, InitialBackoff: -1, MaxBackoff: 1, Multiplier: 1},
		{MaxAttempts: 2, InitialBackoff: 2, MaxBackoff: 1, Multiplier: 1},
		{MaxAttempts: 2, InitialBackoff: 1, MaxBackoff: 1, Multiplier: 0.5},
	} {
		if _, err := NewClient("127.0.0.1:1", WithRetryPolicy(bad)); err == nil {
			t.Errorf("NewClient accepted %+v", bad)
		}
	}
	for _, good := range []RetryPolicy{NoRetries, DefaultRetryPolicy} {
		client, err := NewClient("127.0.0.1:1", WithRetryPolicy(good))
		if err != nil {
			t.Errorf("NewClient refused %+v: %v", good, err)
			continue
		}
		_ = client.Close()
	}
	// Full jitter: within the cap, and at least the broker's RetryInfo.
	for retry := 1; retry < 70; retry++ {
		if pause := DefaultRetryPolicy.pause(retry, nil); pause < 0 || pause > time.Second {
			t.Fatalf("pause %v before retry %d", pause, retry)
		}
	}
	asked := &Error{RetryAfter: 3 * time.Second}
	if pause := DefaultRetryPolicy.pause(1, asked); pause != 3*time.Second {
		t.Fatalf("pause %v, want the broker's 3s", pause)
	}
}

func TestNewOperationsRefuseANilContext(t *testing.T) {
	srv, coll := serveOps(t)
	var nilCtx context.Context
	set := bson.D{{Key: "$set", Value: bson.D{{Key: "a", Value: 1}}}}
	for name, call := range map[string]func() error{
		"UpdateOne":              func() error { _, err := coll.UpdateOne(nilCtx, nil, set); return err },
		"UpdateMany":             func() error { _, err := coll.UpdateMany(nilCtx, nil, set); return err },
		"ReplaceOne":             func() error { _, err := coll.ReplaceOne(nilCtx, nil, bson.D{}); return err },
		"DeleteOne":              func() error { _, err := coll.DeleteOne(nilCtx, nil); return err },
		"DeleteMany":             func() error { _, err := coll.DeleteMany(nilCtx, nil); return err },
		"FindOneAndUpdate":       func() error { return coll.FindOneAndUpdate(nilCtx, nil, set).Err() },
		"FindOneAndReplace":      func() error { return coll.FindOneAndReplace(nilCtx, nil, bson.D{}).Err() },
		"FindOneAndDelete":       func() error { return coll.FindOneAndDelete(nilCtx, nil).Err() },
		"CountDocuments":         func() error { _, err := coll.CountDocuments(nilCtx, nil); return err },
		"EstimatedDocumentCount": func() error { _, err := coll.EstimatedDocumentCount(nilCtx); return err },
		"Distinct":               func() error { return coll.Distinct(nilCtx, "a", nil).Err() },
		"Aggregate":              func() error { _, err := coll.Aggregate(nilCtx, Pipeline{}); return err },
		"BulkWrite":              func() error { _, err := coll.BulkWrite(nilCtx, []WriteModel{NewDeleteOneModel()}); return err },
	} {
		if err := call(); !errors.Is(err, ErrNilContext) {
			t.Errorf("%s(nil context): got %v, want ErrNilContext", name, err)
		}
	}
	if calls := srv.seen(); len(calls) != 0 {
		t.Fatalf("calls %v went out with a nil context", calls)
	}
}

func TestInsertManyFailsWithABulkWriteException(t *testing.T) {
	st := brokerError(t, codes.AlreadyExists, brokerv1.ErrorReason_DUPLICATE_KEY, "dup", map[string]string{
		"inserted_count": "1", "failed_index": "1", "mongo_code": "11000",
		"write_errors": `[{"index": 1, "code": 11000, "codeName": "DuplicateKey", "errmsg": "dup"}]`,
	})
	err := insertManyException(fromRPC(st), [][]byte{doc(t, bson.D{{Key: "_id", Value: "x"}}), doc(t, bson.D{{Key: "_id", Value: "x"}})}, true)
	var bwe BulkWriteException
	if !errors.As(err, &bwe) || len(bwe.WriteErrors) != 1 || bwe.WriteErrors[0].Index != 1 {
		t.Fatalf("got %v", err)
	}
	if model, ok := bwe.WriteErrors[0].Request.(*InsertOneModel); !ok || model.Document == nil {
		t.Errorf("the failing request is %#v, want its InsertOneModel", bwe.WriteErrors[0].Request)
	}
	if !reflect.DeepEqual(bwe.PartialResult.InsertedIDs, map[int64]any{0: "x"}) || bwe.PartialResult.InsertedCount != 1 {
		t.Errorf("partial result %+v", bwe.PartialResult)
	}
	if n, ok := AsError(err).InsertedCount(); !ok || n != 1 {
		t.Errorf("the *Error's InsertedCount is %d, %v", n, ok)
	}
}
