package broker

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"

	"go.mongodb.org/mongo-driver/v2/bson"
	"google.golang.org/grpc/status"

	"github.com/mongo-broker/mongo-broker/clients/go/brokerv1"
)

// WriteError is one write that MongoDB refused, as the Go driver's
// mongo.WriteError.
type WriteError struct {
	// Index is the position of the document (InsertMany) or operation
	// (BulkWrite) that failed; 0 for the single writes.
	Index int
	// Code is MongoDB's error code (11000 for a duplicate key).
	Code int
	// CodeName is MongoDB's name for Code ("DuplicateKey").
	CodeName string
	// Message is MongoDB's message (cut at 200 characters by the broker).
	Message string
}

func (we WriteError) Error() string {
	return fmt.Sprintf("write error at index %d: %s (code %d)", we.Index, we.Message, we.Code)
}

// WriteErrors are the write errors of one operation.
type WriteErrors []WriteError

func (we WriteErrors) Error() string {
	messages := make([]string, len(we))
	for i, e := range we {
		messages[i] = e.Error()
	}
	return "write errors: [" + strings.Join(messages, ", ") + "]"
}

// WriteConcernError is a write concern that was not satisfied: the writes
// were done, but not acknowledged as asked.
type WriteConcernError struct {
	// Message is the server's message.
	Message string
}

func (wce WriteConcernError) Error() string { return "write concern error: " + wce.Message }

// WriteException is the error of a single write (InsertOne, UpdateOne,
// UpdateMany, ReplaceOne, DeleteOne, DeleteMany, FindOneAnd*) that MongoDB
// refused, as the Go driver's mongo.WriteException. It wraps the call's
// *Error, which errors.As still finds (with Code, Reason and Metadata), and
// its Error() is that *Error's:
//
//	var we broker.WriteException
//	if errors.As(err, &we) && we.HasErrorCode(11000) { ... }
type WriteException struct {
	// WriteConcernError is set when the write concern failed.
	WriteConcernError *WriteConcernError
	// WriteErrors are the failed writes: one for a single write.
	WriteErrors WriteErrors
	// Labels are MongoDB's error labels.
	Labels []string

	err *Error
}

func (e WriteException) Error() string { return e.err.Error() }

// Unwrap is the call's *Error.
func (e WriteException) Unwrap() error { return e.err }

// GRPCStatus lets status.Code and status.FromError see the call's status.
func (e WriteException) GRPCStatus() *status.Status { return e.err.GRPCStatus() }

// HasErrorCode reports whether a write error (or the error itself) has
// MongoDB's code.
func (e WriteException) HasErrorCode(code int) bool {
	for _, we := range e.WriteErrors {
		if we.Code == code {
			return true
		}
	}
	return e.err.MongoCode == code
}

// BulkWriteError is one failed operation of a BulkWrite (or document of an
// InsertMany) and the model that made it.
type BulkWriteError struct {
	WriteError
	// Request is the operation's model (an *InsertOneModel for InsertMany);
	// nil when the index is outside the request, which the broker never
	// sends.
	Request WriteModel
}

// BulkWriteException is the error of a BulkWrite or an InsertMany that
// MongoDB refused in part or whole, as the Go driver's
// mongo.BulkWriteException, with what landed in PartialResult. Like
// WriteException, it wraps the call's *Error.
type BulkWriteException struct {
	// WriteConcernError is set when the write concern failed.
	WriteConcernError *WriteConcernError
	// WriteErrors are the failed operations, by index. The broker may cut a
	// long list; WriteErrorsTotal counts them all.
	WriteErrors []BulkWriteError
	// WriteErrorsTotal is the number of failed operations, at least
	// len(WriteErrors).
	WriteErrorsTotal int
	// Labels are MongoDB's error labels.
	Labels []string
	// PartialResult is what the operation did before it stopped (ordered)
	// or around its failures (unordered): the counts as MongoDB reported
	// them, the upserted ids, and the ids of the inserts known to have
	// landed.
	PartialResult *BulkWriteResult

	err *Error
}

func (e BulkWriteException) Error() string { return e.err.Error() }

// Unwrap is the call's *Error.
func (e BulkWriteException) Unwrap() error { return e.err }

// GRPCStatus lets status.Code and status.FromError see the call's status.
func (e BulkWriteException) GRPCStatus() *status.Status { return e.err.GRPCStatus() }

// HasErrorCode reports whether a write error (or the error itself) has
// MongoDB's code.
func (e BulkWriteException) HasErrorCode(code int) bool {
	for _, we := range e.WriteErrors {
		if we.Code == code {
			return true
		}
	}
	return e.err.MongoCode == code
}

// wireWriteError is one element of the metadata's write_errors.
type wireWriteError struct {
	Index    int    `json:"index"`
	Code     int    `json:"code"`
	CodeName string `json:"codeName"`
	Errmsg   string `json:"errmsg"`
}

