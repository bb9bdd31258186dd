package broker_test

// Live tests of the operations beyond Find and Insert (see live_test.go
// for how they find their broker).

import (
	"errors"
	"fmt"
	"sort"
	"strings"
	"testing"

	"go.mongodb.org/mongo-driver/v2/bson"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/mongo-broker/mongo-broker/clients/go/broker"
	"github.com/mongo-broker/mongo-broker/clients/go/brokerv1"
)

// seed inserts documents {_id: i, sku: "s<i>", qty: i, tag: even|odd} for
// i in [0, n).
func seed(t *testing.T, coll *broker.Collection, n int) {
	t.Helper()
	docs := make([]bson.D, n)
	for i := range docs {
		tag := "even"
		if i%2 == 1 {
			tag = "odd"
		}
		docs[i] = bson.D{{Key: "_id", Value: int32(i)}, {Key: "sku", Value: fmt.Sprintf("s%d", i)}, {Key: "qty", Value: int32(i)}, {Key: "tag", Value: tag}}
	}
	if _, err := coll.InsertMany(testContext(t), docs); err != nil {
		t.Fatalf("seeding %d documents: %v", n, err)
	}
}

func qtyOf(t *testing.T, coll *broker.Collection, id int32) int32 {
	t.Helper()
	var got struct {
		Qty int32 `bson:"qty"`
	}
	if err := coll.FindOne(testContext(t), bson.D{{Key: "_id", Value: id}}).Decode(&got); err != nil {
		t.Fatalf("FindOne(_id %d): %v", id, err)
	}
	return got.Qty
}

func set(key string, value any) bson.D {
	return bson.D{{Key: "$set", Value: bson.D{{Key: key, Value: value}}}}
}

func TestLiveUpdateOneUpdateManyReplaceOne(t *testing.T) {
	coll := liveCollection(t)
	ctx := testContext(t)
	seed(t, coll, 6)

	one, err := coll.UpdateOne(ctx, bson.D{{Key: "tag", Value: "odd"}}, bson.D{{Key: "$inc", Value: bson.D{{Key: "qty", Value: int32(100)}}}},
		broker.Comment("go UpdateOne"))
	if err != nil {
		t.Fatalf("UpdateOne: %v", err)
	}
	if *one != (broker.UpdateResult{MatchedCount: 1, ModifiedCount: 1}) {
		t.Fatalf("UpdateOne: %+v", one)
	}
	many, err := coll.UpdateMany(ctx, bson.D{{Key: "tag", Value: "even"}}, set("seen", true))
	if err != nil {
		t.Fatalf("UpdateMany: %v", err)
	}
	if *many != (broker.UpdateResult{MatchedCount: 3, ModifiedCount: 3}) {
		t.Fatalf("UpdateMany: %+v", many)
	}
	// Setting what is already there matches but modifies nothing.
	again, err := coll.UpdateMany(ctx, bson.D{{Key: "tag", Value: "even"}}, set("seen", true))
	if err != nil || again.MatchedCount != 3 || again.ModifiedCount != 0 {
		t.Fatalf("UpdateMany again: %+v, %v", again, err)
	}
	if n, err := coll.CountDocuments(ctx, bson.D{{Key: "seen", Value: true}}); err != nil || n != 3 {
		t.Fatalf("documents seen: %d, %v", n, err)
	}

	replaced, err := coll.ReplaceOne(ctx, bson.D{{Key: "_id", Value: int32(4)}}, bson.D{{Key: "sku", Value: "new"}, {Key: "qty", Value: int32(-4)}})
	if err != nil || replaced.MatchedCount != 1 || replaced.ModifiedCount != 1 {
		t.Fatalf("ReplaceOne: %+v, %v", replaced, err)
	}
	var whole bson.M
	if err := coll.FindOne(ctx, bson.D{{Key: "_id", Value: int32(4)}}).Decode(&whole); err != nil {
		t.Fatal(err)
	}
	if len(whole) != 3 || whole["sku"] != "new" || whole["qty"] != int32(-4) {
		t.Fatalf("after ReplaceOne: %v (the replacement keeps only _id)", whole)
	}

	// An upsert inserts and says which _id; matching nothing without one
	// changes nothing.
	none, err := coll.UpdateOne(ctx, bson.D{{Key: "sku", Value: "missing"}}, set("qty", int32(1)))
	if err != nil || *none != (broker.UpdateResult{}) {
		t.Fatalf("UpdateOne of nothing: %+v, %v", none, err)
	}
	upserted, err := coll.UpdateOne(ctx, bson.D{{Key: "sku", Value: "missing"}}, set("qty", int32(7)), broker.Upsert(true))
	if err != nil {
		t.Fatalf("upsert: %v", err)
	}
	id, ok := upserted.UpsertedID.(bson.ObjectID)
	if !ok || upserted.UpsertedCount != 1 || upserted.MatchedCount != 0 {
		t.Fatalf("upsert: %+v (UpsertedID a %T)", upserted, upserted.UpsertedID)
	}
	var made struct {
		SKU string `bson:"sku"`
		Qty int32  `bson:"qty"`
	}
	if err := coll.FindOne(ctx, bson.D{{Key: "_id", Value: id}}).Decode(&made); err != nil || made.SKU != "missing" || made.Qty != 7 {
		t.Fatalf("the upserted document: %+v, %v", made, err)
	}
	replaceUpsert, err := coll.ReplaceOne(ctx, bson.D{{Key: "_id", Value: "r"}}, bson.D{{Key: "qty", Value: int32(9)}}, broker.Upsert(true))
	if err != nil || replaceUpsert.UpsertedID != "r" || replaceUpsert.UpsertedCount != 1 {
		t.Fatalf("ReplaceOne upsert: %+v, %v", replaceUpsert, err)
	}
}

