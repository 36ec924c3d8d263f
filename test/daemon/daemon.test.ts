import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { nftAvailable } from '../support/nft-check.js';
import { deleteNamedNetns } from '../../src/lab/sys.js';

/** egressd in the foreground, in a namespace of this test's own: apply, reload on SIGHUP, stop without releasing. */
const ROOT = join(import.meta.dirname, '..', '..');
const skip = nftAvailable();
const ns = `egd-dmn-${randomBytes(3).toString('hex')}`;
const dir = mkdtempSync(join(tmpdir(), 'egd-daemon-policy-'));
const state = mkdtempSync(join(tmpdir(), 'egd-daemon-state-'));

const nft = (...args: string[]) => spawnSync('nsenter', [`--net=/run/netns/${ns}`, 'nft', ...args], { encoding: 'utf8' });
const digest = () => /policy sha256:([0-9a-f]{32})/.exec(nft('list', 'table', 'inet', 'egressd').stdout)?.[1];

interface LogLine {
  event: string;
  level: string;
  digest?: string;
  errors?: string[];
}

describe.skipIf(skip)(`egressd daemon ${skip ? `(skipped: ${skip})` : ''}`, () => {
  let daemon: ChildProcess;
  const lines: LogLine[] = [];
  const waiters: { event: string; resolve: (line: LogLine) => void }[] = [];
  const next = (event: string) =>
    new Promise<LogLine>((resolve, reject) => {
      waiters.push({ event, resolve });
      setTimeout(() => reject(new Error(`no "${event}" log line; saw ${JSON.stringify(lines.map((l) => l.event))}`)), 20_000);
    });

  beforeAll(() => {
    spawnSync('ip', ['netns', 'add', ns]);
    spawnSync('ip', ['-n', ns, 'link', 'set', 'lo', 'up']);
    // An upstream nobody answers: the resolver's own answers (the DoH canary) need none.
    writeFileSync(join(dir, '00.yaml'), 'deny:\n  - to: [203.0.113.0/24]\ndns: {upstreams: ["192.0.2.53"]}\n');
  });
  afterAll(() => {
    daemon?.kill('SIGKILL');
    deleteNamedNetns(ns);
    rmSync(dir, { recursive: true, force: true });
    rmSync(state, { recursive: true, force: true });
  });

  it('applies at start, logging JSON lines with stable event names', async () => {
    daemon = spawn(
      'nsenter',
      [`--net=/run/netns/${ns}`, process.execPath, '--import', 'tsx', join(ROOT, 'src/daemon/main.ts'), '--policy', dir, '--state', state],
      { stdio: ['ignore', 'pipe', 'inherit'] },
    );
    createInterface({ input: daemon.stdout! }).on('line', (text) => {
      const line = JSON.parse(text) as LogLine;
      lines.push(line);
      const at = waiters.findIndex((w) => w.event === line.event);
      if (at >= 0) waiters.splice(at, 1)[0]!.resolve(line);
    });
    const applied = await next('applied');
    expect(applied.digest?.slice(0, 32)).toBe(digest());
  });

  it('runs the resolver once the policy is applied, which answers on its own address', async () => {
    const ready = lines.find((l) => l.event === 'resolver-ready') ?? (await next('resolver-ready'));
    expect(ready.level).toBe('info');
    const dig = spawnSync('nsenter', [`--net=/run/netns/${ns}`, 'dig', '@127.0.0.153', '+tries=1', '+time=2', 'use-application-dns.net', 'A'], {
      encoding: 'utf8',
    });
    expect(dig.stdout).toContain('status: NXDOMAIN');
    expect(lines.some((l) => l.event === 'resolver-failed')).toBe(false);
  });

  it('SIGHUP with a broken policy keeps the running table byte-identical and logs every error', async () => {
    const before = nft('-j', 'list', 'ruleset').stdout;
    writeFileSync(join(dir, '10-broken.yaml'), 'apps: {x: {identity: ghost}}\ndeny: [{to: [192.0.2.1/24]}]\n');
    const failed = next('apply-failed');
    daemon.kill('SIGHUP');
    const line = await failed;
    expect(line.level).toBe('error');
    expect(line.errors!.join('\n')).toContain('10-broken.yaml:2:14: "192.0.2.1/24" has host bits set');
    expect(nft('-j', 'list', 'ruleset').stdout).toBe(before);
  });

  it('SIGHUP with a good policy applies the new one', async () => {
    const old = digest();
    unlinkSync(join(dir, '10-broken.yaml'));
    writeFileSync(join(dir, '10-more.yaml'), 'deny:\n  - to: ["2001:db8:bad::/48"]\n');
    const applied = next('applied');
    const resolverUpdated = next('resolver-policy');
    daemon.kill('SIGHUP');
    await applied;
    expect(digest()).toBeDefined();
    expect(digest()).not.toBe(old);
    // The resolver took the new policy without a restart.
    await resolverUpdated;
    expect(lines.filter((l) => l.event === 'resolver-ready')).toHaveLength(1);
    expect(lines.some((l) => l.event === 'resolver-failed')).toBe(false);
  });

  it('SIGTERM stops egressd and leaves the rules in force', async () => {
    const before = digest();
    const exited = new Promise<number | null>((resolve) => daemon.once('exit', (code) => resolve(code)));
    daemon.kill('SIGTERM');
    expect(await exited).toBe(0);
    expect(lines.at(-1)?.event).toBe('stopping');
    expect(digest()).toBe(before);
  });
});
