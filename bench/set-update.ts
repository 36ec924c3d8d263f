/**
 * One DNS answer's set update — 1 to 4 addresses, with a timeout — while a
 * 100,000-CIDR interval set is loaded in the same table: egressd's writer
 * (src/nft/set-elements.ts: libnftnl messages on its own netlink socket)
 * beside a fresh libnftables context per add and a spawned `nft` per add.
 * Target (issue 18): p50 ≤ 0.3 ms.
 *
 * Runs as root in a throwaway network namespace it creates and deletes:
 *   npx tsx bench/set-update.ts [--quick] [--writer-adds 3000] [--lib-adds 20] [--spawn-adds 10]
 * (it re-runs itself inside the namespace with `nsenter`).
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { release, tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import type { TableRef } from '../src/compile/ruleset.js';
import { createBatchingWriter, openSetElementWriter, type ElementWrite } from '../src/nft/set-elements.js';
import { openNft } from '../src/nft/open.js';
import type { Nft } from '../src/nft/client.js';
import { runInOwnNamespace } from './lib/netns.js';
import { latencyTable, type LatencyRow } from './lib/stats.js';

const CIDRS = 100_000;
const TIMEOUT_S = 600;

const { values } = parseArgs({
  options: {
    inner: { type: 'boolean', default: false },
    quick: { type: 'boolean', default: false },
    'writer-adds': { type: 'string' },
    'lib-adds': { type: 'string' },
    'spawn-adds': { type: 'string' },
  },
});
const count = (given: string | undefined, full: number, quick: number): number => Number(given ?? (values.quick ? quick : full));

const TABLE: TableRef = { family: 'inet', name: 'egressd' };

/** Answer i: 1–4 addresses, v4 and v6 in turn, none repeated between scenarios (tag); v4 from the benchmarking range 198.18.0.0/15. */
function answer(tag: number, i: number): { set: string; addresses: string[] } {
  const size = 1 + (i % 4);
  const v6 = i % 2 === 1;
  const addresses = Array.from({ length: size }, (_, j) => {
    const n = (i * 4 + j) % 20_000;
    if (v6) return `2001:db8:${tag.toString(16)}::${n.toString(16)}`;
    const m = tag * 20_000 + n;
    return `198.${18 + (m >> 16)}.${(m >> 8) & 255}.${m & 255}`;
  });
  return { set: v6 ? 'dns6' : 'dns4', addresses };
}

function loadTable(): void {
  const cidrs = Array.from({ length: CIDRS }, (_, i) => `10.${(i >> 12) & 255}.${(i >> 4) & 255}.${(i & 15) << 4}/28`);
  // One statement a line: nft's parser wants a newline or ';' before each closing brace.
  const text = [
    'table inet egressd {',
    '  set cidrs {',
    '    type ipv4_addr; flags interval;',
    `    elements = { ${cidrs.join(', ')} }`,
    '  }',
    '  set dns4 {',
    '    type ipv4_addr; flags timeout;',
    '  }',
    '  set dns6 {',
    '    type ipv6_addr; flags timeout;',
    '  }',
    '}',
    '',
  ].join('\n');
  execFileSync('nft', ['-f', '-'], { input: text });
}

async function timeNft(nft: Nft, tag: number, adds: number): Promise<number[]> {
  const samples: number[] = [];
  for (let i = 0; i < adds; i++) {
    const { set, addresses } = answer(tag, i);
    const start = performance.now();
    await nft.addElements({ table: TABLE, name: set }, addresses, { timeout: TIMEOUT_S });
    samples.push(performance.now() - start);
  }
  return samples;
}

async function inner(): Promise<void> {
  const writerAdds = count(values['writer-adds'], 3000, 300);
  const libAdds = count(values['lib-adds'], 20, 4);
  const spawnAdds = count(values['spawn-adds'], 10, 3);
  const loadStart = performance.now();
  loadTable();
  const loadMs = performance.now() - loadStart;

  const rows: LatencyRow[] = [];
  const writer = openSetElementWriter(TABLE);
  const toWrites = ({ set, addresses }: { set: string; addresses: string[] }): ElementWrite[] =>
    addresses.map((address) => ({ set, address, timeoutMs: TIMEOUT_S * 1000, comment: 'bench.example.test' }));
  const samples: number[] = [];
  for (let i = 0; i < writerAdds; i++) {
    const writes = toWrites(answer(1, i));
    const start = performance.now();
    writer.add(writes);
    samples.push(performance.now() - start);
  }
  rows.push({ scenario: 'egressd writer (libnftnl, own socket), new addresses', samples });
  const refresh: number[] = [];
  for (let i = 0; i < writerAdds; i++) {
    const writes = toWrites(answer(1, i));
    const start = performance.now();
    writer.add(writes);
    refresh.push(performance.now() - start);
  }
  rows.push({ scenario: 'egressd writer, the same addresses again (refresh)', samples: refresh });

  // Four answers asked for in one turn share one transaction; each answer's wait, request to ack.
  const batching = createBatchingWriter(writer);
  const shared: number[] = [];
  for (let round = 0; round < writerAdds / 4; round++) {
    await Promise.all(
      [0, 1, 2, 3].map(async (k) => {
        const start = performance.now();
        await batching.add(toWrites(answer(2, round * 4 + k)));
        shared.push(performance.now() - start);
      }),
    );
  }
  rows.push({ scenario: 'egressd batching writer, 4 answers per turn (per answer)', samples: shared });
  batching.close();

  const lib = await openNft({ prefer: 'libnftables', strict: true, table: TABLE });
  rows.push({ scenario: 'libnftables, fresh nft_ctx per add', samples: await timeNft(lib, 3, libAdds) });
  const bin = await openNft({ prefer: 'binary', strict: true, table: TABLE });
  rows.push({ scenario: 'spawn `nft` per add', samples: await timeNft(bin, 4, spawnAdds) });

  console.log(
    `kernel ${release()}, nft ${await bin.version()}; one answer (1-4 addresses, timeout ${TIMEOUT_S}s) into a hash set, ` +
      `a ${CIDRS.toLocaleString('en')}-CIDR interval set in the same table (loaded in ${loadMs.toFixed(0)} ms)${values.quick ? '; --quick' : ''}\n`,
  );
  console.log(latencyTable(rows));
}

function outer(): void {
  if (process.getuid?.() !== 0) {
    console.error('bench/set-update.ts needs root (it creates a network namespace)');
    process.exit(2);
  }
  const root = mkdtempSync(join(tmpdir(), 'egd-set-update-'));
  process.exitCode = runInOwnNamespace('egd-set-bench', fileURLToPath(import.meta.url), root, ['--inner', ...process.argv.slice(2)]);
}

if (values.inner) await inner();
else outer();