func TestLiveUpsertDuplicateKeyIsAWriteException(t *testing.T) {
	coll := liveCollection(t)
	ctx := testContext(t)
	seed(t, coll, 2)
	// Nothing matches {_id: 1, sku: "other"}, so the upsert inserts _id 1,
	// which exists.
	_, err := coll.UpdateOne(ctx, bson.D{{Key: "_id", Value: int32(1)}, {Key: "sku", Value: "other"}}, set("qty", int32(5)), broker.Upsert(true))
	var we broker.WriteException
	if !errors.As(err, &we) {
		t.Fatalf("got %T %v, want a WriteException", err, err)
	}
	if len(we.WriteErrors) != 1 || we.WriteErrors[0].Code != 11000 || !we.HasErrorCode(11000) {
		t.Fatalf("write errors %+v", we.WriteErrors)
	}
	var e *broker.Error
	if !errors.As(err, &e) || e.Code != codes.AlreadyExists || !e.HasReason(brokerv1.ErrorReason_DUPLICATE_KEY) || !broker.IsDuplicateKey(err) {
		t.Fatalf("the *Error of %v: %+v", err, e)
	}
	if qtyOf(t, coll, 1) != 1 {
		t.Fatal("the failed upsert changed the document")
	}
}

func TestLiveNonOperatorUpdateIsRefused(t *testing.T) {
	coll := liveCollection(t)
	ctx := testContext(t)
	seed(t, coll, 1)
	_, err := coll.UpdateOne(ctx, nil, bson.D{{Key: "qty", Value: int32(50)}})
	if !errors.Is(err, broker.ErrNonOperatorUpdate) {
		t.Fatalf("UpdateOne with a plain document: got %v, want ErrNonOperatorUpdate", err)
	}
	_, err = coll.ReplaceOne(ctx, nil, set("qty", int32(50)))
	if !errors.Is(err, broker.ErrOperatorReplacement) {
		t.Fatalf("ReplaceOne with an operator: got %v, want ErrOperatorReplacement", err)
	}
	// The broker refuses it too, for a client that does not check.
	update, _ := bson.Marshal(bson.D{{Key: "qty", Value: int32(50)}})
	_, err = coll.Database().Client().Raw().Update(ctx, &brokerv1.UpdateRequest{
		Database: coll.Database().Name(), Collection: coll.Name(), Update: update,
	})
	if st := status.Convert(err); st.Code() != codes.InvalidArgument || reasonOf(st) != brokerv1.ErrorReason_INVALID_REQUEST.String() {
		t.Fatalf("a plain update sent raw: got %v (reason %q), want InvalidArgument INVALID_REQUEST", err, reasonOf(st))
	}
	if qtyOf(t, coll, 0) != 0 {
		t.Fatal("a refused update changed the document")
	}
}

