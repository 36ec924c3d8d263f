import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { nftAvailable } from '../support/nft-check.js';
import { deleteNamedNetns } from '../../src/lab/sys.js';
import { until } from '../support/wait.js';

/**
 * Time-limited allows end in the kernel whatever else runs: egressd with no
 * D-Bus part (nor any other), in a namespace of this test's own. An entry
 * whose `until` has passed never reaches the table; one that expires while
 * egressd runs is gone within a bounded time, even when another policy file
 * has broken meanwhile.
 */
const ROOT = join(import.meta.dirname, '..', '..');
const skip = nftAvailable();
const ns = `egd-exp-${randomBytes(3).toString('hex')}`;
const dir = mkdtempSync(join(tmpdir(), 'egd-expiry-policy-'));
const state = mkdtempSync(join(tmpdir(), 'egd-expiry-state-'));

const table = () => spawnSync('nsenter', [`--net=/run/netns/${ns}`, 'nft', 'list', 'table', 'inet', 'egressd'], { encoding: 'utf8' }).stdout;
const iso = (ms: number) => new Date(ms).toISOString().replace(/\.\d{3}Z$/, 'Z');

const APPS = 'apps:\n  app1:\n    identity: {user: root}\n    default: deny\n';
const allowed = (entries: { to: string; until: number }[]) =>
  `allowed:\n${entries.map((e) => `  - app: app1\n    allow: ["${e.to}"]\n    until: "${iso(e.until)}"\n`).join('')}`;

interface LogLine {
  event: string;
  why?: string;
}

describe.skipIf(skip)(`allowed entries expire in the table without the D-Bus part ${skip ? `(skipped: ${skip})` : ''}`, () => {
  let daemon: ChildProcess;
  const lines: LogLine[] = [];

  beforeAll(() => {
    spawnSync('ip', ['netns', 'add', ns]);
    spawnSync('ip', ['-n', ns, 'link', 'set', 'lo', 'up']);
  });
  afterAll(() => {
    daemon?.kill('SIGKILL');
    deleteNamedNetns(ns);
    rmSync(dir, { recursive: true, force: true });
    rmSync(state, { recursive: true, force: true });
  });

  it('leaves out an entry whose until has passed, and takes out one that expires while egressd runs', async () => {
    const now = Date.now();
    writeFileSync(join(dir, '30-apps.yaml'), APPS);
    // Seconds, not minutes: the `until` is written to the second.
    writeFileSync(
      join(dir, '80-allowed.yaml'),
      allowed([
        { to: '192.0.2.7', until: now - 60_000 },
        { to: '198.51.100.7', until: now + 6_000 },
      ]),
    );
    const off = ['resolver', 'apps', 'denials', 'denial-store', 'dbus', 'tor'].map((p) => `--no-${p}`);
    daemon = spawn(
      'nsenter',
      [`--net=/run/netns/${ns}`, process.execPath, '--import', 'tsx', join(ROOT, 'src/daemon/main.ts'), '--policy', dir, '--state', state, ...off],
      { stdio: ['ignore', 'pipe', 'inherit'] },
    );
    createInterface({ input: daemon.stdout! }).on('line', (text) => lines.push(JSON.parse(text) as LogLine));
    await until('the first apply', () => lines.some((l) => l.event === 'applied'));
    expect(table()).toContain('198.51.100.7');
    expect(table()).not.toContain('192.0.2.7');
    await until('198.51.100.7 out of the table', () => !table().includes('198.51.100.7'), { timeoutMs: 15_000, everyMs: 100 });
    expect(Date.now()).toBeGreaterThanOrEqual(now + 5_000);
    await until('the apply at the expiry logged', () => lines.some((l) => l.event === 'applied' && l.why === 'allowed entry expired'));
  }, 40_000);

  it('takes it out even when another policy file broke meanwhile, changing nothing else', async () => {
    writeFileSync(join(dir, '80-allowed.yaml'), allowed([{ to: '203.0.113.7', until: Date.now() + 5_000 }]));
    daemon.kill('SIGHUP');
    await until('203.0.113.7 in the table', () => table().includes('203.0.113.7'));
    const before = table();
    writeFileSync(join(dir, '10-broken.yaml'), 'deny: [{to: [192.0.2.1/24]}]\n');
    await until('203.0.113.7 out of the table', () => !table().includes('203.0.113.7'), { timeoutMs: 15_000, everyMs: 100 });
    await until('the failed apply and the re-apply of the policy in force logged', () => lines.some((l) => l.event === 'allow-expired-in-force'));
    expect(lines.map((l) => l.event)).toContain('apply-failed');
    // Only the allow went: every other rule of the policy in force is still there.
    const rules = (text: string) =>
      [...new Set([...text.matchAll(/comment "(r[0-9a-f]{8} [^#"]*)/g)].map((m) => m[1]!.trim()).filter((c) => !c.includes('/allowed/')))].sort();
    expect(rules(before).length).toBeGreaterThan(3);
    expect(rules(table())).toEqual(rules(before));
  }, 40_000);
});
