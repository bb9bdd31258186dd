'use strict';
/**
 * Errors built from the broker's gRPC status.
 *
 * Every error is a {@link BrokerError}. It carries the gRPC status code
 * (`code`, a number, and `codeName`, e.g. "ALREADY_EXISTS"), the message,
 * and what the broker put in the `google.rpc.Status` details (trailer
 * `grpc-status-details-bin`): the `ErrorInfo` reason and metadata
 * (`mongo_code`, `mongo_code_name`, `mongo_labels`, `database`,
 * `inserted_count`, `failed_index`) and a `RetryInfo` delay.
 *
 * A write that failed with MongoDB write errors also reads as the Node
 * driver's MongoServerError (`errmsg`, `index`, `writeErrors`); a failed
 * bulkWrite or insertMany is moreover a {@link BulkWriteError} (`result`,
 * the partial counts), whatever class its gRPC code gives it. `code` stays the gRPC
 * status code, as for every other error: MongoDB's is `mongoCode`.
 */

const path = require('node:path');
const protobuf = require('protobufjs');
const { status: Status } = require('@grpc/grpc-js');
const { EJSON } = require('bson');

const DOMAIN = 'mongo-broker';
const PROTO_FILE = path.join(__dirname, '..', 'proto', 'broker', 'v1', 'broker.proto');

/** @type {Readonly<Record<string, string>> | null} */
let errorReasons = null;

/**
 * The contract's ErrorReason names, each mapped to itself: what
 * `BrokerError.reason` holds (e.g. `ErrorReason.DUPLICATE_KEY`). Read from
 * the .proto on first use, so requiring the package parses nothing.
 * @returns {Readonly<Record<string, string>>}
 */
function errorReason() {
  if (errorReasons === null) {
    const values = protobuf.loadSync(PROTO_FILE).lookupEnum('broker.v1.ErrorReason').values;
    const names = Object.keys(values).filter((name) => values[name] !== 0);
    errorReasons = Object.freeze(Object.fromEntries(names.map((name) => [name, name])));
  }
  return errorReasons;
}

/** @type {Record<number, string>} gRPC code number -> name */
const CODE_NAMES = Object.fromEntries(Object.entries(Status).map(([name, code]) => [code, name]));

// Just enough of google/rpc/status.proto and error_details.proto to read
// the details; field numbers are what matter on the wire. Any is declared
// under its own name so protobufjs does not try to unpack it itself.
const RPC = protobuf.Root.fromJSON({
  nested: {
    rpc: {
      nested: {
        Any: { fields: { typeUrl: { type: 'string', id: 1 }, value: { type: 'bytes', id: 2 } } },
        Duration: { fields: { seconds: { type: 'int64', id: 1 }, nanos: { type: 'int32', id: 2 } } },
        Status: {
          fields: {
            code: { type: 'int32', id: 1 },
            message: { type: 'string', id: 2 },
            details: { rule: 'repeated', type: 'Any', id: 3 },
          },
        },
        ErrorInfo: {
          fields: {
            reason: { type: 'string', id: 1 },
            domain: { type: 'string', id: 2 },
            metadata: { keyType: 'string', type: 'string', id: 3 },
          },
        },
        RetryInfo: { fields: { retryDelay: { type: 'Duration', id: 1 } } },
      },
    },
  },
});
const StatusType = RPC.lookupType('rpc.Status');
const ErrorInfoType = RPC.lookupType('rpc.ErrorInfo');
const RetryInfoType = RPC.lookupType('rpc.RetryInfo');
const ERROR_INFO_URL = 'type.googleapis.com/google.rpc.ErrorInfo';
const RETRY_INFO_URL = 'type.googleapis.com/google.rpc.RetryInfo';

/** Base class of every error this package throws. */
class BrokerError extends Error {
  /**
   * @param {string} message
   * @param {object} [fields]
   * @param {number|null} [fields.code] the gRPC status code (null: raised by the client itself)
   * @param {string} [fields.reason] the broker's ErrorInfo reason, "" when gRPC itself failed
   * @param {Record<string, string>} [fields.metadata] the ErrorInfo metadata
   * @param {number|null} [fields.retryAfterMs] RetryInfo delay in milliseconds
   * @param {unknown[]} [fields.details] every decoded status detail
   * @param {Error} [fields.cause]
   */
  constructor(message, { code = null, reason = '', metadata = {}, retryAfterMs = null, details = [], cause } = {}) {
    super(message, cause ? { cause } : undefined);
    this.name = new.target.name;
    /** @type {number|null} the gRPC status code, e.g. 6 */
    this.code = code;
    /** @type {string} the gRPC code's name, e.g. "ALREADY_EXISTS" */
    this.codeName = code === null ? '' : CODE_NAMES[code] || String(code);
    /** @type {string} the broker's reason, e.g. "DUPLICATE_KEY" */
    this.reason = reason;
    /** @type {Record<string, string>} */
    this.metadata = { ...metadata };
    /** @type {number|null} milliseconds the broker asks the caller to wait */
    this.retryAfterMs = retryAfterMs;
    /** @type {unknown[]} */
    this.details = details;
    /** @type {number} how many times the call was sent (more than 1 after retries) */
    this.attempts = 1;
    /** @type {any[]|undefined} write_errors, parsed on first use */
    this._writeErrors = undefined;
    Object.defineProperty(this, '_writeErrors', { enumerable: false, writable: true });
  }

