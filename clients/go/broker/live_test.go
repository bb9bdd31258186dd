package broker_test

// Integration tests against a live broker. The address comes from
// MONGO_BROKER_TARGET and the configured database name from
// MONGO_BROKER_DATABASE (default "appdb"); without MONGO_BROKER_TARGET these
// tests skip, so `go test ./...` works offline. tests/test_polyglot.py runs
// them against the pytest session's broker.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/mongo-broker/mongo-broker/clients/go/broker"
)

func liveClient(t *testing.T) (*broker.Client, string) {
	t.Helper()
	target := os.Getenv("MONGO_BROKER_TARGET")
	if target == "" {
		t.Skip("MONGO_BROKER_TARGET is not set: no live broker to test against " +
			"(tests/test_polyglot.py sets it to the pytest session's broker)")
	}
	database := os.Getenv("MONGO_BROKER_DATABASE")
	if database == "" {
		database = "appdb"
	}
	client, err := broker.NewClient(target, broker.WithTimeout(20*time.Second))
	if err != nil {
		t.Fatalf("NewClient(%q): %v", target, err)
	}
	t.Cleanup(func() { _ = client.Close() })
	return client, database
}

// liveCollection is a collection of the test's own, named after it.
func liveCollection(t *testing.T) *broker.Collection {
	t.Helper()
	client, database := liveClient(t)
	suffix := make([]byte, 4)
	_, _ = rand.Read(suffix)
	name := strings.NewReplacer("/", "_", " ", "_").Replace(t.Name())
	return client.Database(database).Collection(fmt.Sprintf("go_%s_%s", name, hex.EncodeToString(suffix)))
}

