package broker

// Retried inserts against an in-test server that can lose an answer on
// demand (store the documents, then answer UNAVAILABLE), which no real
// broker does when asked: a retry must find its own documents and never
// store one twice.

import (
	"context"
	"errors"
	"strconv"
	"testing"

	"go.mongodb.org/mongo-driver/v2/bson"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/mongo-broker/mongo-broker/clients/go/brokerv1"
)

// storeServer keeps inserted documents by _id. Its next `lose` Inserts
// store at most `storeBeforeLoss` documents and answer UNAVAILABLE, as a
// connection cut after the write would. A document with a "conflict"
// field is refused as a duplicate key (another unique index) unstored.
type storeServer struct {
	findOnlyServer
	stored          map[string]bson.Raw
	lose            int
	storeBeforeLoss int
	inserts         int
}

func newStoreServer() *storeServer { return &storeServer{stored: map[string]bson.Raw{}} }

func keyOf(raw bson.Raw) string { return raw.Lookup("_id").String() }

func (s *storeServer) Insert(_ context.Context, request *brokerv1.InsertRequest) (*brokerv1.InsertResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.inserts++
	losing := s.lose > 0
	if losing {
		s.lose--
	}
	response := &brokerv1.InsertResponse{}
	for i, document := range request.GetDocuments() {
		raw := bson.Raw(document)
		if losing && i >= s.storeBeforeLoss {
			break
		}
		_, noConflict := raw.LookupErr("conflict")
		if _, taken := s.stored[keyOf(raw)]; taken || noConflict == nil {
			st, _ := status.New(codes.AlreadyExists, "E11000 duplicate key").WithDetails(&errdetails.ErrorInfo{
				Reason: "DUPLICATE_KEY", Domain: Domain,
				Metadata: map[string]string{"mongo_code": "11000", "failed_index": strconv.Itoa(i), "inserted_count": strconv.Itoa(i)},
			})
			return nil, st.Err()
		}
		s.stored[keyOf(raw)] = raw
		id, _ := bson.Marshal(bson.D{{Key: "_id", Value: raw.Lookup("_id")}})
		response.InsertedIds = append(response.InsertedIds, id)
	}
	if losing {
		return nil, status.Error(codes.Unavailable, "connection lost")
	}
	return response, nil
}

// Find answers {_id: {$in: [...]}} from the store.
func (s *storeServer) Find(request *brokerv1.FindRequest, stream grpc.ServerStreamingServer[brokerv1.FindResponse]) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	values, _ := bson.Raw(request.GetFilter()).LookupErr("_id", "$in")
	list, _ := values.Array().Values()
	response := &brokerv1.FindResponse{}
	for _, value := range list {
		if raw, ok := s.stored[value.String()]; ok {
			response.Documents = append(response.Documents, raw)
		}
	}
	return stream.Send(response)
}

func (s *storeServer) count() (inserts, stored int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.inserts, len(s.stored)
}

func TestInsertOneWhoseAnswerWasLostFindsItsDocument(t *testing.T) {
	srv := newStoreServer()
	srv.lose, srv.storeBeforeLoss = 1, 1
	client := serveBroker(t, srv, &srv.findOnlyServer)
	result, err := client.Database("appdb").Collection("items").InsertOne(context.Background(), bson.D{{Key: "sku", Value: "a1"}})
	if err != nil {
		t.Fatalf("InsertOne: %v; want the lost answer retried and the document found", err)
	}
	if _, ok := result.InsertedID.(bson.ObjectID); !ok {
		t.Fatalf("InsertedID %v, want the ObjectID made here", result.InsertedID)
	}
	inserts, stored := srv.count()
	if inserts != 2 || stored != 1 {
		t.Fatalf("%d inserts, %d stored; want 2 attempts and the document once", inserts, stored)
	}
	if client.RetryCount() != 1 {
		t.Fatalf("RetryCount %d, want 1", client.RetryCount())
	}
	if methods := srv.seen(); len(methods) != 3 || methods[2] != "Find" {
		t.Fatalf("calls %v, want Insert, Insert, then the Find for its own id", methods)
	}
}

