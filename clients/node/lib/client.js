'use strict';
/**
 * The mongo-broker client: BrokerClient -> Database -> Collection, and the
 * Cursor that Collection.find returns. Documents are BSON (the `bson`
 * package, the MongoDB Node driver's own), so every type survives exactly.
 */

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { BSON, ObjectId } = require('bson');
const { BrokerError, fromServiceError } = require('./errors');

const VERSION = require('../package.json').version;
const PROTO_ROOT = path.join(__dirname, '..', 'proto');
const PROTO_FILE = path.join('broker', 'v1', 'broker.proto');

/** Default time limit of a call, in milliseconds: there is no "wait forever". */
const DEFAULT_TIMEOUT_MS = 30_000;
// A single BSON document may be 16 MiB and the broker never splits one, so
// a response message must be allowed 16 MiB plus its protobuf framing.
const DEFAULT_MAX_RECEIVE_MESSAGE_BYTES = 17 * 1024 * 1024;
// Above the broker's default request cap (32 MiB), so that the broker, not
// the client, names the limit that was hit.
const DEFAULT_MAX_SEND_MESSAGE_BYTES = 48 * 1024 * 1024;
const INT32_MAX = 2 ** 31 - 1;

/** @type {any} */
let brokerService = null;

/** The generated service constructor, loaded once from the proto file. */
function loadService() {
  if (brokerService === null) {
    const definition = protoLoader.loadSync(PROTO_FILE, {
      includeDirs: [PROTO_ROOT],
      keepCase: true, // field names as in the proto: inserted_ids, batch_size
      longs: Number,
      enums: String,
      defaults: true,
      oneofs: true,
    });
    brokerService = /** @type {any} */ (grpc.loadPackageDefinition(definition)).broker.v1.Broker;
  }
  return brokerService;
}

/**
 * The address forms every mongo-broker client accepts: "unix:///abs/path",
 * "unix:/abs/path", a bare absolute socket path, or any gRPC target
 * ("127.0.0.1:50051", "dns:///host:50051").
 * @param {string} target
 * @returns {string}
 */
function normalizeTarget(target) {
  if (typeof target !== 'string' || target.trim() === '') {
    throw new TypeError('target must be a non-empty string');
  }
  const t = target.trim();
  if (t.startsWith('unix://')) {
    if (!t.startsWith('unix:///')) {
      throw new TypeError(`target ${JSON.stringify(t)}: a unix socket needs an absolute path, as unix:///path`);
    }
    return t;
  }
  if (t.startsWith('unix:/')) return `unix://${t.slice('unix:'.length)}`;
  if (t.startsWith('/')) return `unix://${t}`;
  return t;
}

/**
 * @typedef {object} CallOptions
 * @property {number} [timeoutMs] time limit of this call in milliseconds
 *   (default: the client's `timeoutMs`); it becomes the gRPC deadline,
 *   which the broker carries through to MongoDB
 * @property {Date|number} [deadline] an absolute deadline (a Date or epoch
 *   milliseconds) instead of `timeoutMs`
 * @property {string} [requestId] sent as `x-request-id`; the broker logs it
 *   and puts it into the MongoDB operation's comment
 */

/**
 * @typedef {object} ClientOptions
 * @property {string} [token] bearer token, sent as `authorization: Bearer <token>`
 * @property {number} [timeoutMs] default time limit of every call (30000)
 * @property {Record<string, string>} [metadata] more gRPC metadata for every call
 * @property {import('@grpc/grpc-js').ChannelCredentials} [credentials] TLS;
 *   default plaintext, which suits a Unix socket or loopback
 * @property {Record<string, any>} [channelOptions] extra gRPC channel options
 * @property {import('bson').DeserializeOptions} [bsonOptions] how documents
 *   are decoded (default: the Node driver's, e.g. promoteLongs). Pass
 *   `{promoteValues: false}` to keep Int32/Double/Long wrappers, or
 *   `{useBigInt64: true}` to read every int64 as a bigint.
 * @property {import('bson').SerializeOptions} [serializeOptions] how
 *   documents are encoded (default `{ignoreUndefined: true}`)
 */