// writeErrorsOf reads the write errors out of the broker's ErrorInfo
// metadata: `write_errors`, or for a broker that sends only `failed_index`,
// the one error the status describes.
func writeErrorsOf(e *Error) (WriteErrors, bool) {
	if text, ok := e.Metadata["write_errors"]; ok {
		var wire []wireWriteError
		if err := json.Unmarshal([]byte(text), &wire); err == nil {
			errs := make(WriteErrors, len(wire))
			for i, w := range wire {
				errs[i] = WriteError{Index: w.Index, Code: w.Code, CodeName: w.CodeName, Message: w.Errmsg}
			}
			return errs, true
		}
	}
	if index, ok := e.FailedIndex(); ok {
		return WriteErrors{{Index: index, Code: e.MongoCode, CodeName: e.MongoCodeName(), Message: e.Message}}, true
	}
	return nil, false
}

func writeConcernErrorOf(e *Error) *WriteConcernError {
	if message, ok := e.Metadata["write_concern_error"]; ok {
		return &WriteConcernError{Message: message}
	}
	return nil
}

// refusals are the reasons of a status that is MongoDB refusing a write
// (rather than the broker refusing the request, or the database being out
// of reach): a single write's status carries its one write error.
var refusals = map[string]bool{
	brokerv1.ErrorReason_DUPLICATE_KEY.String():    true,
	brokerv1.ErrorReason_QUERY_REJECTED.String():   true,
	brokerv1.ErrorReason_OPERATION_FAILED.String(): true,
}

// asWriteException turns the error of a single write into a
// WriteException when the broker says MongoDB refused the write; any other
// error (a bad request, a timeout, ...) is returned as it is.
func asWriteException(err error) error {
	e := AsError(err)
	if e == nil {
		return err
	}
	errs, ok := writeErrorsOf(e)
	if !ok && e.MongoCode != 0 && refusals[e.Reason] {
		// A broker that lists no write errors for a single write still
		// names MongoDB's code: that is the one write error.
		errs, ok = WriteErrors{{Code: e.MongoCode, CodeName: e.MongoCodeName(), Message: e.Message}}, true
	}
	wce := writeConcernErrorOf(e)
	if !ok && wce == nil {
		return err
	}
	return WriteException{WriteConcernError: wce, WriteErrors: errs, Labels: e.Labels(), err: e}
}

// asBulkWriteException turns the error of a BulkWrite or an InsertMany into
// a BulkWriteException when the broker says MongoDB refused some of it.
// models are the operations sent; insertedIDs the _id of each insert, by
// operation index, which were all made or known here.
func asBulkWriteException(err error, models []WriteModel, insertedIDs map[int64]any, ordered bool) error {
	e := AsError(err)
	if e == nil {
		return err
	}
	errs, ok := writeErrorsOf(e)
	wce := writeConcernErrorOf(e)
	if !ok && wce == nil {
		return err
	}
	exception := BulkWriteException{WriteConcernError: wce, Labels: e.Labels(), err: e, WriteErrorsTotal: len(errs)}
	if total, present := e.intMetadata("write_errors_total"); present && total > len(errs) {
		exception.WriteErrorsTotal = total
	}
	failed := map[int]bool{}
	first := -1
	for _, we := range errs {
		bwe := BulkWriteError{WriteError: we}
		if we.Index >= 0 && we.Index < len(models) {
			bwe.Request = models[we.Index]
		}
		exception.WriteErrors = append(exception.WriteErrors, bwe)
		failed[we.Index] = true
		if first < 0 || we.Index < first {
			first = we.Index
		}
	}
	if index, present := e.FailedIndex(); present && (first < 0 || index < first) {
		first = index
	}
	result := &BulkWriteResult{
		InsertedCount: e.int64Metadata("inserted_count"),
		MatchedCount:  e.int64Metadata("matched_count"),
		ModifiedCount: e.int64Metadata("modified_count"),
		DeletedCount:  e.int64Metadata("deleted_count"),
		UpsertedCount: e.int64Metadata("upserted_count"),
		UpsertedIDs:   upsertedIDsOf(e),
		InsertedIDs:   map[int64]any{},
	}
	// Which inserts landed follows from where the writes stopped: ordered,
	// every one before the first failure; unordered, every one that did not
	// fail, when the list of failures is whole.
	complete := exception.WriteErrorsTotal == len(errs)
	for index, id := range insertedIDs {
		switch {
		case ordered && (first < 0 || index < int64(first)):
		case !ordered && complete && !failed[int(index)]:
		default:
			continue
		}
		result.InsertedIDs[index] = id
	}
	exception.PartialResult = result
	return exception
}

func (e *Error) int64Metadata(key string) int64 {
	n, _ := strconv.ParseInt(e.Metadata[key], 10, 64)
	return n
}

// upsertedIDsOf reads the metadata's upserted_ids, an Extended JSON array
// of {"index", "_id"}.
func upsertedIDsOf(e *Error) map[int64]any {
	ids := map[int64]any{}
	text, ok := e.Metadata["upserted_ids"]
	if !ok || text == "" {
		return ids
	}
	var wrapper struct {
		IDs []struct {
			Index int64 `bson:"index"`
			ID    any   `bson:"_id"`
		} `bson:"ids"`
	}
	if err := bson.UnmarshalExtJSON([]byte(`{"ids": `+text+`}`), false, &wrapper); err != nil {
		return ids
	}
	for _, upserted := range wrapper.IDs {
		ids[upserted.Index] = upserted.ID
	}
	return ids
}
