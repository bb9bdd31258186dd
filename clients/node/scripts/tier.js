#!/usr/bin/env node
'use strict';
/**
 * The Node side of tests/test_tier_polyglot.py: drives a tier of broker
 * replicas through one client and prints a JSON summary.
 *
 *   tier.js spread DATABASE COLLECTION CALLS TARGET...
 *       CALLS calls, 4 at a time, findOne by _id and ping in turn; prints
 *       {"calls": N, "errors": [...], "retries": N}
 *   tier.js load DATABASE COLLECTION WORKERS TARGET...
 *       WORKERS loops, each inserting {worker, seq} (the _id made by the
 *       client) and reading it back with findOne, until stdin is closed.
 *       Prints {"ready": true} once every worker has done a few rounds,
 *       then at the end {"inserted": [hex _id...], "rounds": N,
 *       "errors": [...], "retries": N}
 *
 * One TARGET is given as it is (a "dns:///name:port" tier); several as a list.
 * With MONGO_BROKER_CA_FILE (a PEM file) the client speaks TLS and trusts that CA.
 */

const fs = require('node:fs');
const grpc = require('@grpc/grpc-js');
const { BrokerClient } = require('..');

const USAGE = 'usage: tier.js spread DATABASE COLLECTION CALLS TARGET... | load DATABASE COLLECTION WORKERS TARGET...';
const CALL_TIMEOUT_MS = 10_000;
const READY_ROUNDS = 5;

/** @param {unknown} value */
function emit(value) {
  process.stdout.write(`${JSON.stringify(value)}\n`);
}

/**
 * @param {BrokerClient} client
 * @param {import('..').Collection} coll
 * @param {number} calls
 */
async function spread(client, coll, calls) {
  /** @type {string[]} */
  const errors = [];
  let next = 0;
  const worker = async () => {
    for (;;) {
      next += 1;
      const i = next;
      if (i > calls) return;
      try {
        if (i % 2 === 0) await client.ping(undefined, { timeoutMs: CALL_TIMEOUT_MS });
        else await coll.findOne({ _id: i }, { timeoutMs: CALL_TIMEOUT_MS });
      } catch (error) {
        errors.push(`call ${i}: ${error}`);
      }
    }
  };
  await Promise.all([worker(), worker(), worker(), worker()]);
  emit({ calls, errors, retries: client.retryCount });
}

/**
 * @param {BrokerClient} client
 * @param {import('..').Collection} coll
 * @param {number} workers
 */
async function load(client, coll, workers) {
  let stopping = false;
  process.stdin.on('end', () => {
    stopping = true;
  });
  process.stdin.resume();
  /** @type {string[]} */
  const errors = [];
  /** @type {string[]} */
  const inserted = [];
  let rounds = 0;
  let warm = 0;
  /** @type {() => void} */
  let allWarm = () => {};
  const warmed = new Promise((resolve) => {
    allWarm = () => resolve(undefined);
  });
  const warmOne = () => {
    warm += 1;
    if (warm === workers) allWarm();
  };
  const worker = async (/** @type {number} */ w) => {
    for (let seq = 0; ; seq += 1) {
      if (seq === READY_ROUNDS) warmOne();
      if (stopping) {
        if (seq < READY_ROUNDS) warmOne();
        return;
      }
      rounds += 1;
      /** @type {any} */
      const document = { worker: w, seq };
      try {
        await coll.insertOne(document, { timeoutMs: CALL_TIMEOUT_MS });
      } catch (error) {
        errors.push(`worker ${w} seq ${seq}: insertOne: ${error}`);
        continue;
      }
      inserted.push(document._id.toHexString());
      try {
        const found = await coll.findOne({ _id: document._id }, { timeoutMs: CALL_TIMEOUT_MS });
        if (found === null) errors.push(`worker ${w} seq ${seq}: findOne did not find the document just inserted`);
      } catch (error) {
        errors.push(`worker ${w} seq ${seq}: findOne: ${error}`);
      }
    }
  };
  const running = Promise.all(Array.from({ length: workers }, (_, w) => worker(w)));
  await warmed;
  emit({ ready: true });
  await running;
  emit({ inserted, rounds, errors, retries: client.retryCount });
}

async function main() {
  const [mode, database, collection, count, ...targets] = process.argv.slice(2);
  const n = Number(count);
  if (!['spread', 'load'].includes(mode) || !Number.isInteger(n) || n < 1 || targets.length === 0) {
    throw new Error(USAGE);
  }
  const ca = process.env.MONGO_BROKER_CA_FILE;
  const credentials = ca ? grpc.credentials.createSsl(fs.readFileSync(ca)) : undefined;
  const client = new BrokerClient(targets.length === 1 ? targets[0] : targets, { credentials });
  try {
    const coll = client.db(database).collection(collection);
    if (mode === 'spread') await spread(client, coll, n);
    else await load(client, coll, n);
  } finally {
    await client.close();
  }
}

main().catch((error) => {
  process.stderr.write(`tier.js: ${error && error.stack ? error.stack : error}\n`);
  process.exit(1);
});