/** A client for one broker. Make one per process; `close()` it when done. */
class BrokerClient {
  /**
   * @param {string} target "unix:///run/mongo-broker/broker.sock" or "127.0.0.1:50051"
   * @param {ClientOptions} [options]
   */
  constructor(target, options = {}) {
    const { token, timeoutMs = DEFAULT_TIMEOUT_MS, metadata = {}, credentials, channelOptions = {} } = options;
    if (!(typeof timeoutMs === 'number' && timeoutMs > 0 && Number.isFinite(timeoutMs))) {
      throw new TypeError(`timeoutMs must be a positive number, not ${timeoutMs}`);
    }
    if (token !== undefined && (typeof token !== 'string' || token === '')) {
      throw new TypeError('token must be a non-empty string');
    }
    this.target = normalizeTarget(target);
    this.timeoutMs = timeoutMs;
    /** @type {import('bson').DeserializeOptions} */
    this.bsonOptions = { ...(options.bsonOptions || {}) };
    /** @type {import('bson').SerializeOptions} */
    this.serializeOptions = { ignoreUndefined: true, ...(options.serializeOptions || {}) };
    this._metadata = new grpc.Metadata();
    for (const [key, value] of Object.entries(metadata)) this._metadata.add(key.toLowerCase(), String(value));
    if (token !== undefined) this._metadata.set('authorization', `Bearer ${token}`);
    const Broker = loadService();
    this._stub = new Broker(this.target, credentials || grpc.credentials.createInsecure(), {
      'grpc.max_receive_message_length': DEFAULT_MAX_RECEIVE_MESSAGE_BYTES,
      'grpc.max_send_message_length': DEFAULT_MAX_SEND_MESSAGE_BYTES,
      'grpc.primary_user_agent': `mongo-broker-client-node/${VERSION}`,
      ...channelOptions,
    });
    this._closed = false;
    /** @type {Promise<void>|null} what close() returns, once called */
    this._closing = null;
  }

  /**
   * A database configured on the broker (its configured name).
   * @param {string} name
   * @returns {Database}
   */
  db(name) {
    return new Database(this, name);
  }

  /**
   * Checks the broker and its databases (every one, or the one named).
   * A database that is down does not make it throw: see `result.ok`.
   * @param {string} [database]
   * @param {CallOptions} [options]
   * @returns {Promise<PingResult>}
   */
  async ping(database, options = {}) {
    const response = await this._unary('Ping', { database: database || '' }, options);
    const databases = response.databases.map((/** @type {any} */ db) => ({
      ...camelCaseFields(db),
      // A message field the broker left unset reads as null: a pool of zeros.
      pool: camelCaseFields(db.pool || { connections_open: 0, connections_in_use: 0, max_pool_size: 0 }),
    }));
    return { version: response.version, databases, ok: databases.every((/** @type {any} */ db) => db.ok) };
  }

  /**
   * The broker's pool, queue and operation figures, for every database or
   * the one named: the proto's StatsResponse with camelCase field names
   * (`uptimeS`, `connectionsInUse`, `waitP99Ms`, ...), as `ping` has. The
   * keys of the count maps (`rpcs.FindOne`, `operations.getMore`) are kept.
   * @param {string} [database]
   * @param {CallOptions} [options]
   * @returns {Promise<StatsResult>}
   */
  async stats(database, options = {}) {
    const response = await this._unary('Stats', { database: database || '' }, options);
    return { ...camelCaseFields(response), databases: response.databases.map(camelCaseFields) };
  }

  /**
   * Closes the channel; calls in flight fail with CANCELLED. The promise
   * resolves once the channel is shut down; calling it again returns the
   * same promise.
   * @returns {Promise<void>}
   */
  close() {
    if (this._closing === null) {
      this._closed = true;
      const channel = this._stub.getChannel();
      this._stub.close();
      this._closing = shutDown(channel);
    }
    return this._closing;
  }

