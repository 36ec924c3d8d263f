#!/usr/bin/env node
import { gatherFacts } from '../system/facts.js';
import { systemAudit } from '../system/audit.js';
import { systemCapabilityProbe } from '../system/capability-probe.js';
import { controlSocketPath } from '../resolver/control-path.js';
import { DEFAULT_STATE_DIR, Exit, type Deps } from './deps.js';
import { main } from './egressctl.js';

/** The nftables binding, loaded by the commands that open it: compile, check and explain never do. */
const openNft = async () => (await import('../nft/open.js')).openNft();

const systemDeps: Deps = {
  out: (text) => process.stdout.write(`${text}\n`),
  err: (text) => process.stderr.write(`${text}\n`),
  facts: (needed) => gatherFacts(needed),
  nft: () => openNft(),
  stateDir: process.env['EGRESSD_STATE_DIR'] ?? DEFAULT_STATE_DIR,
  audit: systemAudit,
  capabilities: systemCapabilityProbe(),
  resolverSocket: controlSocketPath(),
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
