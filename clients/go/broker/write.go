package broker

import (
	"context"
	"errors"

	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/mongo-broker/mongo-broker/clients/go/brokerv1"
)

// UpdateResult is what UpdateOne, UpdateMany and ReplaceOne return.
type UpdateResult struct {
	// MatchedCount is the number of documents the filter matched.
	MatchedCount int64
	// ModifiedCount is the number of documents changed.
	ModifiedCount int64
	// UpsertedCount is 1 when an upsert inserted a document, else 0.
	UpsertedCount int64
	// UpsertedID is the _id of the document an upsert inserted, or nil.
	UpsertedID any
}

// DeleteResult is what DeleteOne and DeleteMany return.
type DeleteResult struct {
	// DeletedCount is the number of documents removed.
	DeletedCount int64
}

// UpdateOne changes the first document filter matches. update is an
// operator document (bson.D{{Key: "$set", Value: ...}}; every top-level key
// must be a $-operator, or ErrNonOperatorUpdate is returned before anything
// is sent) or an update pipeline (broker.Pipeline, bson.A). A write MongoDB
// refuses (a duplicate key from an upsert) is a WriteException. Updates are
// never retried.
func (c *Collection) UpdateOne(ctx context.Context, filter, update any, opts ...UpdateOption) (*UpdateResult, error) {
	return c.update(ctx, "UpdateOne", filter, update, false, opts)
}

// UpdateMany changes every document filter matches; see UpdateOne.
func (c *Collection) UpdateMany(ctx context.Context, filter, update any, opts ...UpdateOption) (*UpdateResult, error) {
	return c.update(ctx, "UpdateMany", filter, update, true, opts)
}

// ReplaceOne replaces the first document filter matches with replacement,
// a document without $-operators (else ErrOperatorReplacement, before
// anything is sent). It keeps the document's _id. Never retried.
func (c *Collection) ReplaceOne(ctx context.Context, filter, replacement any, opts ...UpdateOption) (*UpdateResult, error) {
	return c.update(ctx, "ReplaceOne", filter, replacement, false, opts)
}

func (c *Collection) update(ctx context.Context, method string, filter, change any, multi bool, opts []UpdateOption) (*UpdateResult, error) {
	if ctx == nil {
		return nil, ErrNilContext
	}
	o := collect(opts)
	w, err := encodeWrite(&o)
	if err != nil {
		return nil, err
	}
	request := &brokerv1.UpdateRequest{
		Database:                 c.db.name,
		Collection:               c.name,
		Multi:                    multi,
		Upsert:                   o.upsert,
		ArrayFilters:             w.arrayFilters,
		Collation:                w.collation,
		Let:                      w.let,
		Comment:                  o.comment,
		MaxTimeMs:                w.maxTimeMs,
		WriteConcern:             w.writeConcern,
		BypassDocumentValidation: o.bypassDocumentValidation,
	}
	if request.Filter, err = marshalDocument("filter", filter); err != nil {
		return nil, err
	}
	if method == "ReplaceOne" {
		if len(w.arrayFilters) > 0 {
			return nil, errors.New("broker: ArrayFilters is not an option of ReplaceOne: a replacement has no $[<id>] to fill")
		}
		request.Replacement, err = replacementDocument(change)
	} else {
		request.Update, request.UpdatePipeline, err = updateParts(change)
	}
	if err != nil {
		return nil, err
	}
	name, keys, err := hintParts(o.hint)
	switch {
	case err != nil:
		return nil, err
	case name != "":
		request.Hint = &brokerv1.UpdateRequest_HintName{HintName: name}
	case keys != nil:
		request.Hint = &brokerv1.UpdateRequest_HintKeys{HintKeys: keys}
	}
	client := c.db.client
	response, err := unary(ctx, client, false, client.stub.Update, request)
	if err != nil {
		return nil, asWriteException(err)
	}
	result := &UpdateResult{MatchedCount: response.GetMatchedCount(), ModifiedCount: response.GetModifiedCount()}
	if raw := response.GetUpsertedId(); len(raw) > 0 {
		if result.UpsertedID, err = idOf(raw); err != nil {
			return nil, err
		}
		result.UpsertedCount = 1
	}
	return result, nil
}

// DeleteOne removes the first document filter matches (nil or an empty
// document: any one). Never retried.
func (c *Collection) DeleteOne(ctx context.Context, filter any, opts ...DeleteOption) (*DeleteResult, error) {
	return c.delete(ctx, filter, false, opts)
}

// DeleteMany removes every document filter matches (nil or an empty
// document: every document). Never retried.
func (c *Collection) DeleteMany(ctx context.Context, filter any, opts ...DeleteOption) (*DeleteResult, error) {
	return c.delete(ctx, filter, true, opts)
}

