import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { DenialCounters } from '../../src/denials/reader.js';
import type { DenialStoreCounters } from '../../src/denials/store.js';
import { createTestNet, ensureTestUsers, harnessUnavailableReason, type TestNet, type TestUsers } from '../harness/index.js';
import { policyDir } from '../support/policy-dir.js';
import { until } from '../support/wait.js';

/**
 * An attacker's flood with the store attached: a local user sends each
 * packet to a new destination (nothing aggregates), so the reader makes a
 * record per packet — more than SQLite writes. The store's queue must stay
 * within its bound and shed the rest as counted drops: every event the
 * kernel logged is read or counted lost, and every event read is in a
 * stored record or in one counted dropped. Counts, not timings.
 */
const ROOT = join(import.meta.dirname, '..', '..');
const CLI = join(ROOT, 'src/cli/main.ts');
const AGENT = join(import.meta.dirname, 'store-flood-agent.ts');
const FLOOD = join(import.meta.dirname, 'flood.cjs');
const GROUP = 7762;
const MAX_QUEUED = 2000;
const unavailable = harnessUnavailableReason();

let net: TestNet;
let users: TestUsers;
let state: string;
let dir: string;
let storeDir: string;

interface Finished {
  counters: DenialCounters;
  store: DenialStoreCounters;
  fed: { records: number; packets: number };
  stored: { records: number; packets: number };
}

describe.skipIf(unavailable)(`the denial store under a flood of new destinations ${unavailable ? `(skipped: ${unavailable})` : ''}`, () => {
  beforeAll(async () => {
    users = ensureTestUsers();
    net = await createTestNet();
    state = mkdtempSync(join(tmpdir(), 'egd-store-flood-state-'));
    storeDir = mkdtempSync(join(tmpdir(), 'egd-store-flood-db-'));
    // A log limit above what one flooding process sends: every packet dropped is logged.
    dir = policyDir(
      {
        '00.yaml': `defaults: {egress: allow, log: {denials: true, group: ${GROUP}, rate: 999999/second, burst: 10000}}\ndeny:\n  - to: [203.0.113.0/24, "2001:db8:1::/64"]\n    why: the test's global deny\n`,
      },
      { keep: true },
    );
    const applied = await net.host.node(CLI, ['apply', dir], { env: { ...process.env, EGRESSD_STATE_DIR: state } });
    if (applied.code !== 0) throw new Error(`apply failed: ${applied.stderr}`);
  }, 60_000);
  afterAll(async () => {
    await net?.destroy();
    for (const d of [state, dir, storeDir]) if (d) rmSync(d, { recursive: true, force: true });
  });

  it('every event logged is read or counted lost; every event read is stored or counted dropped; the queue never passes its bound', async () => {
    // Batches larger than the bound and a 1 s interval: the queue fills before anything is written, so the bound is certainly met.
    const child = net.host.spawn(process.execPath, ['--import', 'tsx', AGENT, String(GROUP), storeDir, String(MAX_QUEUED), '5000', '1000'], {
      env: { ...process.env, EGRESSD_STATE_DIR: state },
    });
    const lines: Record<string, unknown>[] = [];
    let buffered = '';
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    child.stdout!.on('data', (d: Buffer) => {
      buffered += d.toString();
      for (let at = buffered.indexOf('\n'); at >= 0; at = buffered.indexOf('\n')) {
        lines.push(JSON.parse(buffered.slice(0, at)) as Record<string, unknown>);
        buffered = buffered.slice(at + 1);
      }
    });
    const ask = async (): Promise<{ counters: DenialCounters; store: DenialStoreCounters }> => {
      const before = lines.length;
      child.stdin!.write('counters\n');
      await until('the agent to answer', () => lines.length > before, { timeoutMs: 10_000 });
      return lines[lines.length - 1] as never;
    };
    try {
      await until('the reader and store to start', () => lines.some((l) => l['ready']), { timeoutMs: 30_000 }).catch(() => {
        throw new Error(`the agent did not start: ${stderr}`);
      });
      const flood = async (ms: number, max: number): Promise<number> => {
        const addresses = ['203.0.113.51', '203.0.113.52', '2001:db8:1::51', '2001:db8:1::52'];
        const result = await net.host.exec(process.execPath, [FLOOD, addresses.join(','), '30000', '5000', String(ms), String(max)], {
          user: users.app2.name,
          timeoutMs: ms + 20_000,
        });
        return (JSON.parse(result.stdout.trim().split('\n').pop()!) as { sent: number }).sent;
      };
      // 20,000 destinations, 100 aggregates open at most: every packet is a record of its own.
      let sent = await flood(3000, 80_000);
      // A loss at the flood's very end shows only in a later packet's sequence number: once the reader is still, one packet more (again if that one was lost too).
      const seen = async () => {
        const { counters } = await ask();
        return counters.events + counters.lost;
      };
      for (let tries = 0; tries < 5; tries++) {
        let last = await seen();
        for (let still = 0; still < 3 && last < sent;) {
          await new Promise((r) => setTimeout(r, 200));
          const now = await seen();
          still = now === last ? still + 1 : 0;
          last = now;
        }
        if (last >= sent) break;
        sent += await flood(100, 1);
      }
      child.stdin!.write('finish\n');
      await until('the agent to finish', () => lines.some((l) => l['finished']), { timeoutMs: 60_000 });
      const { counters, store, fed, stored } = lines.find((l) => l['finished'])!['finished'] as Finished;
      // The kernel's side: each packet logged was read or counted lost.
      expect(counters.events + counters.lost, JSON.stringify(counters)).toBe(sent);
      expect(counters.unparsed).toBe(0);
      // Every packet read went to the store in some record.
      expect(fed.packets).toBe(counters.events);
      expect(fed.records).toBe(counters.records);
      // The store's side: every record fed is written, dropped or failed, and nothing is left queued …
      expect(store.queued).toBe(0);
      expect(store.written + store.dropped + store.failed).toBe(fed.records);
      expect(stored.records).toBe(store.written);
      // … so every event read is in a stored record or in one counted dropped: none unaccounted.
      expect(stored.packets + store.droppedEvents + store.failedEvents).toBe(counters.events);
      // The flood did outrun the store, the bound held, and the store still wrote what it took.
      expect(store.dropped, JSON.stringify(store)).toBeGreaterThan(0);
      expect(store.queuedPeak).toBeLessThanOrEqual(MAX_QUEUED);
      expect(store.written).toBeGreaterThan(0);
      expect(store.failed).toBe(0);
    } finally {
      child.stdin!.end();
      child.kill('SIGTERM');
    }
  }, 120_000);
});
