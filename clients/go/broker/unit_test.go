package broker

// Tests that need no broker: address forms, client-side _id, and the
// conversion of a broker status (with google.rpc details) into *Error.

import (
	"context"
	"errors"
	"testing"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
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

func mustMarshal(t *testing.T, v any) []byte {
	t.Helper()
	raw, err := bson.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}