  /** @returns {number|null} MongoDB's error code (e.g. 11000), when it gave one. */
  get mongoCode() {
    return intOrNull(this.metadata.mongo_code);
  }

  /** @returns {string|null} MongoDB's code name (e.g. "DuplicateKey"). */
  get mongoCodeName() {
    return this.metadata.mongo_code_name || null;
  }

  /** @returns {string[]} MongoDB's error labels (e.g. "RetryableWriteError"). */
  get labels() {
    return (this.metadata.mongo_labels || '').split(',').map((l) => l.trim()).filter(Boolean);
  }

  /** @param {string} label */
  hasErrorLabel(label) {
    return this.labels.includes(label);
  }

  /** @returns {string|null} the configured database the failed call used. */
  get database() {
    return this.metadata.database || null;
  }

  /** @returns {number|null} for a failed insert: documents inserted before it failed. */
  get insertedCount() {
    return intOrNull(this.metadata.inserted_count);
  }

  /** @returns {number|null} for a failed insert: index of the failing document. */
  get failedIndex() {
    return intOrNull(this.metadata.failed_index);
  }

  /** @returns {number|null} for a failed write: documents matched before it failed. */
  get matchedCount() {
    return intOrNull(this.metadata.matched_count);
  }

  /** @returns {number|null} for a failed write: documents modified before it failed. */
  get modifiedCount() {
    return intOrNull(this.metadata.modified_count);
  }

  /** @returns {number|null} for a failed write: documents deleted before it failed. */
  get deletedCount() {
    return intOrNull(this.metadata.deleted_count);
  }

  /** @returns {number|null} for a failed write: documents upserted before it failed. */
  get upsertedCount() {
    return intOrNull(this.metadata.upserted_count);
  }

  /**
   * The write errors MongoDB reported, as the driver's WriteError has them:
   * [{index, code (MongoDB's), codeName, errmsg}]; empty for an error that
   * was not a write error. The broker may cut the list: see
   * `writeErrorsTotal`.
   * @returns {{index: number, code: number, codeName: string, errmsg: string}[]}
   */
  get writeErrors() {
    if (this._writeErrors === undefined) {
      /** @type {any[]} */
      let parsed = [];
      try {
        const value = JSON.parse(this.metadata.write_errors || '[]');
        if (Array.isArray(value)) parsed = value;
      } catch {
        // Malformed metadata: the code, message and counts still stand.
      }
      this._writeErrors = parsed.map((e) => ({
        index: Number(e.index),
        code: Number(e.code),
        codeName: String(e.codeName || ''),
        errmsg: String(e.errmsg || ''),
      }));
    }
    return this._writeErrors;
  }

  /** @returns {number} how many write errors there were, the cut ones included. */
  get writeErrorsTotal() {
    const total = intOrNull(this.metadata.write_errors_total);
    return total === null ? this.writeErrors.length : total;
  }

  /** @returns {string} MongoDB's message of the (first) write error, else the message. */
  get errmsg() {
    const [first] = this.writeErrors;
    return first && first.errmsg ? first.errmsg : this.message;
  }

  /** @returns {number|null} the index of the failing document or operation (`failedIndex`). */
  get index() {
    return this.failedIndex;
  }

  /**
   * The `_id` of every document an upsert inserted before the failure, by
   * operation index.
   * @returns {Record<number, any>}
   */
  get upsertedIds() {
    /** @type {Record<number, any>} */
    const out = {};
    if (!this.metadata.upserted_ids) return out;
    try {
      // Relaxed: numbers as plain numbers, as the client decodes BSON by default.
      const list = EJSON.parse(this.metadata.upserted_ids);
      if (Array.isArray(list)) for (const entry of list) out[Number(entry.index)] = entry._id;
    } catch {
      // Malformed metadata: no ids rather than no error.
    }
    return out;
  }

  /** @returns {{errmsg: string}|null} the write concern's failure, when it failed. */
  get writeConcernError() {
    return this.metadata.write_concern_error ? { errmsg: this.metadata.write_concern_error } : null;
  }