func testContext(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestLivePing(t *testing.T) {
	client, database := liveClient(t)
	ctx := testContext(t)
	result, err := client.Ping(ctx)
	if err != nil {
		t.Fatalf("Ping: %v", err)
	}
	if result.Version == "" || !result.OK() || len(result.Databases) == 0 {
		t.Fatalf("unexpected ping result %+v", result)
	}
	one, err := client.Database(database).Ping(ctx)
	if err != nil {
		t.Fatalf("Database.Ping: %v", err)
	}
	if len(one.Databases) != 1 || one.Databases[0].Database != database || !one.Databases[0].OK {
		t.Fatalf("unexpected ping result %+v", one)
	}
	if one.Databases[0].Pool.MaxPoolSize < 1 {
		t.Errorf("pool summary missing: %+v", one.Databases[0].Pool)
	}
}

func TestLiveStats(t *testing.T) {
	client, database := liveClient(t)
	ctx := testContext(t)
	if _, err := client.Ping(ctx); err != nil {
		t.Fatalf("Ping: %v", err)
	}
	all, err := client.Stats(ctx)
	if err != nil {
		t.Fatalf("Stats: %v", err)
	}
	db, ok := all.Database(database)
	if all.Version == "" || all.Uptime <= 0 || !ok {
		t.Fatalf("unexpected stats %+v", all)
	}
	if db.MaxPoolSize < 1 || db.RPCs["Ping"] < 1 || db.Operations == nil || db.ServerType == "" {
		t.Errorf("unexpected stats of %s: %+v", database, db)
	}
	one, err := client.Database(database).Stats(ctx)
	if err != nil {
		t.Fatalf("Database.Stats: %v", err)
	}
	if len(one.Databases) != 1 || one.Databases[0].Database != database {
		t.Fatalf("Database.Stats gave %+v", one)
	}
	if _, err := client.Database("no_such_database").Stats(ctx); !broker.IsUnknownDatabase(err) {
		t.Fatalf("Stats of an unknown database: got %v, want NotFound", err)
	}
}

func TestLiveInsertFindRoundTripKeepsTypes(t *testing.T) {
	coll := liveCollection(t)
	ctx := testContext(t)
	oid := bson.NewObjectID()
	when := time.Date(2024, 2, 29, 12, 34, 56, 789_000_000, time.UTC)
	doc := bson.D{
		{Key: "s", Value: "héllo"},
		{Key: "i32", Value: int32(42)},
		{Key: "i64", Value: int64(5)},
		{Key: "big", Value: int64(1) << 40},
		{Key: "dbl", Value: 3.0},
		{Key: "yes", Value: true},
		{Key: "none", Value: nil},
		{Key: "ref", Value: oid},
		{Key: "when", Value: bson.NewDateTimeFromTime(when)},
		{Key: "blob", Value: bson.Binary{Subtype: 0x80, Data: []byte{0, 1, 2, 255}}},
		{Key: "nested", Value: bson.D{{Key: "a", Value: bson.A{int32(1), "two", bson.D{{Key: "x", Value: int64(4)}}}}}},
	}
	inserted, err := coll.InsertOne(ctx, doc)
	if err != nil {
		t.Fatalf("InsertOne: %v", err)
	}
	id, ok := inserted.InsertedID.(bson.ObjectID)
	if !ok {
		t.Fatalf("InsertedID is a %T, want a client-made bson.ObjectID", inserted.InsertedID)
	}
	var got bson.D
	if err := coll.FindOne(ctx, bson.D{{Key: "_id", Value: id}}).Decode(&got); err != nil {
		t.Fatalf("FindOne: %v", err)
	}
	want := append(bson.D{{Key: "_id", Value: id}}, doc...)
	wantRaw, _ := bson.Marshal(want)
	gotRaw, _ := bson.Marshal(got)
	if !bytesEqual(wantRaw, gotRaw) {
		t.Fatalf("round trip changed the document:\nwant %v\n got %v", bson.Raw(wantRaw), bson.Raw(gotRaw))
	}
	if _, isInt32 := got[2].Value.(int32); !isInt32 {
		t.Errorf("i32 came back as %T", got[2].Value)
	}
	if _, isInt64 := got[3].Value.(int64); !isInt64 {
		t.Errorf("i64 came back as %T", got[3].Value)
	}
}

type item struct {
	ID  bson.ObjectID `bson:"_id,omitempty"`
	SKU string        `bson:"sku"`
	Qty int32         `bson:"qty"`
	Tag string        `bson:"tag,omitempty"`
}

func TestLiveFindFilterSortLimitProjectionSkip(t *testing.T) {
	coll := liveCollection(t)
	ctx := testContext(t)
	var docs []item
	for i := range 10 {
		docs = append(docs, item{SKU: fmt.Sprintf("sku-%02d", i), Qty: int32(i), Tag: "t"})
	}
	result, err := coll.InsertMany(ctx, docs)
	if err != nil {
		t.Fatalf("InsertMany: %v", err)
	}
	if len(result.InsertedIDs) != 10 {
		t.Fatalf("%d ids for 10 documents", len(result.InsertedIDs))
	}
	cursor, err := coll.Find(ctx,
		bson.D{{Key: "qty", Value: bson.D{{Key: "$gte", Value: 3}}}},
		broker.Sort(bson.D{{Key: "qty", Value: -1}}),
		broker.Skip(1),
		broker.Limit(4),
		broker.Projection(bson.D{{Key: "sku", Value: 1}, {Key: "qty", Value: 1}}),
		broker.Comment("go client test"),
	)
	if err != nil {
		t.Fatalf("Find: %v", err)
	}
	var got []item
	if err := cursor.All(ctx, &got); err != nil {
		t.Fatalf("All: %v", err)
	}
	var skus []string
	for _, it := range got {
		skus = append(skus, it.SKU)
		if it.Tag != "" || it.ID.IsZero() {
			t.Errorf("projection not applied: %+v", it)
		}
	}
	if want := "sku-08,sku-07,sku-06,sku-05"; strings.Join(skus, ",") != want {
		t.Fatalf("got %v, want %s", skus, want)
	}
	// The client-made ids are the ones stored.
	var first item
	if err := coll.FindOne(ctx, bson.D{{Key: "_id", Value: result.InsertedIDs[0]}}).Decode(&first); err != nil {
		t.Fatalf("FindOne by inserted id: %v", err)
	}
	if first.SKU != "sku-00" {
		t.Fatalf("the first inserted id found %+v", first)
	}
}

func TestLiveFindStreamsManyBatches(t *testing.T) {
	coll := liveCollection(t)
	ctx := testContext(t)
	const total = 1234
	docs := make([]bson.D, total)
	for i := range docs {
		docs[i] = bson.D{{Key: "n", Value: int32(i)}, {Key: "pad", Value: strings.Repeat("x", 100)}}
	}
	if _, err := coll.InsertMany(ctx, docs); err != nil {
		t.Fatalf("InsertMany: %v", err)
	}
	cursor, err := coll.Find(ctx, nil, broker.Sort(bson.D{{Key: "n", Value: 1}}), broker.BatchSize(100))
	if err != nil {
		t.Fatalf("Find: %v", err)
	}
	defer cursor.Close(ctx)
	// Lazy: Find read only the first message.
	if cursor.Batches() != 1 || cursor.RemainingBatchLength() != 100 {
		t.Fatalf("after Find: %d batches read, %d documents buffered; want 1 and 100",
			cursor.Batches(), cursor.RemainingBatchLength())
	}
	n := 0
	for cursor.Next(ctx) {
		var doc struct {
			N int32 `bson:"n"`
		}
		if err := cursor.Decode(&doc); err != nil {
			t.Fatal(err)
		}
		if doc.N != int32(n) {
			t.Fatalf("document %d has n=%d", n, doc.N)
		}
		n++
	}
	if err := cursor.Err(); err != nil {
		t.Fatalf("stream failed: %v", err)
	}
	if n != total {
		t.Fatalf("read %d documents, want %d", n, total)
	}
	if cursor.Batches() < total/100 {
		t.Fatalf("%d documents came in %d messages; want one per batch of 100", total, cursor.Batches())
	}
}

// TestLiveLargeDocument reads one 10 MiB document, more than grpc-go's
// default 4 MiB receive limit: a document always travels alone in one
// message (up to 16 MiB plus framing), so the client's limit decides.
func TestLiveLargeDocument(t *testing.T) {
	coll := liveCollection(t)
	ctx := testContext(t)
	big := strings.Repeat("x", 10*1024*1024)
	inserted, err := coll.InsertOne(ctx, bson.D{{Key: "big", Value: big}})
	if err != nil {
		t.Fatalf("InsertOne: %v", err)
	}
	byID := bson.D{{Key: "_id", Value: inserted.InsertedID}}
	type large struct {
		Big string `bson:"big"`
	}
	cursor, err := coll.Find(ctx, byID)
	if err != nil {
		t.Fatalf("Find: %v", err)
	}
	var found []large
	if err := cursor.All(ctx, &found); err != nil {
		t.Fatalf("Find of a 10 MiB document: %v", err)
	}
	if len(found) != 1 || found[0].Big != big {
		t.Fatalf("Find returned %d documents, or a changed one", len(found))
	}
	var one large
	if err := coll.FindOne(ctx, byID).Decode(&one); err != nil || one.Big != big {
		t.Fatalf("FindOne of a 10 MiB document: %v", err)
	}
	// With grpc-go's own default the same read fails: the option is needed.
	small, err := broker.NewClient(os.Getenv("MONGO_BROKER_TARGET"), broker.WithDialOptions(
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(4*1024*1024))))
	if err != nil {
		t.Fatal(err)
	}
	defer small.Close()
	err = small.Database(coll.Database().Name()).Collection(coll.Name()).FindOne(ctx, byID).Err()
	if broker.Code(err) != codes.ResourceExhausted {
		t.Fatalf("FindOne with a 4 MiB receive limit: got %v, want ResourceExhausted", err)
	}
}