func TestLiveDeleteOneDeleteMany(t *testing.T) {
	coll := liveCollection(t)
	ctx := testContext(t)
	seed(t, coll, 7)
	one, err := coll.DeleteOne(ctx, bson.D{{Key: "tag", Value: "odd"}}, broker.Comment("go DeleteOne"))
	if err != nil || one.DeletedCount != 1 {
		t.Fatalf("DeleteOne: %+v, %v", one, err)
	}
	many, err := coll.DeleteMany(ctx, bson.D{{Key: "tag", Value: "even"}})
	if err != nil || many.DeletedCount != 4 {
		t.Fatalf("DeleteMany: %+v, %v", many, err)
	}
	none, err := coll.DeleteMany(ctx, bson.D{{Key: "tag", Value: "even"}})
	if err != nil || none.DeletedCount != 0 {
		t.Fatalf("DeleteMany of nothing: %+v, %v", none, err)
	}
	if n, err := coll.CountDocuments(ctx, nil); err != nil || n != 2 {
		t.Fatalf("left: %d, %v; want 2", n, err)
	}
	all, err := coll.DeleteMany(ctx, nil)
	if err != nil || all.DeletedCount != 2 {
		t.Fatalf("DeleteMany(nil): %+v, %v", all, err)
	}
}

func TestLiveFindOneAndModify(t *testing.T) {
	coll := liveCollection(t)
	ctx := testContext(t)
	seed(t, coll, 4)
	type doc struct {
		ID  int32  `bson:"_id"`
		SKU string `bson:"sku"`
		Qty int32  `bson:"qty"`
	}
	// The highest qty of the odd ones, by Sort; Before is the default.
	var before doc
	err := coll.FindOneAndUpdate(ctx, bson.D{{Key: "tag", Value: "odd"}}, bson.D{{Key: "$inc", Value: bson.D{{Key: "qty", Value: int32(10)}}}},
		broker.Sort(bson.D{{Key: "qty", Value: -1}})).Decode(&before)
	if err != nil || before != (doc{ID: 3, SKU: "s3", Qty: 3}) {
		t.Fatalf("FindOneAndUpdate, before: %+v, %v", before, err)
	}
	// (No Projection here: the test server has none for findAndModify.)
	var after doc
	err = coll.FindOneAndUpdate(ctx, bson.D{{Key: "_id", Value: int32(3)}}, bson.D{{Key: "$inc", Value: bson.D{{Key: "qty", Value: int32(1)}}}},
		broker.WithReturnDocument(broker.After)).Decode(&after)
	if err != nil || after != (doc{ID: 3, SKU: "s3", Qty: 14}) {
		t.Fatalf("FindOneAndUpdate, after: %+v, %v", after, err)
	}
	var upserted doc
	err = coll.FindOneAndUpdate(ctx, bson.D{{Key: "_id", Value: int32(10)}}, set("sku", "up"), broker.Upsert(true),
		broker.WithReturnDocument(broker.After)).Decode(&upserted)
	if err != nil || upserted != (doc{ID: 10, SKU: "up"}) {
		t.Fatalf("FindOneAndUpdate upsert: %+v, %v", upserted, err)
	}
	if err := coll.FindOneAndUpdate(ctx, bson.D{{Key: "_id", Value: int32(99)}}, set("sku", "x")).Err(); !errors.Is(err, broker.ErrNoDocuments) {
		t.Fatalf("FindOneAndUpdate of nothing: got %v, want ErrNoDocuments", err)
	}

	var replacedBefore, replacedAfter doc
	if err := coll.FindOneAndReplace(ctx, bson.D{{Key: "_id", Value: int32(0)}}, bson.D{{Key: "sku", Value: "zero"}}).Decode(&replacedBefore); err != nil {
		t.Fatalf("FindOneAndReplace: %v", err)
	}
	if err := coll.FindOneAndReplace(ctx, bson.D{{Key: "_id", Value: int32(0)}}, bson.D{{Key: "sku", Value: "nil"}, {Key: "qty", Value: int32(-1)}},
		broker.WithReturnDocument(broker.After)).Decode(&replacedAfter); err != nil {
		t.Fatalf("FindOneAndReplace, after: %v", err)
	}
	if replacedBefore != (doc{ID: 0, SKU: "s0"}) || replacedAfter != (doc{ID: 0, SKU: "nil", Qty: -1}) {
		t.Fatalf("FindOneAndReplace: before %+v, after %+v", replacedBefore, replacedAfter)
	}

	var deleted doc
	if err := coll.FindOneAndDelete(ctx, bson.D{{Key: "tag", Value: "even"}}, broker.Sort(bson.D{{Key: "_id", Value: -1}})).Decode(&deleted); err != nil {
		t.Fatalf("FindOneAndDelete: %v", err)
	}
	if deleted != (doc{ID: 2, SKU: "s2", Qty: 2}) {
		t.Fatalf("FindOneAndDelete removed %+v, want _id 2", deleted)
	}
	if err := coll.FindOne(ctx, bson.D{{Key: "_id", Value: int32(2)}}).Err(); !errors.Is(err, broker.ErrNoDocuments) {
		t.Fatalf("the deleted document is still there: %v", err)
	}
	if err := coll.FindOneAndDelete(ctx, bson.D{{Key: "_id", Value: int32(2)}}).Err(); !errors.Is(err, broker.ErrNoDocuments) {
		t.Fatalf("FindOneAndDelete of nothing: got %v, want ErrNoDocuments", err)
	}
	err = coll.FindOneAndUpdate(ctx, nil, bson.D{{Key: "sku", Value: "plain"}}).Err()
	if !errors.Is(err, broker.ErrNonOperatorUpdate) {
		t.Fatalf("FindOneAndUpdate with a plain document: got %v", err)
	}
}

