// Type declarations of mongo-broker-client's public API (lib/index.js).
// Written by hand beside the JavaScript; test/types.test.js compiles
// typecheck/usage.ts against them with tsc and checks that they name every
// export, so the two cannot drift apart unnoticed.

import type { ChannelCredentials, ClientOptions as GrpcClientOptions, status as grpcStatus } from '@grpc/grpc-js';
import type { DeserializeOptions, Document, SerializeOptions } from 'bson';

/** This client's version, sent in the gRPC user agent. */
export declare const VERSION: string;
/** Default time limit of a call, in milliseconds: there is no "wait forever". */
export declare const DEFAULT_TIMEOUT_MS: number;
/** How reads are retried, in milliseconds; `retries: null` makes every call once. */
export interface RetryPolicy {
  /** Tries in all, the first included (1: no retries). */
  maxAttempts: number;
  /** The cap on the pause before the first retry. */
  initialBackoffMs: number;
  /** The largest cap on any pause (a broker's RetryInfo delay may exceed it). */
  maxBackoffMs: number;
  /** How much the cap grows with each retry. */
  multiplier: number;
}
/** The clients' default: three tries, pauses of at most 50, 100 ms (then up to 1 s). */
export declare const DEFAULT_RETRY_POLICY: Readonly<RetryPolicy>;
/** What `returnDocument` names, as the Node driver spells it. */
export declare const ReturnDocument: Readonly<{ BEFORE: 'before'; AFTER: 'after' }>;
export type ReturnDocumentName = 'before' | 'after';
/** grpc-js's status codes, to compare with `BrokerError.code`. */
export declare const status: typeof grpcStatus;
/** The contract's ErrorReason names: what `BrokerError.reason` holds. */
export type ErrorReasonName =
  | 'DUPLICATE_KEY'
  | 'DATABASE_UNAVAILABLE'
  | 'TIMEOUT'
  | 'POOL_EXHAUSTED'
  | 'INVALID_REQUEST'
  | 'INVALID_BSON'
  | 'INVALID_JSON'
  | 'QUERY_REJECTED'
  | 'UNKNOWN_DATABASE'
  | 'NOT_AUTHORIZED'
  | 'UNAUTHENTICATED'
  | 'LIMIT_EXCEEDED'
  | 'SHUTTING_DOWN'
  | 'CURSOR_LOST'
  | 'NOT_SUPPORTED'
  | 'OPERATION_FAILED'
  | 'INTERNAL';
/** Each ErrorReason name mapped to itself, e.g. `ErrorReason.DUPLICATE_KEY`. */
export declare const ErrorReason: Readonly<{ [N in ErrorReasonName]: N }>;

/**
 * The address forms every mongo-broker client accepts: "unix:///abs/path",
 * "unix:/abs/path", a bare absolute socket path, or any gRPC target.
 * Throws a TypeError for an empty or relative-socket target.
 */
export declare function normalizeTarget(target: string): string;

/** Per-call options: a time limit and a request id. */
export interface CallOptions {
  /** Time limit of this call in milliseconds (default: the client's `timeoutMs`). */
  timeoutMs?: number;
  /** An absolute deadline (a Date or epoch milliseconds) instead of `timeoutMs`. */
  deadline?: Date | number;
  /** Sent as `x-request-id`; the broker logs it and puts it into the MongoDB comment. */
  requestId?: string;
}

export interface ClientOptions {
  /** Bearer token, sent as `authorization: Bearer <token>`. */
  token?: string;
  /** Default time limit of every call, in milliseconds (30000). */
  timeoutMs?: number;
  /** More gRPC metadata for every call. */
  metadata?: Record<string, string>;
  /** TLS; default plaintext, which suits a Unix socket or loopback. */
  credentials?: ChannelCredentials;
  /** Extra grpc-js client and channel options (they win over the client's own). */
  channelOptions?: GrpcClientOptions;
  /** How documents are decoded (default: the Node driver's). */
  bsonOptions?: DeserializeOptions;
  /** How documents are encoded (default `{ignoreUndefined: true}`). */
  serializeOptions?: SerializeOptions;
  /** Of every read, unless its database, collection or call says otherwise. */
  readPreference?: ReadPreferenceLike;
  readConcern?: ReadConcernLike;
  /** Of every write, unless its database, collection or call says otherwise. */
  writeConcern?: WriteConcern;
  /**
   * How reads (find before its first document, findOne, countDocuments,
   * distinct, aggregate without $out/$merge, ping, stats) and inserts whose
   * every `_id` was made here are retried (default DEFAULT_RETRY_POLICY);
   * null: every call is made once. Updates, deletes, find-and-modify and
   * bulk writes are never retried.
   */
  retries?: Partial<RetryPolicy> | null;
}

