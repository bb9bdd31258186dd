#!/usr/bin/env node
// The Node side of tests/test_interop.py: writes the interop fixture
// document with this client, reads documents back, and provokes a duplicate
// key, printing JSON lines that the test compares with what Python and Go
// wrote and read.
//
//   node interop.js write COLLECTION [--decimal]  insert the fixture; print {"inserted_id": ...}
//   node interop.js read COLLECTION WRITER        print each document whose writer is WRITER,
//                                                 as canonical Extended JSON, one per line
//   node interop.js dup COLLECTION                insert one _id twice; print the error
//   node interop.js modify COLLECTION WRITER MODIFIER
//                                                 set modified_by and increment i32 in every
//                                                 document of WRITER; print {"matched", "modified"}
//   node interop.js aggregate COLLECTION WRITER   print WRITER's documents' writer, modified_by and
//                                                 i32 through a pipeline, as canonical Extended JSON
//   node interop.js count COLLECTION WRITER       print {"count": N} of WRITER's documents
//   node interop.js delete COLLECTION WRITER      delete WRITER's documents; print {"deleted": N}
//
// The broker comes from MONGO_BROKER_TARGET, the configured database from
// MONGO_BROKER_DATABASE (default "appdb").
'use strict';

const { Binary, Decimal128, Double, EJSON, ObjectId, UUID } = require('bson');
const { BrokerClient, BrokerError, DuplicateKeyError } = require('./lib');

const USAGE =
  'usage: interop.js write COLLECTION [--decimal] | read COLLECTION WRITER | dup COLLECTION' +
  ' | modify COLLECTION WRITER MODIFIER | aggregate COLLECTION WRITER | count COLLECTION WRITER | delete COLLECTION WRITER';

/**
 * The interop document in the values a Node program would write: numbers
 * that are integers in int32 range are int32, bigints int64, and a double
 * with an integral value needs the Double wrapper. Field order matters (the
 * test compares BSON bytes); no _id, so the client makes one.
 * @param {boolean} withDecimal
 */
function fixture(withDecimal) {
  /** @type {Record<string, unknown>} */
  const doc = {
    writer: 'node',
    s: 'héllo wörld ✓',
    i32: 42,
    i32neg: -7,
    i64: 1099511627777n,
    i64small: 5n,
    i64neg: -9007199254740993n,
    dbl: 2.5,
    dblint: new Double(3),
    dblneg: -0.125,
    t: true,
    f: false,
    n: null,
    oid: new ObjectId('64b7f0c2a1b2c3d4e5f60718'),
    date: new Date('2024-02-29T12:34:56.789Z'),
    predate: new Date('1969-07-20T20:17:40.000Z'),
    bin: new Binary(Buffer.from([0x00, 0x01, 0x02, 0xff]), 0x80),
    uuid: new UUID('01234567-89ab-cdef-0123-456789abcdef'),
    bin0: Buffer.from('raw bytes'),
    nested: {
      a: 1,
      b: { c: 'deep', d: 9n, e: 1.5 },
      list: [1, 'two', 3.5, { x: 4n }, true],
    },
    arr: [10n, 11, new Double(12)],
    empty: {},
    emptyarr: [],
  };
  if (withDecimal) doc.dec = Decimal128.fromString('1234.5678901234567890');
  return doc;
}

/** @param {unknown} value */
function printLine(value) {
  process.stdout.write(`${EJSON.stringify(value, { relaxed: false })}\n`);
}

/**
 * @param {string[]} args
 */
async function main(args) {
  const target = process.env.MONGO_BROKER_TARGET;
  if (!target) throw new Error('MONGO_BROKER_TARGET is not set');
  const database = process.env.MONGO_BROKER_DATABASE || 'appdb';
  const [command, name, extra] = args;
  if (!command || !name) throw new Error(USAGE);
  const client = new BrokerClient(target, { timeoutMs: 30_000 });
  try {
    const coll = client.db(database).collection(name);
    if (command === 'write' && (args.length === 2 || (args.length === 3 && extra === '--decimal'))) {
      const { insertedId } = await coll.insertOne(fixture(extra === '--decimal'));
      printLine({ inserted_id: insertedId });
    } else if (command === 'read' && args.length === 3) {
      // promoteValues: false keeps Int32, Double and Long as such (plain JS
      // numbers cannot tell int32 3 from double 3.0), so what is printed is
      // what this client decoded, type for type.
      const cursor = coll.find({ writer: extra }, { sort: { _id: 1 }, bsonOptions: { promoteValues: false } });
      for await (const doc of cursor) printLine(doc);
    } else if (command === 'dup' && args.length === 2) {
      const doc = { _id: 'dup-node', writer: 'node' };
      await coll.insertOne(doc);
      try {
        await coll.insertOne(doc);
      } catch (error) {
        if (!(error instanceof BrokerError)) throw error;
        process.stdout.write(
          `${JSON.stringify({
            is_duplicate_key: error instanceof DuplicateKeyError,
            class: error.name,
            code: error.code,
            code_name: error.codeName,
            reason: error.reason,
            mongo_code: error.mongoCode,
            message: error.message,
          })}\n`,
        );
        return;
      }
      throw new Error('the second insert of the same _id succeeded');
    } else if (command === 'modify' && args.length === 4) {
      const result = await coll.updateMany({ writer: extra }, { $set: { modified_by: args[3] }, $inc: { i32: 1 } });
      process.stdout.write(`${JSON.stringify({ matched: result.matchedCount, modified: result.modifiedCount })}\n`);
    } else if (command === 'aggregate' && args.length === 3) {
      const pipeline = [{ $match: { writer: extra } }, { $project: { _id: 0, writer: 1, modified_by: 1, i32: 1 } }];
      // Exact types, as `read` prints them: i32 must still be an Int32 after $inc.
      for await (const doc of coll.aggregate(pipeline, { bsonOptions: { promoteValues: false } })) printLine(doc);
    } else if (command === 'count' && args.length === 3) {
      process.stdout.write(`${JSON.stringify({ count: await coll.countDocuments({ writer: extra }) })}\n`);
    } else if (command === 'delete' && args.length === 3) {
      const { deletedCount } = await coll.deleteMany({ writer: extra });
      process.stdout.write(`${JSON.stringify({ deleted: deletedCount })}\n`);
    } else {
      throw new Error(USAGE);
    }
  } finally {
    await client.close();
  }
}

main(process.argv.slice(2)).catch((error) => {
  process.stderr.write(`interop.js: ${error && error.stack ? error.stack : error}\n`);
  process.exitCode = 1;
});