func TestLiveCountDocumentsAndEstimatedDocumentCount(t *testing.T) {
	coll := liveCollection(t)
	ctx := testContext(t)
	if n, err := coll.CountDocuments(ctx, nil); err != nil || n != 0 {
		t.Fatalf("CountDocuments of a new collection: %d, %v", n, err)
	}
	seed(t, coll, 9)
	for _, tc := range []struct {
		name   string
		filter any
		opts   []broker.CountOption
		want   int64
	}{
		{"all", nil, nil, 9},
		{"odd", bson.D{{Key: "tag", Value: "odd"}}, nil, 4},
		{"skip", nil, []broker.CountOption{broker.Skip(3)}, 6},
		{"limit", nil, []broker.CountOption{broker.Limit(5)}, 5},
		{"skip and limit", bson.D{{Key: "qty", Value: bson.D{{Key: "$gte", Value: 2}}}}, []broker.CountOption{broker.Skip(5), broker.Limit(5)}, 2},
		{"hint", nil, []broker.CountOption{broker.Hint("_id_"), broker.Comment("go count")}, 9},
	} {
		if n, err := coll.CountDocuments(ctx, tc.filter, tc.opts...); err != nil || n != tc.want {
			t.Errorf("CountDocuments %s: %d, %v; want %d", tc.name, n, err, tc.want)
		}
	}
	if n, err := coll.EstimatedDocumentCount(ctx); err != nil || n != 9 {
		t.Fatalf("EstimatedDocumentCount: %d, %v", n, err)
	}
	if _, err := coll.Database().Client().Database("no_such_database").Collection("c").CountDocuments(ctx, nil); !broker.IsUnknownDatabase(err) {
		t.Fatalf("CountDocuments on an unknown database: %v", err)
	}
}

func TestLiveDistinct(t *testing.T) {
	coll := liveCollection(t)
	ctx := testContext(t)
	seed(t, coll, 6)
	var tags []string
	if err := coll.Distinct(ctx, "tag", nil).Decode(&tags); err != nil {
		t.Fatalf("Distinct: %v", err)
	}
	sort.Strings(tags)
	if strings.Join(tags, ",") != "even,odd" {
		t.Fatalf("tags %v", tags)
	}
	var quantities []int32
	if err := coll.Distinct(ctx, "qty", bson.D{{Key: "tag", Value: "odd"}}, broker.Comment("go distinct")).Decode(&quantities); err != nil {
		t.Fatalf("Distinct with a filter: %v", err)
	}
	sort.Slice(quantities, func(i, j int) bool { return quantities[i] < quantities[j] })
	if fmt.Sprint(quantities) != "[1 3 5]" {
		t.Fatalf("odd quantities %v", quantities)
	}
	var none []any
	if err := coll.Distinct(ctx, "missing", nil).Decode(&none); err != nil || len(none) != 0 {
		t.Fatalf("Distinct of a missing field: %v, %v", none, err)
	}
}