func TestInsertOneIsRetriedWhenNothingWasStored(t *testing.T) {
	srv := newStoreServer()
	srv.lose, srv.storeBeforeLoss = 2, 0
	client := serveBroker(t, srv, &srv.findOnlyServer)
	if _, err := client.Database("appdb").Collection("items").InsertOne(context.Background(), bson.D{{Key: "n", Value: 1}}); err != nil {
		t.Fatal(err)
	}
	if inserts, stored := srv.count(); inserts != 3 || stored != 1 {
		t.Fatalf("%d inserts, %d stored; want 3 attempts, the document once", inserts, stored)
	}
}

func TestInsertWithTheCallersIDIsSentOnce(t *testing.T) {
	srv := newStoreServer()
	srv.lose = 1
	client := serveBroker(t, srv, &srv.findOnlyServer)
	_, err := client.Database("appdb").Collection("items").InsertOne(context.Background(), bson.D{{Key: "_id", Value: "mine"}})
	if e := AsError(err); e == nil || e.Code != codes.Unavailable || e.Attempts != 1 {
		t.Fatalf("got %v, want UNAVAILABLE after one attempt: nothing tells a retry's duplicate from another's", err)
	}
	if inserts, _ := srv.count(); inserts != 1 {
		t.Fatalf("%d inserts, want 1", inserts)
	}
}

func TestInsertManyOrderedSendsTheRestAfterFindingItsFirstPart(t *testing.T) {
	srv := newStoreServer()
	srv.lose, srv.storeBeforeLoss = 1, 2
	client := serveBroker(t, srv, &srv.findOnlyServer)
	documents := []bson.D{{{Key: "n", Value: 0}}, {{Key: "n", Value: 1}}, {{Key: "n", Value: 2}}, {{Key: "n", Value: 3}}}
	result, err := client.Database("appdb").Collection("items").InsertMany(context.Background(), documents)
	if err != nil {
		t.Fatalf("InsertMany: %v", err)
	}
	if len(result.InsertedIDs) != 4 {
		t.Fatalf("ids %v, want 4", result.InsertedIDs)
	}
	if inserts, stored := srv.count(); inserts != 3 || stored != 4 {
		t.Fatalf("%d inserts, %d stored; want the lost one, the retry meeting its own first document, the rest", inserts, stored)
	}
	if client.RetryCount() != 1 {
		t.Fatalf("RetryCount %d: sending the rest is not a new attempt", client.RetryCount())
	}
}

func TestARealConflictAfterALostAnswerIsStillADuplicateKey(t *testing.T) {
	srv := newStoreServer()
	srv.lose, srv.storeBeforeLoss = 1, 1
	client := serveBroker(t, srv, &srv.findOnlyServer)
	documents := []bson.D{{{Key: "n", Value: 0}}, {{Key: "n", Value: 1}, {Key: "conflict", Value: true}}, {{Key: "n", Value: 2}}}
	_, err := client.Database("appdb").Collection("items").InsertMany(context.Background(), documents)
	var bulk BulkWriteException
	if !errors.As(err, &bulk) || !IsDuplicateKey(err) {
		t.Fatalf("got %v, want a BulkWriteException with a duplicate key", err)
	}
	e := AsError(err)
	failed, _ := e.FailedIndex()
	if inserted, _ := e.InsertedCount(); failed != 1 || inserted != 1 {
		t.Fatalf("failed index %d, inserted %d: want them in the caller's list (1, 1)", failed, inserted)
	}
	if len(bulk.WriteErrors) != 1 || bulk.WriteErrors[0].Index != 1 || len(bulk.PartialResult.InsertedIDs) != 1 {
		t.Fatalf("write errors %v, partial %v: want the conflict at index 1 after the first landed", bulk.WriteErrors, bulk.PartialResult)
	}
	if e.Attempts != 2 {
		t.Fatalf("Attempts %d, want 2", e.Attempts)
	}
}
