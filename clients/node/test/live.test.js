'use strict';
// Integration tests against a live broker: MONGO_BROKER_TARGET is its
// address, MONGO_BROKER_DATABASE the configured database (default "appdb").
// Without MONGO_BROKER_TARGET they are skipped, so `node --test` works
// offline; tests/test_polyglot.py runs them against the pytest session's
// broker.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const { BSON, Binary, Double, Int32, Long, ObjectId } = require('bson');

const broker = require('..');

const TARGET = process.env.MONGO_BROKER_TARGET || '';
const DATABASE = process.env.MONGO_BROKER_DATABASE || 'appdb';
const skip = TARGET
  ? false
  : 'MONGO_BROKER_TARGET is not set: no live broker to test against (tests/test_polyglot.py sets it)';

describe('against a live broker', { skip }, () => {
  /** @type {broker.BrokerClient} */
  let client;

  before(() => {
    client = new broker.BrokerClient(TARGET, { timeoutMs: 20_000 });
  });

  after(async () => {
    if (client) await client.close();
  });

  /** A collection of the test's own. */
  function collection(/** @type {string} */ stem) {
    return client.db(DATABASE).collection(`node_${stem}_${crypto.randomBytes(4).toString('hex')}`);
  }

  it('pings the broker and the database', async () => {
    const all = await client.ping();
    assert.ok(all.version && all.ok && all.databases.length > 0, JSON.stringify(all));
    const one = await client.db(DATABASE).ping();
    assert.equal(one.databases.length, 1);
    assert.equal(one.databases[0].database, DATABASE);
    assert.ok(one.databases[0].ok);
    assert.ok(one.databases[0].pool.maxPoolSize >= 1);
  });

  it('reports stats in camelCase, for every database or one', async () => {
    await client.ping(DATABASE);
    const all = await client.stats();
    assert.ok(all.version && all.uptimeS > 0, JSON.stringify(all));
    const mine = all.databases.find((db) => db.database === DATABASE);
    assert.ok(mine, `no stats for ${DATABASE}`);
    assert.ok(mine.maxPoolSize >= 1 && mine.rpcs.Ping >= 1 && typeof mine.connectionsInUse === 'number');
    assert.ok(Object.keys(mine).every((key) => !key.includes('_')), Object.keys(mine).join(', '));
    const one = await client.stats(DATABASE);
    assert.deepEqual(one.databases.map((db) => db.database), [DATABASE]);
  });

  it('round-trips a document with every type exactly', async () => {
    const coll = collection('roundtrip');
    const doc = {
      s: 'héllo',
      i32: new Int32(42),
      i64: Long.fromString('1099511627777'),
      i64small: Long.fromNumber(5),
      dbl: new Double(3),
      yes: true,
      none: null,
      ref: new ObjectId('64b7f0c2a1b2c3d4e5f60718'),
      when: new Date('2024-02-29T12:34:56.789Z'),
      blob: new Binary(Buffer.from([0, 1, 2, 255]), 0x80),
      nested: { a: [new Int32(1), 'two', { x: Long.fromNumber(4) }] },
    };
    const { insertedId } = await coll.insertOne(doc);
    assert.ok(insertedId instanceof ObjectId);
    assert.ok(doc._id.equals(insertedId), 'insertOne sets _id on the document, as the driver does');

    // Exact types: keep the Int32/Double/Long wrappers.
    const exact = await coll.findOne({ _id: insertedId }, { bsonOptions: { promoteValues: false } });
    assert.deepEqual(
      Buffer.from(BSON.serialize(exact)),
      // _id first, as it was sent, then the fields in their order.
      Buffer.from(BSON.serialize({ _id: insertedId, ...doc })),
    );
    assert.equal(exact.i32._bsontype, 'Int32');
    assert.equal(exact.i64small._bsontype, 'Long');
    assert.equal(exact.dbl._bsontype, 'Double');
    assert.equal(exact.blob.sub_type, 0x80);

    // The driver's default decoding: plain numbers where they fit.
    const plain = await coll.findOne({ _id: insertedId });
    assert.equal(plain.i32, 42);
    assert.equal(plain.i64small, 5);
    assert.ok(plain.when instanceof Date && plain.when.getTime() === doc.when.getTime());
    // int64 as bigint, on request.
    const big = await coll.findOne({ _id: insertedId }, { bsonOptions: { useBigInt64: true } });
    assert.equal(big.i64, 1099511627777n);
  });

  it('finds with filter, sort, skip, limit and projection', async () => {
    const coll = collection('find');
    const docs = Array.from({ length: 10 }, (_, i) => ({ sku: `sku-${String(i).padStart(2, '0')}`, qty: i, tag: 't' }));
    const result = await coll.insertMany(docs);
    assert.equal(result.insertedCount, 10);
    assert.ok(result.insertedIds.every((id) => id instanceof ObjectId));
    const found = await coll
      .find({ qty: { $gte: 3 } }, { sort: { qty: -1 }, skip: 1, limit: 4, projection: { sku: 1, qty: 1 }, comment: 'node' })
      .toArray();
    assert.deepEqual(found.map((d) => d.sku), ['sku-08', 'sku-07', 'sku-06', 'sku-05']);
    assert.ok(found.every((d) => d.tag === undefined && d._id instanceof ObjectId));
    const first = await coll.findOne({ _id: result.insertedIds[0] });
    assert.equal(first.sku, 'sku-00');
    assert.equal(await coll.findOne({ missing: true }), null);
  });

  it('findOne is one FindOne call, by _id or not found, with the usual errors', async () => {
    const coll = collection('findone');
    const { insertedIds } = await coll.insertMany([{ sku: 'a', qty: 1 }, { sku: 'b', qty: 2 }]);
    const findOnes = async () => (await client.stats(DATABASE)).databases[0].rpcs.FindOne || 0;
    const before = await findOnes();

    const byId = await coll.findOne({ _id: insertedIds[1] }, { projection: { sku: 1 } });
    assert.deepEqual(byId, { _id: insertedIds[1], sku: 'b' });
    // The limit is findOne's own, whatever the options say; the sort decides
    // which document is the first.
    assert.equal((await coll.findOne({}, { sort: { qty: -1 }, limit: 5 })).sku, 'b');
    assert.equal(await coll.findOne({ _id: new ObjectId() }), null);
    // The broker counts calls by method: these went out as FindOne.
    assert.ok((await findOnes()) - before >= 3, 'the broker did not count 3 FindOne calls');

    await assert.rejects(client.db('no_such_database').collection('items').findOne({}), broker.UnknownDatabaseError);
    await assert.rejects(coll.findOne({}, { deadline: new Date(Date.now() - 1000) }), broker.DeadlineExceededError);
  });

  it('streams many batches lazily, one message per batch', async () => {
    const coll = collection('stream');
    const total = 1234;
    const docs = Array.from({ length: total }, (_, n) => ({ n, pad: 'x'.repeat(100) }));
    await coll.insertMany(docs);
    const cursor = coll.find({}, { sort: { n: 1 }, batchSize: 100 });
    assert.equal(cursor.batches, 0, 'nothing is sent before the cursor is read');
    assert.ok(await cursor.hasNext());
    assert.equal(cursor.batches, 1);
    let n = 0;
    for await (const doc of cursor) {
      assert.equal(doc.n, n);
      n += 1;
    }
    assert.equal(n, total);
    assert.ok(cursor.batches >= total / 100, `${total} documents in ${cursor.batches} messages`);
  });

  it('reads a 10 MiB document with find and findOne, over grpc-js\'s 4 MiB default', async () => {
    const coll = collection('large');
    // One document always travels alone in one message (up to 16 MiB plus
    // framing): the client's receive limit, not the broker, decides.
    const big = 'x'.repeat(10 * 1024 * 1024);
    const { insertedId } = await coll.insertOne({ big });
    const found = await coll.find({ _id: insertedId }).toArray();
    assert.equal(found.length, 1);
    assert.equal(found[0].big.length, big.length);
    const one = await coll.findOne({ _id: insertedId });
    assert.ok(one && one.big === big);
    // With grpc-js's own default the same reads fail: the option is needed.
    const small = new broker.BrokerClient(TARGET, {
      timeoutMs: 20_000,
      channelOptions: { 'grpc.max_receive_message_length': 4 * 1024 * 1024 },
    });
    try {
      await assert.rejects(small.db(DATABASE).collection(coll.collectionName).findOne({ _id: insertedId }), (err) => {
        assert.equal(err.code, broker.status.RESOURCE_EXHAUSTED, String(err));
        return true;
      });
    } finally {
      await small.close();
    }
  });

  it('stops the stream on an early break and on close()', async () => {
    const coll = collection('early');
    await coll.insertMany(Array.from({ length: 50 }, (_, n) => ({ n })));
    let seen = 0;
    for await (const doc of coll.find({}, { batchSize: 5 })) {
      assert.equal(typeof doc.n, 'number');
      seen += 1;
      if (seen === 3) break;
    }
    const cursor = coll.find({}, { batchSize: 5 });
    assert.notEqual(await cursor.next(), null);
    await cursor.close();
    assert.equal(await cursor.next(), null);
    await cursor.close();
    assert.equal((await coll.find({}).toArray()).length, 50, 'the client still works');
  });

  it('throws DuplicateKeyError with the gRPC code and what landed', async () => {
    const coll = collection('dup');
    await assert.rejects(coll.insertMany([{ _id: 1 }, { _id: 2 }, { _id: 2 }, { _id: 3 }]), (error) => {
      assert.ok(error instanceof broker.DuplicateKeyError, String(error));
      assert.equal(error.code, broker.status.ALREADY_EXISTS);
      assert.equal(error.code, 6);
      assert.equal(error.codeName, 'ALREADY_EXISTS');
      assert.equal(error.reason, 'DUPLICATE_KEY');
      assert.equal(error.mongoCode, 11000);
      assert.equal(error.insertedCount, 2);
      assert.equal(error.failedIndex, 2);
      return true;
    });
    // A retried insert with a client-made _id: the duplicate says it landed.
    const doc = { sku: 'retry' };
    await coll.insertOne(doc);
    await assert.rejects(coll.insertOne(doc), broker.DuplicateKeyError);
  });

  it('throws UnknownDatabaseError (NOT_FOUND) for a database the broker lacks', async () => {
    const coll = client.db('no_such_database').collection('items');
    for (const attempt of [() => coll.find({}).toArray(), () => coll.insertOne({ a: 1 })]) {
      await assert.rejects(attempt(), (error) => {
        assert.ok(error instanceof broker.UnknownDatabaseError, String(error));
        assert.equal(error.code, broker.status.NOT_FOUND);
        assert.equal(error.reason, 'UNKNOWN_DATABASE');
        return true;
      });
    }
  });

  it('throws InvalidArgumentError for a request the broker refuses', async () => {
    const coll = collection('invalid');
    await assert.rejects(coll.find({}, { sort: { a: 'sideways' } }).toArray(), (error) => {
      assert.ok(error instanceof broker.InvalidArgumentError, String(error));
      assert.equal(error.code, broker.status.INVALID_ARGUMENT);
      assert.equal(error.reason, 'INVALID_REQUEST');
      return true;
    });
  });

  it('throws DeadlineExceededError when the deadline has passed', async () => {
    const coll = collection('deadline');
    const checks = [
      () => coll.insertOne({ a: 1 }, { deadline: new Date(Date.now() - 1000) }),
      () => coll.find({}, { timeoutMs: 0 }).toArray(),
    ];
    for (const attempt of checks) {
      await assert.rejects(attempt(), (error) => {
        assert.ok(error instanceof broker.DeadlineExceededError, String(error));
        assert.equal(error.code, broker.status.DEADLINE_EXCEEDED);
        return true;
      });
    }
  });

  it('sends a token and a request id', async () => {
    // The session broker has no tokens: it ignores one that is sent.
    const withToken = new broker.BrokerClient(TARGET, { token: 'a-token-the-broker-ignores', metadata: { 'x-client': 'node' } });
    try {
      const result = await withToken.ping(DATABASE, { requestId: 'node-test.request-1' });
      assert.ok(result.ok);
    } finally {
      await withToken.close();
    }
  });
});