func TestLiveAggregate(t *testing.T) {
	coll := liveCollection(t)
	ctx := testContext(t)
	seed(t, coll, 250)
	cursor, err := coll.Aggregate(ctx, broker.Pipeline{
		{{Key: "$match", Value: bson.D{{Key: "tag", Value: "even"}}}},
		{{Key: "$sort", Value: bson.D{{Key: "qty", Value: 1}}}},
		{{Key: "$project", Value: bson.D{{Key: "_id", Value: 0}, {Key: "qty", Value: 1}}}},
	}, broker.BatchSize(40), broker.Comment("go aggregate"))
	if err != nil {
		t.Fatalf("Aggregate: %v", err)
	}
	if cursor.Batches() != 1 || cursor.RemainingBatchLength() != 40 {
		t.Fatalf("after Aggregate: %d batches, %d buffered; want 1 and 40", cursor.Batches(), cursor.RemainingBatchLength())
	}
	var got []bson.M
	if err := cursor.All(ctx, &got); err != nil {
		t.Fatalf("All: %v", err)
	}
	if len(got) != 125 || cursor.Batches() < 4 {
		t.Fatalf("%d results in %d batches; want 125 in at least 4", len(got), cursor.Batches())
	}
	for i, d := range got {
		if len(d) != 1 || d["qty"] != int32(2*i) {
			t.Fatalf("result %d is %v", i, d)
		}
	}
	grouped, err := coll.Aggregate(ctx, bson.A{
		bson.D{{Key: "$group", Value: bson.D{{Key: "_id", Value: "$tag"}, {Key: "n", Value: bson.D{{Key: "$sum", Value: 1}}}}}},
		bson.D{{Key: "$sort", Value: bson.D{{Key: "_id", Value: 1}}}},
	})
	if err != nil {
		t.Fatalf("Aggregate $group: %v", err)
	}
	var groups []struct {
		ID string `bson:"_id"`
		N  int32  `bson:"n"`
	}
	if err := grouped.All(ctx, &groups); err != nil || len(groups) != 2 || groups[0].ID != "even" || groups[0].N != 125 || groups[1].N != 125 {
		t.Fatalf("groups %+v, %v", groups, err)
	}
	// A bad stage fails Aggregate itself, before any cursor.
	if _, err := coll.Aggregate(ctx, broker.Pipeline{{{Key: "$noSuchStage", Value: bson.D{}}}}); err == nil || broker.AsError(err) == nil {
		t.Fatalf("Aggregate with an unknown stage: got %v, want the broker's error", err)
	}
}

