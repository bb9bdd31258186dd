// Command tier is the Go side of tests/test_tier_polyglot.py: it drives a
// tier of broker replicas through one client and prints a JSON summary.
//
//	tier spread DATABASE COLLECTION CALLS TARGET...
//	    CALLS calls from 4 goroutines, FindOne by _id and Ping in turn; print
//	    {"calls": N, "errors": [...], "retries": N}
//	tier load DATABASE COLLECTION WORKERS TARGET...
//	    WORKERS goroutines, each inserting {worker, seq} (the _id made by the
//	    client) and reading it back with FindOne, until stdin is closed.
//	    Print {"ready": true} once every worker has done a few rounds, then
//	    at the end {"inserted": [hex _id...], "rounds": N, "errors": [...],
//	    "retries": N}
//
// One TARGET is given to broker.NewClient (a "dns:///name:port" tier);
// several go to broker.NewClientForAddresses. With MONGO_BROKER_CA_FILE (a
// PEM file) the client speaks TLS and trusts that CA.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"google.golang.org/grpc/credentials"

	"github.com/mongo-broker/mongo-broker/clients/go/broker"
)

const usage = "usage: tier spread DATABASE COLLECTION CALLS TARGET... | load DATABASE COLLECTION WORKERS TARGET..."

// callTimeout is each call's deadline, its retries included.
const callTimeout = 10 * time.Second

// readyRounds is how many rounds each load worker makes before "ready".
const readyRounds = 5

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "tier:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) < 5 {
		return errors.New(usage)
	}
	n, err := strconv.Atoi(args[3])
	if err != nil || n < 1 {
		return fmt.Errorf("%q is not a positive count: %s", args[3], usage)
	}
	targets := args[4:]
	var opts []broker.Option
	if ca := os.Getenv("MONGO_BROKER_CA_FILE"); ca != "" {
		creds, err := credentials.NewClientTLSFromFile(ca, "")
		if err != nil {
			return err
		}
		opts = append(opts, broker.WithTransportCredentials(creds))
	}
	var client *broker.Client
	if len(targets) == 1 {
		client, err = broker.NewClient(targets[0], opts...)
	} else {
		client, err = broker.NewClientForAddresses(targets, opts...)
	}
	if err != nil {
		return err
	}
	defer client.Close()
	coll := client.Database(args[1]).Collection(args[2])
	switch args[0] {
	case "spread":
		return spread(client, coll, n)
	case "load":
		return load(client, coll, n)
	}
	return errors.New(usage)
}

// errorList gathers the errors callers saw, safe for goroutines.
type errorList struct {
	mu     sync.Mutex
	errors []string
}

func (l *errorList) add(what string, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.errors = append(l.errors, fmt.Sprintf("%s: %v", what, err))
}

func (l *errorList) list() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string{}, l.errors...)
}

func emit(value any) error {
	return json.NewEncoder(os.Stdout).Encode(value)
}

func spread(client *broker.Client, coll *broker.Collection, calls int) error {
	var next atomic.Int64
	var failures errorList
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1)
				if i > int64(calls) {
					return
				}
				ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
				var err error
				if i%2 == 0 {
					_, err = client.Ping(ctx)
				} else if err = coll.FindOne(ctx, bson.D{{Key: "_id", Value: i}}).Err(); errors.Is(err, broker.ErrNoDocuments) {
					err = nil
				}
				cancel()
				if err != nil {
					failures.add(fmt.Sprintf("call %d", i), err)
				}
			}
		}()
	}
	wg.Wait()
	return emit(map[string]any{"calls": calls, "errors": failures.list(), "retries": client.RetryCount()})
}

func load(client *broker.Client, coll *broker.Collection, workers int) error {
	stop := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		close(stop)
	}()
	var (
		failures errorList
		rounds   atomic.Int64
		mu       sync.Mutex
		inserted []string
		warm     sync.WaitGroup
		wg       sync.WaitGroup
	)
	warm.Add(workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for seq := 0; ; seq++ {
				if seq == readyRounds {
					warm.Done()
				}
				select {
				case <-stop:
					if seq < readyRounds {
						warm.Done()
					}
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
				id, err := round(ctx, coll, w, seq)
				cancel()
				rounds.Add(1)
				if err != nil {
					failures.add(fmt.Sprintf("worker %d seq %d", w, seq), err)
				}
				if id != "" {
					mu.Lock()
					inserted = append(inserted, id)
					mu.Unlock()
				}
			}
		}()
	}
	warm.Wait()
	if err := emit(map[string]any{"ready": true}); err != nil {
		return err
	}
	wg.Wait()
	return emit(map[string]any{
		"inserted": inserted, "rounds": rounds.Load(), "errors": failures.list(), "retries": client.RetryCount(),
	})
}

// round inserts one document and reads it back; the _id (hex) once the
// insert was acknowledged, even when the read then failed.
func round(ctx context.Context, coll *broker.Collection, worker, seq int) (string, error) {
	result, err := coll.InsertOne(ctx, bson.D{{Key: "worker", Value: worker}, {Key: "seq", Value: seq}})
	if err != nil {
		return "", fmt.Errorf("InsertOne: %w", err)
	}
	id := result.InsertedID.(bson.ObjectID)
	var found bson.M
	if err := coll.FindOne(ctx, bson.D{{Key: "_id", Value: id}}).Decode(&found); err != nil {
		return id.Hex(), fmt.Errorf("FindOne of the document just inserted: %w", err)
	}
	return id.Hex(), nil
}