export type ReadPreferenceMode = 'primary' | 'primaryPreferred' | 'secondary' | 'secondaryPreferred' | 'nearest';
/** A mode name, or an object with one (the driver's ReadPreference has these fields). */
export type ReadPreferenceLike =
  | ReadPreferenceMode
  | { mode: ReadPreferenceMode; tags?: DocumentLike[]; maxStalenessSeconds?: number };
export type ReadConcernLevel = 'local' | 'available' | 'majority' | 'linearizable' | 'snapshot';
/** A level name, or {level} (the driver's ReadConcern). */
export type ReadConcernLike = ReadConcernLevel | { level: ReadConcernLevel };

/** What a Database or Collection hands down to its operations; a call's own options win. */
export interface InheritedOptions {
  readPreference?: ReadPreferenceLike;
  readConcern?: ReadConcernLike;
  writeConcern?: WriteConcern;
}

/** The options of every read. */
export interface ReadOptions {
  /** How strings compare, e.g. {locale: 'fr'}. */
  collation?: DocumentLike;
  readPreference?: ReadPreferenceLike;
  readConcern?: ReadConcernLike;
}

/** A document, a Map, or one document's BSON bytes. */
export type DocumentLike = Document | Map<string, unknown> | Uint8Array;

export interface FindOptions extends CallOptions, ReadOptions {
  projection?: DocumentLike;
  sort?: DocumentLike;
  skip?: number;
  /** At most this many documents; 0 means no limit. */
  limit?: number;
  /** Documents per MongoDB batch (one gRPC message each). */
  batchSize?: number;
  /** An index name, or a key pattern. */
  hint?: string | DocumentLike;
  maxTimeMS?: number;
  comment?: string;
  /** How this call's documents are decoded, over the client's `bsonOptions`. */
  bsonOptions?: DeserializeOptions;
}

export interface WriteConcern {
  /** A number of nodes or a tag such as "majority". */
  w?: number | string;
  j?: boolean;
  wtimeoutMS?: number;
}

export interface InsertOptions extends CallOptions {
  /** Stop at the first error (default true). */
  ordered?: boolean;
  bypassDocumentValidation?: boolean;
  writeConcern?: WriteConcern;
}

export interface InsertOneResult {
  acknowledged: boolean;
  /** The document's `_id`: its own, or the ObjectId made for it here. */
  insertedId: any;
}

export interface InsertManyResult {
  acknowledged: boolean;
  insertedCount: number;
  /** Each document's `_id`, in the order given. */
  insertedIds: any[];
}

/** An operator document ({$set: ...}) or an update pipeline (an array of stages). */
export type UpdateLike = DocumentLike | DocumentLike[];

export interface UpdateOptions extends CallOptions {
  /** Insert a document when nothing matches. */
  upsert?: boolean;
  /** Which array elements `$[<id>]` updates. */
  arrayFilters?: DocumentLike[];
  /** An index name, or a key pattern. */
  hint?: string | DocumentLike;
  collation?: DocumentLike;
  /** Variables for the filter and an update pipeline ($$name). */
  let?: DocumentLike;
  comment?: string;
  maxTimeMS?: number;
  bypassDocumentValidation?: boolean;
  writeConcern?: WriteConcern;
}

export interface UpdateResult {
  acknowledged: boolean;
  matchedCount: number;
  modifiedCount: number;
  upsertedCount: number;
  /** The `_id` an upsert inserted, or null. */
  upsertedId: any;
}

export interface DeleteOptions extends CallOptions {
  hint?: string | DocumentLike;
  collation?: DocumentLike;
  let?: DocumentLike;
  comment?: string;
  maxTimeMS?: number;
  writeConcern?: WriteConcern;
}

