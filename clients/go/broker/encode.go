package broker

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/mongo-broker/mongo-broker/clients/go/brokerv1"
)

// ErrNonOperatorUpdate is returned, before anything is sent, for an update
// document whose top-level keys are not all $-operators: MongoDB would
// otherwise read it as a replacement, or refuse it.
var ErrNonOperatorUpdate = errors.New("broker: update only works with $ operators")

// ErrOperatorReplacement is returned, before anything is sent, for a
// replacement document with a top-level $-key: it is an update, not a
// replacement.
var ErrOperatorReplacement = errors.New("broker: replacement can not include $ operators")

// Pipeline is an aggregation pipeline (or an update pipeline): one document
// per stage, as the Go driver's mongo.Pipeline.
type Pipeline []bson.D

// collect applies the options of one call, in order: a later option wins.
func collect[O interface{ apply(*callSettings) }](opts []O) callSettings {
	var s callSettings
	for _, opt := range opts {
		opt.apply(&s)
	}
	return s
}

// hintParts splits a Hint into the contract's oneof halves: an index name,
// or the BSON of a key pattern. Both are zero when there is no hint.
func hintParts(hint any) (name string, keys []byte, err error) {
	switch h := hint.(type) {
	case nil:
		return "", nil, nil
	case string:
		if h == "" {
			return "", nil, errors.New("broker: Hint needs an index name or a key pattern, not \"\"")
		}
		return h, nil, nil
	}
	keys, err = marshalDocument("hint", hint)
	return "", keys, err
}

// marshalDocuments encodes a list of documents (array filters, tag sets,
// pipeline stages), none of which may be nil.
func marshalDocuments(what string, documents []any) ([][]byte, error) {
	if len(documents) == 0 {
		return nil, nil
	}
	out := make([][]byte, len(documents))
	for i, document := range documents {
		raw, err := marshalDocument(fmt.Sprintf("%s %d", what, i), document)
		if err != nil {
			return nil, err
		}
		if raw == nil {
			return nil, fmt.Errorf("broker: %s %d must be a document, not nil", what, i)
		}
		out[i] = raw
	}
	return out, nil
}

// isDocument tells a document (bson.D, bson.Raw, a map, a struct) from a
// list of them (a Pipeline, bson.A, []bson.D, []any): bson.D and bson.Raw
// are slices too, but each is one document.
func isDocument(value any) bool {
	switch value.(type) {
	case bson.D, bson.Raw, []byte:
		return true
	}
	kind := reflect.ValueOf(value).Kind()
	return kind != reflect.Slice && kind != reflect.Array
}

// marshalPipeline encodes a pipeline given as any list of stage documents.
func marshalPipeline(what string, pipeline any) ([][]byte, error) {
	if pipeline == nil || isDocument(pipeline) {
		return nil, fmt.Errorf("broker: %s must be a list of stage documents (broker.Pipeline, bson.A, []bson.D), not %T", what, pipeline)
	}
	value := reflect.ValueOf(pipeline)
	stages := make([]any, value.Len())
	for i := range stages {
		stages[i] = value.Index(i).Interface()
	}
	return marshalDocuments(what+" stage", stages)
}

// updateParts encodes an update: an operator document, or an update
// pipeline (a list of stages). pymongo's rule applies to the document: every
// top-level key is a $-operator.
func updateParts(update any) (document []byte, pipeline [][]byte, err error) {
	if update == nil {
		return nil, nil, errors.New("broker: update must not be nil")
	}
	if !isDocument(update) {
		pipeline, err = marshalPipeline("update pipeline", update)
		if err == nil && len(pipeline) == 0 {
			err = errors.New("broker: an update pipeline needs at least one stage")
		}
		return nil, pipeline, err
	}
	document, err = marshalDocument("update", update)
	if err != nil {
		return nil, nil, err
	}
	keys, err := topLevelKeys(document)
	if err != nil {
		return nil, nil, err
	}
	if len(keys) == 0 {
		return nil, nil, errors.New("broker: update cannot be empty")
	}
	for _, key := range keys {
		if !strings.HasPrefix(key, "$") {
			return nil, nil, fmt.Errorf("%w (the update has the key %q)", ErrNonOperatorUpdate, key)
		}
	}
	return document, nil, nil
}

// replacementDocument encodes a replacement, which has no $-operators.
func replacementDocument(replacement any) ([]byte, error) {
	if replacement == nil || !isDocument(replacement) {
		return nil, fmt.Errorf("broker: replacement must be a document, not %T", replacement)
	}
	document, err := marshalDocument("replacement", replacement)
	if err != nil {
		return nil, err
	}
	if document == nil {
		return nil, errors.New("broker: replacement must be a document, not nil")
	}
	keys, err := topLevelKeys(document)
	if err != nil {
		return nil, err
	}
	for _, key := range keys {
		if strings.HasPrefix(key, "$") {
			return nil, fmt.Errorf("%w (the replacement has the key %q)", ErrOperatorReplacement, key)
		}
	}
	return document, nil
}

func topLevelKeys(document []byte) ([]string, error) {
	elements, err := bson.Raw(document).Elements()
	if err != nil {
		return nil, fmt.Errorf("broker: not valid BSON: %w", err)
	}
	keys := make([]string, len(elements))
	for i, element := range elements {
		keys[i] = element.Key()
	}
	return keys, nil
}

