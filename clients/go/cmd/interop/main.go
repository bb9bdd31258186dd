// Command interop is the Go side of tests/test_interop.py: it writes the
// interop fixture document with this client, reads documents back,
// provokes a duplicate key, and updates, aggregates, counts and deletes
// them, printing JSON lines that the test compares with what Python and
// Node wrote and read.
//
//	interop write COLLECTION [--decimal]   insert the fixture; print {"inserted_id": ...}
//	interop read COLLECTION WRITER         print each document whose writer is WRITER,
//	                                       as canonical Extended JSON, one per line
//	interop dup COLLECTION                 insert one _id twice; print the error
//	interop modify COLLECTION WRITER MODIFIER
//	                                       UpdateMany the documents whose writer is WRITER:
//	                                       $set modified_by MODIFIER, $inc i32; print
//	                                       {"matched": N, "modified": N}
//	interop aggregate COLLECTION WRITER    $match writer WRITER, $project writer, modified_by
//	                                       and i32; print each result as canonical
//	                                       Extended JSON, one per line
//	interop count COLLECTION WRITER        CountDocuments of writer WRITER; print {"count": N}
//	interop delete COLLECTION WRITER       DeleteMany of writer WRITER; print {"deleted": N}
//
// The broker comes from MONGO_BROKER_TARGET, the configured database from
// MONGO_BROKER_DATABASE (default "appdb").
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/mongo-broker/mongo-broker/clients/go/broker"
)

const usage = "usage: interop write COLLECTION [--decimal] | read COLLECTION WRITER | dup COLLECTION" +
	" | modify COLLECTION WRITER MODIFIER | aggregate COLLECTION WRITER | count COLLECTION WRITER | delete COLLECTION WRITER"

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "interop:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) < 2 {
		return errors.New(usage)
	}
	target := os.Getenv("MONGO_BROKER_TARGET")
	if target == "" {
		return errors.New("MONGO_BROKER_TARGET is not set")
	}
	database := os.Getenv("MONGO_BROKER_DATABASE")
	if database == "" {
		database = "appdb"
	}
	client, err := broker.NewClient(target)
	if err != nil {
		return err
	}
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	coll := client.Database(database).Collection(args[1])

	switch {
	case args[0] == "write" && len(args) == 2:
		return write(ctx, coll, false)
	case args[0] == "write" && len(args) == 3 && args[2] == "--decimal":
		return write(ctx, coll, true)
	case args[0] == "read" && len(args) == 3:
		return read(ctx, coll, args[2])
	case args[0] == "dup" && len(args) == 2:
		return dup(ctx, coll)
	case args[0] == "modify" && len(args) == 4:
		return modify(ctx, coll, args[2], args[3])
	case args[0] == "aggregate" && len(args) == 3:
		return aggregate(ctx, coll, args[2])
	case args[0] == "count" && len(args) == 3:
		return count(ctx, coll, args[2])
	case args[0] == "delete" && len(args) == 3:
		return deleteWriter(ctx, coll, args[2])
	}
	return errors.New(usage)
}

// fixture is the interop document in plain Go values: the Go driver's
// natural types for each BSON type. Field order matters (the test compares
// BSON bytes); it has no _id, so the client makes one.
func fixture(withDecimal bool) (bson.D, error) {
	ref, err := bson.ObjectIDFromHex("64b7f0c2a1b2c3d4e5f60718")
	if err != nil {
		return nil, err
	}
	doc := bson.D{
		{Key: "writer", Value: "go"},
		{Key: "s", Value: "héllo wörld ✓"},
		{Key: "i32", Value: int32(42)},
		{Key: "i32neg", Value: int32(-7)},
		{Key: "i64", Value: int64(1<<40 + 1)},
		{Key: "i64small", Value: int64(5)},
		{Key: "i64neg", Value: int64(-(1<<53 + 1))},
		{Key: "dbl", Value: 2.5},
		{Key: "dblint", Value: 3.0},
		{Key: "dblneg", Value: -0.125},
		{Key: "t", Value: true},
		{Key: "f", Value: false},
		{Key: "n", Value: nil},
		{Key: "oid", Value: ref},
		{Key: "date", Value: time.Date(2024, 2, 29, 12, 34, 56, 789_000_000, time.UTC)},
		{Key: "predate", Value: time.Date(1969, 7, 20, 20, 17, 40, 0, time.UTC)},
		{Key: "bin", Value: bson.Binary{Subtype: 0x80, Data: []byte{0x00, 0x01, 0x02, 0xff}}},
		{Key: "uuid", Value: bson.Binary{Subtype: 0x04, Data: []byte{
			0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef}}},
		{Key: "bin0", Value: []byte("raw bytes")},
		{Key: "nested", Value: bson.D{
			{Key: "a", Value: int32(1)},
			{Key: "b", Value: bson.D{{Key: "c", Value: "deep"}, {Key: "d", Value: int64(9)}, {Key: "e", Value: 1.5}}},
			{Key: "list", Value: bson.A{int32(1), "two", 3.5, bson.D{{Key: "x", Value: int64(4)}}, true}},
		}},
		{Key: "arr", Value: bson.A{int64(10), int32(11), 12.0}},
		{Key: "empty", Value: bson.D{}},
		{Key: "emptyarr", Value: bson.A{}},
	}
	if withDecimal {
		dec, err := bson.ParseDecimal128("1234.5678901234567890")
		if err != nil {
			return nil, err
		}
		doc = append(doc, bson.E{Key: "dec", Value: dec})
	}
	return doc, nil
}

