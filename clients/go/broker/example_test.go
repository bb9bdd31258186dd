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
		// A retry of an insert that had landed: its client-made _id exists.
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
