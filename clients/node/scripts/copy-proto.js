#!/usr/bin/env node
// Copies the contract, protos/broker/v1/broker.proto, into this package
// (proto/broker/v1/broker.proto), which loads it at run time and ships it
// in the npm tarball. tests/test_polyglot.py fails when the copy is stale.
// `make proto` runs this; so does `npm run proto`.
'use strict';

const fs = require('node:fs');
const path = require('node:path');

const RELATIVE = path.join('broker', 'v1', 'broker.proto');
const source = path.resolve(__dirname, '..', '..', '..', 'protos', RELATIVE);
const destination = path.resolve(__dirname, '..', 'proto', RELATIVE);

fs.mkdirSync(path.dirname(destination), { recursive: true });
fs.copyFileSync(source, destination);
process.stdout.write(`${destination}\n`);