func write(ctx context.Context, coll *broker.Collection, withDecimal bool) error {
	doc, err := fixture(withDecimal)
	if err != nil {
		return err
	}
	result, err := coll.InsertOne(ctx, doc)
	if err != nil {
		return err
	}
	return printLine(bson.D{{Key: "inserted_id", Value: result.InsertedID}})
}

func read(ctx context.Context, coll *broker.Collection, writer string) error {
	cursor, err := coll.Find(ctx, bson.D{{Key: "writer", Value: writer}}, broker.Sort(bson.D{{Key: "_id", Value: 1}}))
	if err != nil {
		return err
	}
	defer cursor.Close(ctx)
	for cursor.Next(ctx) {
		// Decoded into Go values and encoded again, so the test sees what
		// this client made of each type, not the bytes it was sent.
		var doc bson.D
		if err := cursor.Decode(&doc); err != nil {
			return err
		}
		if err := printLine(doc); err != nil {
			return err
		}
	}
	return cursor.Err()
}

func dup(ctx context.Context, coll *broker.Collection) error {
	doc := bson.D{{Key: "_id", Value: "dup-go"}, {Key: "writer", Value: "go"}}
	if _, err := coll.InsertOne(ctx, doc); err != nil {
		return fmt.Errorf("first insert: %w", err)
	}
	_, err := coll.InsertOne(ctx, doc)
	if err == nil {
		return errors.New("the second insert of the same _id succeeded")
	}
	var e *broker.Error
	if !errors.As(err, &e) {
		return fmt.Errorf("the second insert failed with %T, not *broker.Error: %w", err, err)
	}
	line, err := json.Marshal(map[string]any{
		"is_duplicate_key": broker.IsDuplicateKey(err),
		"code":             int(e.Code),
		"code_name":        e.Code.String(),
		"reason":           e.Reason,
		"mongo_code":       e.MongoCode,
		"message":          e.Error(),
	})
	if err != nil {
		return err
	}
	_, err = fmt.Println(string(line))
	return err
}

func modify(ctx context.Context, coll *broker.Collection, writer, modifier string) error {
	result, err := coll.UpdateMany(ctx, bson.D{{Key: "writer", Value: writer}}, bson.D{
		{Key: "$set", Value: bson.D{{Key: "modified_by", Value: modifier}}},
		{Key: "$inc", Value: bson.D{{Key: "i32", Value: int32(1)}}},
	})
	if err != nil {
		return err
	}
	return printJSON(map[string]any{"matched": result.MatchedCount, "modified": result.ModifiedCount})
}

func aggregate(ctx context.Context, coll *broker.Collection, writer string) error {
	cursor, err := coll.Aggregate(ctx, broker.Pipeline{
		{{Key: "$match", Value: bson.D{{Key: "writer", Value: writer}}}},
		{{Key: "$project", Value: bson.D{
			{Key: "_id", Value: int32(0)}, {Key: "writer", Value: int32(1)},
			{Key: "modified_by", Value: int32(1)}, {Key: "i32", Value: int32(1)},
		}}},
	})
	if err != nil {
		return err
	}
	defer cursor.Close(ctx)
	for cursor.Next(ctx) {
		// Decoded and encoded again, as read does, so the test sees what
		// this client made of each value.
		var doc bson.D
		if err := cursor.Decode(&doc); err != nil {
			return err
		}
		if err := printLine(doc); err != nil {
			return err
		}
	}
	return cursor.Err()
}

func count(ctx context.Context, coll *broker.Collection, writer string) error {
	n, err := coll.CountDocuments(ctx, bson.D{{Key: "writer", Value: writer}})
	if err != nil {
		return err
	}
	return printJSON(map[string]any{"count": n})
}

func deleteWriter(ctx context.Context, coll *broker.Collection, writer string) error {
	result, err := coll.DeleteMany(ctx, bson.D{{Key: "writer", Value: writer}})
	if err != nil {
		return err
	}
	return printJSON(map[string]any{"deleted": result.DeletedCount})
}

// printJSON prints one plain JSON line (encoding/json sorts the keys).
func printJSON(value map[string]any) error {
	line, err := json.Marshal(value)
	if err != nil {
		return err
	}
	_, err = fmt.Println(string(line))
	return err
}

func printLine(doc bson.D) error {
	line, err := bson.MarshalExtJSON(doc, true, false)
	if err != nil {
		return err
	}
	_, err = fmt.Println(string(line))
	return err
}
