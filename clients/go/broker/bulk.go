package broker

import (
	"context"
	"errors"
	"fmt"

	"github.com/mongo-broker/mongo-broker/clients/go/brokerv1"
)

// A WriteModel is one operation of a BulkWrite: an *InsertOneModel,
// *UpdateOneModel, *UpdateManyModel, *ReplaceOneModel, *DeleteOneModel or
// *DeleteManyModel, made by its New function and its setters, as in the Go
// driver.
type WriteModel interface {
	// encode returns the operation's message and, for an insert, the _id
	// of its document (made here when it had none).
	encode() (*brokerv1.WriteModel, any, error)
}

// InsertOneModel inserts one document.
type InsertOneModel struct {
	Document any
}

// NewInsertOneModel returns an empty InsertOneModel.
func NewInsertOneModel() *InsertOneModel { return &InsertOneModel{} }

// SetDocument sets the document to insert. One without an _id gets a new
// ObjectID when the BulkWrite is sent, as InsertOne does.
func (m *InsertOneModel) SetDocument(document any) *InsertOneModel {
	m.Document = document
	return m
}

func (m *InsertOneModel) encode() (*brokerv1.WriteModel, any, error) {
	raw, err := marshalForInsert(m.Document)
	if err != nil {
		return nil, nil, err
	}
	id, err := idOf(raw)
	if err != nil {
		return nil, nil, err
	}
	return &brokerv1.WriteModel{Model: &brokerv1.WriteModel_InsertOne{InsertOne: &brokerv1.InsertOneModel{Document: raw}}}, id, nil
}

// UpdateOneModel updates the first document its filter matches.
type UpdateOneModel struct {
	Filter       any
	Update       any
	Upsert       *bool
	ArrayFilters []any
	Collation    any
	Hint         any
}

// NewUpdateOneModel returns an empty UpdateOneModel.
func NewUpdateOneModel() *UpdateOneModel { return &UpdateOneModel{} }

// SetFilter sets the filter (nil: any document).
func (m *UpdateOneModel) SetFilter(filter any) *UpdateOneModel { m.Filter = filter; return m }

// SetUpdate sets the update: an operator document or an update pipeline.
func (m *UpdateOneModel) SetUpdate(update any) *UpdateOneModel { m.Update = update; return m }

// SetUpsert inserts a document when nothing matches.
func (m *UpdateOneModel) SetUpsert(upsert bool) *UpdateOneModel { m.Upsert = &upsert; return m }

// SetArrayFilters sets the documents naming the elements $[<id>] updates.
func (m *UpdateOneModel) SetArrayFilters(filters []any) *UpdateOneModel {
	m.ArrayFilters = filters
	return m
}

// SetCollation sets the collation, a document such as {"locale": "fr"}.
func (m *UpdateOneModel) SetCollation(collation any) *UpdateOneModel {
	m.Collation = collation
	return m
}

// SetHint names the index: an index name or a key pattern document.
func (m *UpdateOneModel) SetHint(hint any) *UpdateOneModel { m.Hint = hint; return m }

func (m *UpdateOneModel) encode() (*brokerv1.WriteModel, any, error) {
	model, err := updateModel(m.Filter, m.Update, m.Upsert, m.ArrayFilters, m.Collation, m.Hint)
	if err != nil {
		return nil, nil, err
	}
	return &brokerv1.WriteModel{Model: &brokerv1.WriteModel_UpdateOne{UpdateOne: model}}, nil, nil
}

// UpdateManyModel updates every document its filter matches.
type UpdateManyModel struct {
	Filter       any
	Update       any
	Upsert       *bool
	ArrayFilters []any
	Collation    any
	Hint         any
}

// NewUpdateManyModel returns an empty UpdateManyModel.
func NewUpdateManyModel() *UpdateManyModel { return &UpdateManyModel{} }

// SetFilter sets the filter (nil: every document).
func (m *UpdateManyModel) SetFilter(filter any) *UpdateManyModel { m.Filter = filter; return m }

// SetUpdate sets the update: an operator document or an update pipeline.
func (m *UpdateManyModel) SetUpdate(update any) *UpdateManyModel { m.Update = update; return m }

// SetUpsert inserts a document when nothing matches.
func (m *UpdateManyModel) SetUpsert(upsert bool) *UpdateManyModel { m.Upsert = &upsert; return m }

// SetArrayFilters sets the documents naming the elements $[<id>] updates.
func (m *UpdateManyModel) SetArrayFilters(filters []any) *UpdateManyModel {
	m.ArrayFilters = filters
	return m
}

// SetCollation sets the collation, a document such as {"locale": "fr"}.
func (m *UpdateManyModel) SetCollation(collation any) *UpdateManyModel {
	m.Collation = collation
	return m
}

// SetHint names the index: an index name or a key pattern document.
func (m *UpdateManyModel) SetHint(hint any) *UpdateManyModel { m.Hint = hint; return m }

