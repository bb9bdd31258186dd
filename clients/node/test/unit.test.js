'use strict';
// Tests that need no broker: address forms, client-side _id, argument
// checks, decoding a broker status (with google.rpc details), and calls
// against an in-test gRPC server.

const test = require('node:test');
const assert = require('node:assert/strict');
const os = require('node:os');
const path = require('node:path');
const fs = require('node:fs');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { BSON, EJSON, ObjectId } = require('bson');

const broker = require('..');
const { encodeForInsert, loadService } = require('../lib/client');
const { fromServiceError, _types } = require('../lib/errors');

test('normalizeTarget accepts the forms every client accepts', () => {
  assert.equal(broker.normalizeTarget('unix:///run/mb/broker.sock'), 'unix:///run/mb/broker.sock');
  assert.equal(broker.normalizeTarget('unix:/run/mb/broker.sock'), 'unix:///run/mb/broker.sock');
  assert.equal(broker.normalizeTarget('/run/mb/broker.sock'), 'unix:///run/mb/broker.sock');
  assert.equal(broker.normalizeTarget('127.0.0.1:50051'), '127.0.0.1:50051');
  assert.equal(broker.normalizeTarget('dns:///localhost:50051'), 'dns:///localhost:50051');
  for (const bad of ['', '  ', 'unix://relative/path', undefined]) {
    assert.throws(() => broker.normalizeTarget(/** @type {any} */ (bad)), TypeError);
  }
});

test('the constructor checks its options', () => {
  assert.throws(() => new broker.BrokerClient('127.0.0.1:1', { timeoutMs: 0 }), TypeError);
  assert.throws(() => new broker.BrokerClient('127.0.0.1:1', { token: '' }), TypeError);
});

test('a document without _id gets an ObjectId first, also on the caller object', () => {
  const doc = { a: 1, b: 'x' };
  const raw = encodeForInsert(doc, 0, {});
  const back = BSON.deserialize(raw);
  assert.deepEqual(Object.keys(back), ['_id', 'a', 'b']);
  assert.ok(back._id instanceof ObjectId);
  assert.ok(doc._id instanceof ObjectId && doc._id.equals(back._id));

  const map = new Map([['a', 1]]);
  const fromMap = BSON.deserialize(encodeForInsert(map, 0, {}));
  assert.deepEqual(Object.keys(fromMap), ['_id', 'a']);
  assert.ok(map.get('_id').equals(fromMap._id));
});

test('a document with an _id is sent as it is', () => {
  const doc = { a: 1, _id: 'mine' };
  assert.deepEqual(encodeForInsert(doc, 0, {}), Buffer.from(BSON.serialize(doc)));
});

test('non-documents and bad counts are refused before any call', async () => {
  const client = new broker.BrokerClient('127.0.0.1:1');
  try {
    const coll = client.db('appdb').collection('c');
    for (const bad of ['text', 42, [1, 2], null]) {
      assert.throws(() => encodeForInsert(bad, 3, {}), /document 3 must be a document/);
    }
    assert.throws(() => coll.find({}, { limit: -1 }), /limit must be an integer/);
    assert.throws(() => coll.find({}, { batchSize: 2 ** 31 }), /batchSize/);
    assert.throws(() => coll.find(/** @type {any} */ ('text')), /filter must be a document/);
    await assert.rejects(coll.insertMany([]), TypeError);
  } finally {
    await client.close();
  }
});

/**
 * A grpc-js ServiceError as a failed call would give it, with details.
 * @param {number} code
 * @param {string} message
 * @param {{reason?: string, domain?: string, metadata?: Record<string, string>, retryMs?: number}} [info]
 */
function serviceError(code, message, info) {
  const trailers = new grpc.Metadata();
  if (info) {
    const { StatusType, ErrorInfoType, RetryInfoType, ERROR_INFO_URL, RETRY_INFO_URL } = _types;
    const details = [
      {
        typeUrl: ERROR_INFO_URL,
        value: ErrorInfoType.encode({ reason: info.reason, domain: info.domain, metadata: info.metadata }).finish(),
      },
    ];
    if (info.retryMs !== undefined) {
      const retryDelay = { seconds: Math.floor(info.retryMs / 1000), nanos: (info.retryMs % 1000) * 1e6 };
      details.push({ typeUrl: RETRY_INFO_URL, value: RetryInfoType.encode({ retryDelay }).finish() });
    }
    trailers.set('grpc-status-details-bin', Buffer.from(StatusType.encode({ code, message, details }).finish()));
  }
  return Object.assign(new Error(`${code} ${message}`), { code, details: message, metadata: trailers });
}

test('a broker status becomes a typed error with reason, mongoCode and metadata', () => {
  const error = fromServiceError(
    serviceError(grpc.status.ALREADY_EXISTS, 'E11000 duplicate key', {
      reason: 'DUPLICATE_KEY',
      domain: 'mongo-broker',
      metadata: { mongo_code: '11000', mongo_code_name: 'DuplicateKey', inserted_count: '2', failed_index: '2',
        database: 'appdb', mongo_labels: 'A, B' },
      retryMs: 1250,
    }),
  );
  assert.ok(error instanceof broker.DuplicateKeyError && error instanceof broker.BrokerError);
  assert.equal(error.name, 'DuplicateKeyError');
  assert.equal(error.code, 6);
  assert.equal(error.codeName, 'ALREADY_EXISTS');
  assert.equal(error.reason, 'DUPLICATE_KEY');
  assert.equal(error.mongoCode, 11000);
  assert.equal(error.mongoCodeName, 'DuplicateKey');
  assert.equal(error.insertedCount, 2);
  assert.equal(error.failedIndex, 2);
  assert.equal(error.database, 'appdb');
  assert.deepEqual(error.labels, ['A', 'B']);
  assert.ok(error.hasErrorLabel('B'));
  assert.equal(error.retryAfterMs, 1250);
  assert.equal(error.message, 'E11000 duplicate key');
  assert.equal(error.retryable, false);
});

test('an ErrorInfo of another domain is kept but not read as the broker reason', () => {
  const error = fromServiceError(
    serviceError(grpc.status.INVALID_ARGUMENT, 'bad', { reason: 'OTHER', domain: 'elsewhere' }),
  );
  assert.ok(error instanceof broker.InvalidArgumentError);
  assert.equal(error.reason, '');
  assert.equal(error.details.length, 1);
});

