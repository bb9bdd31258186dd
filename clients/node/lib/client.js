'use strict';
/**
 * The mongo-broker client: BrokerClient -> Database -> Collection, and the
 * Cursor that Collection.find and Collection.aggregate return. Documents
 * are BSON (the `bson` package, the MongoDB Node driver's own), so every
 * type survives exactly.
 */

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { BSON, ObjectId } = require('bson');
const { BrokerError, InvalidArgumentError, fromServiceError, markBulkWriteError } = require('./errors');
const { Tier, parseTier } = require('./tier');

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
// A retry is not started with less of the deadline left than this: it could
// only end in DEADLINE_EXCEEDED, hiding the error that caused it.
const MIN_ATTEMPT_MS = 10;

/**
 * How reads are retried (the Python client's RetryPolicy, in milliseconds).
 * @typedef {object} RetryPolicy
 * @property {number} maxAttempts tries in all, the first included (1: no retries)
 * @property {number} initialBackoffMs the cap on the pause before the first retry
 * @property {number} maxBackoffMs the largest cap on any pause
 * @property {number} multiplier how much the cap grows with each retry
 */

/** @type {Readonly<RetryPolicy>} three tries, pauses of at most 50, 100 ms (then up to 1 s) */
const DEFAULT_RETRY_POLICY = Object.freeze({ maxAttempts: 3, initialBackoffMs: 50, maxBackoffMs: 1000, multiplier: 2 });

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
 * @property {ReadPreferenceLike} [readPreference] of every read, unless its
 *   database, collection or call says otherwise (as the driver's MongoClient)
 * @property {ReadConcernLike} [readConcern] likewise
 * @property {WriteConcernSpec} [writeConcern] of every write, likewise
 * @property {Partial<RetryPolicy>|null} [retries] how reads, and inserts
 *   whose every `_id` was made here, are retried (default
 *   DEFAULT_RETRY_POLICY; null: every call is made once). The other writes
 *   are never retried: updates, deletes and bulk writes are not idempotent.
 */

/**
 * The options a Database or Collection hands down to its operations, as
 * the Node driver's `db(name, options)` and `collection(name, options)`
 * take them; a call's own options win.
 * @typedef {object} InheritedOptions
 * @property {ReadPreferenceLike} [readPreference]
 * @property {ReadConcernLike} [readConcern]
 * @property {WriteConcernSpec} [writeConcern]
 */

/**
 * @typedef {'primary'|'primaryPreferred'|'secondary'|'secondaryPreferred'|'nearest'} ReadPreferenceMode
 * @typedef {ReadPreferenceMode|{
 *   mode: ReadPreferenceMode, tags?: object[], maxStalenessSeconds?: number
 * }} ReadPreferenceLike
 * @typedef {'local'|'available'|'majority'|'linearizable'|'snapshot'} ReadConcernLevel
 * @typedef {ReadConcernLevel|{level: ReadConcernLevel}} ReadConcernLike
 * @typedef {{w?: number|string, j?: boolean, wtimeoutMS?: number}} WriteConcernSpec
 */

/** A client for one broker. Make one per process; `close()` it when done. */
class BrokerClient {
  /**
   * @param {string|string[]} target one broker, "unix:///run/mongo-broker/broker.sock"
   *   or "127.0.0.1:50051"; or a tier of replicas: "dns:///name:port", or a
   *   list of addresses (["10.0.0.5:50051", "10.0.0.6:50051"]), over which
   *   calls are spread to the replicas whose health is SERVING (see tier.js)
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
    const tier = parseTier(target, normalizeTarget);
    /** @type {string} the target as given; a list's addresses joined by commas */
    this.target = tier === null ? normalizeTarget(/** @type {string} */ (target)) : String(target).trim();
    this.timeoutMs = timeoutMs;
    /** @type {import('bson').DeserializeOptions} */
    this.bsonOptions = { ...(options.bsonOptions || {}) };
    /** @type {import('bson').SerializeOptions} */
    this.serializeOptions = { ignoreUndefined: true, ...(options.serializeOptions || {}) };
    /** @type {Readonly<RetryPolicy>|null} */
    this.retries = retryPolicy(options.retries);
    /** @type {InheritedOptions} what every database hands down */
    this.options = inheritedOptions(options, {});
    this._metadata = new grpc.Metadata();
    for (const [key, value] of Object.entries(metadata)) this._metadata.add(key.toLowerCase(), String(value));
    if (token !== undefined) this._metadata.set('authorization', `Bearer ${token}`);
    const Broker = loadService();
    /**
     * @param {string} address
     * @param {Record<string, string>} [tierOptions] a tier's, under the caller's
     */
    const stubFor = (address, tierOptions = {}) =>
      new Broker(address, credentials || grpc.credentials.createInsecure(), {
        'grpc.max_receive_message_length': DEFAULT_MAX_RECEIVE_MESSAGE_BYTES,
        'grpc.max_send_message_length': DEFAULT_MAX_SEND_MESSAGE_BYTES,
        'grpc.primary_user_agent': `mongo-broker-client-node/${VERSION}`,
        ...tierOptions,
        ...channelOptions,
      });
    /** @type {any} the one broker's stub; null for a tier */
    this._stub = tier === null ? stubFor(this.target) : null;
    /** @type {Tier|null} the replicas of a tier, one channel each */
    this._tier = tier === null ? null : new Tier(tier, stubFor);
    this._retryCount = 0;
    this._closed = false;
    /** @type {Promise<void>|null} what close() returns, once called */
    this._closing = null;
  }

  /**
   * A database configured on the broker (its configured name).
   * @param {string} name
   * @param {InheritedOptions} [options] read preference, read concern and
   *   write concern for its collections' operations
   * @returns {Database}
   */
  db(name, options = {}) {
    return new Database(this, name, options);
  }

  /**
   * Checks the broker and its databases (every one, or the one named).
   * A database that is down does not make it throw: see `result.ok`.
   * @param {string} [database]
   * @param {CallOptions} [options]
   * @returns {Promise<PingResult>}
   */
  async ping(database, options = {}) {
    const response = await this._unary('Ping', { database: database || '' }, options, true);
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
    const response = await this._unary('Stats', { database: database || '' }, options, true);
    return {
      ...camelCaseFields(response),
      databases: response.databases.map(camelCaseFields),
      peers: (response.peers || []).map(camelCaseFields),
    };
  }

  /**
   * Closes the channel (a tier's channels): calls in flight finish (grpc-js
   * lets them), later calls throw. The promise
   * resolves once the channel is shut down; calling it again returns the
   * same promise.
   * @returns {Promise<void>}
   */
  close() {
    if (this._closing === null) {
      this._closed = true;
      let channels;
      if (this._tier !== null) {
        channels = this._tier.close();
      } else {
        channels = [this._stub.getChannel()];
        this._stub.close();
      }
      this._closing = Promise.all(channels.map(shutDown)).then(() => undefined);
    }
    return this._closing;
  }

  /**
   * How many retries this client has made since it was created, over every
   * call: attempts beyond each call's first. A failed call's error says
   * how many attempts it made (`error.attempts`).
   * @returns {number}
   */
  get retryCount() {
    return this._retryCount;
  }

  /**
   * A tier's replicas and their health as this client sees it
   * (CONNECTING, SERVING, NOT_SERVING or UNREACHABLE); empty for one broker.
   * @returns {{address: string, state: string}[]}
   */
  replicas() {
    return this._tier === null ? [] : this._tier.replicas();
  }

  /**
   * The stub for the next attempt: the one broker's, or a tier's next
   * SERVING replica's (`avoid`, where the last attempt failed, last).
   * @param {Date} deadline
   * @param {string} [avoid]
   * @returns {Promise<{stub: any, address: string}>}
   */
  async _pick(deadline, avoid) {
    if (this._closed) throw new BrokerError('the client is closed');
    if (this._tier === null) return { stub: this._stub, address: this.target };
    return this._tier.pick(deadline, avoid);
  }

  /**
   * Tells a tier that an attempt on `address` failed with `error`.
   * @param {string} address
   * @param {BrokerError} error
   */
  _failed(address, error) {
    if (this._tier !== null) this._tier.failed(address, error);
  }

  /**
   * @param {CallOptions} options
   * @param {Date} [deadline] the operation's, shared by its attempts
   * @returns {{metadata: import('@grpc/grpc-js').Metadata, callOptions: {deadline: Date}}}
   */
  _call(options, deadline) {
    if (this._closed) throw new BrokerError('the client is closed');
    const metadata = this._metadata.clone();
    if (options.requestId !== undefined) metadata.set('x-request-id', String(options.requestId));
    return { metadata, callOptions: { deadline: deadline || this._deadline(options) } };
  }

  /**
   * The attempts of one operation: `retry` false (a write) makes it once.
   * @param {string} operation
   * @param {Date} deadline
   * @param {boolean} retry
   * @returns {RetryState}
   */
  _retryState(operation, deadline, retry) {
    return new RetryState(
      retry ? this.retries : null,
      deadline.getTime(),
      operation,
      () => {
        this._retryCount += 1;
      },
      () => this._closed,
    );
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
   * One unary operation: a call, and for a read (`retry`) the retries the
   * policy allows, all within one deadline.
   * @param {string} method
   * @param {object} request
   * @param {CallOptions} options
   * @param {boolean} [retry] only for idempotent calls (reads, ping, stats)
   * @returns {Promise<any>}
   */
  async _unary(method, request, options, retry = false) {
    const deadline = this._deadline(options);
    const state = this._retryState(method, deadline, retry);
    return this._unaryAttempts(method, request, options, deadline, state);
  }

  /**
   * The attempts of a unary call under `state`, each on the next replica.
   * @param {string} method
   * @param {object} request
   * @param {CallOptions} options
   * @param {Date} deadline
   * @param {RetryState} state
   * @returns {Promise<any>}
   */
  async _unaryAttempts(method, request, options, deadline, state) {
    /** @type {string|undefined} */
    let avoid;
    for (;;) {
      try {
        return await this._unaryOnce(method, request, options, deadline, avoid);
      } catch (error) {
        avoid = /** @type {any} */ (error).address;
        await sleep(state.backoff(/** @type {BrokerError} */ (error)));
      }
    }
  }

  /**
   * One attempt; its error carries the `address` it went to.
   * @param {string} method
   * @param {object} request
   * @param {CallOptions} options
   * @param {Date} deadline
   * @param {string} [avoid] a replica to give this attempt only when no other serves
   * @returns {Promise<any>}
   */
  async _unaryOnce(method, request, options, deadline, avoid) {
    const { stub, address } = await this._pick(deadline, avoid);
    // After the pick: close() may have come while it waited.
    const { metadata, callOptions } = this._call(options, deadline);
    return new Promise((resolve, reject) => {
      stub[method](request, metadata, callOptions, (/** @type {any} */ error, /** @type {any} */ response) => {
        if (!error) {
          resolve(response);
          return;
        }
        const failure = fromServiceError(error);
        this._failed(address, failure);
        reject(Object.defineProperty(failure, 'address', { value: address, enumerable: false, configurable: true }));
      });
    });
  }
}

/**
 * One operation's attempts and pauses within its deadline: "full jitter"
 * backoff (a uniform random pause in [0, cap]), so that many workers that
 * failed together do not retry together. Only UNAVAILABLE and a full pool
 * (`BrokerError.retryable`), and a CANCELLED of the server's (see
 * `_serverCancelled`), are retried; a RetryInfo delay from the broker is
 * the least pause. On a tier each attempt goes to the next SERVING
 * replica, the one that failed last.
 */
class RetryState {
  /**
   * @param {Readonly<RetryPolicy>|null} policy null: no retries
   * @param {number} deadline epoch milliseconds
   * @param {string} operation
   */
  /**
   * @param {Readonly<RetryPolicy>|null} policy
   * @param {number} deadline
   * @param {string} operation
   * @param {() => void} [onRetry] called at each retry (the client's count)
   * @param {() => boolean} [closed] whether the client was closed (its calls CANCELLED)
   */
  constructor(policy, deadline, operation, onRetry = () => {}, closed = () => false) {
    this.policy = policy;
    this.deadline = deadline;
    this.operation = operation;
    this.onRetry = onRetry;
    this.closed = closed;
    /** Attempts that failed and were retried. */
    this.failures = 0;
  }

  /**
   * The pause before retrying after `error`; throws `error` when it must
   * not be retried.
   * @param {BrokerError} error
   * @returns {number} milliseconds
   */
  backoff(error) {
    if (error instanceof BrokerError) error.attempts = this.failures + 1;
    const policy = this.policy;
    if (policy === null || !(error instanceof BrokerError) || !(error.retryable || this._serverCancelled(error))) {
      throw error;
    }
    if (this.failures + 1 >= policy.maxAttempts) throw error;
    // A bounded exponent: 2 ** 2000 is Infinity.
    const growth = policy.multiplier ** Math.min(this.failures, 64);
    const cap = Math.min(policy.maxBackoffMs, policy.initialBackoffMs * growth);
    let delay = Math.random() * cap;
    if (error.retryAfterMs !== null) delay = Math.max(delay, error.retryAfterMs);
    if (this.deadline - Date.now() - delay < MIN_ATTEMPT_MS) throw error;
    this.failures += 1;
    this.onRetry();
    return delay;
  }

  /**
   * CANCELLED that this client did not cause (it cancels a unary call only
   * by closing, and a stream only once nobody reads it): a gRPC server that
   * stops cancels the calls it had received but not yet handed to the
   * broker (https://github.com/grpc/grpc/issues/41785), calls that never ran.
   * @param {BrokerError} error
   */
  _serverCancelled(error) {
    return error.code === grpc.status.CANCELLED && !this.closed();
  }
}

/**
 * A client's retry policy from its `retries` option.
 * @param {Partial<RetryPolicy>|null|undefined} spec
 * @returns {Readonly<RetryPolicy>|null}
 */
function retryPolicy(spec) {
  if (spec === null) return null;
  if (spec === undefined) return DEFAULT_RETRY_POLICY;
  if (typeof spec !== 'object') throw new TypeError(`retries must be an object or null, not ${describe(spec)}`);
  const policy = { ...DEFAULT_RETRY_POLICY, ...spec };
  if (!Number.isInteger(policy.maxAttempts) || policy.maxAttempts < 1) {
    throw new TypeError(`retries.maxAttempts must be an integer of at least 1, not ${describe(policy.maxAttempts)}`);
  }
  for (const name of /** @type {const} */ (['initialBackoffMs', 'maxBackoffMs', 'multiplier'])) {
    if (typeof policy[name] !== 'number' || !Number.isFinite(policy[name]) || policy[name] < 0) {
      throw new TypeError(`retries.${name} must be a non-negative number, not ${describe(policy[name])}`);
    }
  }
  if (policy.maxBackoffMs < policy.initialBackoffMs) {
    throw new TypeError('retries.maxBackoffMs must be >= initialBackoffMs');
  }
  if (policy.multiplier < 1) throw new TypeError('retries.multiplier must be >= 1');
  return Object.freeze(policy);
}

/** @param {number} ms */
function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
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
 * @property {string} instance the replica that answered (server.instance)
 * @property {string} caller this call's own peer as the broker saw it
 * @property {{host: string, calls: number, lastCallSAgo: number}[]} peers
 *   calls by calling host, most recent first
 * @property {number} peersDropped hosts dropped from peers to keep it bounded
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
   * @param {InheritedOptions} [options]
   */
  constructor(client, name, options = {}) {
    if (typeof name !== 'string' || name === '') throw new TypeError('database name must be a non-empty string');
    this.client = client;
    this.databaseName = name;
    /** @type {InheritedOptions} the client's options, with this database's over them */
    this.options = inheritedOptions(options, client.options || {});
  }

  /**
   * @param {string} name
   * @param {InheritedOptions} [options] read preference, read concern and
   *   write concern for its operations, over the database's
   * @returns {Collection}
   */
  collection(name, options = {}) {
    return new Collection(this, name, options);
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
 * The options of every read: how strings compare, and where and how
 * consistently it reads.
 * @typedef {object} ReadOptions
 * @property {object} [collation] e.g. {locale: 'fr'}
 * @property {ReadPreferenceLike} [readPreference] over the collection's
 * @property {ReadConcernLike} [readConcern] over the collection's
 */

/**
 * @typedef {CallOptions & ReadOptions & {
 *   projection?: object, sort?: object|Map<string, number>, skip?: number,
 *   limit?: number, batchSize?: number, hint?: string|object, maxTimeMS?: number,
 *   comment?: string, bsonOptions?: import('bson').DeserializeOptions
 * }} FindOptions
 */

/**
 * @typedef {CallOptions & {
 *   ordered?: boolean, bypassDocumentValidation?: boolean,
 *   writeConcern?: WriteConcernSpec
 * }} InsertOptions
 */

/**
 * @typedef {CallOptions & {
 *   upsert?: boolean, arrayFilters?: object[], hint?: string|object,
 *   collation?: object, let?: object, comment?: string, maxTimeMS?: number,
 *   bypassDocumentValidation?: boolean, writeConcern?: WriteConcernSpec
 * }} UpdateOptions
 */

/**
 * @typedef {CallOptions & {
 *   hint?: string|object, collation?: object, let?: object, comment?: string,
 *   maxTimeMS?: number, writeConcern?: WriteConcernSpec
 * }} DeleteOptions
 */

/**
 * @typedef {CallOptions & {
 *   returnDocument?: 'before'|'after', upsert?: boolean, projection?: object,
 *   sort?: object|Map<string, number>, arrayFilters?: object[], hint?: string|object,
 *   collation?: object, let?: object, comment?: string, maxTimeMS?: number,
 *   bypassDocumentValidation?: boolean, writeConcern?: WriteConcernSpec,
 *   includeResultMetadata?: false, bsonOptions?: import('bson').DeserializeOptions
 * }} FindOneAndModifyOptions
 */

/**
 * @typedef {CallOptions & ReadOptions & {
 *   skip?: number, limit?: number, hint?: string|object, maxTimeMS?: number, comment?: string
 * }} CountDocumentsOptions
 */

/**
 * @typedef {CallOptions & {
 *   readPreference?: ReadPreferenceLike, readConcern?: ReadConcernLike,
 *   maxTimeMS?: number, comment?: string
 * }} EstimatedDocumentCountOptions
 */

/**
 * @typedef {CallOptions & ReadOptions & {
 *   maxTimeMS?: number, comment?: string, bsonOptions?: import('bson').DeserializeOptions
 * }} DistinctOptions
 */

/**
 * @typedef {CallOptions & ReadOptions & {
 *   allowDiskUse?: boolean, batchSize?: number, hint?: string|object, let?: object,
 *   comment?: string, maxTimeMS?: number, bypassDocumentValidation?: boolean,
 *   writeConcern?: WriteConcernSpec, bsonOptions?: import('bson').DeserializeOptions
 * }} AggregateOptions
 */

/**
 * @typedef {CallOptions & {
 *   ordered?: boolean, bypassDocumentValidation?: boolean, writeConcern?: WriteConcernSpec,
 *   comment?: string, let?: object
 * }} BulkWriteOptions
 */

/**
 * @typedef {object} UpdateResult
 * @property {boolean} acknowledged
 * @property {number} matchedCount
 * @property {number} modifiedCount
 * @property {number} upsertedCount
 * @property {any} upsertedId the `_id` an upsert inserted, or null
 */

/**
 * @typedef {object} BulkWriteResult
 * @property {boolean} acknowledged
 * @property {number} insertedCount
 * @property {number} matchedCount
 * @property {number} modifiedCount
 * @property {number} deletedCount
 * @property {number} upsertedCount
 * @property {Record<number, any>} insertedIds operation index -> the inserted `_id`
 * @property {Record<number, any>} upsertedIds operation index -> the upserted `_id`
 */

/** What `returnDocument` names, as the Node driver spells it. */
const ReturnDocument = Object.freeze({
  BEFORE: /** @type {'before'} */ ('before'),
  AFTER: /** @type {'after'} */ ('after'),
});

/** A collection of a configured database. */
class Collection {
  /**
   * @param {Database} db
   * @param {string} name
   * @param {InheritedOptions} [options]
   */
  constructor(db, name, options = {}) {
    if (typeof name !== 'string' || name === '') throw new TypeError('collection name must be a non-empty string');
    this.db = db;
    this.collectionName = name;
    /** @type {InheritedOptions} the database's options, with this collection's over them */
    this.options = inheritedOptions(options, db.options || {});
  }

  /**
   * A lazy cursor over the matching documents; the call starts when it is
   * first read (`for await`, `next()`, `toArray()`). The time limit covers
   * the whole stream, from the first batch to the last. A failure before
   * the first document arrives is retried as the client's policy says.
   * @param {object} [filter] a document; empty or omitted matches all
   * @param {FindOptions} [options]
   * @returns {Cursor}
   */
  find(filter = {}, options = {}) {
    const client = this.db.client;
    return new Cursor(client, this._findRequest(filter, options), options, this._bsonOptions(options));
  }

  /**
   * The first matching document, or null: one unary FindOne call (retried
   * as a read), whose errors are thrown as the broker (or grpc) gives them.
   * @param {object} [filter]
   * @param {FindOptions} [options]
   * @returns {Promise<any>}
   */
  async findOne(filter = {}, options = {}) {
    const client = this.db.client;
    const request = this._findRequest(filter, { ...options, limit: 1 });
    const response = await client._unary('FindOne', request, options, true);
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
    return {
      ...this._target(),
      filter: encodeOptional(filter, 'filter', serialize),
      projection: encodeOptional(options.projection, 'projection', serialize),
      sort: encodeOptional(options.sort, 'sort', serialize),
      skip: count(options.skip, 'skip'),
      limit: count(options.limit, 'limit'),
      batch_size: count(options.batchSize, 'batchSize', INT32_MAX),
      max_time_ms: count(options.maxTimeMS, 'maxTimeMS'),
      comment: comment(options.comment),
      ...hintFields(options.hint, serialize),
      ...this._readFields(options),
    };
  }

  /** The database and collection every request names. */
  _target() {
    return { database: this.db.databaseName, collection: this.collectionName };
  }

  /**
   * A read's collation, read preference and read concern: the call's,
   * else the collection's (then the database's).
   * @param {ReadOptions} options
   * @returns {object}
   */
  _readFields(options) {
    const serialize = this.db.client.serializeOptions;
    /** @type {any} */
    const out = { collation: encodeOptional(options.collation, 'collation', serialize) };
    const preference = options.readPreference != null ? options.readPreference : this.options.readPreference;
    if (preference != null) out.read_preference = readPreference(preference, serialize);
    const concern = options.readConcern != null ? options.readConcern : this.options.readConcern;
    if (concern != null) out.read_concern = readConcern(concern);
    return out;
  }

  /**
   * The write concern of a write: the call's, else the collection's.
   * @param {{writeConcern?: WriteConcernSpec}} options
   * @returns {WriteConcernSpec|undefined}
   */
  _writeConcernSpec(options) {
    return options.writeConcern || this.options.writeConcern;
  }

  /**
   * How documents of a find are decoded: the client's options, then the call's.
   * @param {{bsonOptions?: import('bson').DeserializeOptions}} options
   * @returns {import('bson').DeserializeOptions}
   */
  _bsonOptions(options) {
    return { ...this.db.client.bsonOptions, ...(options.bsonOptions || {}) };
  }

  /**
   * Inserts one document. Without an `_id` it gets an ObjectId here, first
   * (and, as in the Node driver, `document._id` is set). Only such an
   * insert, whose `_id` was made here, is retried: a retry that meets a
   * duplicate key of that new ObjectId asks the broker whether it is
   * stored, and if so the earlier attempt stored it, and the insert
   * succeeded. A document with an `_id` of the caller's is sent once.
   * @param {object} document
   * @param {InsertOptions} [options]
   * @returns {Promise<{acknowledged: boolean, insertedId: any}>}
   */
  async insertOne(document, options = {}) {
    const ids = await this._insert([document], { ...options, ordered: true });
    return { acknowledged: isAcknowledged(this._writeConcernSpec(options)), insertedId: ids[0] };
  }

  /**
   * Inserts documents in one call; each without an `_id` gets an ObjectId
   * first. With `ordered: true` (the default) the broker stops at the first
   * error; the error's `insertedCount` and `failedIndex` say what happened,
   * and, a BulkWriteError, its `result.insertedIds` which documents landed.
   * Retried as `insertOne` is, only when every `_id` was made here.
   * @param {object[]} documents
   * @param {InsertOptions} [options]
   * @returns {Promise<{acknowledged: boolean, insertedCount: number, insertedIds: any[]}>}
   */
  async insertMany(documents, options = {}) {
    if (!Array.isArray(documents) || documents.length === 0) {
      throw new TypeError('documents must be a non-empty array');
    }
    let ids;
    try {
      ids = await this._insert(documents, options);
    } catch (error) {
      // As the driver's insertMany: a BulkWriteError whose result has the
      // ids of the documents that landed.
      const made = new Map(documents.map((doc, i) => [i, doc instanceof Map ? doc.get('_id') : /** @type {any} */ (doc)._id]));
      const ordered = options.ordered === undefined ? true : Boolean(options.ordered);
      throw markBulkWriteError(/** @type {BrokerError} */ (error), made, ordered);
    }
    const acknowledged = isAcknowledged(this._writeConcernSpec(options));
    return { acknowledged, insertedCount: ids.length, insertedIds: ids };
  }

  /**
   * @param {object[]} documents
   * @param {InsertOptions} options
   * @returns {Promise<any[]>}
   */
  async _insert(documents, options) {
    const client = this.db.client;
    const hadId = documents.map((doc) => idOfDocument(doc) !== undefined);
    const encoded = documents.map((doc, i) => encodeForInsert(doc, i, client.serializeOptions));
    /** @type {any} */
    const request = {
      ...this._target(),
      documents: encoded,
      ordered: options.ordered === undefined ? true : Boolean(options.ordered),
      bypass_document_validation: Boolean(options.bypassDocumentValidation),
    };
    const concern = this._writeConcernSpec(options);
    if (concern) request.write_concern = writeConcern(concern);
    // w=0 (which the broker refuses) would confirm nothing to check.
    if (!hadId.some(Boolean) && isAcknowledged(concern)) {
      const made = documents.map(idOfDocument);
      await this._insertWithRetries(request, made, options);
      return made;
    }
    const response = await client._unary('Insert', request, options);
    const idOptions = { ...client.bsonOptions };
    return response.inserted_ids.map((/** @type {Buffer} */ raw) => BSON.deserialize(raw, idOptions)._id);
  }

  /**
   * Sends an Insert whose every `_id` was made here (`made`, the new
   * ObjectIds in the caller's order), retried as the client's policy says.
   * The rules, the Python client's, keep a retry from storing a document
   * twice:
   *
   * - An attempt that failed without an answer (UNAVAILABLE: a replica
   *   draining or a connection lost; CANCELLED by a stopping server) may
   *   have stored some documents. A
   *   later attempt that meets a duplicate key may be meeting them: the
   *   ids are new, so the broker is asked which are stored, and one that is
   *   can only have been stored by this call.
   * - Ordered: the documents up to the failed one must all be stored; the
   *   ones after it that are not are sent next (not a new attempt).
   *   Unordered: every document was tried, so all must be there.
   * - Otherwise, or when that lookup fails, the DuplicateKeyError is thrown:
   *   a real conflict (another unique index), or one that cannot be told
   *   from it.
   *
   * The error's `insertedCount`, `failedIndex` and `writeErrors` count in
   * the caller's list, not in the last attempt's.
   * @param {any} request
   * @param {ObjectId[]} made
   * @param {InsertOptions} options
   */
  async _insertWithRetries(request, made, options) {
    const client = this.db.client;
    const deadline = client._deadline(options);
    const state = client._retryState('Insert', deadline, true);
    const all = request.documents;
    let pending = all.map((/** @type {Buffer} */ _, /** @type {number} */ i) => i);
    let maybeStored = false;
    /** @type {string|undefined} */
    let avoid;
    for (;;) {
      /** @type {BrokerError} */
      let failure;
      try {
        const attempt = { ...request, documents: pending.map((i) => all[i]) };
        await client._unaryOnce('Insert', attempt, options, deadline, avoid);
        return;
      } catch (error) {
        if (!(error instanceof BrokerError)) throw error;
        failure = error;
      }
      rebaseInsertError(failure, pending, all.length);
      avoid = /** @type {any} */ (failure).address;
      if (!maybeStored || failure.reason !== 'DUPLICATE_KEY') {
        const delay = state.backoff(failure);
        maybeStored = true;
        await sleep(delay);
        continue;
      }
      failure.attempts = state.failures + 1;
      let must = pending;
      /** @type {number[]} */
      let rest = [];
      if (request.ordered) {
        const cut = failure.failedIndex === null ? -1 : pending.indexOf(failure.failedIndex);
        if (cut < 0) throw failure;
        must = pending.slice(0, cut + 1);
        rest = pending.slice(cut + 1);
      }
      let stored;
      try {
        stored = await this._storedIds(pending.map((i) => made[i]), deadline);
      } catch {
        throw failure;
      }
      const missing = must.filter((i) => !stored.has(made[i].toHexString()));
      if (missing.length > 0) {
        if (!request.ordered) {
          failure.metadata.failed_index = String(missing[0]);
          failure.metadata.inserted_count = String(all.length - missing.length);
        }
        throw failure;
      }
      pending = rest.filter((i) => !stored.has(made[i].toHexString()));
      if (pending.length === 0) return;
    }
  }

  /**
   * Which of these ids are stored: a find on `_id` (retried as a read),
   * within the insert's deadline.
   * @param {ObjectId[]} ids
   * @param {Date} deadline
   * @returns {Promise<Set<string>>} their hex strings
   */
  async _storedIds(ids, deadline) {
    const found = await this.find({ _id: { $in: ids } }, { projection: { _id: 1 }, deadline }).toArray();
    return new Set(found.map((doc) => (doc._id instanceof ObjectId ? doc._id.toHexString() : String(doc._id))));
  }

  /**
   * Updates the first document the filter matches. `update` is an
   * operator document ({$set: ...}; anything else is refused here, before
   * any call) or an update pipeline (an array of stages). Never retried.
   * @param {object} filter
   * @param {object|object[]} update
   * @param {UpdateOptions} [options]
   * @returns {Promise<UpdateResult>}
   */
  async updateOne(filter, update, options = {}) {
    return this._update(filter, updateFields(update, this.db.client.serializeOptions), false, options);
  }

  /**
   * Updates every document the filter matches; as `updateOne` otherwise.
   * @param {object} filter
   * @param {object|object[]} update
   * @param {UpdateOptions} [options]
   * @returns {Promise<UpdateResult>}
   */
  async updateMany(filter, update, options = {}) {
    return this._update(filter, updateFields(update, this.db.client.serializeOptions), true, options);
  }

  /**
   * Replaces the first document the filter matches with `replacement`, a
   * whole document without `$` operators. Never retried.
   * @param {object} filter
   * @param {object} replacement
   * @param {UpdateOptions} [options]
   * @returns {Promise<UpdateResult>}
   */
  async replaceOne(filter, replacement, options = {}) {
    const fields = { replacement: replacementDocument(replacement, this.db.client.serializeOptions) };
    return this._update(filter, fields, false, options);
  }

  /**
   * @param {object} filter
   * @param {object} change the request's update, update_pipeline or replacement
   * @param {boolean} multi
   * @param {UpdateOptions} options
   * @returns {Promise<UpdateResult>}
   */
  async _update(filter, change, multi, options) {
    const client = this.db.client;
    const serialize = client.serializeOptions;
    /** @type {any} */
    const request = {
      ...this._target(),
      filter: encodeOptional(filter, 'filter', serialize),
      ...change,
      multi,
      upsert: Boolean(options.upsert),
      array_filters: encodeList(options.arrayFilters, 'arrayFilters', serialize),
      ...hintFields(options.hint, serialize),
      collation: encodeOptional(options.collation, 'collation', serialize),
      let: encodeOptional(options.let, 'let', serialize),
      comment: comment(options.comment),
      max_time_ms: count(options.maxTimeMS, 'maxTimeMS'),
      bypass_document_validation: Boolean(options.bypassDocumentValidation),
    };
    const concern = this._writeConcernSpec(options);
    if (concern) request.write_concern = writeConcern(concern);
    const response = await client._unary('Update', request, options);
    const upsertedId = response.upserted_id.length > 0 ? decodeId(response.upserted_id, client) : null;
    return {
      acknowledged: isAcknowledged(concern),
      matchedCount: response.matched_count,
      modifiedCount: response.modified_count,
      upsertedCount: upsertedId === null ? 0 : 1,
      upsertedId,
    };
  }

  /**
   * Deletes the first document the filter matches. Never retried.
   * @param {object} filter
   * @param {DeleteOptions} [options]
   * @returns {Promise<{acknowledged: boolean, deletedCount: number}>}
   */
  async deleteOne(filter, options = {}) {
    return this._delete(filter, false, options);
  }

  /**
   * Deletes every document the filter matches ({} or omitted: all). Never retried.
   * @param {object} [filter]
   * @param {DeleteOptions} [options]
   * @returns {Promise<{acknowledged: boolean, deletedCount: number}>}
   */
  async deleteMany(filter = {}, options = {}) {
    return this._delete(filter, true, options);
  }

  /**
   * @param {object} filter
   * @param {boolean} multi
   * @param {DeleteOptions} options
   * @returns {Promise<{acknowledged: boolean, deletedCount: number}>}
   */
  async _delete(filter, multi, options) {
    const client = this.db.client;
    const serialize = client.serializeOptions;
    /** @type {any} */
    const request = {
      ...this._target(),
      filter: encodeOptional(filter, 'filter', serialize),
      multi,
      ...hintFields(options.hint, serialize),
      collation: encodeOptional(options.collation, 'collation', serialize),
      let: encodeOptional(options.let, 'let', serialize),
      comment: comment(options.comment),
      max_time_ms: count(options.maxTimeMS, 'maxTimeMS'),
    };
    const concern = this._writeConcernSpec(options);
    if (concern) request.write_concern = writeConcern(concern);
    const response = await client._unary('Delete', request, options);
    return { acknowledged: isAcknowledged(concern), deletedCount: response.deleted_count };
  }

  /**
   * Updates one document atomically and returns it, as it was before the
   * change (the default) or after it (`returnDocument: 'after'`), or null
   * when nothing matched: the Node driver's default, without result
   * metadata. Never retried.
   * @param {object} filter
   * @param {object|object[]} update an operator document or a pipeline
   * @param {FindOneAndModifyOptions} [options]
   * @returns {Promise<any>}
   */
  async findOneAndUpdate(filter, update, options = {}) {
    return this._findOneAndModify(filter, updateFields(update, this.db.client.serializeOptions), options);
  }

  /**
   * Replaces one document atomically and returns it (before or after), or null.
   * @param {object} filter
   * @param {object} replacement
   * @param {FindOneAndModifyOptions} [options]
   * @returns {Promise<any>}
   */
  async findOneAndReplace(filter, replacement, options = {}) {
    const fields = { replacement: replacementDocument(replacement, this.db.client.serializeOptions) };
    return this._findOneAndModify(filter, fields, options);
  }

  /**
   * Deletes one document atomically and returns it, or null.
   * @param {object} filter
   * @param {FindOneAndModifyOptions} [options] projection, sort, hint, collation, ...
   * @returns {Promise<any>}
   */
  async findOneAndDelete(filter, options = {}) {
    return this._findOneAndModify(filter, { remove: true }, options);
  }

  /**
   * @param {object} filter
   * @param {object} change update, update_pipeline, replacement or remove
   * @param {FindOneAndModifyOptions} options
   * @returns {Promise<any>}
   */
  async _findOneAndModify(filter, change, options) {
    if (options.includeResultMetadata) {
      // The broker answers with the document only: a ModifyResult here
      // would make up its lastErrorObject.
      throw new TypeError('includeResultMetadata is not supported: the result is the document, or null');
    }
    const client = this.db.client;
    const serialize = client.serializeOptions;
    const { returnDocument = ReturnDocument.BEFORE } = options;
    if (returnDocument !== ReturnDocument.BEFORE && returnDocument !== ReturnDocument.AFTER) {
      throw new TypeError(`returnDocument must be 'before' or 'after', not ${describe(returnDocument)}`);
    }
    /** @type {any} */
    const request = {
      ...this._target(),
      filter: encodeOptional(filter, 'filter', serialize),
      sort: encodeOptional(options.sort, 'sort', serialize),
      projection: encodeOptional(options.projection, 'projection', serialize),
      ...change,
      upsert: Boolean(options.upsert),
      return_document: returnDocument === ReturnDocument.AFTER ? 'RETURN_DOCUMENT_AFTER' : 'RETURN_DOCUMENT_BEFORE',
      array_filters: encodeList(options.arrayFilters, 'arrayFilters', serialize),
      ...hintFields(options.hint, serialize),
      collation: encodeOptional(options.collation, 'collation', serialize),
      let: encodeOptional(options.let, 'let', serialize),
      comment: comment(options.comment),
      max_time_ms: count(options.maxTimeMS, 'maxTimeMS'),
      bypass_document_validation: Boolean(options.bypassDocumentValidation),
    };
    const concern = this._writeConcernSpec(options);
    if (concern) request.write_concern = writeConcern(concern);
    const response = await client._unary('FindOneAndModify', request, options);
    return response.document.length > 0 ? BSON.deserialize(response.document, this._bsonOptions(options)) : null;
  }

  /**
   * The number of documents the filter matches (a read, retried).
   * @param {object} [filter]
   * @param {CountDocumentsOptions} [options]
   * @returns {Promise<number>}
   */
  async countDocuments(filter = {}, options = {}) {
    const serialize = this.db.client.serializeOptions;
    const request = {
      ...this._target(),
      filter: encodeOptional(filter, 'filter', serialize),
      skip: count(options.skip, 'skip'),
      limit: count(options.limit, 'limit'),
      ...hintFields(options.hint, serialize),
      max_time_ms: count(options.maxTimeMS, 'maxTimeMS'),
      comment: comment(options.comment),
      ...this._readFields(options),
    };
    const response = await this.db.client._unary('Count', request, options, true);
    return response.count;
  }

  /**
   * The collection's size from its metadata: fast, without a filter.
   * @param {EstimatedDocumentCountOptions} [options]
   * @returns {Promise<number>}
   */
  async estimatedDocumentCount(options = {}) {
    const { collation: _ignored, ...readOptions } = /** @type {ReadOptions} */ (options);
    const request = {
      ...this._target(),
      estimated: true,
      max_time_ms: count(options.maxTimeMS, 'maxTimeMS'),
      comment: comment(options.comment),
      // estimated_document_count takes no collation: only where and how to read.
      ...this._readFields(readOptions),
    };
    const response = await this.db.client._unary('Count', request, options, true);
    return response.count;
  }

  /**
   * The distinct values of `key` (dot notation) among the documents the
   * filter matches. The broker streams them, in several messages when they
   * are large; a failure before the first message is retried.
   * @param {string} key
   * @param {object} [filter]
   * @param {DistinctOptions} [options]
   * @returns {Promise<any[]>}
   */
  async distinct(key, filter = {}, options = {}) {
    if (typeof key !== 'string' || key === '') throw new TypeError('key must be a non-empty string');
    const client = this.db.client;
    const serialize = client.serializeOptions;
    const request = {
      ...this._target(),
      key,
      filter: encodeOptional(filter, 'filter', serialize),
      max_time_ms: count(options.maxTimeMS, 'maxTimeMS'),
      comment: comment(options.comment),
      ...this._readFields(options),
    };
    const bsonOptions = this._bsonOptions(options);
    const deadline = client._deadline(options);
    const state = client._retryState('Distinct', deadline, true);
    /** @type {string|undefined} */
    let avoid;
    for (;;) {
      /** @type {any[]} */
      const values = [];
      let messages = 0;
      let picked;
      try {
        picked = await client._pick(deadline, avoid);
      } catch (error) {
        await sleep(state.backoff(/** @type {BrokerError} */ (error)));
        continue;
      }
      const { metadata, callOptions } = client._call(options, deadline);
      const call = picked.stub.Distinct(request, metadata, callOptions);
      // As for a cursor: a cancelled stream's 'error' must not go unhandled.
      call.on('error', () => {});
      let done = false;
      try {
        for await (const message of call) {
          messages += 1;
          values.push(...BSON.deserialize(message.values, bsonOptions).values);
        }
        done = true;
        return values;
      } catch (error) {
        done = true;
        const failure = fromServiceError(error);
        client._failed(picked.address, failure);
        avoid = picked.address;
        // Only a stream that sent nothing is retried, as a find is: a
        // stream cut later may be a limit or a bug that a retry repeats.
        if (messages > 0) throw failure;
        await sleep(state.backoff(failure));
      } finally {
        // A message that would not decode: stop the stream.
        if (!done) call.cancel();
      }
    }
  }

  /**
   * A lazy cursor over the pipeline's results, framed and read as `find`'s.
   * A pipeline without $out or $merge is a read, retried before its first
   * document; one that writes is never retried.
   * @param {object[]} [pipeline] the stages, e.g. [{$match: {...}}, {$group: {...}}]
   * @param {AggregateOptions} [options]
   * @returns {Cursor}
   */
  aggregate(pipeline = [], options = {}) {
    const client = this.db.client;
    const serialize = client.serializeOptions;
    const stages = encodeList(pipeline, 'pipeline', serialize);
    const writes = stages.some((stage) => {
      const first = topLevelKeys(stage)[0];
      return first === '$out' || first === '$merge';
    });
    /** @type {any} */
    const request = {
      ...this._target(),
      pipeline: stages,
      batch_size: count(options.batchSize, 'batchSize', INT32_MAX),
      ...hintFields(options.hint, serialize),
      let: encodeOptional(options.let, 'let', serialize),
      comment: comment(options.comment),
      max_time_ms: count(options.maxTimeMS, 'maxTimeMS'),
      bypass_document_validation: Boolean(options.bypassDocumentValidation),
      ...this._readFields(options),
    };
    // Unset means the server's default, which `false` is not.
    if (options.allowDiskUse !== undefined) request.allow_disk_use = Boolean(options.allowDiskUse);
    const concern = this._writeConcernSpec(options);
    if (writes && concern) request.write_concern = writeConcern(concern);
    return new Cursor(client, request, options, this._bsonOptions(options), 'Aggregate', !writes);
  }

  /**
   * Runs inserts, updates, replacements and deletes in one call, in order
   * (the default) or not. Never retried. Each insertOne document without an
   * `_id` gets an ObjectId here first, as `insertOne` does.
   *
   * A failure throws the error its gRPC code makes (DuplicateKeyError, ...)
   * that is also a BulkWriteError: `writeErrors` and `result`, the counts
   * of what landed.
   * @param {object[]} operations e.g. [{insertOne: {document}}, {deleteOne: {filter}}]
   * @param {BulkWriteOptions} [options]
   * @returns {Promise<BulkWriteResult>}
   */
  async bulkWrite(operations, options = {}) {
    if (!Array.isArray(operations) || operations.length === 0) {
      throw new TypeError('operations must be a non-empty array');
    }
    const client = this.db.client;
    const serialize = client.serializeOptions;
    /** @type {Map<number, any>} the `_id` of each insertOne, by operation index */
    const madeIds = new Map();
    const models = operations.map((operation, index) => writeModel(operation, index, serialize, madeIds));
    const ordered = options.ordered === undefined ? true : Boolean(options.ordered);
    /** @type {any} */
    const request = {
      ...this._target(),
      operations: models,
      ordered,
      bypass_document_validation: Boolean(options.bypassDocumentValidation),
      comment: comment(options.comment),
      let: encodeOptional(options.let, 'let', serialize),
    };
    const concern = this._writeConcernSpec(options);
    if (concern) request.write_concern = writeConcern(concern);
    let response;
    try {
      response = await client._unary('BulkWrite', request, options);
    } catch (error) {
      throw markBulkWriteError(/** @type {BrokerError} */ (error), madeIds, ordered);
    }
    /** @param {{index: number, id: Buffer}[]} list */
    const byIndex = (list) => Object.fromEntries(list.map((entry) => [entry.index, decodeId(entry.id, client)]));
    // Unacknowledged (w: 0), the broker knows of no ids: the ones made here
    // are what the driver reports then.
    const unacknowledged = response.inserted_ids.length === 0 && !isAcknowledged(concern);
    const insertedIds = unacknowledged ? Object.fromEntries(madeIds) : byIndex(response.inserted_ids);
    return {
      acknowledged: isAcknowledged(concern),
      insertedCount: response.inserted_count,
      matchedCount: response.matched_count,
      modifiedCount: response.modified_count,
      deletedCount: response.deleted_count,
      upsertedCount: response.upserted_count,
      insertedIds,
      upsertedIds: byIndex(response.upserted_ids),
    };
  }
}

/**
 * The result of `find()` and `aggregate()`: an async iterable over the
 * server's stream, one MongoDB batch (one gRPC message) at a time. It can
 * be read once.
 *
 *     for await (const doc of collection.find({ qty: { $gt: 3 } })) { ... }
 */
class Cursor {
  /**
   * @param {BrokerClient} client
   * @param {object} request
   * @param {CallOptions} options
   * @param {import('bson').DeserializeOptions} bsonOptions
   * @param {'Find'|'Aggregate'} [method] the streaming RPC
   * @param {boolean} [retry] whether a failure before the first document is retried
   */
  constructor(client, request, options, bsonOptions, method = 'Find', retry = true) {
    this._client = client;
    this._request = request;
    this._options = options;
    this._bsonOptions = bsonOptions;
    this._method = method;
    this._retry = retry;
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
    const deadline = this._client._deadline(this._options);
    const state = this._client._retryState(this._method, deadline, this._retry);
    let yielded = 0;
    /** @type {string|undefined} */
    let avoid;
    for (;;) {
      let picked;
      try {
        picked = await this._client._pick(deadline, avoid);
      } catch (error) {
        try {
          await sleep(state.backoff(/** @type {BrokerError} */ (error)));
        } catch (final) {
          this._finished = true;
          throw final;
        }
        continue;
      }
      const { metadata, callOptions } = this._client._call(this._options, deadline);
      const call = picked.stub[this._method](this._request, metadata, callOptions);
      this._call = call;
      // grpc-js reports a cancel (close(), an early break) as an 'error'
      // event; with nobody iterating any more it must not go unhandled.
      call.on('error', () => {});
      let failure = null;
      try {
        for await (const message of call) {
          this._batches += 1;
          for (const raw of message.documents) {
            yielded += 1;
            yield BSON.deserialize(raw, this._bsonOptions);
          }
        }
        this._finished = true;
        return;
      } catch (error) {
        failure = fromServiceError(error);
        this._client._failed(picked.address, failure);
        avoid = picked.address;
        // Once documents were handed out, a new stream would hand them out
        // again: only a stream that gave nothing yet is retried.
        if (yielded > 0) {
          this._finished = true;
          throw failure;
        }
      } finally {
        // An early break or close(): stop the stream, so the broker closes
        // the server cursor.
        if (!this._finished) call.cancel();
      }
      try {
        await sleep(state.backoff(failure));
      } catch (error) {
        this._finished = true;
        throw error;
      }
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
 * A client's, Database's or Collection's own options over those it inherits.
 * @param {InheritedOptions} own
 * @param {InheritedOptions} inherited
 * @returns {InheritedOptions}
 */
function inheritedOptions(own, inherited) {
  if (typeof own !== 'object' || own === null) throw new TypeError(`options must be an object, not ${describe(own)}`);
  /** @type {InheritedOptions} */
  const out = { ...inherited };
  if (own.readPreference != null) out.readPreference = own.readPreference;
  if (own.readConcern != null) out.readConcern = own.readConcern;
  if (own.writeConcern != null) out.writeConcern = own.writeConcern;
  return out;
}

/** @param {unknown} value */
function comment(value) {
  return value === undefined || value === null ? '' : String(value);
}

/**
 * A request's hint oneof: an index name or a key pattern.
 * @param {unknown} hint
 * @param {import('bson').SerializeOptions} serialize
 * @returns {{hint_name?: string, hint_keys?: Buffer}}
 */
function hintFields(hint, serialize) {
  if (hint === undefined || hint === null) return {};
  if (typeof hint === 'string') return { hint_name: hint };
  return { hint_keys: encodeDocument(hint, 'hint', serialize) };
}

/** The contract's ReadPreferenceMode for each of the driver's mode names. */
const READ_PREFERENCE_MODES = Object.freeze({
  primary: 'READ_PREFERENCE_PRIMARY',
  primaryPreferred: 'READ_PREFERENCE_PRIMARY_PREFERRED',
  secondary: 'READ_PREFERENCE_SECONDARY',
  secondaryPreferred: 'READ_PREFERENCE_SECONDARY_PREFERRED',
  nearest: 'READ_PREFERENCE_NEAREST',
});

/** The driver's read concern levels, each a ReadConcernLevel of the contract. */
const READ_CONCERN_LEVELS = Object.freeze(['local', 'available', 'majority', 'linearizable', 'snapshot']);

/**
 * A ReadPreference message from a mode name or an object with `mode`,
 * `tags` and `maxStalenessSeconds` (the driver's ReadPreference has them).
 * @param {ReadPreferenceLike} spec
 * @param {import('bson').SerializeOptions} serialize
 */
function readPreference(spec, serialize) {
  const pref = typeof spec === 'string' ? { mode: spec } : spec;
  if (typeof pref !== 'object' || pref === null) {
    throw new TypeError(`readPreference must be a mode name or an object with a mode, not ${describe(spec)}`);
  }
  const mode = Object.prototype.hasOwnProperty.call(READ_PREFERENCE_MODES, pref.mode)
    ? READ_PREFERENCE_MODES[/** @type {ReadPreferenceMode} */ (pref.mode)]
    : undefined;
  if (mode === undefined) {
    const modes = Object.keys(READ_PREFERENCE_MODES).join(', ');
    throw new TypeError(`readPreference mode must be one of ${modes}, not ${describe(pref.mode)}`);
  }
  // The driver's ReadPreference says "no limit" with -1 or undefined.
  const staleness = pref.maxStalenessSeconds === -1 ? 0 : pref.maxStalenessSeconds;
  return {
    mode,
    tag_sets: encodeList(pref.tags, 'readPreference.tags', serialize),
    max_staleness_s: count(staleness, 'readPreference.maxStalenessSeconds'),
  };
}

/**
 * A ReadConcernLevel from a level name or {level}.
 * @param {ReadConcernLike} spec
 * @returns {string}
 */
function readConcern(spec) {
  const level = typeof spec === 'string' ? spec : spec && typeof spec === 'object' ? spec.level : undefined;
  if (typeof level !== 'string' || !READ_CONCERN_LEVELS.includes(level)) {
    throw new TypeError(`readConcern level must be one of ${READ_CONCERN_LEVELS.join(', ')}, not ${describe(level)}`);
  }
  return `READ_CONCERN_${level.toUpperCase()}`;
}

/**
 * A list of documents (array filters, pipeline stages, tag sets), one BSON
 * document each; undefined or null is none.
 * @param {unknown} list
 * @param {string} what
 * @param {import('bson').SerializeOptions} serialize
 * @returns {Buffer[]}
 */
function encodeList(list, what, serialize) {
  if (list === undefined || list === null) return [];
  if (!Array.isArray(list)) throw new TypeError(`${what} must be an array of documents, not ${describe(list)}`);
  return list.map((item, i) => encodeDocument(item, `${what}[${i}]`, serialize));
}

/**
 * The top-level keys of a document, a Map or BSON bytes, in order.
 * @param {unknown} value
 * @returns {string[]}
 */
function topLevelKeys(value) {
  if (value instanceof Map) return [...value.keys()].map(String);
  if (Buffer.isBuffer(value) || value instanceof Uint8Array) {
    return Object.keys(BSON.deserialize(value, { promoteValues: false }));
  }
  return Object.keys(/** @type {object} */ (value));
}

/**
 * The update part of an Update or FindOneAndModify request: an operator
 * document or a pipeline. A document with a key that is not an operator
 * would replace the match (or fail on the server): refused here, before any
 * call, as pymongo and the Node driver refuse it.
 * @param {unknown} update
 * @param {import('bson').SerializeOptions} serialize
 * @returns {{update: Buffer}|{update_pipeline: Buffer[]}}
 */
function updateFields(update, serialize) {
  if (Array.isArray(update)) return { update_pipeline: encodeList(update, 'update pipeline', serialize) };
  const encoded = encodeDocument(update, 'update', serialize);
  const keys = topLevelKeys(update);
  if (keys.length === 0) throw new InvalidArgumentError('update cannot be empty');
  if (!keys.every((key) => key.startsWith('$'))) throw new InvalidArgumentError('update only works with $ operators');
  return { update: encoded };
}

/**
 * A replacement document: no `$` operators at its top level.
 * @param {unknown} replacement
 * @param {import('bson').SerializeOptions} serialize
 * @returns {Buffer}
 */
function replacementDocument(replacement, serialize) {
  const encoded = encodeDocument(replacement, 'replacement', serialize);
  if (topLevelKeys(replacement).some((key) => key.startsWith('$'))) {
    throw new InvalidArgumentError('replacement can not include $ operators');
  }
  return encoded;
}

/**
 * The value of a one-field BSON document {"_id": value}.
 * @param {Buffer} raw
 * @param {BrokerClient} client
 */
function decodeId(raw, client) {
  return BSON.deserialize(raw, { ...client.bsonOptions })._id;
}

/** The driver's bulkWrite model names, each the contract's WriteModel field. */
const WRITE_MODELS = Object.freeze({
  insertOne: 'insert_one',
  updateOne: 'update_one',
  updateMany: 'update_many',
  replaceOne: 'replace_one',
  deleteOne: 'delete_one',
  deleteMany: 'delete_many',
});

/**
 * One operation of a bulkWrite as a WriteModel message.
 * @param {any} operation e.g. {updateOne: {filter, update, upsert}}
 * @param {number} index
 * @param {import('bson').SerializeOptions} serialize
 * @param {Map<number, any>} madeIds gets the `_id` of an insertOne's document
 */
function writeModel(operation, index, serialize, madeIds) {
  const names = operation && typeof operation === 'object' ? Object.keys(operation) : [];
  if (names.length !== 1 || !Object.prototype.hasOwnProperty.call(WRITE_MODELS, names[0])) {
    throw new TypeError(
      `operation ${index} must be an object with one of ${Object.keys(WRITE_MODELS).join(', ')}, ` +
        `not ${describe(operation)}`,
    );
  }
  const name = /** @type {keyof typeof WRITE_MODELS} */ (names[0]);
  const spec = operation[name];
  if (typeof spec !== 'object' || spec === null) throw new TypeError(`operation ${index}: ${name} must be an object`);
  const what = `operation ${index} (${name})`;
  /** @type {any} */
  let model;
  if (name === 'insertOne') {
    const encoded = encodeForInsert(spec.document, index, serialize);
    madeIds.set(index, spec.document instanceof Map ? spec.document.get('_id') : spec.document._id);
    model = { document: encoded };
  } else {
    model = {
      filter: encodeOptional(spec.filter, `${what} filter`, serialize),
      ...hintFields(spec.hint, serialize),
      collation: encodeOptional(spec.collation, `${what} collation`, serialize),
    };
    if (name === 'updateOne' || name === 'updateMany') {
      Object.assign(model, updateFields(spec.update, serialize), {
        upsert: Boolean(spec.upsert),
        array_filters: encodeList(spec.arrayFilters, `${what} arrayFilters`, serialize),
      });
    } else if (name === 'replaceOne') {
      Object.assign(model, {
        replacement: replacementDocument(spec.replacement, serialize),
        upsert: Boolean(spec.upsert),
      });
    }
  }
  return { [WRITE_MODELS[name]]: model };
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
 * A document's `_id`, or undefined (also for what is not a document,
 * which encodeForInsert refuses).
 * @param {any} document
 */
function idOfDocument(document) {
  if (document instanceof Map) return document.get('_id');
  return typeof document === 'object' && document !== null ? document._id : undefined;
}

/**
 * Makes an attempt's counts and indexes, which count in the documents it
 * sent (`pending`, indexes in the caller's list), count in the caller's list.
 * @param {BrokerError} error
 * @param {number[]} pending
 * @param {number} total
 */
function rebaseInsertError(error, pending, total) {
  if (pending.length === total) return;
  const meta = error.metadata;
  const failed = error.failedIndex;
  if (failed !== null && failed >= 0 && failed < pending.length) meta.failed_index = String(pending[failed]);
  const inserted = error.insertedCount;
  if (inserted !== null) meta.inserted_count = String(total - pending.length + inserted);
  if (meta.write_errors !== undefined) {
    try {
      const list = JSON.parse(meta.write_errors);
      if (Array.isArray(list)) {
        for (const entry of list) {
          if (entry.index >= 0 && entry.index < pending.length) entry.index = pending[entry.index];
        }
        meta.write_errors = JSON.stringify(list);
        /** @type {any} */ (error)._writeErrors = undefined;
      }
    } catch {
      // Malformed metadata: left as it came.
    }
  }
}

/**
 * @param {WriteConcernSpec} spec
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

/** @param {WriteConcernSpec|undefined} concern the write's */
function isAcknowledged(concern) {
  return !(concern && concern.w === 0);
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
  DEFAULT_RETRY_POLICY,
  ReturnDocument,
  BrokerClient,
  Database,
  Collection,
  Cursor,
  normalizeTarget,
  loadService,
  encodeForInsert,
};