func TestLiveCursorCloseEarlyThenClientStillWorks(t *testing.T) {
	coll := liveCollection(t)
	ctx := testContext(t)
	docs := make([]bson.D, 50)
	for i := range docs {
		docs[i] = bson.D{{Key: "n", Value: i}}
	}
	if _, err := coll.InsertMany(ctx, docs); err != nil {
		t.Fatal(err)
	}
	cursor, err := coll.Find(ctx, nil, broker.BatchSize(5))
	if err != nil {
		t.Fatal(err)
	}
	if !cursor.Next(ctx) {
		t.Fatalf("no first document: %v", cursor.Err())
	}
	if err := cursor.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if cursor.Next(ctx) {
		t.Fatal("Next after Close returned a document")
	}
	var all []bson.M
	cursor, err = coll.Find(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := cursor.All(ctx, &all); err != nil || len(all) != 50 {
		t.Fatalf("after an early close: %d documents, %v", len(all), err)
	}
}

func TestLiveFindOneNoDocuments(t *testing.T) {
	coll := liveCollection(t)
	var doc bson.M
	err := coll.FindOne(testContext(t), bson.M{"missing": true}).Decode(&doc)
	if !errors.Is(err, broker.ErrNoDocuments) {
		t.Fatalf("got %v, want ErrNoDocuments", err)
	}
}

func TestLiveFindOneIsOneUnaryCall(t *testing.T) {
	coll := liveCollection(t)
	ctx := testContext(t)
	client := coll.Database().Client()
	result, err := coll.InsertMany(ctx, []item{{SKU: "a", Qty: 1, Tag: "t"}, {SKU: "b", Qty: 2, Tag: "t"}})
	if err != nil {
		t.Fatalf("InsertMany: %v", err)
	}
	findOnes := func() int64 {
		stats, err := coll.Database().Stats(ctx)
		if err != nil || len(stats.Databases) != 1 {
			t.Fatalf("Stats: %v, %v", stats, err)
		}
		return stats.Databases[0].RPCs["FindOne"]
	}
	before := findOnes()

	var found item
	if err := coll.FindOne(ctx, bson.D{{Key: "_id", Value: result.InsertedIDs[1]}},
		broker.Projection(bson.D{{Key: "sku", Value: 1}})).Decode(&found); err != nil {
		t.Fatalf("FindOne by _id: %v", err)
	}
	if found.SKU != "b" || found.Qty != 0 || found.ID != result.InsertedIDs[1] {
		t.Fatalf("FindOne by _id found %+v", found)
	}
	// Limit is FindOne's own, whatever the options say; the sort decides
	// which document is the first.
	if err := coll.FindOne(ctx, nil, broker.Sort(bson.D{{Key: "qty", Value: -1}}), broker.Limit(5)).Decode(&found); err != nil || found.SKU != "b" {
		t.Fatalf("FindOne sorted by qty descending: %+v, %v", found, err)
	}
	err = coll.FindOne(ctx, bson.D{{Key: "_id", Value: bson.NewObjectID()}}).Err()
	if !errors.Is(err, broker.ErrNoDocuments) {
		t.Fatalf("FindOne of an unknown _id: got %v, want ErrNoDocuments", err)
	}
	// The broker counts calls by method: these went out as FindOne.
	if n := findOnes() - before; n < 3 {
		t.Fatalf("the broker counted %d FindOne calls for 3 FindOnes", n)
	}

	// Its errors are those of the other calls.
	err = client.Database("no_such_database").Collection("items").FindOne(ctx, nil).Err()
	if !broker.IsUnknownDatabase(err) || broker.Code(err) != codes.NotFound {
		t.Fatalf("FindOne on an unknown database: got %v, want NotFound", err)
	}
	expired, cancel := context.WithTimeout(ctx, time.Nanosecond)
	defer cancel()
	<-expired.Done()
	if err := coll.FindOne(expired, nil).Err(); !broker.IsTimeout(err) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("FindOne past its deadline: got %v, want DeadlineExceeded", err)
	}
}

