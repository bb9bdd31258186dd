// Package broker is the Go client of mongo-broker, a sidecar that runs
// MongoDB operations (find, insert, update, delete, find-and-modify, count,
// distinct, aggregate, bulk write) for many short-lived worker processes
// over one bounded connection pool per configured database.
//
// Its shape follows the official Go driver:
//
//	client, err := broker.NewClient("unix:///run/mongo-broker/broker.sock")
//	if err != nil { ... }
//	defer client.Close()
//	items := client.Database("appdb").Collection("items")
//	res, err := items.InsertOne(ctx, bson.D{{Key: "sku", Value: "a1"}, {Key: "qty", Value: 5}})
//	cur, err := items.Find(ctx, bson.D{{Key: "qty", Value: bson.D{{Key: "$gt", Value: 3}}}},
//		broker.Sort(bson.D{{Key: "sku", Value: 1}}), broker.Limit(10))
//	defer cur.Close(ctx)
//	for cur.Next(ctx) {
//		var item Item
//		if err := cur.Decode(&item); err != nil { ... }
//	}
//	if err := cur.Err(); err != nil { ... }
//
// Documents travel as BSON bytes (go.mongodb.org/mongo-driver/v2/bson), so
// every type survives exactly: ObjectID, DateTime, int32 vs int64 vs double,
// Binary subtypes, Decimal128. Documents may be bson.D, bson.M, bson.Raw or
// structs with bson tags.
//
// Deadlines: a call's context deadline becomes the gRPC deadline, which the
// broker carries through to MongoDB. A context without a deadline gets the
// client's default timeout (WithTimeout, 30 s): there is no "wait forever".
// A nil context is refused with ErrNilContext rather than a panic.
//
// Errors from the broker are *Error values carrying the gRPC code and the
// broker's google.rpc.ErrorInfo (reason, MongoDB code, metadata); test them
// with errors.As or with IsDuplicateKey, IsUnavailable, IsTimeout, ... A
// write MongoDB refuses is a WriteException or, for BulkWrite and
// InsertMany, a BulkWriteException, each wrapping that *Error.
//
// Retries: reads, and inserts whose every _id was made here, are retried
// on transient errors as RetryPolicy says; the other writes (updates,
// deletes, FindOneAnd*, BulkWrite) never are.
//
// A tier of broker replicas (the pods behind a headless Kubernetes Service)
// is one "dns:///name:port" target to NewClient, or a list of addresses to
// NewClientForAddresses: calls go round-robin to every replica whose
// grpc.health.v1 status is SERVING, so a draining replica gets no new ones,
// and a retry goes to the next replica.
package broker
