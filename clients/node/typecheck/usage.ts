// Uses the public API as a TypeScript program would, so that `tsc --noEmit`
// (test/types.test.js) checks lib/index.d.ts. Compiled, never run: it lives
// outside test/ so that a Node able to run .ts files does not take it for
// a test file.
import { ObjectId } from 'bson';
import {
  BrokerClient,
  BrokerError,
  DEFAULT_TIMEOUT_MS,
  DuplicateKeyError,
  ErrorReason,
  normalizeTarget,
  status,
  VERSION,
  type Cursor,
  type DatabaseStats,
  type PingResult,
  type StatsResult,
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

  const closed: Promise<void> = client.close();
  await closed;
  // @ts-expect-error close() takes no callback
  client.close(() => {});
  void [count, first, all, one, rtt, findOnes];
}