func TestLiveDuplicateKey(t *testing.T) {
	coll := liveCollection(t)
	ctx := testContext(t)
	_, err := coll.InsertMany(ctx, []bson.D{
		{{Key: "_id", Value: 1}}, {{Key: "_id", Value: 2}}, {{Key: "_id", Value: 2}}, {{Key: "_id", Value: 3}},
	})
	if !broker.IsDuplicateKey(err) {
		t.Fatalf("got %v, want a duplicate key", err)
	}
	var e *broker.Error
	if !errors.As(err, &e) {
		t.Fatalf("%T is not a *broker.Error", err)
	}
	if e.Code != codes.AlreadyExists || status.Code(err) != codes.AlreadyExists || e.Reason != "DUPLICATE_KEY" {
		t.Fatalf("code %v, reason %q", e.Code, e.Reason)
	}
	if e.MongoCode != 11000 {
		t.Errorf("MongoCode = %d, want 11000", e.MongoCode)
	}
	if n, ok := e.InsertedCount(); !ok || n != 2 {
		t.Errorf("InsertedCount = %d, %v; want 2", n, ok)
	}
	if n, ok := e.FailedIndex(); !ok || n != 2 {
		t.Errorf("FailedIndex = %d, %v; want 2", n, ok)
	}
	// A retried insert with a client-made _id: the duplicate says it landed.
	doc := bson.D{{Key: "sku", Value: "retry"}}
	first, err := coll.InsertOne(ctx, bson.D{{Key: "_id", Value: bson.NewObjectID()}, doc[0]})
	if err != nil {
		t.Fatal(err)
	}
	_, err = coll.InsertOne(ctx, bson.D{{Key: "_id", Value: first.InsertedID}, doc[0]})
	if !broker.IsDuplicateKey(err) {
		t.Fatalf("retry of a landed insert: got %v, want a duplicate key", err)
	}
}

