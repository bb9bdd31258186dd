package broker_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/mongo-broker/mongo-broker/clients/go/broker"
)

// Compiled, not run: it needs a broker.
func Example() {
	client, err := broker.NewClient("unix:///run/mongo-broker/broker.sock", broker.WithTimeout(10*time.Second))
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	items := client.Database("appdb").Collection("items")

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	res, err := items.InsertOne(ctx, bson.D{{Key: "sku", Value: "a1"}, {Key: "qty", Value: 5}})
	switch {
	case broker.IsDuplicateKey(err):
		// Another document has this _id or unique key.
	case broker.IsUnavailable(err):
		log.Fatal("broker or database down, retry later: ", err)
	case err != nil:
		var e *broker.Error
		if errors.As(err, &e) {
			log.Fatalf("%v: reason %s, MongoDB code %d", e.Code, e.Reason, e.MongoCode)
		}
		log.Fatal(err)
	default:
		fmt.Println("inserted", res.InsertedID)
	}

	cur, err := items.Find(ctx, bson.D{{Key: "qty", Value: bson.D{{Key: "$gt", Value: 3}}}},
		broker.Sort(bson.D{{Key: "sku", Value: 1}}), broker.Limit(10), broker.BatchSize(100))
	if err != nil {
		log.Fatal(err)
	}
	defer cur.Close(ctx)
	for cur.Next(ctx) {
		var item struct {
			SKU string `bson:"sku"`
			Qty int32  `bson:"qty"`
		}
		if err := cur.Decode(&item); err != nil {
			log.Fatal(err)
		}
		fmt.Println(item.SKU, item.Qty)
	}
	if err := cur.Err(); err != nil {
		log.Fatal(err)
	}
}

// Compiled, not run: updates, a find-and-modify and a bulk write, with the
// errors each can give.
func ExampleCollection_BulkWrite() {
	client, err := broker.NewClient("unix:///run/mongo-broker/broker.sock")
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	items := client.Database("appdb").Collection("items")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	inc := bson.D{{Key: "$inc", Value: bson.D{{Key: "qty", Value: 1}}}}
	updated, err := items.UpdateOne(ctx, bson.D{{Key: "sku", Value: "a1"}}, inc, broker.Upsert(true))
	var we broker.WriteException
	switch {
	case errors.As(err, &we) && we.HasErrorCode(11000):
		log.Fatal("the upsert collided with a unique index: ", we.WriteErrors[0].Message)
	case err != nil:
		log.Fatal(err)
	}
	fmt.Println(updated.MatchedCount, updated.ModifiedCount, updated.UpsertedID)

	var before struct {
		Qty int32 `bson:"qty"`
	}
	err = items.FindOneAndUpdate(ctx, bson.D{{Key: "sku", Value: "a1"}}, inc).Decode(&before)
	if errors.Is(err, broker.ErrNoDocuments) {
		fmt.Println("no a1")
	}

	result, err := items.BulkWrite(ctx, []broker.WriteModel{
		broker.NewInsertOneModel().SetDocument(bson.D{{Key: "sku", Value: "b2"}}),
		broker.NewUpdateManyModel().SetFilter(bson.D{{Key: "qty", Value: 0}}).SetUpdate(bson.D{{Key: "$set", Value: bson.D{{Key: "empty", Value: true}}}}),
		broker.NewDeleteOneModel().SetFilter(bson.D{{Key: "sku", Value: "gone"}}),
	})
	var bwe broker.BulkWriteException
	if errors.As(err, &bwe) {
		// Ordered: everything before the first failure landed.
		for _, failure := range bwe.WriteErrors {
			fmt.Println("operation", failure.Index, "failed:", failure.Message)
		}
		fmt.Println("inserted before the failure:", bwe.PartialResult.InsertedCount)
		return
	}
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(result.InsertedIDs[0], result.ModifiedCount, result.DeletedCount)
}