export interface DeleteResult {
  acknowledged: boolean;
  deletedCount: number;
}

export interface FindOneAndModifyOptions extends CallOptions {
  /** The document as it was before the change (the default), or after it. */
  returnDocument?: ReturnDocumentName;
  upsert?: boolean;
  /** Fields of the returned document. */
  projection?: DocumentLike;
  /** Which matching document is changed, when several match. */
  sort?: DocumentLike;
  arrayFilters?: DocumentLike[];
  hint?: string | DocumentLike;
  collation?: DocumentLike;
  let?: DocumentLike;
  comment?: string;
  maxTimeMS?: number;
  bypassDocumentValidation?: boolean;
  writeConcern?: WriteConcern;
  /** Only false: the result is the document, or null (the driver v6 default). */
  includeResultMetadata?: false;
  bsonOptions?: DeserializeOptions;
}

/** A delete has nothing to return after, upsert, or filter arrays of. */
export interface FindOneAndDeleteOptions
  extends Omit<FindOneAndModifyOptions, 'returnDocument' | 'upsert' | 'arrayFilters' | 'bypassDocumentValidation'> {}

export interface CountDocumentsOptions extends CallOptions, ReadOptions {
  skip?: number;
  /** 0 means no limit. */
  limit?: number;
  hint?: string | DocumentLike;
  maxTimeMS?: number;
  comment?: string;
}

export interface EstimatedDocumentCountOptions extends CallOptions {
  readPreference?: ReadPreferenceLike;
  readConcern?: ReadConcernLike;
  maxTimeMS?: number;
  comment?: string;
}

export interface DistinctOptions extends CallOptions, ReadOptions {
  maxTimeMS?: number;
  comment?: string;
  bsonOptions?: DeserializeOptions;
}

export interface AggregateOptions extends CallOptions, ReadOptions {
  /** Let stages spill to temporary files; unset means the server's default. */
  allowDiskUse?: boolean;
  /** Documents per MongoDB batch (one gRPC message each). */
  batchSize?: number;
  hint?: string | DocumentLike;
  let?: DocumentLike;
  comment?: string;
  maxTimeMS?: number;
  /** For a pipeline ending in $out or $merge. */
  bypassDocumentValidation?: boolean;
  /** For a pipeline ending in $out or $merge. */
  writeConcern?: WriteConcern;
  bsonOptions?: DeserializeOptions;
}

export interface UpdateModel {
  filter: DocumentLike;
  update: UpdateLike;
  upsert?: boolean;
  arrayFilters?: DocumentLike[];
  hint?: string | DocumentLike;
  collation?: DocumentLike;
}

export interface ReplaceOneModel {
  filter: DocumentLike;
  replacement: Document | Map<string, unknown>;
  upsert?: boolean;
  hint?: string | DocumentLike;
  collation?: DocumentLike;
}

export interface DeleteModel {
  filter: DocumentLike;
  hint?: string | DocumentLike;
  collation?: DocumentLike;
}

/** One operation of a bulkWrite, in the driver's shape. */
export type AnyBulkWriteOperation =
  | { insertOne: { document: Document | Map<string, unknown> } }
  | { updateOne: UpdateModel }
  | { updateMany: UpdateModel }
  | { replaceOne: ReplaceOneModel }
  | { deleteOne: DeleteModel }
  | { deleteMany: DeleteModel };

export interface BulkWriteOptions extends CallOptions {
  /** Stop at the first error (default true). */
  ordered?: boolean;
  bypassDocumentValidation?: boolean;
  writeConcern?: WriteConcern;
  comment?: string;
  let?: DocumentLike;
}

export interface BulkWriteResult {
  acknowledged: boolean;
  insertedCount: number;
  matchedCount: number;
  modifiedCount: number;
  deletedCount: number;
  upsertedCount: number;
  /** Operation index -> the `_id` of its insertOne's document. */
  insertedIds: Record<number, any>;
  /** Operation index -> the `_id` its upsert inserted. */
  upsertedIds: Record<number, any>;
}

/** One write error, as the driver's WriteError: `code` is MongoDB's. */
export interface WriteError {
  index: number;
  code: number;
  codeName: string;
  errmsg: string;
}

