package broker

import (
	"context"
	"encoding/json"
	"strconv"

	"go.mongodb.org/mongo-driver/v2/bson"
	"google.golang.org/protobuf/proto"

	"github.com/mongo-broker/mongo-broker/clients/go/brokerv1"
)

// insertWithRetries sends an Insert whose every _id was made here (ids, in
// the caller's order), retried as RetryPolicy says. The rules, the Python
// client's, keep a retry from storing a document twice:
//
//   - An attempt that failed without an answer (UNAVAILABLE: a replica
//     draining or a connection lost; CANCELLED by the server) may have
//     stored some documents. A
//     later attempt that meets a duplicate key may be meeting them: the
//     ids are new ObjectIDs, so the broker is asked which of them are
//     stored, and one that is can only have been stored by this call.
//   - Ordered: the documents up to the failed one must all be stored; the
//     ones after it that are not are sent next (not counted as a new
//     attempt). Unordered: every document was tried, so all must be there.
//   - Otherwise, or when that lookup fails, the duplicate key is returned:
//     it is a real conflict (another unique index) or cannot be told from one.
//
// The error's inserted_count, failed_index and write_errors always count in
// the caller's list, not in the last attempt's.
func (c *Collection) insertWithRetries(ctx context.Context, request *brokerv1.InsertRequest, ids []any) error {
	client := c.db.client
	callCtx, cancel := client.callContext(ctx)
	defer cancel()
	documents := request.GetDocuments()
	ordered := request.GetOrdered()
	// Every attempt is this request with the documents still pending.
	template := request
	template.Documents = nil
	pending := make([]int, len(documents))
	for i := range pending {
		pending[i] = i
	}
	maybeStored := false
	return client.retry(callCtx, func() error {
		for {
			attempt := proto.Clone(template).(*brokerv1.InsertRequest)
			attempt.Documents = make([][]byte, len(pending))
			for i, index := range pending {
				attempt.Documents[i] = documents[index]
			}
			_, err := client.stub.Insert(callCtx, attempt)
			if err == nil {
				return nil
			}
			e := fromRPC(err).(*Error)
			rebaseInsertError(e, pending, len(documents))
			if !maybeStored || !e.HasReason(brokerv1.ErrorReason_DUPLICATE_KEY) {
				maybeStored = maybeStored || shouldRetry(callCtx, e)
				return e
			}
			must, rest := pending, []int(nil)
			if ordered {
				failed, ok := e.FailedIndex()
				cut := indexOf(pending, failed)
				if !ok || cut < 0 {
					return final{e}
				}
				must, rest = pending[:cut+1], pending[cut+1:]
			}
			stored, err := c.storedIDs(ctx, callCtx, ids, pending)
			if err != nil {
				return final{e}
			}
			var missing []int
			for _, index := range must {
				if !stored[ids[index]] {
					missing = append(missing, index)
				}
			}
			if len(missing) > 0 {
				if !ordered {
					e.Metadata["failed_index"] = strconv.Itoa(missing[0])
					e.Metadata["inserted_count"] = strconv.Itoa(len(documents) - len(missing))
				}
				return final{e}
			}
			pending = pending[:0:0]
			for _, index := range rest {
				if !stored[ids[index]] {
					pending = append(pending, index)
				}
			}
			if len(pending) == 0 {
				return nil
			}
		}
	})
}

// storedIDs asks the broker which of the pending documents' ids are
// stored: a Find on _id, retried as a read, within the insert's deadline.
// ctx is the caller's (callCtx already carries the client's metadata, which
// the Find adds again).
func (c *Collection) storedIDs(ctx, callCtx context.Context, ids []any, pending []int) (map[any]bool, error) {
	if deadline, ok := callCtx.Deadline(); ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, deadline)
		defer cancel()
	}
	wanted := make(bson.A, len(pending))
	for i, index := range pending {
		wanted[i] = ids[index]
	}
	filter := bson.D{{Key: "_id", Value: bson.D{{Key: "$in", Value: wanted}}}}
	cursor, err := c.Find(ctx, filter, Projection(bson.D{{Key: "_id", Value: 1}}))
	if err != nil {
		return nil, err
	}
	var found []struct {
		ID bson.ObjectID `bson:"_id"`
	}
	if err := cursor.All(ctx, &found); err != nil {
		return nil, err
	}
	stored := make(map[any]bool, len(found))
	for _, document := range found {
		stored[document.ID] = true
	}
	return stored, nil
}

// rebaseInsertError makes an attempt's counts and indexes, which count in
// the documents it sent (pending), count in the caller's list of total.
func rebaseInsertError(e *Error, pending []int, total int) {
	if len(pending) == total {
		return
	}
	if failed, ok := e.FailedIndex(); ok && failed >= 0 && failed < len(pending) {
		e.Metadata["failed_index"] = strconv.Itoa(pending[failed])
	}
	if inserted, ok := e.intMetadata("inserted_count"); ok {
		e.Metadata["inserted_count"] = strconv.Itoa(total - len(pending) + inserted)
	}
	if text, ok := e.Metadata["write_errors"]; ok {
		var wire []wireWriteError
		if json.Unmarshal([]byte(text), &wire) == nil {
			for i := range wire {
				if wire[i].Index >= 0 && wire[i].Index < len(pending) {
					wire[i].Index = pending[wire[i].Index]
				}
			}
			if encoded, err := json.Marshal(wire); err == nil {
				e.Metadata["write_errors"] = string(encoded)
			}
		}
	}
}

// acknowledged says whether a write concern asks for an answer (w is not 0).
func acknowledged(wc *brokerv1.WriteConcern) bool {
	nodes, ok := wc.GetW().(*brokerv1.WriteConcern_WNodes)
	return !ok || nodes.WNodes != 0
}

// idsOf is the _id of each document, which prepareInsert made sure of.
func idsOf(documents [][]byte) ([]any, error) {
	ids := make([]any, len(documents))
	for i, raw := range documents {
		id, err := idOf(raw)
		if err != nil {
			return nil, err
		}
		ids[i] = id
	}
	return ids, nil
}

func indexOf(list []int, value int) int {
	for i, v := range list {
		if v == value {
			return i
		}
	}
	return -1
}
