/**
 * Single set-element add latency into a 100,000-element hash set:
 * libnftables in-process (fresh nft_ctx per add) vs spawning `nft`, plus two
 * rows that explain the design: a context reused after a listing, and a
 * fresh-context add while a big interval set exists elsewhere.
 *
 * Runs as root in a throwaway network namespace it creates and deletes:
 *   npx tsx bench/nft-elements.ts [--adds 300] [--spawn-adds 100]
 * (it re-runs itself inside the namespace with `nsenter`).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { performance } from 'node:perf_hooks';
import { command, commandJson, type Ruleset, type TableRef } from '../src/compile/ruleset.js';
import { batchDocument, list } from '../src/nft/commands.js';
import { loadLibnftables, NftOutputFlag } from '../src/nft/libnftables.js';
import { openNft } from '../src/nft/open.js';
import type { Nft } from '../src/nft/client.js';
import { latencyTable, type LatencyRow } from './lib/stats.js';

const SIZE = 100_000;
const INTERVAL_SIZE = 20_000;

const { values } = parseArgs({
  options: {
    inner: { type: 'boolean', default: false },
    adds: { type: 'string', default: '300' },
    'spawn-adds': { type: 'string', default: '100' },
    'slow-adds': { type: 'string', default: '20' },
  },
});

const BENCH: TableRef = { family: 'inet', name: 'bench' };
const OTHER: TableRef = { family: 'inet', name: 'other' };

/** The client's table replaced by `ruleset` in one transaction. */
const replace = (nft: Nft, ruleset: Ruleset) =>
  nft.run({ commands: [command.addTable(ruleset.table), command.deleteTable(ruleset.table), command.block(ruleset)] });

const addr = (prefix: string, i: number) => `2001:db8:${prefix}::${(i >> 16).toString(16)}:${(i & 0xffff).toString(16)}`;

async function timeAdds(nft: Nft, count: number, prefix: string): Promise<number[]> {
  const ref = { table: BENCH, name: 'big6' };
  const samples: number[] = [];
  for (let i = 0; i < count; i++) {
    const start = performance.now();
    await nft.addElements(ref, [addr(prefix, i)], { timeout: 600 });
    samples.push(performance.now() - start);
  }
  return samples;
}

async function inner(): Promise<void> {
  const adds = Number(values.adds);
  const spawnAdds = Number(values['spawn-adds']);
  const slowAdds = Number(values['slow-adds']);
  const lib = await openNft({ prefer: 'libnftables', strict: true, table: BENCH });
  const bin = await openNft({ prefer: 'binary', strict: true, table: BENCH });

  const elements = Array.from({ length: SIZE }, (_, i) => addr('a', i));
  const big: Ruleset = { table: BENCH, sets: [{ name: 'big6', key: 'ipv6_addr', flags: ['timeout'], elements }], chains: [] };
  const loads: LatencyRow[] = [];
  for (const [label, nft] of [
    ['libnftables', lib],
    ['nft binary', bin],
  ] as const) {
    const start = performance.now();
    await replace(nft, big);
    loads.push({ scenario: `replace table, ${SIZE.toLocaleString('en')} elements (${label})`, samples: [performance.now() - start] });
  }

  const rows: LatencyRow[] = [];
  rows.push({ scenario: 'in-process, fresh nft_ctx per add', samples: await timeAdds(lib, adds, 'b') });
  rows.push({ scenario: 'spawn `nft` per add', samples: await timeAdds(bin, spawnAdds, 'c') });

  // The trap, measured directly on the C API: one context, used for a JSON
  // listing of the set and then for every add.
  const api = await loadLibnftables();
  const ctx = api.ctxNew(0);
  if (ctx === null) throw new Error('nft_ctx_new failed');
  const reused: number[] = [];
  try {
    api.bufferOutput(ctx);
    api.bufferError(ctx);
    api.outputSetFlags(ctx, NftOutputFlag.Json);
    const ref = { table: BENCH, name: 'big6' };
    api.runCmdFromBuffer(ctx, batchDocument([list.set('inet', 'bench', 'big6')]));
    api.getOutputBuffer(ctx);
    for (let i = 0; i < slowAdds; i++) {
      const doc = batchDocument([commandJson(command.addElements(ref, [{ key: addr('d', i), timeout: 600 }]))]);
      const start = performance.now();
      if (api.runCmdFromBuffer(ctx, doc) !== 0) throw new Error(api.getErrorBuffer(ctx) ?? 'add failed');
      reused.push(performance.now() - start);
    }
  } finally {
    api.ctxFree(ctx);
  }
  rows.push({ scenario: 'in-process, ONE nft_ctx reused after a listing', samples: reused });

  const intervals = Array.from({ length: INTERVAL_SIZE }, (_, i) => addr('e', i));
  const other = await openNft({ prefer: 'libnftables', strict: true, table: OTHER });
  await replace(other, { table: OTHER, sets: [{ name: 'cidrs', key: 'ipv6_addr', flags: ['interval'], elements: intervals }], chains: [] });
  rows.push({
    scenario: `in-process, fresh ctx, ${INTERVAL_SIZE.toLocaleString('en')}-elem interval set in another table`,
    samples: await timeAdds(lib, slowAdds, 'f'),
  });
  await other.deleteTable();
  await lib.deleteTable();

  console.log(`nft ${await lib.version()}; single element add (timeout 600s) into a ${SIZE.toLocaleString('en')}-element hash set\n`);
  console.log(latencyTable(rows));
  console.log('');
  console.log(latencyTable(loads));
}

function outer(): void {
  if (process.getuid?.() !== 0) {
    console.error('bench/nft-elements.ts needs root (it creates a network namespace)');
    process.exit(2);
  }
  const ns = `egd-nft-bench-${randomBytes(4).toString('hex')}`;
  execFileSync('ip', ['netns', 'add', ns]);
  try {
    const self = fileURLToPath(import.meta.url);
    const args = process.argv.slice(2);
    const result = spawnSync('nsenter', [`--net=/run/netns/${ns}`, process.execPath, '--import', 'tsx', self, '--inner', ...args], { stdio: 'inherit' });
    process.exitCode = result.status ?? 1;
  } finally {
    execFileSync('ip', ['netns', 'delete', ns]);
  }
}

if (values.inner) await inner();
else outer();
