'use strict';
// A tier of replicas without a broker: the address list is checked, and
// in-test gRPC servers with the standard health service show that calls go
// round-robin to the SERVING replicas only, that a call a replica refuses
// with UNAVAILABLE is retried on another one, and that a retried insert
// finds its own documents rather than storing them twice. (A replica that
// turns NOT_SERVING while it still serves is what a broker does only with a
// drain delay; tests/test_tier_polyglot.py drives real ones.)

const test = require('node:test');
const assert = require('node:assert/strict');
const os = require('node:os');
const path = require('node:path');
const fs = require('node:fs');
const grpc = require('@grpc/grpc-js');
const { BSON, ObjectId } = require('bson');

const broker = require('..');
const { loadService, normalizeTarget } = require('../lib/client');
const { parseTier, loadHealth } = require('../lib/tier');
const { _types } = require('../lib/errors');

test('a list of IP addresses or sockets is a tier; a dns target too; anything else is one broker', () => {
  assert.deepEqual(parseTier([' 10.0.0.5:50051', '[fd00::5]:50051', '127.0.0.1:1 '], normalizeTarget), {
    addresses: ['10.0.0.5:50051', '[fd00::5]:50051', '127.0.0.1:1'],
  });
  assert.deepEqual(parseTier(['unix:///run/a.sock', 'unix:/run/b.sock', '/run/c.sock'], normalizeTarget), {
    addresses: ['unix:///run/a.sock', 'unix:///run/b.sock', 'unix:///run/c.sock'],
  });
  assert.deepEqual(parseTier('dns:///broker.apps.svc:50051', normalizeTarget), { host: 'broker.apps.svc', port: 50051 });
  assert.equal(parseTier('127.0.0.1:50051', normalizeTarget), null);
  assert.equal(parseTier('unix:///run/a.sock', normalizeTarget), null);
});

test('a bad list or dns target is refused with what to write instead', () => {
  /** @type {[any, RegExp][]} */
  const cases = [
    [[], /no addresses/],
    [['10.0.0.5:50051', ' '], /address 2 of 2 is empty/],
    [[42], /address 1 of 1 is a number, not a string/],
    [['10.0.0.5'], /has no port: write host:port/],
    [['fd00::5'], /10\.0\.0\.5:50051 or \[fd00::5\]:50051/],
    [['10.0.0.5:http'], /is not a number from 1 to 65535/],
    [['10.0.0.5:70000'], /from 1 to 65535/],
    [['broker-0.broker:50051'], /is a host name.*"dns:\/\/\/broker-0\.broker:50051"/],
    [['localhost:50051'], /a list takes IP addresses/],
    [['10.0.0.5:50051', '10.0.0.5:50051'], /is listed twice/],
    [['unix:///run/a.sock', '10.0.0.5:50051'], /mix a unix socket/],
    [['dns:///broker:50051'], /not dns: targets/],
    [['unix://relative/a.sock'], /absolute path/],
    ['dns:///broker.apps.svc', /has no port/],
    ['dns://10.96.0.10/broker.apps.svc:50051', /naming a DNS server/],
    [{ addresses: [] }, /a string or an array/],
  ];
  for (const [target, message] of cases) {
    assert.throws(() => new broker.BrokerClient(target), message, JSON.stringify(target));
  }
});

/**
 * One in-test replica: Ping answers its address (and, while `draining`,
 * UNAVAILABLE SHUTTING_DOWN), counted; the health service reports `serving`
 * for "broker.v1.Broker".
 */
class Replica {
  constructor() {
    this.pings = 0;
    this.draining = false;
    this.status = 'SERVING';
    /** @type {Set<any>} open Watch calls */
    this.watchers = new Set();
    this.server = new grpc.Server();
    this.address = '';
  }

  /**
   * @param {string} bindTo
   * @param {Record<string, Function>} [implementation] the Broker methods; a counted Ping by default
   */
  async start(bindTo, implementation) {
    this.server.addService(
      loadService().service,
      implementation || {
        Ping: (/** @type {any} */ _call, /** @type {Function} */ callback) => {
          this.pings += 1;
          if (this.draining) callback(shuttingDown());
          else callback(null, { version: this.address, databases: [] });
        },
      },
    );
    this.server.addService(loadHealth().service, {
      Watch: (/** @type {any} */ call) => {
        this.watchers.add(call);
        call.on('cancelled', () => this.watchers.delete(call));
        call.write({ status: call.request.service === 'broker.v1.Broker' ? this.status : 'SERVICE_UNKNOWN' });
      },
    });
    const port = await new Promise((resolve, reject) =>
      this.server.bindAsync(bindTo, grpc.ServerCredentials.createInsecure(), (error, p) => (error ? reject(error) : resolve(p))),
    );
    this.address = bindTo.startsWith('unix:') ? bindTo : `127.0.0.1:${port}`;
    return this;
  }

