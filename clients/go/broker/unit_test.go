package broker

// Tests that need no broker: address forms, client-side _id, the
// conversion of a broker status (with google.rpc details) into *Error, and
// calls against an in-test gRPC server.

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/reflect/protoreflect"
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

func TestNewClientRejectsBadOptions(t *testing.T) {
	if _, err := NewClient("127.0.0.1:1", WithTimeout(0)); err == nil {
		t.Error("NewClient accepted a zero timeout")
	}
	if _, err := NewClient("127.0.0.1:1", WithMetadata("odd")); err == nil {
		t.Error("NewClient accepted an odd number of metadata strings")
	}
	if _, err := NewClient("unix://relative/path"); err == nil {
		t.Error("NewClient accepted a relative unix target")
	}
	client, err := NewClient("/run/mb/broker.sock")
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	if client.Target() != "unix:///run/mb/broker.sock" {
		t.Errorf("Target() = %q", client.Target())
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
	if !e.HasReason(brokerv1.ErrorReason_DUPLICATE_KEY) || e.HasReason(brokerv1.ErrorReason_TIMEOUT) {
		t.Errorf("HasReason disagrees with Reason %q", e.Reason)
	}
	if (*Error)(nil).HasReason(brokerv1.ErrorReason_DUPLICATE_KEY) || (&Error{}).HasReason(brokerv1.ErrorReason_ERROR_REASON_UNSPECIFIED) {
		t.Error("no error, or an error without a reason, has no reason")
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
// method in recorder, and connects a client (with opts) to it.
func serveBroker(t *testing.T, srv brokerv1.BrokerServer, recorder *findOnlyServer, opts ...Option) *Client {
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
	client, err := NewClient("unix://"+socket, append([]Option{WithTimeout(10 * time.Second)}, opts...)...)
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

// statsServer answers Stats with response, noting each request's database.
type statsServer struct {
	findOnlyServer
	response  *brokerv1.StatsResponse
	databases []string
}

func (s *statsServer) Stats(_ context.Context, request *brokerv1.StatsRequest) (*brokerv1.StatsResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.databases = append(s.databases, request.GetDatabase())
	return s.response, nil
}

// filledDatabaseStats is a DatabaseStats message with every field set, each
// to a value of its own, so that a field the conversion drops shows as zero.
func filledDatabaseStats(t *testing.T) *brokerv1.DatabaseStats {
	t.Helper()
	message := &brokerv1.DatabaseStats{}
	reflected := message.ProtoReflect()
	fields := reflected.Descriptor().Fields()
	for i := range fields.Len() {
		field := fields.Get(i)
		n := int64(i + 1)
		switch {
		case field.IsMap():
			entries := reflected.Mutable(field).Map()
			entries.Set(protoreflect.ValueOfString(string(field.Name())).MapKey(), protoreflect.ValueOfInt64(n))
		case field.Kind() == protoreflect.StringKind:
			reflected.Set(field, protoreflect.ValueOfString(string(field.Name())))
		case field.Kind() == protoreflect.BoolKind:
			reflected.Set(field, protoreflect.ValueOfBool(true))
		case field.Kind() == protoreflect.Int64Kind:
			reflected.Set(field, protoreflect.ValueOfInt64(n))
		case field.Kind() == protoreflect.DoubleKind:
			reflected.Set(field, protoreflect.ValueOfFloat64(float64(n)+0.5))
		default:
			t.Fatalf("DatabaseStats.%s is a %v: teach this test (and statsFromProto) about it", field.Name(), field.Kind())
		}
	}
	return message
}

func TestStatsResultHasEveryFieldOfTheProto(t *testing.T) {
	proto := filledDatabaseStats(t)
	response := &brokerv1.StatsResponse{
		Version: "1.2.3", UptimeS: 90.25, Databases: []*brokerv1.DatabaseStats{proto},
		Instance: "broker-0", Caller: "ipv4:10.0.0.7:53412", PeersDropped: 2,
		Peers: []*brokerv1.PeerStats{{Host: "10.0.0.7", Calls: 5, LastCallSAgo: 1.5}},
	}
	result := statsFromProto(response)
	if result.Version != "1.2.3" || result.Uptime != 90250*time.Millisecond || len(result.Databases) != 1 {
		t.Fatalf("got %+v", result)
	}
	if result.Instance != "broker-0" || result.Caller != "ipv4:10.0.0.7:53412" || result.PeersDropped != 2 ||
		len(result.Peers) != 1 || result.Peers[0] != (PeerStats{Host: "10.0.0.7", Calls: 5, LastCallAgo: 1500 * time.Millisecond}) {
		t.Fatalf("the replica's own fields: %+v", result)
	}
	// Every field of the response but databases is a field of StatsResult.
	if got, want := reflect.TypeOf(*result).NumField(), response.ProtoReflect().Descriptor().Fields().Len(); got != want {
		t.Errorf("StatsResult has %d fields for the proto's %d", got, want)
	}
	if got, want := reflect.TypeOf(PeerStats{}).NumField(), (&brokerv1.PeerStats{}).ProtoReflect().Descriptor().Fields().Len(); got != want {
		t.Errorf("PeerStats has %d fields for the proto's %d", got, want)
	}
	db := result.Databases[0]
	value := reflect.ValueOf(db)
	for i := range value.NumField() {
		if value.Field(i).IsZero() {
			t.Errorf("DatabaseStats.%s was not filled from the proto", value.Type().Field(i).Name)
		}
	}
	if got := reflect.TypeOf(db).NumField(); got != proto.ProtoReflect().Descriptor().Fields().Len() {
		t.Errorf("DatabaseStats has %d fields for the proto's %d", got, proto.ProtoReflect().Descriptor().Fields().Len())
	}
	// The proto's milliseconds are Durations, its counts int64s, by name.
	if db.WaitP50 != milliseconds(proto.GetWaitP50Ms()) || db.MeanHold != milliseconds(proto.GetMeanHoldMs()) ||
		db.ServerRTT != milliseconds(proto.GetServerRttMs()) || db.WaitMax != milliseconds(proto.GetWaitMaxMs()) {
		t.Errorf("durations: %+v", db)
	}
	if db.RPCs["rpcs"] != proto.GetRpcs()["rpcs"] || db.RPCsInFlight != proto.GetRpcsInFlight() ||
		db.Database != "database" || db.ConnectionsIdle != proto.GetConnectionsIdle() {
		t.Errorf("values: %+v", db)
	}
	// The result owns its maps.
	db.RPCs["rpcs"] = -1
	if proto.GetRpcs()["rpcs"] == -1 {
		t.Error("the result's RPCs map is the response's")
	}
	if empty := statsFromProto(&brokerv1.StatsResponse{Databases: []*brokerv1.DatabaseStats{{}}}); empty.Databases[0].RPCs == nil {
		t.Error("a database without calls has a nil RPCs map")
	}
}

func TestStatsAskForEveryDatabaseOrOne(t *testing.T) {
	srv := &statsServer{response: &brokerv1.StatsResponse{
		Version: "1.2.3",
		Databases: []*brokerv1.DatabaseStats{
			{Database: "appdb", MaxPoolSize: 10, Rpcs: map[string]int64{"FindOne": 3}},
			{Database: "other", WaitP99Ms: 1.5},
		},
	}}
	client := serveBroker(t, srv, &srv.findOnlyServer)
	ctx := context.Background()
	all, err := client.Stats(ctx)
	if err != nil {
		t.Fatalf("Stats: %v", err)
	}
	if _, err := client.Database("appdb").Stats(ctx); err != nil {
		t.Fatalf("Database.Stats: %v", err)
	}
	if srv.databases[0] != "" || srv.databases[1] != "appdb" {
		t.Fatalf("asked for %q, want every database, then appdb", srv.databases)
	}
	appdb, ok := all.Database("appdb")
	if !ok || appdb.MaxPoolSize != 10 || appdb.RPCs["FindOne"] != 3 {
		t.Fatalf("appdb: %+v, %v", appdb, ok)
	}
	if other, ok := all.Database("other"); !ok || other.WaitP99 != 1500*time.Microsecond {
		t.Fatalf("other: %+v, %v", other, ok)
	}
	if _, ok := all.Database("missing"); ok {
		t.Fatal("found a database the result does not have")
	}
}

func TestNilContextIsRefusedWithoutACall(t *testing.T) {
	srv := &findOnlyServer{}
	client := serveBroker(t, srv, srv)
	coll := client.Database("appdb").Collection("items")
	var nilCtx context.Context // a nil context.Context, as a caller's bug would pass
	calls := map[string]func() error{
		"Client.Ping":           func() error { _, err := client.Ping(nilCtx); return err },
		"Client.Stats":          func() error { _, err := client.Stats(nilCtx); return err },
		"Database.Ping":         func() error { _, err := coll.Database().Ping(nilCtx); return err },
		"Database.Stats":        func() error { _, err := coll.Database().Stats(nilCtx); return err },
		"Collection.InsertOne":  func() error { _, err := coll.InsertOne(nilCtx, bson.M{"a": 1}); return err },
		"Collection.InsertMany": func() error { _, err := coll.InsertMany(nilCtx, []bson.M{{"a": 1}}); return err },
		"Collection.Find":       func() error { _, err := coll.Find(nilCtx, nil); return err },
		"Collection.FindOne":    func() error { return coll.FindOne(nilCtx, nil).Err() },
	}
	for name, call := range calls {
		if err := call(); !errors.Is(err, ErrNilContext) {
			t.Errorf("%s(nil context): got %v, want ErrNilContext", name, err)
		}
	}
	if methods := srv.seen(); len(methods) != 0 {
		t.Fatalf("calls %v went out with a nil context", methods)
	}

	ctx := context.Background()
	open := func() *Cursor {
		t.Helper()
		cursor, err := coll.Find(ctx, nil)
		if err != nil {
			t.Fatalf("Find: %v", err)
		}
		return cursor
	}
	cursor := open()
	if cursor.Next(nilCtx) || !errors.Is(cursor.Err(), ErrNilContext) {
		t.Errorf("Cursor.Next(nil context): error %v, want ErrNilContext", cursor.Err())
	}
	var all []bson.M
	if err := open().All(nilCtx, &all); !errors.Is(err, ErrNilContext) {
		t.Errorf("Cursor.All(nil context): got %v, want ErrNilContext", err)
	}
	cursor = open()
	if err := cursor.Close(nilCtx); !errors.Is(err, ErrNilContext) {
		t.Errorf("Cursor.Close(nil context): got %v, want ErrNilContext", err)
	}
	if cursor.Next(ctx) {
		t.Error("Close with a nil context left the cursor open")
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

func TestWithRequestIDNamesANilContext(t *testing.T) {
	defer func() {
		got, _ := recover().(string)
		if !strings.Contains(got, "nil Context") || !strings.Contains(got, "WithRequestID") {
			t.Fatalf("WithRequestID(nil): panic %q, want one naming the nil context", got)
		}
	}()
	var nilCtx context.Context
	WithRequestID(nilCtx, "abc")
	t.Fatal("WithRequestID(nil) returned")
}

func TestWithRequestIDSetsTheHeader(t *testing.T) {
	md, _ := metadata.FromOutgoingContext(WithRequestID(context.Background(), "job-7"))
	if got := md.Get("x-request-id"); len(got) != 1 || got[0] != "job-7" {
		t.Fatalf("x-request-id = %v, want [job-7]", got)
	}
}