  /**
   * @param {CallOptions} options
   * @returns {{metadata: import('@grpc/grpc-js').Metadata, callOptions: {deadline: Date}}}
   */
  _call(options) {
    if (this._closed) throw new BrokerError('the client is closed');
    const metadata = this._metadata.clone();
    if (options.requestId !== undefined) metadata.set('x-request-id', String(options.requestId));
    return { metadata, callOptions: { deadline: this._deadline(options) } };
  }

  /**
   * The deadline a call with these options gets.
   * @param {CallOptions} options
   * @returns {Date}
   */
  _deadline(options) {
    let deadline;
    if (options.deadline !== undefined) {
      deadline = options.deadline instanceof Date ? options.deadline : new Date(options.deadline);
    } else {
      const timeoutMs = options.timeoutMs === undefined ? this.timeoutMs : options.timeoutMs;
      if (!(typeof timeoutMs === 'number' && timeoutMs >= 0 && Number.isFinite(timeoutMs))) {
        throw new TypeError(`timeoutMs must be a non-negative number, not ${timeoutMs}`);
      }
      deadline = new Date(Date.now() + timeoutMs);
    }
    if (Number.isNaN(deadline.getTime())) throw new TypeError('deadline must be a Date or epoch milliseconds');
    return deadline;
  }

  /**
   * @param {string} method
   * @param {object} request
   * @param {CallOptions} options
   * @returns {Promise<any>}
   */
  _unary(method, request, options) {
    const { metadata, callOptions } = this._call(options);
    return new Promise((resolve, reject) => {
      this._stub[method](request, metadata, callOptions, (/** @type {any} */ error, /** @type {any} */ response) => {
        if (error) reject(fromServiceError(error));
        else resolve(response);
      });
    });
  }
}

/**
 * @typedef {object} PingResult
 * @property {string} version the broker's version
 * @property {boolean} ok every pinged database answered
 * @property {{database: string, ok: boolean, rttMs: number, error: string,
 *   pool: {connectionsOpen: number, connectionsInUse: number, maxPoolSize: number}}[]} databases
 */

/**
 * @typedef {object} StatsResult
 * @property {string} version the broker's version
 * @property {number} uptimeS seconds since the broker started
 * @property {Record<string, any>[]} databases each database's figures: the
 *   proto's DatabaseStats fields, in camelCase
 */

/**
 * A proto message's fields under camelCase names, the Node driver's style:
 * `connections_in_use` becomes `connectionsInUse`, `rtt_ms` `rttMs`. Only
 * the message's own field names change: the keys inside a map field (a
 * method name, a command name) are data, and are kept.
 * @param {Record<string, any>} message
 * @returns {Record<string, any>}
 */
function camelCaseFields(message) {
  /** @type {Record<string, any>} */
  const out = {};
  for (const [name, value] of Object.entries(message)) {
    out[name.replace(/_([a-z0-9])/g, (_, c) => c.toUpperCase())] = value;
  }
  return out;
}

/**
 * Resolves once a closed grpc-js channel reports SHUTDOWN (at once in the
 * versions we pin, which shut down synchronously; watched otherwise).
 * @param {import('@grpc/grpc-js').Channel} channel
 * @returns {Promise<void>}
 */
function shutDown(channel) {
  return new Promise((resolve) => {
    const check = () => {
      const state = channel.getConnectivityState(false);
      if (state === grpc.connectivityState.SHUTDOWN) resolve();
      else channel.watchConnectivityState(state, Infinity, check);
    };
    check();
  });
}

/** A database configured on the broker. */
class Database {
  /**
   * @param {BrokerClient} client
   * @param {string} name
   */
  constructor(client, name) {
    if (typeof name !== 'string' || name === '') throw new TypeError('database name must be a non-empty string');
    this.client = client;
    this.databaseName = name;
  }

  /**
   * @param {string} name
   * @returns {Collection}
   */
  collection(name) {
    return new Collection(this, name);
  }

  /**
   * Pings this database only.
   * @param {CallOptions} [options]
   */
  ping(options = {}) {
    return this.client.ping(this.databaseName, options);
  }
}