  /** @param {boolean} serving */
  setServing(serving) {
    this.status = serving ? 'SERVING' : 'NOT_SERVING';
    for (const call of this.watchers) call.write({ status: this.status });
  }

  stop() {
    this.server.forceShutdown();
  }
}

function shuttingDown() {
  const { StatusType, ErrorInfoType, ERROR_INFO_URL } = _types;
  const info = ErrorInfoType.encode({ reason: 'SHUTTING_DOWN', domain: 'mongo-broker', metadata: {} }).finish();
  const status = StatusType.encode({ code: grpc.status.UNAVAILABLE, message: 'shutting down', details: [{ typeUrl: ERROR_INFO_URL, value: info }] }).finish();
  const metadata = new grpc.Metadata();
  metadata.set('grpc-status-details-bin', Buffer.from(status));
  return { code: grpc.status.UNAVAILABLE, details: 'the broker is shutting down', metadata };
}

/**
 * @param {number} n
 * @param {{unix?: boolean}} [options]
 * @returns {Promise<Replica[]>}
 */
async function startReplicas(n, { unix = false } = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mb-tier-'));
  const replicas = [];
  for (let i = 0; i < n; i += 1) {
    replicas.push(await new Replica().start(unix ? `unix://${path.join(dir, `r${i}.sock`)}` : '127.0.0.1:0'));
  }
  return replicas;
}

/**
 * @param {broker.BrokerClient} client
 * @param {Replica[]} replicas
 * @param {number} n
 * @returns {Promise<number[]>} the pings each replica got
 */
async function pings(client, replicas, n) {
  const before = replicas.map((r) => r.pings);
  for (let i = 0; i < n; i += 1) await client.ping();
  return replicas.map((r, i) => r.pings - before[i]);
}

/**
 * Repeats `check` (health updates arrive asynchronously) until it holds, for 5 s.
 * @param {string} what
 * @param {() => Promise<[boolean, any]>} check
 */