/** The broker's connection pool to one database. */
export interface PoolSummary {
  connectionsOpen: number;
  connectionsInUse: number;
  maxPoolSize: number;
}

/** One database's answer to a ping. */
export interface DatabasePing {
  database: string;
  ok: boolean;
  /** Round-trip time of MongoDB's `ping` command, in milliseconds. */
  rttMs: number;
  /** Why the ping failed; empty when ok. */
  error: string;
  pool: PoolSummary;
}

export interface PingResult {
  /** The broker's version. */
  version: string;
  /** Every pinged database answered. */
  ok: boolean;
  databases: DatabasePing[];
}

/** One database's pool, wait queue, operation and server figures. */
export interface DatabaseStats {
  database: string;
  connectionsOpen: number;
  connectionsInUse: number;
  connectionsIdle: number;
  connectionsCreated: number;
  connectionsClosed: number;
  maxPoolSize: number;
  poolClears: number;
  waitQueueLength: number;
  waitQueueMax: number;
  maxWaiting: number;
  waitP50Ms: number;
  waitP99Ms: number;
  waitMaxMs: number;
  /** Calls refused or failed while getting a connection, by reason. */
  checkoutFailures: Record<string, number>;
  /** Commands sent to MongoDB, by command name (find, getMore, insert, ...). */
  operations: Record<string, number>;
  /** Calls answered, by method (Find, FindOne, Insert, Ping). */
  rpcs: Record<string, number>;
  /** Calls that failed, by gRPC status code name. */
  errors: Record<string, number>;
  rpcsInFlight: number;
  openCursors: number;
  available: boolean;
  serverType: string;
  serverRttMs: number;
  lastError: string;
  recommendedMaxPoolSize: number;
  demandConnections: number;
  roundTripsPerSecond: number;
  meanHoldMs: number;
  /** Commands that failed, by command name. */
  commandFailures: Record<string, number>;
  /** Round trips still running a second past their time limit (should stay 0). */
  abandonedRoundTrips: number;
  /** Find streams ended at their time limit because their client stopped reading. */
  stalledStreams: number;
  /** Round trips that carried more than one waiting call (queue-time coalescing). */
  coalescedRoundTrips: number;
  /** Calls those round trips carried. */
  coalescedCalls: number;
}

export interface StatsResult {
  /** The broker's version. */
  version: string;
  /** Seconds since the broker started. */
  uptimeS: number;
  databases: DatabaseStats[];
  /** The replica that answered: server.instance (default: its host name, the pod name on Kubernetes). */
  instance: string;
  /** This call's own peer as the broker saw it ("ipv4:10.0.0.7:53412", "unix:"). */
  caller: string;
  /** Calls by calling host, most recently seen first (at most 64); empty unless the token may use every database. */
  peers: PeerStats[];
  /** Hosts dropped from `peers` to keep it bounded. */
  peersDropped: number;
}

/** One calling host of a broker. */
export interface PeerStats {
  /** "10.0.0.7", "fd00::7", or "unix" for every Unix-socket caller. */
  host: string;
  calls: number;
  lastCallSAgo: number;
}

/** A replica of a tier, as the client sees its health. */
export interface ReplicaState {
  /** "10.0.0.5:50051", "[fd00::5]:50051" or "unix:///path". */
  address: string;
  /** CONNECTING until its health first answers; only SERVING replicas get calls. */
  state: 'CONNECTING' | 'SERVING' | 'NOT_SERVING' | 'UNREACHABLE';
}

