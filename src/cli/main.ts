#!/usr/bin/env node
import { gatherFacts } from '../system/facts.js';
import { Exit, type Deps } from './deps.js';
import { main } from './egressctl.js';

const systemDeps: Deps = {
  out: (text) => process.stdout.write(`${text}\n`),
  err: (text) => process.stderr.write(`${text}\n`),
  facts: (depth) => gatherFacts(depth),
};

main(process.argv.slice(2), systemDeps).then(
  (code) => {
    process.exitCode = code;
  },
  (error: unknown) => {
    process.stderr.write(`egressctl: ${String(error)}\n`);
    process.exitCode = Exit.SystemError;
  },
);