  /** @returns {boolean} worth retrying after a pause (UNAVAILABLE, a full pool). */
  get retryable() {
    return this.code === Status.UNAVAILABLE || this instanceof PoolExhaustedError;
  }
}

/** ALREADY_EXISTS: duplicate key. `insertedCount` says how many documents landed first. */
class DuplicateKeyError extends BrokerError {}
/** UNAVAILABLE: no broker listening, the database unreachable, or the broker draining. Retry. */
class UnavailableError extends BrokerError {}
/** DEADLINE_EXCEEDED: the call's time limit ran out. */
class DeadlineExceededError extends BrokerError {}
/** RESOURCE_EXHAUSTED because the broker's pool or queue is saturated. Back off. */
class PoolExhaustedError extends BrokerError {}
/** RESOURCE_EXHAUSTED because a size or count limit was hit. Send less. */
class LimitExceededError extends BrokerError {}
/** INVALID_ARGUMENT: a malformed request, or one MongoDB refused as bad input. */
class InvalidArgumentError extends BrokerError {}
/** NOT_FOUND: the database name is not configured on the broker. */
class UnknownDatabaseError extends BrokerError {}
/** PERMISSION_DENIED: the token, the database or the query is not allowed. */
class PermissionDeniedError extends BrokerError {}
/** UNAUTHENTICATED: tokens are configured and none, or a wrong one, was sent. */
class UnauthenticatedError extends BrokerError {}
/** CANCELLED: the call was cancelled (cursor closed, client closed). */
class CancelledError extends BrokerError {}
/** FAILED_PRECONDITION, UNIMPLEMENTED, ...: MongoDB refused the operation. */
class OperationFailedError extends BrokerError {}

const BULK_RESULT = Symbol('bulkWriteResult');

/**
 * A failed bulkWrite or insertMany, as the driver's MongoBulkWriteError: `writeErrors`
 * and `result` (what landed). Such an error keeps the class its gRPC code
 * gives it (a duplicate key is still a DuplicateKeyError), and is a
 * BulkWriteError too: `instanceof` checks for the result rather than the
 * prototype, since an error has one prototype chain.
 */
class BulkWriteError extends BrokerError {
  /**
   * @param {unknown} value
   * @returns {boolean}
   */
  static [Symbol.hasInstance](value) {
    return value instanceof BrokerError && /** @type {any} */ (value)[BULK_RESULT] !== undefined;
  }
}

/**
 * Makes a failed bulkWrite's error a BulkWriteError: its `result` holds
 * the counts from the broker's metadata, the ids of the upserts it lists,
 * and the ids of the inserts known to have landed (ordered: those before
 * the failing operation; unordered: those without a write error).
 * An error without write metadata (the broker unreachable, a bad request)
 * is returned as it is.
 * @param {BrokerError} error
 * @param {Map<number, any>} madeIds each insertOne's `_id`, by operation index
 * @param {boolean} ordered
 * @returns {BrokerError}
 */
function markBulkWriteError(error, madeIds, ordered) {
  if (!(error instanceof BrokerError)) return error;
  const meta = error.metadata;
  if (meta.failed_index === undefined && meta.write_errors === undefined && meta.write_concern_error === undefined) {
    return error;
  }
  const failedIndex = error.failedIndex;
  const failing = new Set(error.writeErrors.map((e) => e.index));
  // Unordered, the inserts past the first failure landed unless they failed
  // too, which only a whole list of write errors says (an Insert's error
  // has none, a long list is cut): without it, only those before the first
  // failure are known to have landed.
  const listed = error.writeErrors.length > 0 && error.writeErrorsTotal === error.writeErrors.length;
  /** @type {Record<number, any>} */
  const insertedIds = {};
  for (const [index, id] of madeIds) {
    const landed = ordered || !listed ? failedIndex === null || index < failedIndex : !failing.has(index);
    if (landed) insertedIds[index] = id;
  }
  const result = {
    acknowledged: true,
    insertedCount: error.insertedCount || 0,
    matchedCount: error.matchedCount || 0,
    modifiedCount: error.modifiedCount || 0,
    deletedCount: error.deletedCount || 0,
    upsertedCount: error.upsertedCount || 0,
    insertedIds,
    upsertedIds: error.upsertedIds,
  };
  Object.defineProperty(error, BULK_RESULT, { value: result, enumerable: false });
  Object.defineProperty(error, 'result', { value: result, enumerable: true });
  return error;
}