/** A client for one broker, or for a tier of replicas. Make one per process; `close()` it when done. */
export declare class BrokerClient {
  /**
   * One broker ("unix:///run/mongo-broker/broker.sock", "127.0.0.1:50051"),
   * or a tier of replicas: "dns:///name:port", or a list of IP:port
   * addresses (or of unix sockets), over whose SERVING replicas calls are
   * spread round-robin.
   */
  constructor(target: string | string[], options?: ClientOptions);
  /** The gRPC target, normalized; a list's addresses joined by commas. */
  readonly target: string;
  readonly timeoutMs: number;
  bsonOptions: DeserializeOptions;
  serializeOptions: SerializeOptions;
  /** The retry policy of reads; null when every call is made once. */
  readonly retries: Readonly<RetryPolicy> | null;
  /** The read preference, read concern and write concern its databases inherit. */
  readonly options: InheritedOptions;
  /** A database configured on the broker (its configured name). */
  db(name: string, options?: InheritedOptions): Database;
  /** Checks the broker and its databases (every one, or the one named). */
  ping(database?: string, options?: CallOptions): Promise<PingResult>;
  /** Pool, queue and operation figures, for every database or the one named. */
  stats(database?: string, options?: CallOptions): Promise<StatsResult>;
  /** Closes the channel (a tier's channels); resolves once shut down. Calling it again returns the same promise. */
  close(): Promise<void>;
  /** Retries made since the client was created, over every call. */
  readonly retryCount: number;
  /** A tier's replicas and their health; empty for one broker. */
  replicas(): ReplicaState[];
}

/** A database configured on the broker. */
export declare class Database {
  constructor(client: BrokerClient, name: string, options?: InheritedOptions);
  readonly client: BrokerClient;
  readonly databaseName: string;
  readonly options: InheritedOptions;
  collection<TSchema extends Document = Document>(name: string, options?: InheritedOptions): Collection<TSchema>;
  /** Pings this database only. */
  ping(options?: CallOptions): Promise<PingResult>;
}

/** A collection of a configured database. */
export declare class Collection<TSchema extends Document = Document> {
  constructor(db: Database, name: string, options?: InheritedOptions);
  readonly db: Database;
  readonly collectionName: string;
  /** The database's options, with this collection's over them. */
  readonly options: InheritedOptions;
  /** A lazy cursor; the call starts when it is first read. */
  find(filter?: DocumentLike, options?: FindOptions): Cursor<TSchema>;
  /** The first matching document, or null: one unary call. */
  findOne(filter?: DocumentLike, options?: FindOptions): Promise<TSchema | null>;
  /** Inserts one document; without an `_id` it gets an ObjectId here, first, and then it may be retried. */
  insertOne(document: Document | Map<string, unknown>, options?: InsertOptions): Promise<InsertOneResult>;
  /** Inserts documents in one call. */
  insertMany(documents: Array<Document | Map<string, unknown>>, options?: InsertOptions): Promise<InsertManyResult>;
  /** Updates the first match; `update` must be operators or a pipeline. Never retried. */
  updateOne(filter: DocumentLike, update: UpdateLike, options?: UpdateOptions): Promise<UpdateResult>;
  /** Updates every match. Never retried. */
  updateMany(filter: DocumentLike, update: UpdateLike, options?: UpdateOptions): Promise<UpdateResult>;
  /** Replaces the first match with a document without `$` operators. Never retried. */
  replaceOne(
    filter: DocumentLike,
    replacement: Document | Map<string, unknown>,
    options?: UpdateOptions,
  ): Promise<UpdateResult>;
  /** Deletes the first match. Never retried. */
  deleteOne(filter: DocumentLike, options?: DeleteOptions): Promise<DeleteResult>;
  /** Deletes every match ({} or omitted: all). Never retried. */
  deleteMany(filter?: DocumentLike, options?: DeleteOptions): Promise<DeleteResult>;
  /** Updates one document atomically; it before (default) or after the change, or null. */
  findOneAndUpdate(filter: DocumentLike, update: UpdateLike, options?: FindOneAndModifyOptions): Promise<TSchema | null>;
  /** Replaces one document atomically; it before (default) or after, or null. */
  findOneAndReplace(
    filter: DocumentLike,
    replacement: Document | Map<string, unknown>,
    options?: FindOneAndModifyOptions,
  ): Promise<TSchema | null>;
  /** Deletes one document atomically and returns it, or null. */
  findOneAndDelete(filter: DocumentLike, options?: FindOneAndDeleteOptions): Promise<TSchema | null>;
  /** The number of matching documents (a read, retried). */
  countDocuments(filter?: DocumentLike, options?: CountDocumentsOptions): Promise<number>;
  /** The collection's size from its metadata. */
  estimatedDocumentCount(options?: EstimatedDocumentCountOptions): Promise<number>;
  /** The distinct values of a field (dot notation) among the matches. */
  distinct(key: string, filter?: DocumentLike, options?: DistinctOptions): Promise<any[]>;
  /** A lazy cursor over the pipeline's results, read as `find`'s. */
  aggregate<T extends Document = Document>(pipeline?: DocumentLike[], options?: AggregateOptions): Cursor<T>;
  /** Inserts, updates, replacements and deletes in one call. Never retried. */
  bulkWrite(operations: AnyBulkWriteOperation[], options?: BulkWriteOptions): Promise<BulkWriteResult>;
}