func (m *UpdateManyModel) encode() (*brokerv1.WriteModel, any, error) {
	model, err := updateModel(m.Filter, m.Update, m.Upsert, m.ArrayFilters, m.Collation, m.Hint)
	if err != nil {
		return nil, nil, err
	}
	return &brokerv1.WriteModel{Model: &brokerv1.WriteModel_UpdateMany{UpdateMany: model}}, nil, nil
}

func updateModel(filter, update any, upsert *bool, arrayFilters []any, collation, hint any) (*brokerv1.UpdateModel, error) {
	model := &brokerv1.UpdateModel{Upsert: upsert != nil && *upsert}
	var err error
	if model.Filter, err = marshalDocument("filter", filter); err != nil {
		return nil, err
	}
	if model.Update, model.UpdatePipeline, err = updateParts(update); err != nil {
		return nil, err
	}
	if model.ArrayFilters, err = marshalDocuments("array filter", arrayFilters); err != nil {
		return nil, err
	}
	if model.Collation, err = marshalDocument("collation", collation); err != nil {
		return nil, err
	}
	name, keys, err := hintParts(hint)
	switch {
	case err != nil:
		return nil, err
	case name != "":
		model.Hint = &brokerv1.UpdateModel_HintName{HintName: name}
	case keys != nil:
		model.Hint = &brokerv1.UpdateModel_HintKeys{HintKeys: keys}
	}
	return model, nil
}

// ReplaceOneModel replaces the first document its filter matches.
type ReplaceOneModel struct {
	Filter      any
	Replacement any
	Upsert      *bool
	Collation   any
	Hint        any
}

// NewReplaceOneModel returns an empty ReplaceOneModel.
func NewReplaceOneModel() *ReplaceOneModel { return &ReplaceOneModel{} }

// SetFilter sets the filter (nil: any document).
func (m *ReplaceOneModel) SetFilter(filter any) *ReplaceOneModel { m.Filter = filter; return m }

// SetReplacement sets the replacement, a document without $-operators.
func (m *ReplaceOneModel) SetReplacement(replacement any) *ReplaceOneModel {
	m.Replacement = replacement
	return m
}

// SetUpsert inserts the replacement when nothing matches.
func (m *ReplaceOneModel) SetUpsert(upsert bool) *ReplaceOneModel { m.Upsert = &upsert; return m }

// SetCollation sets the collation, a document such as {"locale": "fr"}.
func (m *ReplaceOneModel) SetCollation(collation any) *ReplaceOneModel {
	m.Collation = collation
	return m
}

// SetHint names the index: an index name or a key pattern document.
func (m *ReplaceOneModel) SetHint(hint any) *ReplaceOneModel { m.Hint = hint; return m }

func (m *ReplaceOneModel) encode() (*brokerv1.WriteModel, any, error) {
	model := &brokerv1.ReplaceOneModel{Upsert: m.Upsert != nil && *m.Upsert}
	var err error
	if model.Filter, err = marshalDocument("filter", m.Filter); err != nil {
		return nil, nil, err
	}
	if model.Replacement, err = replacementDocument(m.Replacement); err != nil {
		return nil, nil, err
	}
	if model.Collation, err = marshalDocument("collation", m.Collation); err != nil {
		return nil, nil, err
	}
	name, keys, err := hintParts(m.Hint)
	switch {
	case err != nil:
		return nil, nil, err
	case name != "":
		model.Hint = &brokerv1.ReplaceOneModel_HintName{HintName: name}
	case keys != nil:
		model.Hint = &brokerv1.ReplaceOneModel_HintKeys{HintKeys: keys}
	}
	return &brokerv1.WriteModel{Model: &brokerv1.WriteModel_ReplaceOne{ReplaceOne: model}}, nil, nil
}

// DeleteOneModel removes the first document its filter matches.
type DeleteOneModel struct {
	Filter    any
	Collation any
	Hint      any
}

// NewDeleteOneModel returns an empty DeleteOneModel.
func NewDeleteOneModel() *DeleteOneModel { return &DeleteOneModel{} }

// SetFilter sets the filter (nil: any document).
func (m *DeleteOneModel) SetFilter(filter any) *DeleteOneModel { m.Filter = filter; return m }

// SetCollation sets the collation, a document such as {"locale": "fr"}.
func (m *DeleteOneModel) SetCollation(collation any) *DeleteOneModel {
	m.Collation = collation
	return m
}

// SetHint names the index: an index name or a key pattern document.
func (m *DeleteOneModel) SetHint(hint any) *DeleteOneModel { m.Hint = hint; return m }

func (m *DeleteOneModel) encode() (*brokerv1.WriteModel, any, error) {
	model, err := deleteModel(m.Filter, m.Collation, m.Hint)
	if err != nil {
		return nil, nil, err
	}
	return &brokerv1.WriteModel{Model: &brokerv1.WriteModel_DeleteOne{DeleteOne: model}}, nil, nil
}

// DeleteManyModel removes every document its filter matches.
type DeleteManyModel struct {
	Filter    any
	Collation any
	Hint      any
}

// NewDeleteManyModel returns an empty DeleteManyModel.
func NewDeleteManyModel() *DeleteManyModel { return &DeleteManyModel{} }