func TestLiveBulkWrite(t *testing.T) {
	coll := liveCollection(t)
	ctx := testContext(t)
	seed(t, coll, 4)
	models := []broker.WriteModel{
		broker.NewInsertOneModel().SetDocument(bson.D{{Key: "sku", Value: "fresh"}, {Key: "tag", Value: "new"}}),
		broker.NewInsertOneModel().SetDocument(bson.D{{Key: "_id", Value: int32(100)}, {Key: "tag", Value: "new"}}),
		// The upsert comes first of its run of updates: placed later (at 4),
		// the test server gave it the run's first index (2).
		broker.NewUpdateOneModel().SetFilter(bson.D{{Key: "_id", Value: int32(200)}}).SetUpdate(set("tag", "upserted")).SetUpsert(true),
		broker.NewUpdateOneModel().SetFilter(bson.D{{Key: "_id", Value: int32(0)}}).SetUpdate(set("qty", int32(50))),
		broker.NewUpdateManyModel().SetFilter(bson.D{{Key: "tag", Value: "odd"}}).SetUpdate(set("seen", true)),
		broker.NewReplaceOneModel().SetFilter(bson.D{{Key: "_id", Value: int32(2)}}).SetReplacement(bson.D{{Key: "sku", Value: "two"}}),
		broker.NewDeleteOneModel().SetFilter(bson.D{{Key: "_id", Value: int32(3)}}),
		broker.NewDeleteManyModel().SetFilter(bson.D{{Key: "tag", Value: "none"}}),
	}
	result, err := coll.BulkWrite(ctx, models, broker.Comment("go bulk"))
	if err != nil {
		t.Fatalf("BulkWrite: %v", err)
	}
	if result.InsertedCount != 2 || result.MatchedCount != 4 || result.ModifiedCount != 4 || result.DeletedCount != 1 || result.UpsertedCount != 1 {
		t.Fatalf("counts %+v", result)
	}
	if result.UpsertedIDs[2] != int32(200) || len(result.UpsertedIDs) != 1 {
		t.Fatalf("upserted ids %v", result.UpsertedIDs)
	}
	made, ok := result.InsertedIDs[0].(bson.ObjectID)
	if !ok || result.InsertedIDs[1] != int32(100) || len(result.InsertedIDs) != 2 {
		t.Fatalf("inserted ids %v", result.InsertedIDs)
	}
	if err := coll.FindOne(ctx, bson.D{{Key: "_id", Value: made}}).Err(); err != nil {
		t.Fatalf("the client-made _id of the insert: %v", err)
	}
	if qtyOf(t, coll, 0) != 50 {
		t.Fatal("the update_one did not land")
	}
	if n, err := coll.CountDocuments(ctx, nil); err != nil || n != 6 {
		t.Fatalf("documents after the bulk write: %d, %v; want 6", n, err)
	}
}

func TestLiveOrderedBulkWriteStopsAtTheFailure(t *testing.T) {
	coll := liveCollection(t)
	ctx := testContext(t)
	seed(t, coll, 1)
	models := []broker.WriteModel{
		broker.NewInsertOneModel().SetDocument(bson.D{{Key: "_id", Value: int32(10)}}),
		broker.NewUpdateOneModel().SetFilter(bson.D{{Key: "_id", Value: int32(0)}}).SetUpdate(set("qty", int32(5))),
		broker.NewInsertOneModel().SetDocument(bson.D{{Key: "_id", Value: int32(11)}}),
		broker.NewInsertOneModel().SetDocument(bson.D{{Key: "_id", Value: int32(10)}}), // the duplicate
		broker.NewInsertOneModel().SetDocument(bson.D{{Key: "_id", Value: int32(12)}}),
		broker.NewDeleteOneModel().SetFilter(bson.D{{Key: "_id", Value: int32(0)}}),
	}
	_, err := coll.BulkWrite(ctx, models)
	var bwe broker.BulkWriteException
	if !errors.As(err, &bwe) {
		t.Fatalf("got %T %v, want a BulkWriteException", err, err)
	}
	if len(bwe.WriteErrors) != 1 || bwe.WriteErrorsTotal != 1 {
		t.Fatalf("write errors %+v (total %d)", bwe.WriteErrors, bwe.WriteErrorsTotal)
	}
	we := bwe.WriteErrors[0]
	if we.Index != 3 || we.Code != 11000 || we.Request != models[3] {
		t.Fatalf("write error %+v, want index 3, code 11000", we)
	}
	partial := bwe.PartialResult
	if partial.InsertedCount != 2 || partial.MatchedCount != 1 || partial.ModifiedCount != 1 || partial.DeletedCount != 0 {
		t.Fatalf("partial result %+v", partial)
	}
	if len(partial.InsertedIDs) != 2 || partial.InsertedIDs[0] != int32(10) || partial.InsertedIDs[2] != int32(11) {
		t.Fatalf("inserted ids %v, want 0: 10 and 2: 11", partial.InsertedIDs)
	}
	if !broker.IsDuplicateKey(err) || broker.Code(err) != codes.AlreadyExists {
		t.Fatalf("the *Error of %v", err)
	}
	if n, ok := broker.AsError(err).FailedIndex(); !ok || n != 3 {
		t.Errorf("FailedIndex = %d, %v; want 3", n, ok)
	}
	// What came after the failure did not run.
	if n, err := coll.CountDocuments(ctx, nil); err != nil || n != 3 {
		t.Fatalf("documents: %d, %v; want 3 (0, 10, 11)", n, err)
	}

	// Unordered, everything but the duplicate runs.
	_, err = coll.BulkWrite(ctx, []broker.WriteModel{
		broker.NewInsertOneModel().SetDocument(bson.D{{Key: "_id", Value: int32(11)}}),
		broker.NewInsertOneModel().SetDocument(bson.D{{Key: "_id", Value: int32(20)}}),
		broker.NewDeleteOneModel().SetFilter(bson.D{{Key: "_id", Value: int32(0)}}),
	}, broker.Ordered(false))
	if !errors.As(err, &bwe) || len(bwe.WriteErrors) != 1 || bwe.WriteErrors[0].Index != 0 {
		t.Fatalf("unordered: %v", err)
	}
	if bwe.PartialResult.InsertedCount != 1 || bwe.PartialResult.DeletedCount != 1 || bwe.PartialResult.InsertedIDs[1] != int32(20) {
		t.Fatalf("unordered partial result %+v", bwe.PartialResult)
	}
}