/**
 * @typedef {CallOptions & {
 *   projection?: object, sort?: object|Map<string, number>, skip?: number,
 *   limit?: number, batchSize?: number, hint?: string|object, maxTimeMS?: number,
 *   comment?: string, bsonOptions?: import('bson').DeserializeOptions
 * }} FindOptions
 */

/**
 * @typedef {CallOptions & {
 *   ordered?: boolean, bypassDocumentValidation?: boolean,
 *   writeConcern?: {w?: number|string, j?: boolean, wtimeoutMS?: number}
 * }} InsertOptions
 */

/** A collection of a configured database. */
class Collection {
  /**
   * @param {Database} db
   * @param {string} name
   */
  constructor(db, name) {
    if (typeof name !== 'string' || name === '') throw new TypeError('collection name must be a non-empty string');
    this.db = db;
    this.collectionName = name;
  }

  /**
   * A lazy cursor over the matching documents; the call starts when it is
   * first read (`for await`, `next()`, `toArray()`). The time limit covers
   * the whole stream, from the first batch to the last.
   * @param {object} [filter] a document; empty or omitted matches all
   * @param {FindOptions} [options]
   * @returns {Cursor}
   */
  find(filter = {}, options = {}) {
    const client = this.db.client;
    return new Cursor(client, this._findRequest(filter, options), options, this._bsonOptions(options));
  }

  /**
   * The first matching document, or null: one unary FindOne call, whose
   * errors are thrown as the broker (or grpc) gives them.
   * @param {object} [filter]
   * @param {FindOptions} [options]
   * @returns {Promise<any>}
   */
  async findOne(filter = {}, options = {}) {
    const client = this.db.client;
    const request = this._findRequest(filter, { ...options, limit: 1 });
    const response = await client._unary('FindOne', request, options);
    return response.documents.length > 0 ? BSON.deserialize(response.documents[0], this._bsonOptions(options)) : null;
  }

  /**
   * The FindRequest of `find` and `findOne`.
   * @param {object} filter
   * @param {FindOptions} options
   * @returns {object}
   */
  _findRequest(filter, options) {
    const serialize = this.db.client.serializeOptions;
    const request = {
      database: this.db.databaseName,
      collection: this.collectionName,
      filter: encodeOptional(filter, 'filter', serialize),
      projection: encodeOptional(options.projection, 'projection', serialize),
      sort: encodeOptional(options.sort, 'sort', serialize),
      skip: count(options.skip, 'skip'),
      limit: count(options.limit, 'limit'),
      batch_size: count(options.batchSize, 'batchSize', INT32_MAX),
      max_time_ms: count(options.maxTimeMS, 'maxTimeMS'),
      comment: options.comment === undefined ? '' : String(options.comment),
    };
    if (typeof options.hint === 'string') {
      Object.assign(request, { hint_name: options.hint });
    } else if (options.hint !== undefined) {
      Object.assign(request, { hint_keys: encodeOptional(options.hint, 'hint', serialize) });
    }
    return request;
  }

  /**
   * How documents of a find are decoded: the client's options, then the call's.
   * @param {FindOptions} options
   * @returns {import('bson').DeserializeOptions}
   */
  _bsonOptions(options) {
    return { ...this.db.client.bsonOptions, ...(options.bsonOptions || {}) };
  }

  /**
   * Inserts one document. Without an `_id` it gets an ObjectId here, first
   * (and, as in the Node driver, `document._id` is set), so that a retried
   * insert that had already landed shows up as a DuplicateKeyError.
   * @param {object} document
   * @param {InsertOptions} [options]
   * @returns {Promise<{acknowledged: boolean, insertedId: any}>}
   */
  async insertOne(document, options = {}) {
    const ids = await this._insert([document], { ...options, ordered: true });
    return { acknowledged: isAcknowledged(options), insertedId: ids[0] };
  }

