'use strict';
/**
 * Node.js client for mongo-broker.
 *
 *     const { BrokerClient } = require('mongo-broker-client');
 *     const client = new BrokerClient('unix:///run/mongo-broker/broker.sock');
 *     const items = client.db('appdb').collection('items');
 *     await items.insertOne({ sku: 'a1', qty: 5 });
 *     for await (const doc of items.find({ qty: { $gt: 3 } }, { sort: { sku: 1 }, limit: 10 })) { ... }
 *     await client.close();
 */

const client = require('./client');
const errors = require('./errors');

module.exports = {
  VERSION: client.VERSION,
  DEFAULT_TIMEOUT_MS: client.DEFAULT_TIMEOUT_MS,
  DEFAULT_RETRY_POLICY: client.DEFAULT_RETRY_POLICY,
  ReturnDocument: client.ReturnDocument,
  BrokerClient: client.BrokerClient,
  Database: client.Database,
  Collection: client.Collection,
  Cursor: client.Cursor,
  normalizeTarget: client.normalizeTarget,
  status: require('@grpc/grpc-js').status,
  BrokerError: errors.BrokerError,
  DuplicateKeyError: errors.DuplicateKeyError,
  UnavailableError: errors.UnavailableError,
  DeadlineExceededError: errors.DeadlineExceededError,
  PoolExhaustedError: errors.PoolExhaustedError,
  LimitExceededError: errors.LimitExceededError,
  InvalidArgumentError: errors.InvalidArgumentError,
  UnknownDatabaseError: errors.UnknownDatabaseError,
  PermissionDeniedError: errors.PermissionDeniedError,
  UnauthenticatedError: errors.UnauthenticatedError,
  CancelledError: errors.CancelledError,
  OperationFailedError: errors.OperationFailedError,
  BulkWriteError: errors.BulkWriteError,
};
// A getter: the names are read from the contract on first use.
Object.defineProperty(module.exports, 'ErrorReason', { enumerable: true, get: errors.errorReason });

