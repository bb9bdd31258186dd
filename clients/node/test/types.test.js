'use strict';
// The TypeScript declarations (lib/index.d.ts): tsc checks them through
// typecheck/usage.ts, and they must declare what lib/index.js exports, with the
// Stats fields the proto has.

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const { spawnSync } = require('node:child_process');
const protoLoader = require('@grpc/proto-loader');

const broker = require('..');

const PACKAGE = path.join(__dirname, '..');
const DECLARATIONS = fs.readFileSync(path.join(PACKAGE, 'lib', 'index.d.ts'), 'utf8');

test('tsc --noEmit accepts the declarations and typecheck/usage.ts', () => {
  // The package's own pinned tsc (a devDependency), not whatever is on PATH.
  let tsc;
  try {
    tsc = require.resolve('typescript/bin/tsc');
  } catch {
    assert.fail('typescript is not installed: run `npm ci` in clients/node (or `make clients`)');
  }
  const result = spawnSync(process.execPath, [tsc, '--noEmit', '-p', path.join(PACKAGE, 'tsconfig.json')], {
    cwd: PACKAGE,
    encoding: 'utf8',
    timeout: 120_000,
  });
  assert.equal(result.status, 0, `tsc failed:\n${result.stdout}${result.stderr}${result.error || ''}`);
});

test('package.json points at the declarations', () => {
  const pkg = JSON.parse(fs.readFileSync(path.join(PACKAGE, 'package.json'), 'utf8'));
  assert.equal(pkg.types, 'lib/index.d.ts');
  assert.ok(pkg.files.includes('lib/'));
});

test('the declarations name every export of lib/index.js, and nothing else', () => {
  const declared = [...DECLARATIONS.matchAll(/^export declare (?:const|function|class) (\w+)/gm)].map((m) => m[1]);
  assert.deepEqual(declared.slice().sort(), Object.keys(broker).sort());
});

test("the declared DatabaseStats fields are the proto's, in camelCase", () => {
  const definition = protoLoader.loadSync(path.join('broker', 'v1', 'broker.proto'), {
    includeDirs: [path.join(PACKAGE, 'proto')],
    keepCase: true,
  });
  const message = /** @type {any} */ (definition['broker.v1.DatabaseStats']).type;
  const fields = message.field.map((/** @type {{name: string}} */ f) =>
    f.name.replace(/_([a-z0-9])/g, (_, c) => c.toUpperCase()),
  );
  const body = /export interface DatabaseStats \{([^}]*)\}/.exec(DECLARATIONS);
  assert.ok(body, 'lib/index.d.ts declares no DatabaseStats');
  const declared = [...body[1].matchAll(/^\s+(\w+):/gm)].map((m) => m[1]);
  assert.deepEqual(declared, fields);
});

test("ErrorReason is the proto's enum, less its unspecified zero, and the declarations list the same names", () => {
  const definition = protoLoader.loadSync(path.join('broker', 'v1', 'broker.proto'), {
    includeDirs: [path.join(PACKAGE, 'proto')],
  });
  const values = /** @type {any} */ (definition['broker.v1.ErrorReason']).type.value;
  const names = values.filter((/** @type {{number: number}} */ v) => v.number !== 0).map((/** @type {{name: string}} */ v) => v.name);
  assert.deepEqual(Object.keys(broker.ErrorReason), names);
  for (const name of names) assert.equal(broker.ErrorReason[name], name);
  assert.ok(Object.isFrozen(broker.ErrorReason));
  const union = /export type ErrorReasonName =([^;]*);/.exec(DECLARATIONS);
  assert.ok(union, 'lib/index.d.ts declares no ErrorReasonName');
  assert.deepEqual([...union[1].matchAll(/'(\w+)'/g)].map((m) => m[1]), names);
});