func TestLiveInsertManyDuplicateIsABulkWriteException(t *testing.T) {
	coll := liveCollection(t)
	_, err := coll.InsertMany(testContext(t), []bson.D{{{Key: "_id", Value: "a"}}, {{Key: "_id", Value: "b"}}, {{Key: "_id", Value: "a"}}})
	var bwe broker.BulkWriteException
	if !errors.As(err, &bwe) || len(bwe.WriteErrors) != 1 || bwe.WriteErrors[0].Index != 2 || bwe.WriteErrors[0].Code != 11000 {
		t.Fatalf("got %T %v, want a BulkWriteException at index 2", err, err)
	}
	if bwe.PartialResult.InsertedCount != 2 || len(bwe.PartialResult.InsertedIDs) != 2 {
		t.Fatalf("partial result %+v", bwe.PartialResult)
	}
	_, err = coll.InsertOne(testContext(t), bson.D{{Key: "_id", Value: "a"}})
	var we broker.WriteException
	if !errors.As(err, &we) || len(we.WriteErrors) != 1 || we.WriteErrors[0].Code != 11000 {
		t.Fatalf("InsertOne duplicate: got %T %v, want a WriteException", err, err)
	}
}

func TestLiveReadOptions(t *testing.T) {
	coll := liveCollection(t)
	ctx := testContext(t)
	seed(t, coll, 3)
	// A single server is every read preference's primary.
	rp := broker.WithReadPreference(broker.ReadPreference{Mode: broker.PrimaryPreferredMode})
	cursor, err := coll.Find(ctx, nil, rp)
	if err != nil {
		t.Fatalf("Find with a read preference: %v", err)
	}
	var all []bson.M
	if err := cursor.All(ctx, &all); err != nil || len(all) != 3 {
		t.Fatalf("Find with a read preference: %d, %v", len(all), err)
	}
	if n, err := coll.CountDocuments(ctx, nil, rp, broker.WithReadConcern(broker.ReadConcernLocal)); err != nil || n != 3 {
		t.Fatalf("CountDocuments with read options: %d, %v", n, err)
	}
	if err := coll.Distinct(ctx, "tag", nil, rp).Err(); err != nil {
		t.Fatalf("Distinct with a read preference: %v", err)
	}
	// The test server has no collation: refused, as not supported or
	// invalid, never as a broker fault.
	_, err = coll.Find(ctx, nil, broker.Collation(bson.D{{Key: "locale", Value: "fr"}}))
	if code := broker.Code(err); err != nil && code != codes.Unimplemented && code != codes.InvalidArgument {
		t.Fatalf("Find with a collation: got %v, want success, Unimplemented or InvalidArgument", err)
	}
	// Read preference tags with mode primary are a bad request.
	_, err = coll.CountDocuments(ctx, nil, broker.WithReadPreference(broker.ReadPreference{Mode: broker.PrimaryMode, TagSets: []any{bson.D{{Key: "dc", Value: "east"}}}}))
	if !broker.IsInvalidArgument(err) {
		t.Fatalf("tag sets with mode primary: got %v, want InvalidArgument", err)
	}
}

// reasonOf is the broker's ErrorInfo reason in a status from the raw stub.
func reasonOf(st *status.Status) string {
	for _, detail := range st.Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok && info.GetDomain() == broker.Domain {
			return info.GetReason()
		}
	}
	return ""
}