async function eventually(what, check) {
  const deadline = Date.now() + 5000;
  for (;;) {
    const [ok, seen] = await check();
    if (ok) return;
    if (Date.now() > deadline) assert.fail(`after 5 s, still not ${what}: ${JSON.stringify(seen)}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

for (const unix of [false, true]) {
  test(`calls go round-robin to the SERVING replicas only (unix: ${unix})`, async () => {
    const replicas = await startReplicas(3, { unix });
    replicas[2].setServing(false);
    const client = new broker.BrokerClient(replicas.map((r) => r.address), { timeoutMs: 10_000 });
    try {
      let shares = await pings(client, replicas, 60);
      assert.ok(shares[0] > 0 && shares[1] > 0 && shares[2] === 0, `shares ${shares}`);
      assert.deepEqual(
        client.replicas().map((r) => r.state),
        ['SERVING', 'SERVING', 'NOT_SERVING'],
      );
      replicas[2].setServing(true);
      replicas[0].setServing(false);
      await eventually('moved off the first replica onto the third', async () => {
        const s = await pings(client, replicas, 30);
        return [s[0] === 0 && s[1] > 0 && s[2] > 0, s];
      });
      shares = await pings(client, replicas, 30);
      assert.equal(shares[0], 0, `a NOT_SERVING replica got calls: ${shares}`);
    } finally {
      await client.close();
      for (const r of replicas) r.stop();
    }
  });
}

test('with no replica serving a call fails UNAVAILABLE at once, not at its deadline', async () => {
  const replicas = await startReplicas(2);
  for (const r of replicas) r.setServing(false);
  const client = new broker.BrokerClient(replicas.map((r) => r.address), { retries: null });
  try {
    await eventually('told that both are NOT_SERVING', async () => {
      const states = client.replicas().map((r) => r.state);
      return [states.every((s) => s === 'NOT_SERVING'), states];
    });
    const started = Date.now();
    await assert.rejects(client.ping(undefined, { timeoutMs: 5000 }), (error) => {
      assert.ok(error instanceof broker.UnavailableError, String(error));
      assert.match(error.message, /no broker replica is serving: 127\.0\.0\.1:\d+ NOT_SERVING/);
      return true;
    });
    assert.ok(Date.now() - started < 1000);
    assert.equal(replicas[0].pings + replicas[1].pings, 0);
  } finally {
    await client.close();
    for (const r of replicas) r.stop();
  }
});

test('a replica that is down is UNREACHABLE, and the calls go to the others', async () => {
  const replicas = await startReplicas(2);
  const gone = await new Replica().start('127.0.0.1:0');
  gone.stop();
  const client = new broker.BrokerClient([gone.address, ...replicas.map((r) => r.address)], { timeoutMs: 5000 });
  try {
    const shares = await pings(client, replicas, 20);
    assert.ok(shares[0] > 0 && shares[1] > 0, `shares ${shares}`);
    await eventually('the dead one UNREACHABLE', async () => {
      const [first] = client.replicas();
      return [first.state === 'UNREACHABLE', first];
    });
  } finally {
    await client.close();
    for (const r of replicas) r.stop();
  }
});

test('a call refused UNAVAILABLE SHUTTING_DOWN is retried on another replica, and counted', async () => {
  const replicas = await startReplicas(2);
  const client = new broker.BrokerClient(replicas.map((r) => r.address), { timeoutMs: 10_000 });
  try {
    await pings(client, replicas, 4);
    replicas[0].draining = true; // refuses, while its health still says SERVING
    for (let i = 0; i < 20; i += 1) {
      const { version } = await client.ping();
      assert.equal(version, replicas[1].address);
    }
    assert.ok(client.retryCount > 0, 'a retry was made and counted');
    assert.equal(client.replicas()[0].state, 'NOT_SERVING', 'a replica that said it shuts down gets no more calls');
    const once = new broker.BrokerClient(replicas.map((r) => r.address), { retries: null });
    try {
      let refused = null;
      for (let i = 0; i < 10 && refused === null; i += 1) {
        refused = await once.ping().then(
          () => null,
          (error) => error,
        );
      }
      assert.ok(refused instanceof broker.UnavailableError && refused.reason === 'SHUTTING_DOWN' && refused.attempts === 1, String(refused));
    } finally {
      await once.close();
    }
  } finally {
    await client.close();
    for (const r of replicas) r.stop();
  }
});

test("a CANCELLED of the server's (a stopping server's, to a call it never ran) is retried", async () => {
  let cancelNext = 1;
  const replica = await new Replica().start('127.0.0.1:0', {
    Ping: (/** @type {any} */ _call, /** @type {Function} */ callback) => {
      replica.pings += 1;
      if (cancelNext > 0) {
        cancelNext -= 1;
        callback({ code: grpc.status.CANCELLED, details: 'CANCELLED' });
      } else {
        callback(null, { version: 'ok', databases: [] });
      }
    },
  });
  const client = new broker.BrokerClient([replica.address], { timeoutMs: 5000 });
  try {
    assert.equal((await client.ping()).version, 'ok');
    assert.equal(client.retryCount, 1);
    assert.equal(replica.pings, 2);
  } finally {
    await client.close();
    replica.stop();
  }
});

test('a dns target reaches what the name resolves to', async () => {
  const [replica] = await startReplicas(1);
  const port = replica.address.split(':').pop();
  const client = new broker.BrokerClient(`dns:///localhost:${port}`, { timeoutMs: 5000 });
  try {
    assert.equal((await client.ping()).version, replica.address);
    assert.ok(client.replicas().some((r) => r.address === replica.address && r.state === 'SERVING'), JSON.stringify(client.replicas()));
  } finally {
    await client.close();
    replica.stop();
  }
  const nowhere = new broker.BrokerClient('dns:///no-such-host.invalid:50051', { retries: null });
  try {
    await assert.rejects(nowhere.ping(undefined, { timeoutMs: 5000 }), /dns lookup of no-such-host\.invalid:50051 failed/);
  } finally {
    await nowhere.close();
  }
});

// --- inserts that lost their answer -------------------------------------------------

/**
 * An in-test store of documents by _id. Its next `lose` Inserts store at
 * most `storeBeforeLoss` documents and answer UNAVAILABLE, as a connection
 * cut after the write would; a document with a `conflict` field is refused
 * as a duplicate key (another unique index), unstored.
 */
async function serveStore({ lose = 0, storeBeforeLoss = 0 } = {}) {
  /** @type {Map<string, Buffer>} */
  const stored = new Map();
  const calls = { inserts: 0, finds: 0 };
  const keyOf = (/** @type {any} */ id) => (id instanceof ObjectId ? id.toHexString() : String(id));
  const replica = new Replica();
  const implementation = {
    Insert: (/** @type {any} */ call, /** @type {Function} */ callback) => {
      calls.inserts += 1;
      const losing = lose > 0;
      if (losing) lose -= 1;
      /** @type {Buffer[]} */
      const ids = [];
      for (const [i, raw] of call.request.documents.entries()) {
        if (losing && i >= storeBeforeLoss) break;
        const doc = BSON.deserialize(raw);
        if (stored.has(keyOf(doc._id)) || doc.conflict !== undefined) {
          const { StatusType, ErrorInfoType, ERROR_INFO_URL } = _types;
          const metadata = { mongo_code: '11000', failed_index: String(i), inserted_count: String(i) };
          const info = ErrorInfoType.encode({ reason: 'DUPLICATE_KEY', domain: 'mongo-broker', metadata }).finish();
          const status = StatusType.encode({ code: grpc.status.ALREADY_EXISTS, message: 'E11000', details: [{ typeUrl: ERROR_INFO_URL, value: info }] }).finish();
          const trailers = new grpc.Metadata();
          trailers.set('grpc-status-details-bin', Buffer.from(status));
          callback({ code: grpc.status.ALREADY_EXISTS, details: 'E11000 duplicate key', metadata: trailers });
          return;
        }
        stored.set(keyOf(doc._id), raw);
        ids.push(Buffer.from(BSON.serialize({ _id: doc._id })));
      }
      if (losing) callback({ code: grpc.status.UNAVAILABLE, details: 'connection lost' });
      else callback(null, { inserted_ids: ids });
    },
    Find: (/** @type {any} */ call) => {
      calls.finds += 1;
      const wanted = BSON.deserialize(call.request.filter)._id.$in.map(keyOf);
      call.write({ documents: wanted.filter((key) => stored.has(key)).map((key) => stored.get(key)) });
      call.end();
    },
  };
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mb-store-'));
  await replica.start(`unix://${path.join(dir, 'broker.sock')}`, implementation);
  const client = new broker.BrokerClient(replica.address, { timeoutMs: 10_000 });
  const stop = async () => {
    await client.close();
    replica.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  };
  return { client, stored, calls, stop };
}

test('an insertOne whose answer was lost finds its own document on the retry', async () => {
  const { client, stored, calls, stop } = await serveStore({ lose: 1, storeBeforeLoss: 1 });
  try {
    const { insertedId } = await client.db('appdb').collection('items').insertOne({ sku: 'a1' });
    assert.ok(insertedId instanceof ObjectId);
    assert.deepEqual({ ...calls, stored: stored.size }, { inserts: 2, finds: 1, stored: 1 });
    assert.equal(client.retryCount, 1);
  } finally {
    await stop();
  }
});

test('an insertOne that stored nothing is retried until it lands', async () => {
  const { client, stored, calls, stop } = await serveStore({ lose: 2, storeBeforeLoss: 0 });
  try {
    await client.db('appdb').collection('items').insertOne({ n: 1 });
    assert.deepEqual({ inserts: calls.inserts, stored: stored.size }, { inserts: 3, stored: 1 });
  } finally {
    await stop();
  }
});

test("an insert with the caller's _id is sent once", async () => {
  const { client, calls, stop } = await serveStore({ lose: 1 });
  try {
    await assert.rejects(client.db('appdb').collection('items').insertOne({ _id: 'mine' }), (error) => {
      assert.ok(error instanceof broker.UnavailableError && error.attempts === 1, String(error));
      return true;
    });
    assert.equal(calls.inserts, 1);
  } finally {
    await stop();
  }
});

test('an ordered insertMany sends the rest after finding its first part stored', async () => {
  const { client, stored, calls, stop } = await serveStore({ lose: 1, storeBeforeLoss: 2 });
  try {
    const result = await client.db('appdb').collection('items').insertMany([{ n: 0 }, { n: 1 }, { n: 2 }, { n: 3 }]);
    assert.equal(result.insertedIds.length, 4);
    assert.deepEqual({ inserts: calls.inserts, stored: stored.size }, { inserts: 3, stored: 4 });
    assert.equal(client.retryCount, 1, 'sending the rest is not a new attempt');
  } finally {
    await stop();
  }
});

test('a real conflict after a lost answer is still a duplicate key, counted in the caller list', async () => {
  const { client, stop } = await serveStore({ lose: 1, storeBeforeLoss: 1 });
  try {
    const documents = [{ n: 0 }, { n: 1, conflict: true }, { n: 2 }];
    await assert.rejects(client.db('appdb').collection('items').insertMany(documents), (error) => {
      assert.ok(error instanceof broker.DuplicateKeyError && error instanceof broker.BulkWriteError, String(error));
      assert.equal(error.failedIndex, 1);
      assert.equal(error.insertedCount, 1);
      assert.equal(error.attempts, 2);
      assert.deepEqual(Object.keys(error.result.insertedIds), ['0']);
      return true;
    });
  } finally {
    await stop();
  }
});