/** The result of `find()` and `aggregate()`: an async iterable over the stream, read once. */
export declare class Cursor<TSchema extends Document = Document> implements AsyncIterable<TSchema> {
  /** Messages (MongoDB batches) received so far. */
  readonly batches: number;
  [Symbol.asyncIterator](): AsyncGenerator<TSchema, void, undefined>;
  /** The next document, or null at the end. */
  next(): Promise<TSchema | null>;
  hasNext(): Promise<boolean>;
  toArray(): Promise<TSchema[]>;
  /** Stops the stream if it is still running. Closing twice is harmless. */
  close(): Promise<void>;
}

export interface BrokerErrorFields {
  code?: number | null;
  reason?: string;
  metadata?: Record<string, string>;
  retryAfterMs?: number | null;
  details?: unknown[];
  cause?: Error;
}

/** Base class of every error this package throws. */
export declare class BrokerError extends Error {
  constructor(message: string, fields?: BrokerErrorFields);
  /** The gRPC status code, e.g. 6; null when raised by the client itself. */
  code: number | null;
  /** The gRPC code's name, e.g. "ALREADY_EXISTS". */
  codeName: string;
  /** The broker's reason, a name in `ErrorReason` (e.g. "DUPLICATE_KEY"); "" when gRPC itself failed. */
  reason: string;
  metadata: Record<string, string>;
  /** Milliseconds the broker asks the caller to wait before retrying. */
  retryAfterMs: number | null;
  details: unknown[];
  /** How many times the call was sent: 1, more after retries. */
  attempts: number;
  readonly mongoCode: number | null;
  readonly mongoCodeName: string | null;
  readonly labels: string[];
  hasErrorLabel(label: string): boolean;
  readonly database: string | null;
  readonly insertedCount: number | null;
  readonly failedIndex: number | null;
  /** For a failed write: what landed before it failed. */
  readonly matchedCount: number | null;
  readonly modifiedCount: number | null;
  readonly deletedCount: number | null;
  readonly upsertedCount: number | null;
  /** MongoDB's write errors ([] for other errors); the broker may cut the list. */
  readonly writeErrors: WriteError[];
  /** How many write errors there were, the cut ones included. */
  readonly writeErrorsTotal: number;
  /** MongoDB's message of the (first) write error, else `message`. */
  readonly errmsg: string;
  /** The failing document's or operation's index (`failedIndex`). */
  readonly index: number | null;
  /** Operation index -> the `_id` an upsert inserted before the failure. */
  readonly upsertedIds: Record<number, any>;
  /** The write concern's failure, when it failed. */
  readonly writeConcernError: { errmsg: string } | null;
  /** Worth retrying after a pause (UNAVAILABLE, a full pool). */
  readonly retryable: boolean;
}

export declare class DuplicateKeyError extends BrokerError {}
export declare class UnavailableError extends BrokerError {}
export declare class DeadlineExceededError extends BrokerError {}
export declare class PoolExhaustedError extends BrokerError {}
export declare class LimitExceededError extends BrokerError {}
export declare class InvalidArgumentError extends BrokerError {}
export declare class UnknownDatabaseError extends BrokerError {}
export declare class PermissionDeniedError extends BrokerError {}
export declare class UnauthenticatedError extends BrokerError {}
export declare class CancelledError extends BrokerError {}
export declare class OperationFailedError extends BrokerError {}
/**
 * A failed bulkWrite or insertMany, as the driver's MongoBulkWriteError. The error keeps
 * the class its gRPC code gives it (a duplicate key is a DuplicateKeyError
 * too); `instanceof BulkWriteError` checks for `result`.
 */
export declare class BulkWriteError extends BrokerError {
  /** What landed before the failure: counts and ids. */
  readonly result: BulkWriteResult;
}
