package broker

import (
	"fmt"
	"time"

	"github.com/mongo-broker/mongo-broker/clients/go/brokerv1"
)

// callSettings gathers the options of one call. Each option sets its own
// field; each operation reads the fields it has, and the option types below
// say at compile time which options an operation takes.
type callSettings struct {
	projection               any
	sort                     any
	skip                     int64
	limit                    int64
	batchSize                int32
	hint                     any
	maxTime                  time.Duration
	comment                  string
	collation                any
	let                      any
	upsert                   bool
	arrayFilters             []any
	returnDocument           ReturnDocument
	bypassDocumentValidation bool
	writeConcern             *WriteConcern
	ordered                  *bool
	allowDiskUse             *bool
	readPreference           *ReadPreference
	readConcern              ReadConcern
}

// setting is the one behaviour of every option: it sets its field.
type setting struct{ set func(*callSettings) }

func (s setting) apply(c *callSettings) { s.set(c) }

// The markers below say which operations an option belongs to. They are
// unexported, so only this package's options satisfy the option interfaces.
type (
	findOpt      struct{}
	insertOpt    struct{}
	updateOpt    struct{}
	deleteOpt    struct{}
	modifyOpt    struct{}
	countOpt     struct{}
	distinctOpt  struct{}
	aggregateOpt struct{}
	bulkOpt      struct{}
)

func (findOpt) findOption()           {}
func (insertOpt) insertOption()       {}
func (updateOpt) updateOption()       {}
func (deleteOpt) deleteOption()       {}
func (modifyOpt) modifyOption()       {}
func (countOpt) countOption()         {}
func (distinctOpt) distinctOption()   {}
func (aggregateOpt) aggregateOption() {}
func (bulkOpt) bulkWriteOption()      {}

// A FindOption sets an option of Find or FindOne.
type FindOption interface {
	apply(*callSettings)
	findOption()
}

// An InsertOption sets an option of InsertOne or InsertMany.
type InsertOption interface {
	apply(*callSettings)
	insertOption()
}

// An UpdateOption sets an option of UpdateOne, UpdateMany or ReplaceOne.
type UpdateOption interface {
	apply(*callSettings)
	updateOption()
}

// A DeleteOption sets an option of DeleteOne or DeleteMany.
type DeleteOption interface {
	apply(*callSettings)
	deleteOption()
}

// A FindAndModifyOption sets an option of FindOneAndUpdate,
// FindOneAndReplace or FindOneAndDelete.
type FindAndModifyOption interface {
	apply(*callSettings)
	modifyOption()
}

// A CountOption sets an option of CountDocuments or EstimatedDocumentCount
// (which takes MaxTime, Comment and the read options only).
type CountOption interface {
	apply(*callSettings)
	countOption()
}

// A DistinctOption sets an option of Distinct.
type DistinctOption interface {
	apply(*callSettings)
	distinctOption()
}

// An AggregateOption sets an option of Aggregate.
type AggregateOption interface {
	apply(*callSettings)
	aggregateOption()
}

// A BulkWriteOption sets an option of BulkWrite.
type BulkWriteOption interface {
	apply(*callSettings)
	bulkWriteOption()
}

// ProjectionOption is Projection's: Find, FindOne and FindOneAnd*.
type ProjectionOption struct {
	setting
	findOpt
	modifyOpt
}

// Projection selects the fields returned, e.g. bson.D{{Key: "sku", Value: 1}}.
func Projection(projection any) ProjectionOption {
	return ProjectionOption{setting: setting{func(o *callSettings) { o.projection = projection }}}
}

// SortOption is Sort's: Find, FindOne and FindOneAnd* (which document of
// several matching ones is changed).
type SortOption struct {
	setting
	findOpt
	modifyOpt
}

// Sort orders the results; use bson.D, whose key order is the sort order.
func Sort(sort any) SortOption {
	return SortOption{setting: setting{func(o *callSettings) { o.sort = sort }}}
}

// SkipOption is Skip's: Find and CountDocuments.
type SkipOption struct {
	setting
	findOpt
	countOpt
}

// Skip skips the first n matching documents.
func Skip(n int64) SkipOption {
	return SkipOption{setting: setting{func(o *callSettings) { o.skip = n }}}
}

// LimitOption is Limit's: Find and CountDocuments.
type LimitOption struct {
	setting
	findOpt
	countOpt
}

// Limit returns (or counts) at most n documents; 0 means no limit.
func Limit(n int64) LimitOption {
	return LimitOption{setting: setting{func(o *callSettings) { o.limit = n }}}
}

// BatchSizeOption is BatchSize's: Find and Aggregate.
type BatchSizeOption struct {
	setting
	findOpt
	aggregateOpt
}