/** @type {Record<number, typeof BrokerError>} */
const CLASS_BY_CODE = {
  [Status.ALREADY_EXISTS]: DuplicateKeyError,
  [Status.UNAVAILABLE]: UnavailableError,
  [Status.DEADLINE_EXCEEDED]: DeadlineExceededError,
  [Status.RESOURCE_EXHAUSTED]: PoolExhaustedError,
  [Status.INVALID_ARGUMENT]: InvalidArgumentError,
  [Status.NOT_FOUND]: UnknownDatabaseError,
  [Status.PERMISSION_DENIED]: PermissionDeniedError,
  [Status.UNAUTHENTICATED]: UnauthenticatedError,
  [Status.CANCELLED]: CancelledError,
  [Status.FAILED_PRECONDITION]: OperationFailedError,
  [Status.UNIMPLEMENTED]: OperationFailedError,
};

/**
 * @param {number} code
 * @param {string} reason
 * @param {string} message
 * @returns {typeof BrokerError}
 */
function classFor(code, reason, message) {
  // RESOURCE_EXHAUSTED also means "too big", which backing off will not
  // fix: the broker's LIMIT_EXCEEDED, or gRPC's own message-size check.
  if (
    code === Status.RESOURCE_EXHAUSTED &&
    (reason === errorReason().LIMIT_EXCEEDED || /larger than max/i.test(message))
  ) {
    return LimitExceededError;
  }
  return CLASS_BY_CODE[code] || BrokerError;
}

/**
 * Turns a failed call's error (a grpc-js ServiceError) into a BrokerError.
 * @param {any} error
 * @returns {BrokerError}
 */
function fromServiceError(error) {
  if (error instanceof BrokerError) return error;
  if (!error || typeof error.code !== 'number') {
    return new BrokerError(String((error && error.message) || error), { cause: error });
  }
  const message = error.details || error.message || CODE_NAMES[error.code] || 'the call failed';
  const { reason, metadata, retryAfterMs, details } = statusDetails(error.metadata);
  const Class = classFor(error.code, reason, message);
  return new Class(message, { code: error.code, reason, metadata, retryAfterMs, details, cause: error });
}

/**
 * Decodes `grpc-status-details-bin` from a call's trailers.
 * @param {any} trailers a grpc-js Metadata, or undefined
 */
function statusDetails(trailers) {
  /** @type {{reason: string, metadata: Record<string, string>, retryAfterMs: number|null, details: unknown[]}} */
  const out = { reason: '', metadata: {}, retryAfterMs: null, details: [] };
  const values = trailers && typeof trailers.get === 'function' ? trailers.get('grpc-status-details-bin') : [];
  if (!values || values.length === 0) return out;
  let status;
  try {
    status = StatusType.decode(/** @type {Buffer} */ (values[0]));
  } catch {
    return out; // Malformed details: the code and message still stand.
  }
  for (const any of /** @type {any} */ (status).details) {
    if (any.typeUrl === ERROR_INFO_URL) {
      const info = /** @type {any} */ (ErrorInfoType.toObject(ErrorInfoType.decode(any.value), { defaults: true }));
      out.details.push({ type: 'ErrorInfo', ...info });
      if (info.domain === DOMAIN && !out.reason) {
        out.reason = info.reason;
        out.metadata = { ...info.metadata };
      }
    } else if (any.typeUrl === RETRY_INFO_URL) {
      const retry = /** @type {any} */ (RetryInfoType.decode(any.value));
      const delay = retry.retryDelay || {};
      out.retryAfterMs = toNumber(delay.seconds) * 1000 + Math.round(toNumber(delay.nanos) / 1e6);
      out.details.push({ type: 'RetryInfo', retryAfterMs: out.retryAfterMs });
    } else {
      out.details.push({ type: 'Any', typeUrl: any.typeUrl, value: Buffer.from(any.value) });
    }
  }
  return out;
}

/** @param {any} value a number, a Long or undefined */
function toNumber(value) {
  if (value === undefined || value === null) return 0;
  return typeof value === 'object' && typeof value.toNumber === 'function' ? value.toNumber() : Number(value);
}

/** @param {string|undefined} value */
function intOrNull(value) {
  if (value === undefined || value === '') return null;
  const n = Number.parseInt(value, 10);
  return Number.isNaN(n) ? null : n;
}

module.exports = {
  DOMAIN,
  CODE_NAMES,
  errorReason,
  BrokerError,
  DuplicateKeyError,
  UnavailableError,
  DeadlineExceededError,
  PoolExhaustedError,
  LimitExceededError,
  InvalidArgumentError,
  UnknownDatabaseError,
  PermissionDeniedError,
  UnauthenticatedError,
  CancelledError,
  OperationFailedError,
  BulkWriteError,
  markBulkWriteError,
  fromServiceError,
  // For tests: encode a google.rpc.Status the way a server would.
  _types: { StatusType, ErrorInfoType, RetryInfoType, ERROR_INFO_URL, RETRY_INFO_URL },
};
