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
const { BSON, ObjectId } = require('bson');

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
    assert.deepEqual(Object.keys(stats).sort(), ['databases', 'uptimeS', 'version']);
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
