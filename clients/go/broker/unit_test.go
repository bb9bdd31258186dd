package broker

// Tests that need no broker: address forms, client-side _id, the
// conversion of a broker status (with google.rpc details) into *Error, and
// calls against an in-test gRPC server.

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/mongo-broker/mongo-broker/clients/go/brokerv1"
)

func TestNormalizeTarget(t *testing.T) {
	cases := map[string]string{
		"unix:///run/mb/broker.sock": "unix:///run/mb/broker.sock",
		"unix:/run/mb/broker.sock":   "unix:///run/mb/broker.sock",
		"/run/mb/broker.sock":        "unix:///run/mb/broker.sock",
		"127.0.0.1:50051":            "127.0.0.1:50051",
		"dns:///localhost:50051":     "dns:///localhost:50051",
	}
	for in, want := range cases {
		got, err := normalizeTarget(in)
		if err != nil || got != want {
			t.Errorf("normalizeTarget(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "  ", "unix://relative/path"} {
		if _, err := normalizeTarget(bad); err == nil {
			t.Errorf("normalizeTarget(%q) accepted a bad target", bad)
		}
	}
}

func TestDialRejectsBadOptions(t *testing.T) {
	if _, err := Dial("127.0.0.1:1", WithTimeout(0)); err == nil {
		t.Error("Dial accepted a zero timeout")
	}
	if _, err := Dial("127.0.0.1:1", WithMetadata("odd")); err == nil {
		t.Error("Dial accepted an odd number of metadata strings")
	}
}

func TestMarshalForInsertPutsNewObjectIDFirst(t *testing.T) {
	raw, err := marshalForInsert(bson.D{{Key: "a", Value: int32(1)}, {Key: "b", Value: "x"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := bson.Raw(raw).Validate(); err != nil {
		t.Fatalf("not valid BSON: %v", err)
	}
	elems, err := bson.Raw(raw).Elements()
	if err != nil {
		t.Fatal(err)
	}
	if len(elems) != 3 || elems[0].Key() != "_id" || elems[1].Key() != "a" || elems[2].Key() != "b" {
		t.Fatalf("want _id, a, b; got %v", bson.Raw(raw))
	}
	if _, ok := elems[0].Value().ObjectIDOK(); !ok {
		t.Fatalf("_id is a %v, not an ObjectID", elems[0].Value().Type)
	}
}

func TestMarshalForInsertKeepsExistingID(t *testing.T) {
	doc := bson.M{"_id": "mine", "a": 1}
	raw, err := marshalForInsert(doc)
	if err != nil {
		t.Fatal(err)
	}
	if id := bson.Raw(raw).Lookup("_id").StringValue(); id != "mine" {
		t.Fatalf("_id changed to %q", id)
	}
	if len(bson.Raw(raw)) != len(mustMarshal(t, doc)) {
		t.Fatal("a document with an _id was changed")
	}
}

func TestMarshalRejectsNonDocuments(t *testing.T) {
	for _, bad := range []any{"a string", 42, []byte{1, 2, 3}} {
		if _, err := marshalForInsert(bad); err == nil {
			t.Errorf("marshalForInsert(%#v) accepted a non-document", bad)
		}
	}
	if raw, err := marshalDocument("filter", nil); err != nil || raw != nil {
		t.Errorf("a nil filter should be empty bytes, got %v, %v", raw, err)
	}
	var nilMap bson.M
	if raw, err := marshalDocument("filter", nilMap); err != nil || raw != nil {
		t.Errorf("a nil map filter should be empty bytes, got %v, %v", raw, err)
	}
}

func TestFromStatusReadsErrorInfoAndRetryInfo(t *testing.T) {
	st, err := status.New(codes.AlreadyExists, "E11000 duplicate key").WithDetails(
		&errdetails.ErrorInfo{Reason: "OTHER", Domain: "elsewhere"},
		&errdetails.ErrorInfo{Reason: "DUPLICATE_KEY", Domain: Domain, Metadata: map[string]string{
			"mongo_code": "11000", "mongo_code_name": "DuplicateKey", "database": "appdb",
			"inserted_count": "2", "failed_index": "2", "mongo_labels": "A, B",
		}},
		&errdetails.RetryInfo{RetryDelay: durationpb.New(250 * time.Millisecond)},
	)
	if err != nil {
		t.Fatal(err)
	}
	wrapped := errors.Join(errors.New("context"), fromRPC(st.Err()))
	e := AsError(wrapped)
	if e == nil {
		t.Fatal("errors.As found no *Error")
	}
	if e.Code != codes.AlreadyExists || e.Reason != "DUPLICATE_KEY" || e.MongoCode != 11000 {
		t.Fatalf("got %+v", e)
	}
	if n, ok := e.InsertedCount(); !ok || n != 2 {
		t.Errorf("InsertedCount = %d, %v", n, ok)
	}
	if n, ok := e.FailedIndex(); !ok || n != 2 {
		t.Errorf("FailedIndex = %d, %v", n, ok)
	}
	if e.RetryAfter != 250*time.Millisecond {
		t.Errorf("RetryAfter = %v", e.RetryAfter)
	}
	if !e.HasErrorLabel("B") || len(e.Labels()) != 2 || e.MongoCodeName() != "DuplicateKey" || e.Database() != "appdb" {
		t.Errorf("labels %v, code name %q, database %q", e.Labels(), e.MongoCodeName(), e.Database())
	}
	if len(e.Details) != 3 {
		t.Errorf("want 3 details, got %d", len(e.Details))
	}
	if !IsDuplicateKey(wrapped) || IsUnavailable(wrapped) || status.Code(e) != codes.AlreadyExists {
		t.Error("predicates disagree with the code")
	}
	if got := e.Error(); got != "broker: E11000 duplicate key (AlreadyExists, DUPLICATE_KEY)" {
		t.Errorf("Error() = %q", got)
	}
}

func TestContextErrorsMatch(t *testing.T) {
	deadline := fromRPC(status.Error(codes.DeadlineExceeded, "too slow"))
	if !errors.Is(deadline, context.DeadlineExceeded) || !IsTimeout(deadline) || errors.Is(deadline, context.Canceled) {
		t.Error("DeadlineExceeded does not match context.DeadlineExceeded")
	}
	if !errors.Is(fromRPC(status.Error(codes.Canceled, "gone")), context.Canceled) {
		t.Error("Canceled does not match context.Canceled")
	}
}

func TestIsRetryable(t *testing.T) {
	limit, _ := status.New(codes.ResourceExhausted, "too many").WithDetails(
		&errdetails.ErrorInfo{Reason: "LIMIT_EXCEEDED", Domain: Domain})
	pool, _ := status.New(codes.ResourceExhausted, "queue full").WithDetails(
		&errdetails.ErrorInfo{Reason: "POOL_EXHAUSTED", Domain: Domain})
	for err, want := range map[error]bool{
		fromRPC(status.Error(codes.Unavailable, "down")): true,
		fromRPC(pool.Err()):  true,
		fromRPC(limit.Err()): false,
		fromRPC(status.Error(codes.ResourceExhausted, "grpc: received message larger than max (5 vs. 4)")): false,
		fromRPC(status.Error(codes.InvalidArgument, "bad")):                                                false,
		nil: false,
	} {
		if got := IsRetryable(err); got != want {
			t.Errorf("IsRetryable(%v) = %v, want %v", err, got, want)
		}
	}
}

// findOnlyServer serves Find alone: gRPC itself answers its other methods
// Unimplemented, without a broker reason.
type findOnlyServer struct {
	brokerv1.UnimplementedBrokerServer

	mu      sync.Mutex
	methods []string
}

func (s *findOnlyServer) Find(request *brokerv1.FindRequest, stream grpc.ServerStreamingServer[brokerv1.FindResponse]) error {
	return stream.Send(&brokerv1.FindResponse{})
}

// seen is the methods the server was asked for so far, in order.
func (s *findOnlyServer) seen() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.methods...)
}

func (s *findOnlyServer) record(method string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.methods = append(s.methods, strings.TrimPrefix(method, "/broker.v1.Broker/"))
}

// serveBroker runs srv on a Unix socket for the test, noting each call's
// method in recorder, and connects a client to it.
func serveBroker(t *testing.T, srv brokerv1.BrokerServer, recorder *findOnlyServer) *Client {
	t.Helper()
	socket := filepath.Join(t.TempDir(), "broker.sock")
	listener, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer(
		grpc.UnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
			recorder.record(info.FullMethod)
			return handler(ctx, req)
		}),
		grpc.StreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
			recorder.record(info.FullMethod)
			return handler(srv, ss)
		}),
	)
	brokerv1.RegisterBrokerServer(server, srv)
	go func() { _ = server.Serve(listener) }()
	t.Cleanup(server.Stop)
	client, err := Dial("unix://"+socket, WithTimeout(10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	return client
}

func TestFindOneReturnsGRPCsUnimplementedWithoutAFind(t *testing.T) {
	srv := &findOnlyServer{}
	client := serveBroker(t, srv, srv)
	err := client.Database("appdb").Collection("items").FindOne(context.Background(), bson.M{"_id": 7}).Err()
	if e := AsError(err); e == nil || e.Code != codes.Unimplemented || e.Reason != "" {
		t.Fatalf("got %v, want gRPC's own Unimplemented", err)
	}
	if methods := srv.seen(); len(methods) != 1 || methods[0] != "FindOne" {
		t.Fatalf("calls %v, want FindOne alone", methods)
	}
}

// refusingServer answers FindOne with the broker's own Unimplemented: the
// database does not support the query.
type refusingServer struct {
	findOnlyServer
}

func (s *refusingServer) FindOne(context.Context, *brokerv1.FindRequest) (*brokerv1.FindResponse, error) {
	st, err := status.New(codes.Unimplemented, "the database cannot do that").WithDetails(
		&errdetails.ErrorInfo{Reason: "NOT_SUPPORTED", Domain: Domain})
	if err != nil {
		return nil, err
	}
	return nil, st.Err()
}

func TestFindOneReturnsTheBrokersErrorsAsTheyCome(t *testing.T) {
	srv := &refusingServer{}
	client := serveBroker(t, srv, &srv.findOnlyServer)
	err := client.Database("appdb").Collection("items").FindOne(context.Background(), nil).Err()
	if e := AsError(err); e == nil || e.Code != codes.Unimplemented || e.Reason != "NOT_SUPPORTED" {
		t.Fatalf("got %v, want the broker's Unimplemented NOT_SUPPORTED", err)
	}
	if methods := srv.seen(); len(methods) != 1 || methods[0] != "FindOne" {
		t.Fatalf("calls %v, want FindOne alone", methods)
	}
}

func mustMarshal(t *testing.T, v any) []byte {
	t.Helper()
	raw, err := bson.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}