func TestLiveUnknownDatabase(t *testing.T) {
	client, _ := liveClient(t)
	ctx := testContext(t)
	coll := client.Database("no_such_database").Collection("items")
	_, err := coll.Find(ctx, nil)
	if !broker.IsUnknownDatabase(err) || broker.Code(err) != codes.NotFound {
		t.Fatalf("Find: got %v, want NotFound", err)
	}
	if e := broker.AsError(err); e == nil || e.Reason != "UNKNOWN_DATABASE" {
		t.Fatalf("Find: reason of %v", err)
	}
	if _, err := coll.InsertOne(ctx, bson.M{"a": 1}); broker.Code(err) != codes.NotFound {
		t.Fatalf("InsertOne: got %v, want NotFound", err)
	}
}

func TestLiveInvalidArgument(t *testing.T) {
	coll := liveCollection(t)
	// A sort direction that is neither 1 nor -1 is refused by the broker.
	_, err := coll.Find(testContext(t), nil, broker.Sort(bson.D{{Key: "a", Value: "sideways"}}))
	if !broker.IsInvalidArgument(err) {
		t.Fatalf("got %v, want InvalidArgument", err)
	}
	if e := broker.AsError(err); e == nil || e.Reason != "INVALID_REQUEST" {
		t.Fatalf("reason of %v, want INVALID_REQUEST", err)
	}
}

func TestLiveContextDeadline(t *testing.T) {
	coll := liveCollection(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Nanosecond)
	defer cancel()
	<-ctx.Done()
	_, err := coll.InsertOne(ctx, bson.M{"a": 1})
	if !broker.IsTimeout(err) || broker.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("InsertOne: got %v, want DeadlineExceeded", err)
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("errors.Is(%v, context.DeadlineExceeded) is false", err)
	}
	if _, err := coll.Find(ctx, nil); broker.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("Find: got %v, want DeadlineExceeded", err)
	}
}

func TestLiveCancelWhileReading(t *testing.T) {
	coll := liveCollection(t)
	ctx := testContext(t)
	docs := make([]bson.D, 30)
	for i := range docs {
		docs[i] = bson.D{{Key: "n", Value: i}}
	}
	if _, err := coll.InsertMany(ctx, docs); err != nil {
		t.Fatal(err)
	}
	cursor, err := coll.Find(ctx, nil, broker.BatchSize(10))
	if err != nil {
		t.Fatal(err)
	}
	defer cursor.Close(ctx)
	for range 10 {
		if !cursor.Next(ctx) {
			t.Fatalf("first batch ended early: %v", cursor.Err())
		}
	}
	done, cancel := context.WithCancel(ctx)
	cancel()
	if cursor.Next(done) {
		t.Fatal("Next with a cancelled context read another batch")
	}
	if broker.Code(cursor.Err()) != codes.Canceled || !errors.Is(cursor.Err(), context.Canceled) {
		t.Fatalf("got %v, want Canceled", cursor.Err())
	}
}

func TestLiveRequestIDAndToken(t *testing.T) {
	// A token on a broker without tokens is ignored; the request id travels.
	target := os.Getenv("MONGO_BROKER_TARGET")
	if target == "" {
		t.Skip("MONGO_BROKER_TARGET is not set")
	}
	client, err := broker.NewClient(target, broker.WithToken("a-token-the-broker-ignores"),
		broker.WithMetadata("x-client", "go-test"))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	ctx := broker.WithRequestID(testContext(t), "go-test.request-1")
	if _, err := client.Ping(ctx); err != nil {
		t.Fatalf("Ping with token and request id: %v", err)
	}
}

func TestUnavailableWhenNothingListens(t *testing.T) {
	// Needs no broker: a socket path where nothing listens.
	client, err := broker.NewClient("unix://" + filepath.Join(t.TempDir(), "nobody.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = client.Ping(ctx)
	if !broker.IsUnavailable(err) || !broker.IsRetryable(err) {
		t.Fatalf("got %v, want Unavailable", err)
	}
	if e := broker.AsError(err); e == nil || e.Reason != "" {
		t.Fatalf("a status from gRPC itself should have no reason: %#v", e)
	}
}

func bytesEqual(a, b []byte) bool { return string(a) == string(b) }
