// Uses the public API as a TypeScript program would, so that `tsc --noEmit`
// (test/types.test.js) checks lib/index.d.ts. Compiled, never run: it lives
// outside test/ so that a Node able to run .ts files does not take it for
// a test file.
import { ObjectId } from 'bson';
import {
  BrokerClient,
  BrokerError,
  BulkWriteError,
  DEFAULT_RETRY_POLICY,
  DEFAULT_TIMEOUT_MS,
  DuplicateKeyError,
  ErrorReason,
  normalizeTarget,
  ReturnDocument,
  status,
  VERSION,
  type Cursor,
  type DatabaseStats,
  type BulkWriteResult,
  type PingResult,
  type StatsResult,
  type UpdateResult,
} from '..';

interface Item {
  _id?: ObjectId;
  sku: string;
  qty: number;
}

export async function usage(): Promise<void> {
  const target: string = normalizeTarget('/run/mongo-broker/broker.sock');
  const client = new BrokerClient(target, { timeoutMs: DEFAULT_TIMEOUT_MS, token: 's3cret', metadata: { 'x-app': VERSION } });
  const items = client.db('appdb').collection<Item>('items');

  const { insertedId } = await items.insertOne({ sku: 'a1', qty: 5 }, { writeConcern: { w: 'majority' } });
  const many = await items.insertMany([{ sku: 'b2' }, new Map([['sku', 'c3']])], { ordered: false });
  const count: number = many.insertedCount + many.insertedIds.length;

  const cursor: Cursor<Item> = items.find({ qty: { $gt: 3 } }, { sort: { sku: 1 }, limit: 10, batchSize: 100, requestId: 'r-1' });
  for await (const item of cursor) {
    const sku: string = item.sku;
    void sku;
  }
  const first: Item | null = await items.find({}, { deadline: new Date() }).next();
  const all: Item[] = await items.find({}).toArray();
  const one: Item | null = await items.findOne({ _id: insertedId }, { projection: { sku: 1 }, bsonOptions: { promoteValues: false } });

  const ping: PingResult = await client.ping();
  const rtt: number = ping.databases[0].rttMs + ping.databases[0].pool.connectionsInUse;
  const stats: StatsResult = await client.stats('appdb', { timeoutMs: 1000 });
  const db: DatabaseStats = stats.databases[0];
  const findOnes: number = (db.rpcs.FindOne ?? 0) + db.connectionsInUse + db.waitP99Ms + stats.uptimeS;
  // @ts-expect-error the proto's snake_case names are not the result's
  void db.connections_in_use;

  try {
    await items.insertOne({ _id: 'dup', sku: 'x', qty: 1 });
  } catch (error) {
    if (error instanceof DuplicateKeyError) {
      const landed: number | null = error.insertedCount;
      void landed;
    } else if (error instanceof BrokerError && error.code === status.UNAVAILABLE && error.retryable) {
      const wait: number | null = error.retryAfterMs;
      void wait;
    } else if (error instanceof BrokerError && error.reason === ErrorReason.POOL_EXHAUSTED) {
      const reason: 'POOL_EXHAUSTED' = ErrorReason.POOL_EXHAUSTED;
      void reason;
    }
  }

  // The operation set, with read options inherited from the collection.
  const reads = client.db('appdb', { readConcern: 'majority' }).collection<Item>('items', {
    readPreference: { mode: 'secondaryPreferred', tags: [{ dc: 'east' }], maxStalenessSeconds: 90 },
  });
  const updated: UpdateResult = await items.updateOne({ sku: 'a1' }, { $inc: { qty: 1 } }, { upsert: true, hint: 'sku_1' });
  const piped: UpdateResult = await items.updateMany({}, [{ $set: { qty: 0 } }], { let: { z: 0 }, comment: 'c' });
  const replaced: UpdateResult = await items.replaceOne({ sku: 'a1' }, { sku: 'a1', qty: 9 }, { writeConcern: { w: 1 } });
  const upserted: unknown = updated.upsertedId;
  const { deletedCount } = await items.deleteMany({ qty: 0 }, { collation: { locale: 'fr' } });
  const before: Item | null = await items.findOneAndUpdate({ sku: 'a1' }, { $set: { qty: 1 } }, { returnDocument: ReturnDocument.AFTER });
  const gone: Item | null = await items.findOneAndDelete({ sku: 'a1' }, { sort: { qty: -1 } });
  const swapped: Item | null = await items.findOneAndReplace({ sku: 'b2' }, { sku: 'b3', qty: 1 }, { returnDocument: 'before', upsert: true });
  const n: number = (await reads.countDocuments({ qty: { $gt: 1 } }, { limit: 5, readPreference: 'nearest' })) + (await reads.estimatedDocumentCount());
  const skus: unknown[] = await reads.distinct('sku', {}, { readConcern: { level: 'local' }, collation: { locale: 'en' } });
  const grouped = reads.aggregate<{ _id: string; total: number }>([{ $group: { _id: '$sku', total: { $sum: '$qty' } } }], { allowDiskUse: true });
  for await (const group of grouped) {
    const total: number = group.total;
    void total;
  }
  const bulk: BulkWriteResult = await items.bulkWrite(
    [
      { insertOne: { document: { sku: 'd4', qty: 1 } } },
      { updateOne: { filter: { sku: 'd4' }, update: { $inc: { qty: 1 } }, upsert: true } },
      { replaceOne: { filter: { sku: 'e5' }, replacement: { sku: 'e5', qty: 2 } } },
      { deleteMany: { filter: { qty: 0 } } },
    ],
    { ordered: false },
  );
  const landed: number = bulk.insertedCount + bulk.upsertedCount + Object.keys(bulk.insertedIds).length;
  try {
    await items.bulkWrite([{ deleteOne: { filter: {} } }]);
  } catch (error) {
    if (error instanceof BulkWriteError) {
      const partial: number = error.result.insertedCount + error.writeErrors[0].code + (error.index ?? 0);
      const message: string = error.errmsg;
      void [partial, message];
    }
  }
  // @ts-expect-error returnDocument is 'before' or 'after'
  await items.findOneAndUpdate({}, { $set: { qty: 1 } }, { returnDocument: 'later' });
  const tier = new BrokerClient(['10.0.0.5:50051', '10.0.0.6:50051'], { timeoutMs: 5000 });
  const byName = new BrokerClient('dns:///mongo-broker.apps.svc.cluster.local:50051');
  const healthy: string[] = tier.replicas().filter((r) => r.state === 'SERVING').map((r) => r.address);
  const retried: number = byName.retryCount;
  try {
    await tier.ping();
  } catch (error) {
    if (error instanceof BrokerError) {
      const attempts: number = error.attempts;
      void attempts;
    }
  }
  // @ts-expect-error a list is of address strings
  void new BrokerClient([50051]);
  void [healthy, retried];
  const noRetries = new BrokerClient(target, { retries: null });
  const fewer = new BrokerClient(target, { retries: { maxAttempts: DEFAULT_RETRY_POLICY.maxAttempts + 1 } });
  void [piped, replaced, upserted, deletedCount, before, gone, swapped, n, skus, landed, noRetries.retries, fewer];

  const closed: Promise<void> = client.close();
  await closed;
  // @ts-expect-error close() takes no callback
  client.close(() => {});
  void [count, first, all, one, rtt, findOnes];
}