  /**
   * Inserts documents in one call; each without an `_id` gets an ObjectId
   * first. With `ordered: true` (the default) the broker stops at the first
   * error; the error's `insertedCount` and `failedIndex` say what happened.
   * @param {object[]} documents
   * @param {InsertOptions} [options]
   * @returns {Promise<{acknowledged: boolean, insertedCount: number, insertedIds: any[]}>}
   */
  async insertMany(documents, options = {}) {
    if (!Array.isArray(documents) || documents.length === 0) {
      throw new TypeError('documents must be a non-empty array');
    }
    const ids = await this._insert(documents, options);
    return { acknowledged: isAcknowledged(options), insertedCount: ids.length, insertedIds: ids };
  }

  /**
   * @param {object[]} documents
   * @param {InsertOptions} options
   * @returns {Promise<any[]>}
   */
  async _insert(documents, options) {
    const client = this.db.client;
    const encoded = documents.map((doc, i) => encodeForInsert(doc, i, client.serializeOptions));
    /** @type {any} */
    const request = {
      database: this.db.databaseName,
      collection: this.collectionName,
      documents: encoded,
      ordered: options.ordered === undefined ? true : Boolean(options.ordered),
      bypass_document_validation: Boolean(options.bypassDocumentValidation),
    };
    if (options.writeConcern) request.write_concern = writeConcern(options.writeConcern);
    const response = await client._unary('Insert', request, options);
    const idOptions = { ...client.bsonOptions };
    return response.inserted_ids.map((/** @type {Buffer} */ raw) => BSON.deserialize(raw, idOptions)._id);
  }
}

/**
 * The result of `find()`: an async iterable over the server's stream, one
 * MongoDB batch (one gRPC message) at a time. It can be read once.
 *
 *     for await (const doc of collection.find({ qty: { $gt: 3 } })) { ... }
 */
class Cursor {
  /**
   * @param {BrokerClient} client
   * @param {object} request
   * @param {CallOptions} options
   * @param {import('bson').DeserializeOptions} bsonOptions
   */
  constructor(client, request, options, bsonOptions) {
    this._client = client;
    this._request = request;
    this._options = options;
    this._bsonOptions = bsonOptions;
    /** @type {any} the grpc-js call, once started */
    this._call = null;
    this._finished = false;
    this._batches = 0;
    /** @type {{done: boolean, value: any}|null} */
    this._peeked = null;
    this._iterator = this._documents();
  }

  /** Messages (MongoDB batches) received so far. */
  get batches() {
    return this._batches;
  }

  /** @returns {AsyncGenerator<any, void, undefined>} */
  async *_documents() {
    const { metadata, callOptions } = this._client._call(this._options);
    const call = this._client._stub.Find(this._request, metadata, callOptions);
    this._call = call;
    // grpc-js reports a cancel (close(), an early break) as an 'error'
    // event; with nobody iterating any more it must not go unhandled.
    call.on('error', () => {});
    try {
      for await (const message of call) {
        this._batches += 1;
        for (const raw of message.documents) {
          yield BSON.deserialize(raw, this._bsonOptions);
        }
      }
      this._finished = true;
    } catch (error) {
      this._finished = true;
      throw fromServiceError(error);
    } finally {
      // An early break or close(): stop the stream, so the broker closes
      // the server cursor.
      if (!this._finished) call.cancel();
    }
  }

  /** @returns {AsyncGenerator<any, void, undefined>} */
  [Symbol.asyncIterator]() {
    if (this._peeked === null) return this._iterator;
    // A hasNext() looked ahead one document: yield it first.
    const self = this;
    return (async function* resume() {
      const peeked = /** @type {{done: boolean, value: any}} */ (self._peeked);
      self._peeked = null;
      if (peeked.done) return;
      yield peeked.value;
      yield* self._iterator;
    })();
  }

  /**
   * The next document, or null at the end.
   * @returns {Promise<any>}
   */
  async next() {
    const step = this._peeked || (await this._iterator.next());
    this._peeked = step.done ? step : null;
    return step.done ? null : step.value;
  }

  /** @returns {Promise<boolean>} whether another document follows. */
  async hasNext() {
    if (this._peeked === null) this._peeked = /** @type {any} */ (await this._iterator.next());
    return !(/** @type {any} */ (this._peeked).done);
  }

