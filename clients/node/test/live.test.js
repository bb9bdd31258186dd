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
      // As the driver's MongoBulkWriteError.
      assert.ok(error instanceof broker.BulkWriteError);
      assert.deepEqual(error.result.insertedIds, { 0: 1, 1: 2 });
      assert.equal(error.result.insertedCount, 2);
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

  it('updateOne, updateMany and replaceOne change what they match, and upsert', async () => {
    const coll = collection('update');
    await coll.insertMany([{ _id: 1, sku: 'a', qty: 1 }, { _id: 2, sku: 'b', qty: 2 }, { _id: 3, sku: 'c', qty: 3 }]);
    assert.deepEqual(await coll.updateOne({ qty: { $gte: 2 } }, { $inc: { qty: 10 } }), {
      acknowledged: true, matchedCount: 1, modifiedCount: 1, upsertedCount: 0, upsertedId: null,
    });
    const many = await coll.updateMany({}, { $set: { tag: 't' } });
    assert.equal(many.matchedCount, 3);
    assert.equal(many.modifiedCount, 3);
    const none = await coll.updateOne({ sku: 'zz' }, { $set: { tag: 'u' } });
    assert.deepEqual([none.matchedCount, none.modifiedCount, none.upsertedId], [0, 0, null]);
    const upsert = await coll.updateOne({ sku: 'd' }, { $set: { qty: 4 } }, { upsert: true });
    assert.equal(upsert.matchedCount, 0);
    assert.equal(upsert.upsertedCount, 1);
    assert.ok(upsert.upsertedId instanceof ObjectId, String(upsert.upsertedId));
    const replaced = await coll.replaceOne({ _id: 3 }, { sku: 'c2', qty: 30 });
    assert.deepEqual([replaced.matchedCount, replaced.modifiedCount], [1, 1]);
    assert.deepEqual(await coll.findOne({ _id: 3 }), { _id: 3, sku: 'c2', qty: 30 });
    const replacedUpsert = await coll.replaceOne({ _id: 9 }, { sku: 'e' }, { upsert: true });
    assert.equal(replacedUpsert.upsertedId, 9);
    assert.deepEqual(
      (await coll.find({}, { sort: { _id: 1 }, projection: { _id: 1, qty: 1 } }).toArray()).map((d) => d.qty),
      [1, 12, 30, undefined, 4],
    );
    assert.equal(await coll.countDocuments({ sku: 'd', qty: 4 }), 1);
  });

  it('refuses an update without $ operators, in the client and in the broker', async () => {
    const coll = collection('nonoperator');
    await coll.insertOne({ _id: 1, qty: 1 });
    await assert.rejects(coll.updateOne({ _id: 1 }, { qty: 2 }), (error) => {
      assert.ok(error instanceof broker.InvalidArgumentError, String(error));
      assert.match(error.message, /update only works with \$ operators/);
      return true;
    });
    await assert.rejects(coll.replaceOne({ _id: 1 }, { $set: { qty: 2 } }), /replacement can not include \$ operators/);
    // Past the client's check (a hand-made request), the broker refuses it too.
    const request = {
      database: DATABASE,
      collection: coll.collectionName,
      filter: BSON.serialize({ _id: 1 }),
      update: BSON.serialize({ qty: 2 }),
    };
    await assert.rejects(client._unary('Update', request, {}), (error) => {
      assert.ok(error instanceof broker.InvalidArgumentError, String(error));
      assert.equal(error.reason, 'INVALID_REQUEST');
      return true;
    });
    assert.deepEqual(await coll.findOne({ _id: 1 }), { _id: 1, qty: 1 }, 'nothing changed');
  });

  it('an upsert that collides with a unique _id is a DuplicateKeyError with the write error', async () => {
    const coll = collection('upsertdup');
    await coll.insertMany([{ _id: 1, sku: 'a' }, { _id: 2, sku: 'b' }]);
    // The filter matches nothing, so the upsert inserts _id 1 again.
    await assert.rejects(coll.updateOne({ _id: 1, sku: 'nope' }, { $set: { qty: 1 } }, { upsert: true }), (error) => {
      assert.ok(error instanceof broker.DuplicateKeyError, String(error));
      assert.equal(error.code, broker.status.ALREADY_EXISTS);
      assert.equal(error.reason, 'DUPLICATE_KEY');
      assert.equal(error.mongoCode, 11000);
      assert.match(error.errmsg, /duplicate key/i);
      return true;
    });
  });

  it('deleteOne and deleteMany remove what they match', async () => {
    const coll = collection('delete');
    await coll.insertMany(Array.from({ length: 6 }, (_, n) => ({ n, even: n % 2 === 0 })));
    assert.deepEqual(await coll.deleteOne({ even: true }), { acknowledged: true, deletedCount: 1 });
    assert.deepEqual(await coll.deleteMany({ even: true }), { acknowledged: true, deletedCount: 2 });
    assert.deepEqual(await coll.deleteOne({ n: 99 }), { acknowledged: true, deletedCount: 0 });
    assert.equal(await coll.countDocuments(), 3);
    assert.equal((await coll.deleteMany()).deletedCount, 3);
    assert.equal(await coll.countDocuments(), 0);
  });

  it('findOneAndUpdate, findOneAndReplace and findOneAndDelete return the document before or after', async () => {
    const coll = collection('fam');
    await coll.insertMany([{ _id: 1, qty: 5 }, { _id: 2, qty: 7 }]);
    assert.deepEqual(await coll.findOneAndUpdate({ _id: 1 }, { $inc: { qty: 1 } }), { _id: 1, qty: 5 }, 'before, by default');
    assert.deepEqual(
      await coll.findOneAndUpdate({ _id: 1 }, { $inc: { qty: 1 } }, { returnDocument: 'after' }),
      { _id: 1, qty: 7 },
    );
    assert.equal(await coll.findOneAndUpdate({ _id: 3 }, { $set: { qty: 0 } }), null, 'nothing matched');
    assert.deepEqual(
      await coll.findOneAndUpdate({ _id: 4 }, { $set: { qty: 4 } }, { upsert: true, returnDocument: broker.ReturnDocument.AFTER }),
      { _id: 4, qty: 4 },
    );
    assert.deepEqual(await coll.findOneAndReplace({ _id: 2 }, { sku: 'r' }, { returnDocument: 'after' }), { _id: 2, sku: 'r' });
    // With a sort, the highest qty is the one deleted.
    assert.deepEqual(await coll.findOneAndDelete({ qty: { $exists: true } }, { sort: { qty: -1 } }), { _id: 1, qty: 7 });
    assert.equal(await coll.findOneAndDelete({ _id: 1 }), null);
    assert.deepEqual((await coll.find({}, { sort: { _id: 1 } }).toArray()).map((d) => d._id), [2, 4]);
    await assert.rejects(coll.findOneAndUpdate({ _id: 2 }, { sku: 'x' }), /update only works with \$ operators/);
    // FerretDB 1.24 has no projection in findAndModify: an error, not a wrong document.
    await assert.rejects(coll.findOneAndUpdate({ _id: 2 }, { $set: { a: 1 } }, { projection: { a: 1 } }), broker.BrokerError);
  });

  it('countDocuments, estimatedDocumentCount and distinct read with their options', async () => {
    const coll = collection('count');
    await coll.insertMany(Array.from({ length: 10 }, (_, n) => ({ n, tag: `t${n % 3}`, nested: { k: n % 2 } })));
    assert.equal(await coll.countDocuments(), 10);
    assert.equal(await coll.countDocuments({ n: { $gte: 4 } }), 6);
    assert.equal(await coll.countDocuments({ n: { $gte: 4 } }, { skip: 2, limit: 3 }), 3);
    assert.equal(await coll.countDocuments({}, { readPreference: 'primaryPreferred', readConcern: 'local' }), 10);
    assert.equal(await coll.estimatedDocumentCount(), 10);
    assert.deepEqual((await coll.distinct('tag')).sort(), ['t0', 't1', 't2']);
    assert.deepEqual((await coll.distinct('nested.k', { n: { $lt: 5 } })).sort(), [0, 1]);
    assert.deepEqual(await coll.distinct('missing'), []);
    // The read options reach the broker, which passes them on.
    const reads = client.db(DATABASE, { readConcern: { level: 'local' } }).collection(coll.collectionName, { readPreference: 'primary' });
    assert.equal(await reads.countDocuments({ tag: 't0' }), 4);
    assert.equal((await reads.find({ tag: 't1' }).toArray()).length, 3);
  });

  it('sends collation through to the server, which here refuses it', async () => {
    // FerretDB 1.24 has no collation: the error shows the option reached it
    // (a client that dropped it would answer normally).
    const coll = collection('collation');
    await coll.insertOne({ s: 'a' });
    const refused = (/** @type {any} */ error) => {
      assert.ok(error instanceof broker.BrokerError, String(error));
      assert.ok([broker.status.UNIMPLEMENTED, broker.status.INVALID_ARGUMENT].includes(error.code), `${error.codeName}: ${error.message}`);
      return true;
    };
    const collation = { locale: 'fr', strength: 1 };
    await assert.rejects(coll.find({}, { collation }).toArray(), refused);
    await assert.rejects(coll.countDocuments({}, { collation }), refused);
    await assert.rejects(coll.updateOne({ s: 'A' }, { $set: { t: 1 } }, { collation }), refused);
    assert.deepEqual(await coll.findOne({}, { projection: { _id: 0 } }), { s: 'a' }, 'the refused update changed nothing');
  });

  it('aggregate streams a pipeline in batches, as find does', async () => {
    const coll = collection('aggregate');
    await coll.insertMany(Array.from({ length: 300 }, (_, n) => ({ n, group: n % 3 })));
    const groups = await coll
      .aggregate([{ $group: { _id: '$group', total: { $sum: '$n' } } }, { $sort: { _id: 1 } }])
      .toArray();
    assert.deepEqual(groups, [
      { _id: 0, total: 14850 },
      { _id: 1, total: 14950 },
      { _id: 2, total: 15050 },
    ]);
    const pipeline = [{ $match: { group: 1 } }, { $sort: { n: 1 } }, { $project: { _id: 0, n: 1 } }];
    const cursor = coll.aggregate(pipeline, { batchSize: 25, comment: 'node' });
    let expected = 1;
    for await (const doc of cursor) {
      assert.deepEqual(doc, { n: expected });
      expected += 3;
    }
    assert.equal(expected, 301);
    assert.ok(cursor.batches >= 4, `100 documents in ${cursor.batches} messages`);
    await assert.rejects(coll.aggregate([{ $nonsense: {} }]).toArray(), broker.BrokerError);
  });

  it('bulkWrite runs every model and reports counts and ids by operation index', async () => {
    const coll = collection('bulk');
    await coll.insertMany([{ _id: 1, qty: 1 }, { _id: 2, qty: 2 }, { _id: 3, qty: 3 }]);
    const added = { qty: 10 };
    // The upsert opens the run of updates: FerretDB 1.24 reports index 0
    // for an upsert wherever it sits in the update command.
    const result = await coll.bulkWrite([
      { insertOne: { document: added } },
      { updateOne: { filter: { _id: 50 }, update: { $set: { qty: 50 } }, upsert: true } },
      { updateOne: { filter: { _id: 1 }, update: { $inc: { qty: 100 } } } },
      { updateMany: { filter: { qty: { $lte: 3 } }, update: { $set: { low: true } } } },
      { replaceOne: { filter: { _id: 3 }, replacement: { qty: 33 } } },
      { deleteOne: { filter: { _id: 2 } } },
      { deleteMany: { filter: { qty: 999 } } },
    ]);
    assert.ok(added._id instanceof ObjectId, 'the insertOne document got an _id here');
    assert.equal(result.insertedCount, 1);
    assert.equal(result.matchedCount, 4);
    assert.equal(result.modifiedCount, 4);
    assert.equal(result.deletedCount, 1);
    assert.equal(result.upsertedCount, 1);
    assert.ok(result.insertedIds[0].equals(added._id));
    assert.deepEqual(Object.keys(result.insertedIds), ['0']);
    assert.deepEqual(result.upsertedIds, { 1: 50 });
    assert.deepEqual(await coll.find({}, { sort: { _id: 1 } }).toArray(), [
      { _id: 1, qty: 101 },
      { _id: 3, qty: 33 },
      { _id: 50, qty: 50 },
      { _id: added._id, qty: 10 },
    ].sort((a, b) => (typeof a._id === typeof b._id ? 0 : typeof a._id === 'number' ? -1 : 1)));
  });

  it('an ordered bulkWrite stops at a duplicate key in the middle, with exact counts and the failing index', async () => {
    const coll = collection('bulkdup');
    await coll.insertOne({ _id: 'taken' });
    const promise = coll.bulkWrite([
      { insertOne: { document: { _id: 'a' } } },
      // First in its run of updates, for FerretDB's upsert index (see above).
      { updateOne: { filter: { _id: 'up' }, update: { $set: { seen: 2 } }, upsert: true } },
      { updateOne: { filter: { _id: 'a' }, update: { $set: { seen: 1 } } } },
      { insertOne: { document: { _id: 'taken' } } },
      { insertOne: { document: { _id: 'b' } } },
      { deleteOne: { filter: { _id: 'a' } } },
    ]);
    await assert.rejects(promise, (error) => {
      assert.ok(error instanceof broker.DuplicateKeyError, String(error));
      assert.ok(error instanceof broker.BulkWriteError, 'a bulk write error too');
      assert.equal(error.reason, 'DUPLICATE_KEY');
      assert.equal(error.index, 3);
      assert.equal(error.failedIndex, 3);
      assert.equal(error.writeErrors.length, 1);
      assert.equal(error.writeErrors[0].index, 3);
      assert.equal(error.writeErrors[0].code, 11000);
      assert.match(error.writeErrors[0].errmsg, /duplicate key/i);
      assert.equal(error.result.insertedCount, 1);
      assert.equal(error.result.matchedCount, 1);
      assert.equal(error.result.modifiedCount, 1);
      assert.equal(error.result.upsertedCount, 1);
      assert.equal(error.result.deletedCount, 0);
      assert.deepEqual(error.result.insertedIds, { 0: 'a' });
      assert.deepEqual(error.result.upsertedIds, { 1: 'up' });
      return true;
    });
    // Nothing after the failing operation ran.
    assert.deepEqual((await coll.find({}, { sort: { _id: 1 } }).toArray()).map((d) => d._id), ['a', 'taken', 'up']);
  });

  it('an unordered bulkWrite carries on past its duplicates', async () => {
    const coll = collection('bulkunordered');
    await coll.insertOne({ _id: 2 });
    const docs = [{ _id: 1 }, { _id: 2 }, { _id: 3 }, { _id: 2 }, { _id: 4 }];
    await assert.rejects(coll.bulkWrite(docs.map((document) => ({ insertOne: { document } })), { ordered: false }), (error) => {
      assert.ok(error instanceof broker.BulkWriteError, String(error));
      assert.deepEqual(error.writeErrors.map((e) => e.index), [1, 3]);
      assert.equal(error.result.insertedCount, 3);
      assert.deepEqual(error.result.insertedIds, { 0: 1, 2: 3, 4: 4 });
      return true;
    });
    assert.equal(await coll.countDocuments(), 4);
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