// SetFilter sets the filter (nil: every document).
func (m *DeleteManyModel) SetFilter(filter any) *DeleteManyModel { m.Filter = filter; return m }

// SetCollation sets the collation, a document such as {"locale": "fr"}.
func (m *DeleteManyModel) SetCollation(collation any) *DeleteManyModel {
	m.Collation = collation
	return m
}

// SetHint names the index: an index name or a key pattern document.
func (m *DeleteManyModel) SetHint(hint any) *DeleteManyModel { m.Hint = hint; return m }

func (m *DeleteManyModel) encode() (*brokerv1.WriteModel, any, error) {
	model, err := deleteModel(m.Filter, m.Collation, m.Hint)
	if err != nil {
		return nil, nil, err
	}
	return &brokerv1.WriteModel{Model: &brokerv1.WriteModel_DeleteMany{DeleteMany: model}}, nil, nil
}

func deleteModel(filter, collation, hint any) (*brokerv1.DeleteModel, error) {
	model := &brokerv1.DeleteModel{}
	var err error
	if model.Filter, err = marshalDocument("filter", filter); err != nil {
		return nil, err
	}
	if model.Collation, err = marshalDocument("collation", collation); err != nil {
		return nil, err
	}
	name, keys, err := hintParts(hint)
	switch {
	case err != nil:
		return nil, err
	case name != "":
		model.Hint = &brokerv1.DeleteModel_HintName{HintName: name}
	case keys != nil:
		model.Hint = &brokerv1.DeleteModel_HintKeys{HintKeys: keys}
	}
	return model, nil
}

// BulkWriteResult is what BulkWrite returns (and, in part, a
// BulkWriteException's PartialResult).
type BulkWriteResult struct {
	InsertedCount int64
	MatchedCount  int64
	ModifiedCount int64
	DeletedCount  int64
	UpsertedCount int64
	// UpsertedIDs are the _id of each document an upsert inserted, by the
	// index of its operation.
	UpsertedIDs map[int64]any
	// InsertedIDs are the _id of each InsertOneModel's document, by the
	// index of its operation.
	InsertedIDs map[int64]any
}

// BulkWrite runs models in one call: in order, stopping at the first error
// (the default), or all of them (Ordered(false)). Insert models without an
// _id get an ObjectID here first. When MongoDB refuses operations the error
// is a BulkWriteException: WriteErrors by index, and in PartialResult the
// counts and ids of what landed. BulkWrite is never retried.
func (c *Collection) BulkWrite(ctx context.Context, models []WriteModel, opts ...BulkWriteOption) (*BulkWriteResult, error) {
	if ctx == nil {
		return nil, ErrNilContext
	}
	if len(models) == 0 {
		return nil, errors.New("broker: BulkWrite needs at least one model")
	}
	o := collect(opts)
	ordered := o.ordered == nil || *o.ordered
	request := &brokerv1.BulkWriteRequest{
		Database:                 c.db.name,
		Collection:               c.name,
		Operations:               make([]*brokerv1.WriteModel, len(models)),
		Ordered:                  &ordered,
		BypassDocumentValidation: o.bypassDocumentValidation,
		Comment:                  o.comment,
	}
	insertedIDs := map[int64]any{}
	for i, model := range models {
		if model == nil {
			return nil, fmt.Errorf("broker: BulkWrite model %d is nil", i)
		}
		operation, id, err := model.encode()
		if err != nil {
			return nil, fmt.Errorf("BulkWrite model %d: %w", i, err)
		}
		request.Operations[i] = operation
		if id != nil {
			insertedIDs[int64(i)] = id
		}
	}
	var err error
	if request.Let, err = marshalDocument("let", o.let); err != nil {
		return nil, err
	}
	if request.WriteConcern, err = writeConcernProto(o.writeConcern); err != nil {
		return nil, err
	}
	client := c.db.client
	response, err := unary(ctx, client, false, client.stub.BulkWrite, request)
	if err != nil {
		return nil, asBulkWriteException(err, models, insertedIDs, ordered)
	}
	result := &BulkWriteResult{
		InsertedCount: response.GetInsertedCount(),
		MatchedCount:  response.GetMatchedCount(),
		ModifiedCount: response.GetModifiedCount(),
		DeletedCount:  response.GetDeletedCount(),
		UpsertedCount: response.GetUpsertedCount(),
		UpsertedIDs:   map[int64]any{},
		InsertedIDs:   insertedIDs,
	}
	for _, upserted := range response.GetUpsertedIds() {
		id, err := idOf(upserted.GetId())
		if err != nil {
			return nil, err
		}
		result.UpsertedIDs[int64(upserted.GetIndex())] = id
	}
	// The broker echoes the inserts' ids; they are the ones made here, but
	// its word is what was stored.
	for _, inserted := range response.GetInsertedIds() {
		id, err := idOf(inserted.GetId())
		if err != nil {
			return nil, err
		}
		result.InsertedIDs[int64(inserted.GetIndex())] = id
	}
	return result, nil
}