  /**
   * Every remaining document.
   * @returns {Promise<any[]>}
   */
  async toArray() {
    const out = [];
    for await (const doc of this) out.push(doc);
    return out;
  }

  /** Stops the stream if it is still running. Closing twice is harmless. */
  async close() {
    this._peeked = { done: true, value: undefined };
    await this._iterator.return(undefined);
  }
}

/**
 * @param {unknown} value
 * @param {string} what
 * @param {import('bson').SerializeOptions} options
 * @returns {Buffer}
 */
function encodeOptional(value, what, options) {
  if (value === undefined || value === null) return Buffer.alloc(0);
  return encodeDocument(value, what, options);
}

/**
 * @param {unknown} value
 * @param {string} what
 * @param {import('bson').SerializeOptions} options
 * @returns {Buffer}
 */
function encodeDocument(value, what, options) {
  if (Buffer.isBuffer(value) || value instanceof Uint8Array) return Buffer.from(/** @type {Uint8Array} */ (value));
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new TypeError(`${what} must be a document (an object or a Map), not ${describe(value)}`);
  }
  return Buffer.from(BSON.serialize(/** @type {any} */ (value), options));
}

/**
 * A document's BSON with an `_id` first when it had none. The new id is
 * also set on the caller's object, as the Node driver does.
 * @param {any} document
 * @param {number} index
 * @param {import('bson').SerializeOptions} options
 * @returns {Buffer}
 */
function encodeForInsert(document, index, options) {
  const what = `document ${index}`;
  if (document instanceof Map) {
    if (document.get('_id') !== undefined) return encodeDocument(document, what, options);
    const id = new ObjectId();
    document.set('_id', id);
    const withId = new Map([['_id', id]]);
    for (const [key, value] of document) if (key !== '_id') withId.set(key, value);
    return encodeDocument(withId, what, options);
  }
  if (typeof document !== 'object' || document === null || Array.isArray(document) || Buffer.isBuffer(document)) {
    throw new TypeError(`${what} must be a document (an object or a Map), not ${describe(document)}`);
  }
  if (document._id !== undefined) return encodeDocument(document, what, options);
  const id = new ObjectId();
  // _id first on the wire, as the other clients send it; the caller's
  // object gets it too.
  const encoded = encodeDocument({ _id: id, ...document }, what, options);
  document._id = id;
  return encoded;
}

/**
 * @param {{w?: number|string, j?: boolean, wtimeoutMS?: number}} spec
 */
function writeConcern(spec) {
  /** @type {any} */
  const out = { wtimeout_ms: count(spec.wtimeoutMS, 'writeConcern.wtimeoutMS') };
  if (typeof spec.w === 'number') out.w_nodes = spec.w;
  else if (typeof spec.w === 'string') out.w_tag = spec.w;
  else if (spec.w !== undefined) throw new TypeError('writeConcern.w must be a number or a string');
  if (spec.j !== undefined) out.j = Boolean(spec.j);
  return out;
}

/** @param {InsertOptions} options */
function isAcknowledged(options) {
  return !(options.writeConcern && options.writeConcern.w === 0);
}

/**
 * @param {unknown} value
 * @param {string} name
 * @param {number} [maximum]
 * @returns {number}
 */
function count(value, name, maximum = Number.MAX_SAFE_INTEGER) {
  if (value === undefined || value === null) return 0;
  if (!Number.isInteger(value) || /** @type {number} */ (value) < 0 || /** @type {number} */ (value) > maximum) {
    throw new TypeError(`${name} must be an integer from 0 to ${maximum}, not ${describe(value)}`);
  }
  return /** @type {number} */ (value);
}

/** @param {unknown} value */
function describe(value) {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  return typeof value === 'object' ? value.constructor.name : `${typeof value} ${String(value)}`;
}

module.exports = {
  VERSION,
  DEFAULT_TIMEOUT_MS,
  BrokerClient,
  Database,
  Collection,
  Cursor,
  normalizeTarget,
  loadService,
  encodeForInsert,
};
