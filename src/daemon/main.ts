#!/usr/bin/env node
/**
 * egressd's entry: the command line (run.ts) with the parts of parts.ts.
 * Fail-closed: a policy that does not load on reload keeps the running
 * table; stopping never removes the rules (only `egressctl release` does).
 */
import { setFlagsFromString } from 'node:v8';
import { defaultParts } from './parts.js';
import { runEgressd } from './run.js';

// V8 lets the old generation grow to up to 4× what survives a full collection before the next one, and a
// busy resolver promotes its queries in flight (~20 MB/s at 10k qps): 1.5× keeps the peak under load at
// ~150 MB instead of ~220 MB for about the same CPU per query (bench/README.md, resolver.ts). Read at
// every collection, so setting it here, after start-up, takes effect.
setFlagsFromString('--heap-growing-percent=50');

runEgressd(process.argv.slice(2), defaultParts()).then(
  (code) => process.exit(code),
  () => process.exit(3),
);