func (c *Collection) delete(ctx context.Context, filter any, multi bool, opts []DeleteOption) (*DeleteResult, error) {
	if ctx == nil {
		return nil, ErrNilContext
	}
	o := collect(opts)
	w, err := encodeWrite(&o)
	if err != nil {
		return nil, err
	}
	request := &brokerv1.DeleteRequest{
		Database:     c.db.name,
		Collection:   c.name,
		Multi:        multi,
		Collation:    w.collation,
		Let:          w.let,
		Comment:      o.comment,
		MaxTimeMs:    w.maxTimeMs,
		WriteConcern: w.writeConcern,
	}
	if request.Filter, err = marshalDocument("filter", filter); err != nil {
		return nil, err
	}
	name, keys, err := hintParts(o.hint)
	switch {
	case err != nil:
		return nil, err
	case name != "":
		request.Hint = &brokerv1.DeleteRequest_HintName{HintName: name}
	case keys != nil:
		request.Hint = &brokerv1.DeleteRequest_HintKeys{HintKeys: keys}
	}
	client := c.db.client
	response, err := unary(ctx, client, false, client.stub.Delete, request)
	if err != nil {
		return nil, asWriteException(err)
	}
	return &DeleteResult{DeletedCount: response.GetDeletedCount()}, nil
}

// FindOneAndUpdate updates the first document filter matches (the first
// by Sort) and returns it as it was (Before, the default) or as the update
// left it (WithReturnDocument(After)); ErrNoDocuments when nothing matched
// and nothing was upserted. update is checked as UpdateOne's. Never retried.
func (c *Collection) FindOneAndUpdate(ctx context.Context, filter, update any, opts ...FindAndModifyOption) *SingleResult {
	return c.findAndModify(ctx, "FindOneAndUpdate", filter, update, opts)
}

// FindOneAndReplace replaces the first document filter matches and returns
// it (Before or After); replacement is checked as ReplaceOne's.
func (c *Collection) FindOneAndReplace(ctx context.Context, filter, replacement any, opts ...FindAndModifyOption) *SingleResult {
	return c.findAndModify(ctx, "FindOneAndReplace", filter, replacement, opts)
}

// FindOneAndDelete removes the first document filter matches and returns
// it; ErrNoDocuments when nothing matched.
func (c *Collection) FindOneAndDelete(ctx context.Context, filter any, opts ...FindAndModifyOption) *SingleResult {
	return c.findAndModify(ctx, "FindOneAndDelete", filter, nil, opts)
}

func (c *Collection) findAndModify(ctx context.Context, method string, filter, change any, opts []FindAndModifyOption) *SingleResult {
	if ctx == nil {
		return &SingleResult{err: ErrNilContext}
	}
	request, err := c.findAndModifyRequest(method, filter, change, opts)
	if err != nil {
		return &SingleResult{err: err}
	}
	client := c.db.client
	response, err := unary(ctx, client, false, client.stub.FindOneAndModify, request)
	if err != nil {
		return &SingleResult{err: asWriteException(err)}
	}
	if document := response.GetDocument(); len(document) > 0 {
		return &SingleResult{raw: bson.Raw(document)}
	}
	return &SingleResult{err: ErrNoDocuments}
}

func (c *Collection) findAndModifyRequest(method string, filter, change any, opts []FindAndModifyOption) (*brokerv1.FindOneAndModifyRequest, error) {
	o := collect(opts)
	w, err := encodeWrite(&o)
	if err != nil {
		return nil, err
	}
	request := &brokerv1.FindOneAndModifyRequest{
		Database:                 c.db.name,
		Collection:               c.name,
		Upsert:                   o.upsert,
		ReturnDocument:           brokerv1.ReturnDocument(o.returnDocument),
		ArrayFilters:             w.arrayFilters,
		Collation:                w.collation,
		Let:                      w.let,
		Comment:                  o.comment,
		MaxTimeMs:                w.maxTimeMs,
		WriteConcern:             w.writeConcern,
		BypassDocumentValidation: o.bypassDocumentValidation,
	}
	if o.returnDocument != Before && o.returnDocument != After {
		return nil, errors.New("broker: WithReturnDocument takes broker.Before or broker.After")
	}
	switch method {
	case "FindOneAndUpdate":
		request.Update, request.UpdatePipeline, err = updateParts(change)
	case "FindOneAndReplace":
		if len(w.arrayFilters) > 0 {
			return nil, errors.New("broker: ArrayFilters is not an option of FindOneAndReplace: a replacement has no $[<id>] to fill")
		}
		request.Replacement, err = replacementDocument(change)
	case "FindOneAndDelete":
		// The options that describe a change mean nothing to a removal:
		// refused, as the Go driver's FindOneAndDeleteOptions lack them.
		switch {
		case o.upsert:
			err = errors.New("broker: Upsert is not an option of FindOneAndDelete")
		case len(w.arrayFilters) > 0:
			err = errors.New("broker: ArrayFilters is not an option of FindOneAndDelete")
		case o.returnDocument == After:
			err = errors.New("broker: FindOneAndDelete returns the document as it was; WithReturnDocument(After) has nothing to return")
		case o.bypassDocumentValidation:
			err = errors.New("broker: BypassDocumentValidation is not an option of FindOneAndDelete")
		}
		request.Remove = true
	}
	if err != nil {
		return nil, err
	}
	if request.Filter, err = marshalDocument("filter", filter); err != nil {
		return nil, err
	}
	if request.Sort, err = marshalDocument("sort", o.sort); err != nil {
		return nil, err
	}
	if request.Projection, err = marshalDocument("projection", o.projection); err != nil {
		return nil, err
	}
	name, keys, err := hintParts(o.hint)
	switch {
	case err != nil:
		return nil, err
	case name != "":
		request.Hint = &brokerv1.FindOneAndModifyRequest_HintName{HintName: name}
	case keys != nil:
		request.Hint = &brokerv1.FindOneAndModifyRequest_HintKeys{HintKeys: keys}
	}
	return request, nil
}
