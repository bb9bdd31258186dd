package broker

import (
	"fmt"
	"time"
)

type findOptions struct {
	projection any
	sort       any
	skip       int64
	limit      int64
	batchSize  int32
	hint       any
	maxTime    time.Duration
	comment    string
}

// A FindOption sets an option of Find or FindOne.
type FindOption func(*findOptions)

// Projection selects the fields returned, e.g. bson.D{{Key: "sku", Value: 1}}.
func Projection(projection any) FindOption {
	return func(o *findOptions) { o.projection = projection }
}

// Sort orders the results; use bson.D, whose key order is the sort order.
func Sort(sort any) FindOption {
	return func(o *findOptions) { o.sort = sort }
}

// Skip skips the first n matching documents.
func Skip(n int64) FindOption {
	return func(o *findOptions) { o.skip = n }
}

// Limit returns at most n documents; 0 means no limit.
func Limit(n int64) FindOption {
	return func(o *findOptions) { o.limit = n }
}

// BatchSize sets the documents per MongoDB batch (one gRPC message each);
// 0 means the broker's default.
func BatchSize(n int32) FindOption {
	return func(o *findOptions) { o.batchSize = n }
}

// Hint names the index to use: an index name (string) or a key pattern
// document such as bson.D{{Key: "sku", Value: 1}}.
func Hint(hint any) FindOption {
	return func(o *findOptions) { o.hint = hint }
}

// MaxTime is a server-side time limit. The context deadline always applies
// as well; this is for a limit shorter than the caller's wait.
func MaxTime(d time.Duration) FindOption {
	return func(o *findOptions) { o.maxTime = d }
}

// Comment is attached to the MongoDB operation, visible in the server's logs.
func Comment(comment string) FindOption {
	return func(o *findOptions) { o.comment = comment }
}

// WriteConcern is the acknowledgement an insert asks for. The zero value
// means the database's configured default.
type WriteConcern struct {
	// W is a number of nodes (int) or a tag such as "majority"; nil means
	// the default.
	W any
	// Journal, when not nil, asks to wait for the journal (true) or not.
	Journal *bool
	// WTimeout is the time limit of the write concern; 0 means none.
	WTimeout time.Duration
}

type insertOptions struct {
	ordered                  bool
	bypassDocumentValidation bool
	writeConcern             *WriteConcern
}

// An InsertOption sets an option of InsertOne or InsertMany.
type InsertOption func(*insertOptions)

// Ordered (the default, true) stops InsertMany at the first error; false
// carries on with the remaining documents.
func Ordered(ordered bool) InsertOption {
	return func(o *insertOptions) { o.ordered = ordered }
}

// BypassDocumentValidation skips the collection's validator.
func BypassDocumentValidation(bypass bool) InsertOption {
	return func(o *insertOptions) { o.bypassDocumentValidation = bypass }
}

// WithWriteConcern sets the insert's write concern.
func WithWriteConcern(wc WriteConcern) InsertOption {
	return func(o *insertOptions) { o.writeConcern = &wc }
}

func checkCount(name string, n int64) error {
	if n < 0 {
		return fmt.Errorf("broker: %s must not be negative, not %d", name, n)
	}
	return nil
}