test('RESOURCE_EXHAUSTED is a full pool unless a limit was hit', () => {
  const pool = fromServiceError(
    serviceError(grpc.status.RESOURCE_EXHAUSTED, 'queue full', { reason: 'POOL_EXHAUSTED', domain: 'mongo-broker' }),
  );
  assert.ok(pool instanceof broker.PoolExhaustedError && pool.retryable);
  const limit = fromServiceError(
    serviceError(grpc.status.RESOURCE_EXHAUSTED, 'too many', { reason: 'LIMIT_EXCEEDED', domain: 'mongo-broker' }),
  );
  assert.ok(limit instanceof broker.LimitExceededError && !limit.retryable);
  const size = fromServiceError(
    serviceError(grpc.status.RESOURCE_EXHAUSTED, 'Received message larger than max (5 vs. 4)'),
  );
  assert.ok(size instanceof broker.LimitExceededError);
});

test('a call to a socket where nothing listens fails UNAVAILABLE', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mb-node-'));
  const client = new broker.BrokerClient(`unix://${path.join(dir, 'nobody.sock')}`, { timeoutMs: 5000 });
  try {
    await assert.rejects(client.ping(), (/** @type {any} */ error) => {
      assert.ok(error instanceof broker.UnavailableError, String(error));
      assert.equal(error.code, grpc.status.UNAVAILABLE);
      assert.equal(error.reason, '');
      assert.ok(error.retryable);
      return true;
    });
  } finally {
    await client.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('a closed client refuses calls', async () => {
  const client = new broker.BrokerClient('127.0.0.1:1');
  await client.close();
  await assert.rejects(client.ping(), /closed/);
});

test('close() returns one promise, resolved once the channel is shut down', async () => {
  const client = new broker.BrokerClient('127.0.0.1:1');
  const channel = client._stub.getChannel();
  const closing = client.close();
  assert.ok(closing instanceof Promise);
  assert.equal(client.close(), closing, 'a second close() returns the same promise');
  assert.equal(await closing, undefined);
  assert.equal(channel.getConnectivityState(false), grpc.connectivityState.SHUTDOWN);
  assert.equal(await client.close(), undefined);
});

/**
 * The field names of a message of the contract, as the proto spells them.
 * @param {string} name
 * @returns {string[]}
 */
function protoFields(name) {
  const definition = protoLoader.loadSync(path.join('broker', 'v1', 'broker.proto'), {
    includeDirs: [path.join(__dirname, '..', 'proto')],
    keepCase: true,
  });
  return /** @type {any} */ (definition[name]).type.field.map((/** @type {{name: string}} */ f) => f.name);
}

/** @param {string} name */
function camelCase(name) {
  return name.replace(/_([a-z0-9])/g, (_, c) => c.toUpperCase());
}

/**
 * Serves `implementation` (the methods it has; grpc-js answers the others
 * UNIMPLEMENTED) on a Unix socket, and a client for it that notes the
 * methods it calls.
 * @param {Record<string, Function>} implementation
 * @returns {Promise<{client: broker.BrokerClient, methods: string[], stop: () => void}>}
 */
async function serveBroker(implementation) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mb-node-'));
  const target = `unix://${path.join(dir, 'broker.sock')}`;
  const server = new grpc.Server();
  server.addService(loadService().service, implementation);
  await new Promise((resolve, reject) =>
    server.bindAsync(target, grpc.ServerCredentials.createInsecure(), (error) => (error ? reject(error) : resolve(undefined))),
  );
  /** @type {string[]} */
  const methods = [];
  /** @type {import('@grpc/grpc-js').Interceptor} */
  const note = (options, nextCall) => {
    methods.push(options.method_definition.path.split('/').pop() || '');
    return new grpc.InterceptingCall(nextCall(options));
  };
  const client = new broker.BrokerClient(target, { token: 's3cret', timeoutMs: 10_000, channelOptions: { interceptors: [note] } });
  const stop = () => {
    client.close();
    server.forceShutdown();
    fs.rmSync(dir, { recursive: true, force: true });
  };
  return { client, methods, stop };
}

test("findOne throws grpc's own UNIMPLEMENTED as it comes, without a find", async () => {
  let finds = 0;
  const { client, methods, stop } = await serveBroker({
    Find(/** @type {any} */ call) {
      finds += 1;
      call.end();
    },
  });
  try {
    await assert.rejects(
      client.db('appdb').collection('items').findOne({ _id: 7 }),
      (/** @type {any} */ error) => error.code === grpc.status.UNIMPLEMENTED && error.reason === '',
    );
    assert.deepEqual(methods, ['FindOne']);
    assert.equal(finds, 0);
  } finally {
    stop();
  }
});

test("findOne throws the broker's own UNIMPLEMENTED as it comes", async () => {
  // The database refusing the query (reason NOT_SUPPORTED).
  let finds = 0;
  const { client, methods, stop } = await serveBroker({
    FindOne(/** @type {any} */ _call, /** @type {Function} */ callback) {
      callback(
        serviceError(grpc.status.UNIMPLEMENTED, 'the database cannot do that', {
          reason: 'NOT_SUPPORTED',
          domain: 'mongo-broker',
        }),
      );
    },
    Find(/** @type {any} */ call) {
      finds += 1;
      call.end();
    },
  });
  try {
    await assert.rejects(
      client.db('appdb').collection('items').findOne({}),
      (/** @type {any} */ error) => error.code === grpc.status.UNIMPLEMENTED && error.reason === 'NOT_SUPPORTED',
    );
    assert.deepEqual(methods, ['FindOne']);
    assert.equal(finds, 0);
  } finally {
    stop();
  }
});

test('ping and stats results are camelCase throughout; the count maps keep their keys', async () => {
  const { client, methods, stop } = await serveBroker({
    Ping(/** @type {any} */ call, /** @type {Function} */ callback) {
      callback(null, {
        version: '1.2.3',
        databases: [{ database: call.request.database || 'appdb', ok: true, rtt_ms: 0.5,
          pool: { connections_open: 2, connections_in_use: 1, max_pool_size: 10 } }],
      });
    },
    Stats(/** @type {any} */ call, /** @type {Function} */ callback) {
      callback(null, {
        version: '1.2.3',
        uptime_s: 90.5,
        databases: [{ database: call.request.database, connections_in_use: 3, wait_p99_ms: 1.5,
          rpcs: { FindOne: 4, Insert: 1 }, operations: { getMore: 2 }, checkout_failures: { queue_full: 1 },
          rpcs_in_flight: 1, server_rtt_ms: 0.25 }],
        instance: 'broker-0',
        caller: 'unix:',
        peers: [{ host: 'unix', calls: 7, last_call_s_ago: 0.5 }],
        peers_dropped: 1,
      });
    },
  });
  try {
    const ping = await client.db('appdb').ping();
    assert.deepEqual(ping, {
      version: '1.2.3',
      ok: true,
      databases: [{ database: 'appdb', ok: true, rttMs: 0.5, error: '',
        pool: { connectionsOpen: 2, connectionsInUse: 1, maxPoolSize: 10 } }],
    });

    const stats = await client.stats('appdb');
    assert.equal(stats.version, '1.2.3');
    assert.equal(stats.uptimeS, 90.5);
    const [db] = stats.databases;
    // Every field of the proto, each under its camelCase name.
    assert.deepEqual(Object.keys(stats).sort(), protoFields('broker.v1.StatsResponse').map(camelCase).sort());
    assert.deepEqual(stats.peers, [{ host: 'unix', calls: 7, lastCallSAgo: 0.5 }]);
    assert.deepEqual([stats.instance, stats.caller, stats.peersDropped], ['broker-0', 'unix:', 1]);
    assert.deepEqual(Object.keys(db).sort(), protoFields('broker.v1.DatabaseStats').map(camelCase).sort());
    assert.equal(db.database, 'appdb');
    assert.equal(db.connectionsInUse, 3);
    assert.equal(db.waitP99Ms, 1.5);
    assert.equal(db.rpcsInFlight, 1);
    assert.equal(db.serverRttMs, 0.25);
    assert.equal(db.maxPoolSize, 0, 'a field the broker did not send reads as 0');
    assert.deepEqual(db.rpcs, { FindOne: 4, Insert: 1 });
    assert.deepEqual(db.operations, { getMore: 2 });
    assert.deepEqual(db.checkoutFailures, { queue_full: 1 }, 'map keys are data, not field names');
    assert.deepEqual(methods, ['Ping', 'Stats']);
  } finally {
    stop();
  }
});

// ---------------------------------------------------------------------------
// The operation set: the requests each method builds, the refusals made
// before any call, the retry rules and the decoding of write failures.

/** @param {Buffer} raw */
const doc = (raw) => (raw.length === 0 ? null : BSON.deserialize(raw));
/** @param {Record<string, unknown>} value */
const bson = (value) => Buffer.from(BSON.serialize(value));

/**
 * A unary handler that records each request and answers `response`.
 * @param {any[]} requests
 * @param {object|((request: any) => object)} response
 */
function answer(requests, response) {
  return (/** @type {any} */ call, /** @type {Function} */ callback) => {
    requests.push(call.request);
    callback(null, typeof response === 'function' ? response(call.request) : response);
  };
}

test('updateOne, updateMany and replaceOne send every option and read the result', async () => {
  /** @type {any[]} */
  const requests = [];
  const upsertedId = new ObjectId();
  const { client, methods, stop } = await serveBroker({
    Update: answer(requests, (request) =>
      request.upsert
        ? { matched_count: 0, modified_count: 0, upserted_id: bson({ _id: upsertedId }) }
        : { matched_count: 3, modified_count: 2 },
    ),
  });
  try {
    const coll = client.db('appdb').collection('items', { writeConcern: { w: 'majority' } });
    const one = await coll.updateOne({ sku: 'a' }, { $set: { qty: 1 } }, {
      upsert: true, arrayFilters: [{ 'e.x': 1 }], hint: { sku: 1 }, collation: { locale: 'fr' },
      let: { v: 2 }, comment: 'why', maxTimeMS: 500, bypassDocumentValidation: true,
    });
    assert.deepEqual(one, { acknowledged: true, matchedCount: 0, modifiedCount: 0, upsertedCount: 1, upsertedId });
    const many = await coll.updateMany({}, [{ $set: { qty: 0 } }], { hint: 'sku_1', writeConcern: { w: 0 } });
    assert.deepEqual(many, { acknowledged: false, matchedCount: 3, modifiedCount: 2, upsertedCount: 0, upsertedId: null });
    await coll.replaceOne({ sku: 'b' }, { sku: 'b', qty: 7 });

    const [u1, u2, u3] = requests;
    assert.equal(u1.database, 'appdb');
    assert.equal(u1.collection, 'items');
    assert.deepEqual(doc(u1.filter), { sku: 'a' });
    assert.deepEqual(doc(u1.update), { $set: { qty: 1 } });
    assert.equal(u1.multi, false);
    assert.equal(u1.upsert, true);
    assert.deepEqual(u1.array_filters.map(doc), [{ 'e.x': 1 }]);
    assert.equal(u1.hint, 'hint_keys');
    assert.deepEqual(doc(u1.hint_keys), { sku: 1 });
    assert.deepEqual(doc(u1.collation), { locale: 'fr' });
    assert.deepEqual(doc(u1.let), { v: 2 });
    assert.equal(u1.comment, 'why');
    assert.equal(u1.max_time_ms, 500);
    assert.equal(u1.bypass_document_validation, true);
    assert.equal(u1.write_concern.w_tag, 'majority', "the collection's write concern");

    assert.equal(u2.multi, true);
    assert.equal(u2.update.length, 0);
    assert.deepEqual(u2.update_pipeline.map(doc), [{ $set: { qty: 0 } }]);
    assert.equal(u2.hint_name, 'sku_1');
    assert.equal(u2.write_concern.w_nodes, 0, "the call's write concern wins");

    assert.deepEqual(doc(u3.replacement), { sku: 'b', qty: 7 });
    assert.equal(u3.update.length, 0);
    assert.equal(u3.multi, false);
    assert.equal(u3.upsert, false);
    assert.deepEqual(methods, ['Update', 'Update', 'Update']);
  } finally {
    stop();
  }
});

test('updates without $ operators and replacements with them are refused before any call', async () => {
  const { client, methods, stop } = await serveBroker({});
  try {
    const coll = client.db('appdb').collection('items');
    const operators = /update only works with \$ operators/;
    await assert.rejects(coll.updateOne({}, { qty: 1 }), operators);
    await assert.rejects(coll.updateMany({}, { $set: { a: 1 }, qty: 1 }), operators);
    await assert.rejects(coll.updateOne({}, new Map([['qty', 1]])), operators);
    await assert.rejects(coll.updateOne({}, bson({ qty: 1 })), operators, 'raw BSON is checked too');
    await assert.rejects(coll.findOneAndUpdate({}, { qty: 1 }), operators);
    await assert.rejects(coll.updateOne({}, {}), /update cannot be empty/);
    await assert.rejects(coll.bulkWrite([{ updateOne: { filter: {}, update: { qty: 1 } } }]), operators);
    const dollar = /replacement can not include \$ operators/;
    await assert.rejects(coll.replaceOne({}, { $set: { qty: 1 } }), dollar);
    await assert.rejects(coll.findOneAndReplace({}, { a: 1, $inc: { b: 1 } }), dollar);
    await assert.rejects(coll.bulkWrite([{ replaceOne: { filter: {}, replacement: { $set: {} } } }]), dollar);
    await assert.rejects(coll.updateOne({}, { qty: 1 }), (/** @type {any} */ error) => {
      assert.ok(error instanceof broker.InvalidArgumentError);
      assert.equal(error.code, null, 'refused by the client: no gRPC code');
      return true;
    });
    await assert.rejects(coll.replaceOne({}, /** @type {any} */ ('text')), /replacement must be a document/);
    await assert.rejects(coll.bulkWrite([{ insertOne: { document: { a: 1 } }, deleteOne: { filter: {} } }]), /operation 0 must be/);
    await assert.rejects(coll.bulkWrite([{ upsertOne: {} }]), /operation 0 must be/);
    await assert.rejects(coll.bulkWrite([]), /non-empty array/);
    await assert.rejects(coll.findOneAndUpdate({}, { $set: { a: 1 } }, { returnDocument: /** @type {any} */ ('later') }), /returnDocument/);
    await assert.rejects(coll.distinct(''), /key must be/);
    assert.throws(() => coll.aggregate(/** @type {any} */ ({ $match: {} })), /pipeline must be an array/);
    assert.deepEqual(methods, [], 'nothing was sent');
  } finally {
    stop();
  }
});

test('deleteOne and deleteMany send their options and read deletedCount', async () => {
  /** @type {any[]} */
  const requests = [];
  const { client, stop } = await serveBroker({ Delete: answer(requests, (r) => ({ deleted_count: r.multi ? 5 : 1 })) });
  try {
    const coll = client.db('appdb').collection('items');
    assert.deepEqual(await coll.deleteOne({ a: 1 }, { hint: 'a_1', collation: { locale: 'en' }, comment: 'c', let: { x: 1 } }), {
      acknowledged: true,
      deletedCount: 1,
    });
    assert.deepEqual(await coll.deleteMany(), { acknowledged: true, deletedCount: 5 });
    const [one, many] = requests;
    assert.equal(one.multi, false);
    assert.deepEqual(doc(one.filter), { a: 1 });
    assert.equal(one.hint_name, 'a_1');
    assert.deepEqual(doc(one.collation), { locale: 'en' });
    assert.deepEqual(doc(one.let), { x: 1 });
    assert.equal(one.comment, 'c');
    assert.equal(many.multi, true);
    assert.deepEqual(doc(many.filter), {}, 'deleteMany() is {}: every document');
    assert.equal(many.write_concern, null, 'unset: the database default');
  } finally {
    stop();
  }
});

test('findOneAndUpdate, findOneAndReplace and findOneAndDelete return the document or null', async () => {
  /** @type {any[]} */
  const requests = [];
  const found = { _id: 1, sku: 'a', qty: 2 };
  const { client, methods, stop } = await serveBroker({
    FindOneAndModify: answer(requests, (r) => ({ document: r.remove && doc(r.filter)._id === 2 ? Buffer.alloc(0) : bson(found) })),
  });
  try {
    const coll = client.db('appdb').collection('items');
    const after = await coll.findOneAndUpdate({ _id: 1 }, { $inc: { qty: 1 } }, {
      returnDocument: broker.ReturnDocument.AFTER, upsert: true, projection: { qty: 1 }, sort: { qty: -1 },
      arrayFilters: [{ x: 1 }], hint: 'h', collation: { locale: 'fr' }, let: { v: 1 }, comment: 'c', maxTimeMS: 9,
    });
    assert.deepEqual(after, found);
    assert.deepEqual(await coll.findOneAndReplace({ _id: 1 }, { sku: 'z' }), found);
    assert.equal(await coll.findOneAndDelete({ _id: 2 }, { sort: { _id: 1 } }), null);
    const [update, replace, remove] = requests;
    assert.deepEqual(doc(update.update), { $inc: { qty: 1 } });
    assert.equal(update.return_document, 'RETURN_DOCUMENT_AFTER');
    assert.equal(update.upsert, true);
    assert.deepEqual(doc(update.projection), { qty: 1 });
    assert.deepEqual(doc(update.sort), { qty: -1 });
    assert.deepEqual(update.array_filters.map(doc), [{ x: 1 }]);
    assert.equal(update.hint_name, 'h');
    assert.deepEqual(doc(update.collation), { locale: 'fr' });
    assert.deepEqual(doc(update.let), { v: 1 });
    assert.equal(update.comment, 'c');
    assert.equal(update.max_time_ms, 9);
    assert.equal(update.remove, false);
    assert.deepEqual(doc(replace.replacement), { sku: 'z' });
    assert.equal(replace.return_document, 'RETURN_DOCUMENT_BEFORE', "the driver's default");
    assert.equal(remove.remove, true);
    assert.equal(remove.update.length + remove.replacement.length, 0);
    assert.deepEqual(methods, ['FindOneAndModify', 'FindOneAndModify', 'FindOneAndModify']);
    await assert.rejects(
      coll.findOneAndDelete({}, /** @type {any} */ ({ includeResultMetadata: true })),
      /includeResultMetadata/,
    );
  } finally {
    stop();
  }
});

test('countDocuments and estimatedDocumentCount send their options; read options are inherited and overridden', async () => {
  /** @type {any[]} */
  const requests = [];
  const { client, stop } = await serveBroker({ Count: answer(requests, (r) => ({ count: r.estimated ? 100 : 7 })) });
  try {
    const fromClient = new broker.BrokerClient(client.target, { readConcern: 'available' }).db('appdb');
    assert.equal(fromClient.collection('x').options.readConcern, 'available', "the client's options reach its collections");
    await fromClient.client.close();
    const db = client.db('appdb', { readConcern: { level: 'majority' } });
    const coll = db.collection('items', { readPreference: { mode: 'secondary', tags: [{ dc: 'east' }, {}], maxStalenessSeconds: 120 } });
    assert.equal(
      await coll.countDocuments(
        { qty: { $gt: 1 } },
        { skip: 2, limit: 10, hint: { qty: 1 }, collation: { locale: 'fr' }, maxTimeMS: 50, comment: 'n' },
      ),
      7,
    );
    assert.equal(await coll.estimatedDocumentCount({ readPreference: 'nearest', readConcern: 'local' }), 100);
    const [counted, estimated] = requests;
    assert.deepEqual(doc(counted.filter), { qty: { $gt: 1 } });
    assert.equal(counted.skip, 2);
    assert.equal(counted.limit, 10);
    assert.deepEqual(doc(counted.hint_keys), { qty: 1 });
    assert.deepEqual(doc(counted.collation), { locale: 'fr' });
    assert.equal(counted.max_time_ms, 50);
    assert.equal(counted.comment, 'n');
    assert.equal(counted.estimated, false);
    assert.equal(counted.read_preference.mode, 'READ_PREFERENCE_SECONDARY');
    assert.deepEqual(counted.read_preference.tag_sets.map(doc), [{ dc: 'east' }, {}]);
    assert.equal(counted.read_preference.max_staleness_s, 120);
    assert.equal(counted.read_concern, 'READ_CONCERN_MAJORITY', "the database's read concern");
    assert.equal(estimated.estimated, true);
    assert.equal(estimated.filter.length + estimated.collation.length, 0);
    assert.equal(estimated.read_preference.mode, 'READ_PREFERENCE_NEAREST', "the call's read preference wins");
    assert.deepEqual(estimated.read_preference.tag_sets, []);
    assert.equal(estimated.read_concern, 'READ_CONCERN_LOCAL');
    await assert.rejects(coll.countDocuments({}, { readPreference: /** @type {any} */ ('closest') }), /readPreference mode/);
    await assert.rejects(coll.countDocuments({}, { readConcern: /** @type {any} */ ({ level: 'eventual' }) }), /readConcern level/);
    assert.equal(requests.length, 2);
  } finally {
    stop();
  }
});

test('find and findOne carry collation, read preference and read concern; none set means unset', async () => {
  /** @type {any[]} */
  const requests = [];
  const { client, stop } = await serveBroker({
    FindOne: answer(requests, { documents: [] }),
    Find(/** @type {any} */ call) {
      requests.push(call.request);
      call.end();
    },
  });
  try {
    const coll = client.db('appdb').collection('items');
    await coll.findOne({}, { collation: { locale: 'de' }, readPreference: 'primaryPreferred', readConcern: 'available' });
    await coll.find({}, { readPreference: { mode: 'secondaryPreferred' } }).toArray();
    await coll.find({}).toArray();
    const [one, found, plain] = requests;
    assert.deepEqual(doc(one.collation), { locale: 'de' });
    assert.equal(one.read_preference.mode, 'READ_PREFERENCE_PRIMARY_PREFERRED');
    assert.equal(one.read_concern, 'READ_CONCERN_AVAILABLE');
    assert.equal(found.read_preference.mode, 'READ_PREFERENCE_SECONDARY_PREFERRED');
    assert.equal(found.read_concern, 'READ_CONCERN_UNSPECIFIED');
    assert.equal(plain.read_preference, null, "unset: the broker's configured read preference");
    assert.equal(plain.collation.length, 0);
  } finally {
    stop();
  }
});

test('distinct concatenates the values of every message', async () => {
  /** @type {any[]} */
  const requests = [];
  const { client, stop } = await serveBroker({
    Distinct(/** @type {any} */ call) {
      requests.push(call.request);
      call.write({ values: bson({ values: ['a', 'b'] }) });
      call.write({ values: bson({ values: [3, { x: 1 }] }) });
      call.end();
    },
  });
  try {
    const coll = client.db('appdb').collection('items');
    assert.deepEqual(
      await coll.distinct('tags.name', { qty: 1 }, { collation: { locale: 'fr' }, readConcern: 'majority', maxTimeMS: 5, comment: 'd' }),
      ['a', 'b', 3, { x: 1 }],
    );
    const [request] = requests;
    assert.equal(request.key, 'tags.name');
    assert.deepEqual(doc(request.filter), { qty: 1 });
    assert.deepEqual(doc(request.collation), { locale: 'fr' });
    assert.equal(request.read_concern, 'READ_CONCERN_MAJORITY');
    assert.equal(request.max_time_ms, 5);
    assert.equal(request.comment, 'd');
  } finally {
    stop();
  }
});

test('aggregate is a lazy cursor over Aggregate, framed as find, with every option', async () => {
  /** @type {any[]} */
  const requests = [];
  const { client, methods, stop } = await serveBroker({
    Aggregate(/** @type {any} */ call) {
      requests.push(call.request);
      call.write({ documents: [bson({ n: 1 }), bson({ n: 2 })] });
      call.write({ documents: [bson({ n: 3 })] });
      call.end();
    },
  });
  try {
    const coll = client.db('appdb').collection('items');
    const pipeline = [{ $match: { a: 1 } }, { $group: { _id: '$b' } }];
    const cursor = coll.aggregate(pipeline, {
      allowDiskUse: false, batchSize: 2, hint: 'a_1', collation: { locale: 'fr' }, let: { v: 1 }, comment: 'agg',
      maxTimeMS: 40, readPreference: 'secondary', readConcern: 'local', writeConcern: { w: 1 },
    });
    assert.deepEqual(methods, [], 'nothing is sent before the cursor is read');
    assert.deepEqual(await cursor.toArray(), [{ n: 1 }, { n: 2 }, { n: 3 }]);
    assert.equal(cursor.batches, 2);
    await coll.aggregate([{ $match: {} }]).toArray();
    const [request, plain] = requests;
    assert.deepEqual(request.pipeline.map(doc), pipeline);
    assert.equal(request.allow_disk_use, false, 'false is sent, not left unset');
    assert.equal(request.batch_size, 2);
    assert.equal(request.hint_name, 'a_1');
    assert.deepEqual(doc(request.collation), { locale: 'fr' });
    assert.deepEqual(doc(request.let), { v: 1 });
    assert.equal(request.comment, 'agg');
    assert.equal(request.max_time_ms, 40);
    assert.equal(request.read_preference.mode, 'READ_PREFERENCE_SECONDARY');
    assert.equal(request.read_concern, 'READ_CONCERN_LOCAL');
    assert.equal(request.write_concern, null, 'a write concern only for a pipeline that writes');
    assert.equal(plain.allow_disk_use, undefined, "unset: the server's default");
    assert.deepEqual(methods, ['Aggregate', 'Aggregate']);
  } finally {
    stop();
  }
});

test('bulkWrite sends each model, gives insertOne documents an _id, and reads the result', async () => {
  /** @type {any[]} */
  const requests = [];
  const upserted = new ObjectId();
  const { client, stop } = await serveBroker({
    BulkWrite: answer(requests, (r) => ({
      inserted_count: 1, matched_count: 2, modified_count: 2, deleted_count: 4, upserted_count: 1,
      upserted_ids: [{ index: 1, id: bson({ _id: upserted }) }],
      inserted_ids: r.operations[0].insert_one ? [{ index: 0, id: bson({ _id: doc(r.operations[0].insert_one.document)._id }) }] : [],
    })),
  });
  try {
    const coll = client.db('appdb').collection('items');
    const inserted = { sku: 'new' };
    const result = await coll.bulkWrite(
      [
        { insertOne: { document: inserted } },
        {
          updateOne: {
            filter: { sku: 'a' }, update: { $set: { q: 1 } }, upsert: true,
            arrayFilters: [{ e: 1 }], hint: 'sku_1', collation: { locale: 'fr' },
          },
        },
        { updateMany: { filter: {}, update: [{ $set: { q: 2 } }] } },
        { replaceOne: { filter: { sku: 'b' }, replacement: { sku: 'b', q: 3 }, upsert: true, hint: { sku: 1 } } },
        { deleteOne: { filter: { sku: 'c' }, collation: { locale: 'en' } } },
        { deleteMany: { filter: { q: 0 } } },
      ],
      { ordered: false, bypassDocumentValidation: true, comment: 'bulk', let: { z: 1 }, writeConcern: { w: 1, j: true } },
    );
    assert.ok(inserted._id instanceof ObjectId, 'the insertOne document got its _id here');
    assert.deepEqual(result, {
      acknowledged: true, insertedCount: 1, matchedCount: 2, modifiedCount: 2, deletedCount: 4, upsertedCount: 1,
      insertedIds: { 0: inserted._id }, upsertedIds: { 1: upserted },
    });
    const [request] = requests;
    assert.equal(request.ordered, false);
    assert.equal(request.bypass_document_validation, true);
    assert.equal(request.comment, 'bulk');
    assert.deepEqual(doc(request.let), { z: 1 });
    assert.deepEqual({ w: request.write_concern.w_nodes, j: request.write_concern.j }, { w: 1, j: true });
    const ops = request.operations;
    assert.deepEqual(
      ops.map((/** @type {any} */ op) => op.model),
      ['insert_one', 'update_one', 'update_many', 'replace_one', 'delete_one', 'delete_many'],
    );
    const sent = doc(ops[0].insert_one.document);
    assert.deepEqual(Object.keys(sent), ['_id', 'sku'], '_id first on the wire');
    assert.ok(sent._id.equals(inserted._id));
    assert.deepEqual(doc(ops[1].update_one.filter), { sku: 'a' });
    assert.deepEqual(doc(ops[1].update_one.update), { $set: { q: 1 } });
    assert.equal(ops[1].update_one.upsert, true);
    assert.deepEqual(ops[1].update_one.array_filters.map(doc), [{ e: 1 }]);
    assert.equal(ops[1].update_one.hint_name, 'sku_1');
    assert.deepEqual(doc(ops[1].update_one.collation), { locale: 'fr' });
    assert.deepEqual(ops[2].update_many.update_pipeline.map(doc), [{ $set: { q: 2 } }]);
    assert.deepEqual(doc(ops[3].replace_one.replacement), { sku: 'b', q: 3 });
    assert.equal(ops[3].replace_one.upsert, true);
    assert.deepEqual(doc(ops[3].replace_one.hint_keys), { sku: 1 });
    assert.deepEqual(doc(ops[4].delete_one.collation), { locale: 'en' });
    assert.deepEqual(doc(ops[5].delete_many.filter), { q: 0 });
    assert.equal((await coll.bulkWrite([{ deleteOne: { filter: {} } }])).acknowledged, true);
    assert.equal(requests[1].ordered, true, 'ordered by default');
  } finally {
    stop();
  }
});

/**
 * A server whose `method` fails with `failures` (in turn) and then answers
 * `success`; for streams, `success` is the messages to write.
 * @param {string} method
 * @param {any[]} failures ServiceErrors
 * @param {any} success
 * @param {boolean} [stream]
 */
function flaky(method, failures, success, stream = false) {
  let calls = 0;
  const handler = stream
    ? (/** @type {any} */ call) => {
        const failure = failures[calls++];
        if (failure) {
          call.emit('error', failure);
          return;
        }
        for (const message of success) call.write(message);
        call.end();
      }
    : (/** @type {any} */ _call, /** @type {Function} */ callback) => {
        const failure = failures[calls++];
        callback(failure || null, failure ? undefined : success);
      };
  return { [method]: handler };
}

/**
 * A broker error: the gRPC code, and the ErrorInfo of the broker's domain.
 * @param {number} code
 * @param {string} message
 * @param {string} reason
 * @param {Record<string, string>} [metadata]
 * @param {number} [retryMs]
 */
const brokerError = (code, message, reason, metadata, retryMs) =>
  serviceError(code, message, { reason, domain: 'mongo-broker', metadata, retryMs });
const unavailable = () => brokerError(grpc.status.UNAVAILABLE, 'the database is down', 'DATABASE_UNAVAILABLE');

test('reads are retried after UNAVAILABLE and a full pool: countDocuments, distinct, aggregate', async () => {
  const full = brokerError(grpc.status.RESOURCE_EXHAUSTED, 'queue full', 'POOL_EXHAUSTED', {}, 20);
  const { client, methods, stop } = await serveBroker({
    ...flaky('Count', [unavailable(), full], { count: 4 }),
    ...flaky('Distinct', [unavailable()], [{ values: bson({ values: [1, 2] }) }], true),
    ...flaky('Aggregate', [unavailable()], [{ documents: [bson({ n: 1 })] }], true),
  });
  try {
    const coll = client.db('appdb').collection('items');
    const started = Date.now();
    assert.equal(await coll.countDocuments({}), 4);
    assert.ok(Date.now() - started >= 20, "the broker's RetryInfo delay is the least pause");
    assert.deepEqual(await coll.distinct('a'), [1, 2]);
    assert.deepEqual(await coll.aggregate([{ $match: {} }]).toArray(), [{ n: 1 }]);
    assert.deepEqual(methods, ['Count', 'Count', 'Count', 'Distinct', 'Distinct', 'Aggregate', 'Aggregate']);
  } finally {
    stop();
  }
});

test('a read gives up after maxAttempts, and retries: null makes one attempt', async () => {
  const { client, methods, stop } = await serveBroker(flaky('Count', [unavailable(), unavailable(), unavailable()], { count: 1 }));
  try {
    await assert.rejects(client.db('appdb').collection('items').countDocuments({}), broker.UnavailableError);
    assert.equal(methods.length, 3, 'the default policy tries three times');
  } finally {
    stop();
  }
  const invalid = serviceError(grpc.status.INVALID_ARGUMENT, 'bad filter', { reason: 'INVALID_REQUEST', domain: 'mongo-broker' });
  const bad = await serveBroker(flaky('Count', [invalid], { count: 1 }));
  try {
    await assert.rejects(bad.client.db('appdb').collection('items').countDocuments({}), broker.InvalidArgumentError);
    assert.deepEqual(bad.methods, ['Count'], 'INVALID_ARGUMENT does not change by retrying');
  } finally {
    bad.stop();
  }
  const second = await serveBroker(flaky('Count', [unavailable()], { count: 1 }));
  const once = new broker.BrokerClient(second.client.target, { retries: null });
  try {
    await assert.rejects(once.db('appdb').collection('items').estimatedDocumentCount(), broker.UnavailableError);
    assert.equal(once.retries, null);
    assert.throws(() => new broker.BrokerClient('127.0.0.1:1', { retries: { maxAttempts: 0 } }), /maxAttempts/);
  } finally {
    await once.close();
    second.stop();
  }
});

test('a read is not retried when the pause would outlast its deadline: the error comes at once', async () => {
  const full = brokerError(grpc.status.RESOURCE_EXHAUSTED, 'queue full', 'POOL_EXHAUSTED', {}, 5000);
  const { client, methods, stop } = await serveBroker(flaky('Count', [full], { count: 1 }));
  try {
    const started = Date.now();
    await assert.rejects(client.db('appdb').collection('items').countDocuments({}, { timeoutMs: 1000 }), broker.PoolExhaustedError);
    assert.ok(Date.now() - started < 900, 'it did not sleep towards the deadline');
    assert.deepEqual(methods, ['Count']);
  } finally {
    stop();
  }
});

test('updates, deletes, find-and-modify, bulk writes and writing aggregates are never retried', async () => {
  const { client, methods, stop } = await serveBroker({
    ...flaky('Update', [unavailable()], { matched_count: 1 }),
    ...flaky('Delete', [unavailable()], { deleted_count: 1 }),
    ...flaky('FindOneAndModify', [unavailable()], { document: Buffer.alloc(0) }),
    ...flaky('BulkWrite', [unavailable()], {}),
    ...flaky('Aggregate', [unavailable(), unavailable()], [], true),
  });
  try {
    const coll = client.db('appdb').collection('items');
    const attempts = [
      () => coll.updateOne({}, { $set: { a: 1 } }),
      () => coll.deleteMany({}),
      () => coll.findOneAndDelete({}),
      () => coll.bulkWrite([{ deleteOne: { filter: {} } }]),
      () => coll.aggregate([{ $match: {} }, { $out: 'elsewhere' }]).toArray(),
    ];
    for (const attempt of attempts) await assert.rejects(attempt(), broker.UnavailableError);
    assert.deepEqual(methods, ['Update', 'Delete', 'FindOneAndModify', 'BulkWrite', 'Aggregate']);
    await assert.rejects(coll.aggregate([{ $merge: { into: 'x' } }]).toArray(), broker.UnavailableError);
    assert.equal(methods.length, 6, 'a $merge pipeline is not retried either');
  } finally {
    stop();
  }
});

test('a find is retried before its first document, never after it', async () => {
  let calls = 0;
  const { client, methods, stop } = await serveBroker({
    Find(/** @type {any} */ call) {
      calls += 1;
      if (calls === 1) {
        call.emit('error', unavailable());
        return;
      }
      call.write({ documents: [bson({ n: 1 })] });
      call.emit('error', unavailable());
    },
  });
  try {
    const cursor = client.db('appdb').collection('items').find({});
    assert.deepEqual(await cursor.next(), { n: 1 });
    await assert.rejects(cursor.next(), broker.UnavailableError);
    assert.deepEqual(methods, ['Find', 'Find']);
  } finally {
    stop();
  }
});

test('a distinct cut after its first message is not retried; an unacknowledged bulkWrite reports the ids made here', async () => {
  const { client, methods, stop } = await serveBroker({
    Distinct(/** @type {any} */ call) {
      call.write({ values: bson({ values: [1] }) });
      call.emit('error', unavailable());
    },
    BulkWrite: answer([], {}),
  });
  try {
    const coll = client.db('appdb').collection('items');
    await assert.rejects(coll.distinct('a'), broker.UnavailableError);
    assert.deepEqual(methods, ['Distinct']);
    const document = { a: 1 };
    const result = await coll.bulkWrite([{ deleteOne: { filter: {} } }, { insertOne: { document } }], { writeConcern: { w: 0 } });
    assert.equal(result.acknowledged, false);
    assert.deepEqual(result.insertedIds, { 1: document._id });
  } finally {
    stop();
  }
});

test('a bulk failure is a BulkWriteError of its code, with writeErrors and the partial result from the metadata', async () => {
  const upserted = new ObjectId();
  const metadata = {
    mongo_code: '11000', mongo_code_name: 'DuplicateKey', failed_index: '3',
    inserted_count: '1', matched_count: '1', modified_count: '1', deleted_count: '0', upserted_count: '1',
    write_errors: JSON.stringify([{ index: 3, code: 11000, codeName: 'DuplicateKey', errmsg: 'E11000 duplicate key error' }]),
    write_errors_total: '1',
    upserted_ids: EJSON.stringify([{ index: 2, _id: upserted }, { index: 5, _id: 7 }], { relaxed: false }),
  };
  const { client, methods, stop } = await serveBroker(
    flaky('BulkWrite', [brokerError(grpc.status.ALREADY_EXISTS, 'E11000 duplicate key error', 'DUPLICATE_KEY', metadata)], {}),
  );
  try {
    const coll = client.db('appdb').collection('items');
    const first = { sku: 'a' };
    const fourth = { _id: 'dup' };
    await assert.rejects(
      coll.bulkWrite([
        { insertOne: { document: first } },
        { updateOne: { filter: {}, update: { $set: { a: 1 } } } },
        { updateOne: { filter: { a: 2 }, update: { $set: { a: 1 } }, upsert: true } },
        { insertOne: { document: fourth } },
        { insertOne: { document: { sku: 'never sent on' } } },
      ]),
      (/** @type {any} */ error) => {
        assert.ok(error instanceof broker.DuplicateKeyError, 'the class of its gRPC code');
        assert.ok(error instanceof broker.BulkWriteError, 'and a bulk write error');
        assert.equal(error.reason, 'DUPLICATE_KEY');
        assert.equal(error.mongoCode, 11000);
        assert.equal(error.index, 3);
        assert.equal(error.errmsg, 'E11000 duplicate key error');
        assert.deepEqual(error.writeErrors, [{ index: 3, code: 11000, codeName: 'DuplicateKey', errmsg: 'E11000 duplicate key error' }]);
        assert.equal(error.writeErrorsTotal, 1);
        assert.deepEqual(error.result, {
          acknowledged: true, insertedCount: 1, matchedCount: 1, modifiedCount: 1, deletedCount: 0, upsertedCount: 1,
          // Ordered: only the inserts before the failing operation landed.
          insertedIds: { 0: first._id },
          upsertedIds: { 2: upserted, 5: 7 },
        });
        assert.equal(error.writeConcernError, null);
        return true;
      },
    );
    assert.deepEqual(methods, ['BulkWrite']);
  } finally {
    stop();
  }
});

test('an unordered bulk failure counts every insert without a write error; other errors are not bulk errors', async () => {
  const metadata = {
    failed_index: '1', inserted_count: '2',
    write_errors: JSON.stringify([{ index: 1, code: 11000, codeName: 'DuplicateKey', errmsg: 'dup' }]),
    write_concern_error: 'waiting for replication timed out',
  };
  const { client, stop } = await serveBroker(
    flaky('BulkWrite', [
      brokerError(grpc.status.ALREADY_EXISTS, 'dup', 'DUPLICATE_KEY', metadata),
      brokerError(grpc.status.INVALID_ARGUMENT, 'operations: at most 1000', 'INVALID_REQUEST'),
    ], {}),
  );
  try {
    const coll = client.db('appdb').collection('items');
    const docs = [{ n: 0 }, { _id: 'dup' }, { n: 2 }];
    const inserts = docs.map((document) => ({ insertOne: { document } }));
    await assert.rejects(coll.bulkWrite(inserts, { ordered: false }), (/** @type {any} */ error) => {
      assert.ok(error instanceof broker.BulkWriteError);
      assert.deepEqual(error.result.insertedIds, { 0: docs[0]._id, 2: docs[2]._id });
      assert.equal(error.result.insertedCount, 2);
      assert.deepEqual(error.writeConcernError, { errmsg: 'waiting for replication timed out' });
      return true;
    });
    await assert.rejects(coll.bulkWrite([{ deleteOne: { filter: {} } }]), (/** @type {any} */ error) => {
      assert.ok(error instanceof broker.InvalidArgumentError);
      assert.ok(!(error instanceof broker.BulkWriteError), 'no write metadata: not a bulk write error');
      assert.equal(error.result, undefined);
      assert.deepEqual(error.writeErrors, []);
      assert.equal(error.errmsg, 'operations: at most 1000');
      return true;
    });
  } finally {
    stop();
  }
});

test('an unordered insertMany failure without a list of write errors claims only the ids before the first failure', async () => {
  // As the broker reports a failed Insert: the first failing index and the count.
  const metadata = { mongo_code: '11000', failed_index: '1', inserted_count: '2' };
  const { client, stop } = await serveBroker(
    flaky('Insert', [brokerError(grpc.status.ALREADY_EXISTS, 'write failed at document 1', 'DUPLICATE_KEY', metadata)], {}),
  );
  try {
    const docs = [{ n: 0 }, { _id: 'dup' }, { n: 2 }];
    await assert.rejects(client.db('appdb').collection('items').insertMany(docs, { ordered: false }), (/** @type {any} */ error) => {
      assert.ok(error instanceof broker.DuplicateKeyError && error instanceof broker.BulkWriteError);
      assert.deepEqual(error.result.insertedIds, { 0: docs[0]._id }, 'document 2 may or may not have landed');
      assert.equal(error.result.insertedCount, 2);
      assert.deepEqual(error.writeErrors, []);
      return true;
    });
  } finally {
    stop();
  }
});

test("a single write's failure reads as the driver's MongoServerError: errmsg, index, mongoCode", async () => {
  const metadata = {
    mongo_code: '11000', mongo_code_name: 'DuplicateKey', failed_index: '0', matched_count: '0', upserted_count: '0',
    write_errors: JSON.stringify([{ index: 0, code: 11000, codeName: 'DuplicateKey', errmsg: 'E11000 dup key: { sku: "a" }' }]),
  };
  const { client, stop } = await serveBroker(
    flaky('Update', [brokerError(grpc.status.ALREADY_EXISTS, 'duplicate key', 'DUPLICATE_KEY', metadata)], {}),
  );
  try {
    const upsert = client.db('appdb').collection('items').updateOne({ a: 1 }, { $set: { sku: 'a' } }, { upsert: true });
    await assert.rejects(upsert, (/** @type {any} */ error) => {
      assert.ok(error instanceof broker.DuplicateKeyError);
      assert.ok(!(error instanceof broker.BulkWriteError));
      assert.equal(error.code, grpc.status.ALREADY_EXISTS, 'code stays the gRPC code');
      assert.equal(error.mongoCode, 11000);
      assert.equal(error.errmsg, 'E11000 dup key: { sku: "a" }');
      assert.equal(error.message, 'duplicate key');
      assert.equal(error.index, 0);
      assert.equal(error.matchedCount, 0);
      assert.equal(error.upsertedCount, 0);
      assert.equal(error.deletedCount, null, 'not sent: null');
      return true;
    });
  } finally {
    stop();
  }
});
