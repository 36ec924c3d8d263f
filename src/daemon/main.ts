#!/usr/bin/env node
/**
 * egressd's entry: the command line (run.ts) with the parts of parts.ts.
 * Fail-closed: a policy that does not load on reload keeps the running
 * table; stopping never removes the rules (only `egressctl release` does).
 */
import { defaultParts } from './parts.js';
import { runEgressd } from './run.js';

runEgressd(process.argv.slice(2), defaultParts()).then(
  (code) => process.exit(code),
  () => process.exit(3),
);