// hasWriteStage reports an $out or $merge stage: such a pipeline writes,
// so it is never retried.
func hasWriteStage(pipeline [][]byte) bool {
	for _, stage := range pipeline {
		keys, _ := topLevelKeys(stage)
		for _, key := range keys {
			if key == "$out" || key == "$merge" {
				return true
			}
		}
	}
	return false
}

func writeConcernProto(wc *WriteConcern) (*brokerv1.WriteConcern, error) {
	if wc == nil {
		return nil, nil
	}
	out := &brokerv1.WriteConcern{J: wc.Journal, WtimeoutMs: wc.WTimeout.Milliseconds()}
	switch w := wc.W.(type) {
	case nil:
	case int:
		out.W = &brokerv1.WriteConcern_WNodes{WNodes: int32(w)}
	case int32:
		out.W = &brokerv1.WriteConcern_WNodes{WNodes: w}
	case string:
		out.W = &brokerv1.WriteConcern_WTag{WTag: w}
	default:
		return nil, fmt.Errorf("broker: WriteConcern.W must be an int or a string, not %T", wc.W)
	}
	return out, nil
}

func readPreferenceProto(rp *ReadPreference) (*brokerv1.ReadPreference, error) {
	if rp == nil {
		return nil, nil
	}
	if rp.Mode < PrimaryMode || rp.Mode > NearestMode {
		return nil, fmt.Errorf("broker: ReadPreference.Mode %d is not a mode (PrimaryMode ... NearestMode)", rp.Mode)
	}
	if rp.MaxStaleness < 0 {
		return nil, fmt.Errorf("broker: ReadPreference.MaxStaleness must not be negative, not %v", rp.MaxStaleness)
	}
	tagSets, err := marshalDocuments("tag set", rp.TagSets)
	if err != nil {
		return nil, err
	}
	return &brokerv1.ReadPreference{
		Mode:          brokerv1.ReadPreferenceMode(rp.Mode),
		TagSets:       tagSets,
		MaxStalenessS: int64(rp.MaxStaleness / time.Second),
	}, nil
}

var readConcernLevels = map[ReadConcern]brokerv1.ReadConcernLevel{
	"":                      brokerv1.ReadConcernLevel_READ_CONCERN_UNSPECIFIED,
	ReadConcernLocal:        brokerv1.ReadConcernLevel_READ_CONCERN_LOCAL,
	ReadConcernAvailable:    brokerv1.ReadConcernLevel_READ_CONCERN_AVAILABLE,
	ReadConcernMajority:     brokerv1.ReadConcernLevel_READ_CONCERN_MAJORITY,
	ReadConcernLinearizable: brokerv1.ReadConcernLevel_READ_CONCERN_LINEARIZABLE,
	ReadConcernSnapshot:     brokerv1.ReadConcernLevel_READ_CONCERN_SNAPSHOT,
}

func readConcernProto(level ReadConcern) (brokerv1.ReadConcernLevel, error) {
	if value, ok := readConcernLevels[level]; ok {
		return value, nil
	}
	return 0, fmt.Errorf("broker: %q is not a read concern level (local, available, majority, linearizable, snapshot)", string(level))
}

// readParts are the options every read shares, encoded.
type readParts struct {
	collation      []byte
	readPreference *brokerv1.ReadPreference
	readConcern    brokerv1.ReadConcernLevel
	maxTimeMs      int64
}

func encodeRead(s *callSettings) (readParts, error) {
	var parts readParts
	var err error
	if err = checkCount("MaxTime", int64(s.maxTime)); err != nil {
		return parts, err
	}
	parts.maxTimeMs = s.maxTime.Milliseconds()
	if parts.collation, err = marshalDocument("collation", s.collation); err != nil {
		return parts, err
	}
	if parts.readPreference, err = readPreferenceProto(s.readPreference); err != nil {
		return parts, err
	}
	parts.readConcern, err = readConcernProto(s.readConcern)
	return parts, err
}

// writeParts are the options the writes share, encoded.
type writeParts struct {
	collation    []byte
	let          []byte
	arrayFilters [][]byte
	writeConcern *brokerv1.WriteConcern
	maxTimeMs    int64
}

func encodeWrite(s *callSettings) (writeParts, error) {
	var parts writeParts
	var err error
	if err = checkCount("MaxTime", int64(s.maxTime)); err != nil {
		return parts, err
	}
	parts.maxTimeMs = s.maxTime.Milliseconds()
	if parts.collation, err = marshalDocument("collation", s.collation); err != nil {
		return parts, err
	}
	if parts.let, err = marshalDocument("let", s.let); err != nil {
		return parts, err
	}
	if parts.arrayFilters, err = marshalDocuments("array filter", s.arrayFilters); err != nil {
		return parts, err
	}
	parts.writeConcern, err = writeConcernProto(s.writeConcern)
	return parts, err
}

// idOf reads the value out of a one-field {"_id": value} document, the
// contract's form of every returned id.
func idOf(raw []byte) (any, error) {
	value, err := bson.Raw(raw).LookupErr("_id")
	if err != nil {
		return nil, fmt.Errorf("broker: an id is not a {_id: value} document: %w", err)
	}
	var id any
	if err := value.Unmarshal(&id); err != nil {
		return nil, fmt.Errorf("broker: decoding an id: %w", err)
	}
	return id, nil
}