// BatchSize sets the documents per MongoDB batch (one gRPC message each);
// 0 means the broker's default.
func BatchSize(n int32) BatchSizeOption {
	return BatchSizeOption{setting: setting{func(o *callSettings) { o.batchSize = n }}}
}

// HintOption is Hint's: every operation that picks documents by an index.
type HintOption struct {
	setting
	findOpt
	updateOpt
	deleteOpt
	modifyOpt
	countOpt
	aggregateOpt
}

// Hint names the index to use: an index name (string) or a key pattern
// document such as bson.D{{Key: "sku", Value: 1}}.
func Hint(hint any) HintOption {
	return HintOption{setting: setting{func(o *callSettings) { o.hint = hint }}}
}

// MaxTimeOption is MaxTime's: every operation but the inserts and BulkWrite,
// whose requests have no such field.
type MaxTimeOption struct {
	setting
	findOpt
	updateOpt
	deleteOpt
	modifyOpt
	countOpt
	distinctOpt
	aggregateOpt
}

// MaxTime is a server-side time limit. The context deadline always applies
// as well; this is for a limit shorter than the caller's wait.
func MaxTime(d time.Duration) MaxTimeOption {
	return MaxTimeOption{setting: setting{func(o *callSettings) { o.maxTime = d }}}
}

// CommentOption is Comment's: every operation but the inserts.
type CommentOption struct {
	setting
	findOpt
	updateOpt
	deleteOpt
	modifyOpt
	countOpt
	distinctOpt
	aggregateOpt
	bulkOpt
}

// Comment is attached to the MongoDB operation, visible in the server's logs.
func Comment(comment string) CommentOption {
	return CommentOption{setting: setting{func(o *callSettings) { o.comment = comment }}}
}

// CollationOption is Collation's: every operation that compares strings.
// BulkWrite's models have their own (SetCollation).
type CollationOption struct {
	setting
	findOpt
	updateOpt
	deleteOpt
	modifyOpt
	countOpt
	distinctOpt
	aggregateOpt
}

// Collation says how strings compare: a document such as
// bson.D{{Key: "locale", Value: "fr"}, {Key: "strength", Value: 2}}.
func Collation(collation any) CollationOption {
	return CollationOption{setting: setting{func(o *callSettings) { o.collation = collation }}}
}

// LetOption is Let's: the writes and Aggregate.
type LetOption struct {
	setting
	updateOpt
	deleteOpt
	modifyOpt
	aggregateOpt
	bulkOpt
}

// Let is a document of variables that the filter, an update pipeline or an
// aggregation pipeline reads as $$name.
func Let(let any) LetOption {
	return LetOption{setting: setting{func(o *callSettings) { o.let = let }}}
}

// UpsertOption is Upsert's: UpdateOne, UpdateMany, ReplaceOne and
// FindOneAndUpdate/FindOneAndReplace.
type UpsertOption struct {
	setting
	updateOpt
	modifyOpt
}

// Upsert inserts a document when nothing matches.
func Upsert(upsert bool) UpsertOption {
	return UpsertOption{setting: setting{func(o *callSettings) { o.upsert = upsert }}}
}

// ArrayFiltersOption is ArrayFilters': UpdateOne, UpdateMany and
// FindOneAndUpdate (a replacement has no $[<id>] to fill).
type ArrayFiltersOption struct {
	setting
	updateOpt
	modifyOpt
}

// ArrayFilters are the documents naming the array elements that $[<id>]
// updates, e.g. bson.D{{Key: "e.qty", Value: bson.D{{Key: "$gt", Value: 5}}}}.
func ArrayFilters(filters ...any) ArrayFiltersOption {
	return ArrayFiltersOption{setting: setting{func(o *callSettings) { o.arrayFilters = filters }}}
}

// ReturnDocument says which version of the document FindOneAndUpdate and
// FindOneAndReplace return.
type ReturnDocument int32

const (
	// Before is the document as it was before the change (the default).
	Before = ReturnDocument(brokerv1.ReturnDocument_RETURN_DOCUMENT_BEFORE)
	// After is the document as the change left it (an upsert's new one).
	After = ReturnDocument(brokerv1.ReturnDocument_RETURN_DOCUMENT_AFTER)
)

// ReturnDocumentOption is WithReturnDocument's: FindOneAnd*.
type ReturnDocumentOption struct {
	setting
	modifyOpt
}

// WithReturnDocument chooses Before (the default) or After.
func WithReturnDocument(which ReturnDocument) ReturnDocumentOption {
	return ReturnDocumentOption{setting: setting{func(o *callSettings) { o.returnDocument = which }}}
}

// WriteConcern is the acknowledgement a write asks for. The zero value
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

// OrderedOption is Ordered's: InsertMany and BulkWrite.
type OrderedOption struct {
	setting
	insertOpt
	bulkOpt
}

// Ordered (the default, true) stops InsertMany or BulkWrite at the first
// error; false carries on with the remaining documents or operations.
func Ordered(ordered bool) OrderedOption {
	return OrderedOption{setting: setting{func(o *callSettings) { o.ordered = &ordered }}}
}

// BypassDocumentValidationOption is BypassDocumentValidation's: the writes
// that store documents (and an Aggregate ending in $out or $merge).
type BypassDocumentValidationOption struct {
	setting
	insertOpt
	updateOpt
	modifyOpt
	aggregateOpt
	bulkOpt
}

// BypassDocumentValidation skips the collection's validator.
func BypassDocumentValidation(bypass bool) BypassDocumentValidationOption {
	return BypassDocumentValidationOption{setting: setting{func(o *callSettings) { o.bypassDocumentValidation = bypass }}}
}

// WriteConcernOption is WithWriteConcern's: every write (and an Aggregate
// ending in $out or $merge).
type WriteConcernOption struct {
	setting
	insertOpt
	updateOpt
	deleteOpt
	modifyOpt
	aggregateOpt
	bulkOpt
}

// WithWriteConcern sets the write's write concern.
func WithWriteConcern(wc WriteConcern) WriteConcernOption {
	return WriteConcernOption{setting: setting{func(o *callSettings) { o.writeConcern = &wc }}}
}

// AllowDiskUseOption is AllowDiskUse's: Aggregate.
type AllowDiskUseOption struct {
	setting
	aggregateOpt
}

// AllowDiskUse lets the pipeline's stages spill to temporary files; unset
// means the server's default.
func AllowDiskUse(allow bool) AllowDiskUseOption {
	return AllowDiskUseOption{setting: setting{func(o *callSettings) { o.allowDiskUse = &allow }}}
}

// ReadPreferenceMode is which members of a replica set a read may go to.
type ReadPreferenceMode int32

// The modes, as in the MongoDB read preference specification.
const (
	PrimaryMode            = ReadPreferenceMode(brokerv1.ReadPreferenceMode_READ_PREFERENCE_PRIMARY)
	PrimaryPreferredMode   = ReadPreferenceMode(brokerv1.ReadPreferenceMode_READ_PREFERENCE_PRIMARY_PREFERRED)
	SecondaryMode          = ReadPreferenceMode(brokerv1.ReadPreferenceMode_READ_PREFERENCE_SECONDARY)
	SecondaryPreferredMode = ReadPreferenceMode(brokerv1.ReadPreferenceMode_READ_PREFERENCE_SECONDARY_PREFERRED)
	NearestMode            = ReadPreferenceMode(brokerv1.ReadPreferenceMode_READ_PREFERENCE_NEAREST)
)

// ReadPreference is a read's read preference. Without one (no
// WithReadPreference), a read uses the database's configured one.
type ReadPreference struct {
	// Mode is required.
	Mode ReadPreferenceMode
	// TagSets are tried in order, each a document of tag name to value
	// (bson.D{{Key: "dc", Value: "east"}}); an empty document matches any
	// member. Not with PrimaryMode.
	TagSets []any
	// MaxStaleness skips secondaries lagging more than this (whole seconds;
	// 0 means no limit, otherwise at least 90 s). Not with PrimaryMode.
	MaxStaleness time.Duration
}

// ReadPreferenceOption is WithReadPreference's: the reads.
type ReadPreferenceOption struct {
	setting
	findOpt
	countOpt
	distinctOpt
	aggregateOpt
}

// WithReadPreference sets the read preference of a read.
func WithReadPreference(rp ReadPreference) ReadPreferenceOption {
	return ReadPreferenceOption{setting: setting{func(o *callSettings) { o.readPreference = &rp }}}
}

// ReadConcern is a read concern level; "" means the server's default.
type ReadConcern string

// The read concern levels.
const (
	ReadConcernLocal        ReadConcern = "local"
	ReadConcernAvailable    ReadConcern = "available"
	ReadConcernMajority     ReadConcern = "majority"
	ReadConcernLinearizable ReadConcern = "linearizable"
	ReadConcernSnapshot     ReadConcern = "snapshot"
)

// ReadConcernOption is WithReadConcern's: the reads.
type ReadConcernOption struct {
	setting
	findOpt
	countOpt
	distinctOpt
	aggregateOpt
}

// WithReadConcern sets the read concern level of a read.
func WithReadConcern(level ReadConcern) ReadConcernOption {
	return ReadConcernOption{setting: setting{func(o *callSettings) { o.readConcern = level }}}
}

func checkCount(name string, n int64) error {
	if n < 0 {
		return fmt.Errorf("broker: %s must not be negative, not %d", name, n)
	}
	return nil
}
