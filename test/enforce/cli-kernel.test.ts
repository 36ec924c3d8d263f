import { spawn, spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { nftAvailable } from '../support/nft-check.js';
import { policyDir } from '../support/policy-dir.js';
import { holdLock } from '../support/hold-lock.js';
import { deleteNamedNetns } from '../../src/lab/sys.js';
import { until } from '../support/wait.js';
import { lockPathFor } from '../../src/enforce/lock.js';

/**
 * egressctl's enforcement commands against the real kernel, in a network
 * namespace of this test's own. The CLI runs inside it (nsenter), so its
 * in-process libnftables acts on that namespace only.
 */
const ROOT = join(import.meta.dirname, '..', '..');
const skip = nftAvailable();
const ns = `egd-cli-${randomBytes(3).toString('hex')}`;
const state = mkdtempSync(join(tmpdir(), 'egd-state-'));
/** TMPDIR of the applies this file kills: the input file of a transaction cut short stays there, not in /tmp. */
const scratch = mkdtempSync(join(tmpdir(), 'egd-scratch-'));

function inNs(cmd: string, args: string[], input?: string): SpawnSyncReturns<string> {
  return spawnSync('nsenter', [`--net=/run/netns/${ns}`, cmd, ...args], {
    encoding: 'utf8',
    input,
    env: { ...process.env, EGRESSD_STATE_DIR: state },
    timeout: 60_000,
    maxBuffer: 256 * 1024 * 1024,
  });
}
const egressctl = (...args: string[]) => inNs(process.execPath, ['--import', 'tsx', join(ROOT, 'src/cli/main.ts'), ...args]);

/** egressctl in the background, in the namespace: its process, its stderr so far, and its exit code. */
function egressctlInBackground(...args: string[]) {
  const child = spawn('nsenter', [`--net=/run/netns/${ns}`, process.execPath, '--import', 'tsx', join(ROOT, 'src/cli/main.ts'), ...args], {
    env: { ...process.env, EGRESSD_STATE_DIR: state, TMPDIR: scratch },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const run = { child, stderr: '', exited: new Promise<number>((resolve) => child.once('exit', (code) => resolve(code ?? -1))) };
  child.stderr.on('data', (chunk: Buffer) => (run.stderr += chunk.toString()));
  return run;
}
/** Whether `pid` holds a netfilter netlink socket that has joined NFNLGRP_NFTABLES (group 7: bit 0x40). */
function subscribedToNftEvents(pid: number): boolean {
  try {
    const sockets = new Set(
      readdirSync(`/proc/${pid}/fd`).map((fd) => {
        try {
          return /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`))?.[1];
        } catch {
          return undefined;
        }
      }),
    );
    // sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode; Eth 12 is NETLINK_NETFILTER.
    return readFileSync(`/proc/${pid}/net/netlink`, 'utf8')
      .split('\n')
      .slice(1)
      .map((line) => line.trim().split(/\s+/))
      .some((f) => f[1] === '12' && sockets.has(f[9]) && (Number.parseInt(f[3] ?? '0', 16) & 0x40) !== 0);
  } catch {
    return false;
  }
}

/** `nft monitor rules` in the namespace: every rule event from the moment it resolves, as lines. */
async function monitorRules() {
  const child = spawn('nsenter', [`--net=/run/netns/${ns}`, 'nft', 'monitor', 'rules'], { stdio: ['ignore', 'pipe', 'inherit'] });
  const events: string[] = [];
  let partial = '';
  child.stdout.on('data', (chunk: Buffer) => {
    const lines = (partial + chunk.toString()).split('\n');
    partial = lines.pop()!;
    events.push(...lines);
  });
  // Ready once the kernel shows its socket subscribed to nftables events: nothing after that is
  // missed. (Writing a sentinel until one shows would not do: each write restarts the listing nft
  // takes before it subscribes, and with a big set that listing never finishes.)
  try {
    await until('nft monitor to subscribe', () => child.pid !== undefined && subscribedToNftEvents(child.pid));
  } catch (error) {
    child.kill();
    throw error;
  }
  return { events, stop: () => child.kill() };
}
const nft = (...args: string[]) => inNs('nft', args);
const liveText = () => nft('list', 'table', 'inet', 'egressd').stdout;
const liveDigest = () => /policy sha256:([0-9a-f]{32})/.exec(nft('-t', 'list', 'table', 'inet', 'egressd').stdout)?.[1];

const GOOD = { '00.yaml': 'defaults: {egress: allow}\ndeny:\n  - to: [203.0.113.0/24, "2001:db8:dead::/48"]\n' };
const CHANGED = { '00.yaml': 'defaults: {egress: allow}\ndeny:\n  - to: [203.0.113.0/24, "2001:db8:dead::/48"]\n    ports: [443]\n' };

describe.skipIf(skip)(`egressctl apply/plan/status/lockdown/release in a namespace ${skip ? `(skipped: ${skip})` : ''}`, () => {
  beforeAll(() => {
    spawnSync('ip', ['netns', 'add', ns]);
    // Someone else's table, which egressd must never touch.
    inNs(
      'nft',
      ['-f', '-'],
      'table ip foreign {\n\tchain c {\n\t\ttype filter hook output priority 10; policy accept;\n\t\tip daddr 198.51.100.1 counter drop\n\t}\n}\n',
    );
  });
  afterAll(() => {
    deleteNamedNetns(ns);
    rmSync(state, { recursive: true, force: true });
    rmSync(scratch, { recursive: true, force: true });
  });

  it('apply creates the table in one go, keeps the last good ruleset, and leaves other tables alone', () => {
    const foreign = nft('list', 'table', 'ip', 'foreign').stdout;
    expect(egressctl('plan', policyDir(GOOD)).status).toBe(1);
    const dir = policyDir(GOOD);
    const applied = egressctl('apply', dir);
    expect(applied.stderr).toMatch(/^applied .*: \d+ rules, \d+ sets and maps; policy sha256:[0-9a-f]{16}… \(libnftables\)/);
    expect(applied.status).toBe(0);
    expect(liveText()).toContain('elements = { 203.0.113.0/24 }');
    expect(nft('list', 'table', 'ip', 'foreign').stdout).toBe(foreign);
    const compiled = egressctl('compile', dir).stdout;
    expect(readFileSync(join(state, 'last-good.nft'), 'utf8')).toBe(compiled);
    expect(egressctl('plan', dir).status).toBe(0);
  });

  it('status: 0 when the live table matches the policy on disk, 1 when it differs, with the reason', () => {
    const dir = policyDir(GOOD);
    egressctl('apply', dir);
    const same = egressctl('status', dir, '--json');
    expect(same.status).toBe(0);
    expect(JSON.parse(same.stdout)).toMatchObject({ enforced: true, lockdown: false, matchesPolicyOnDisk: true, digest: liveDigest() });
    const other = egressctl('status', policyDir(CHANGED));
    expect(other.status).toBe(1);
    expect(other.stderr).toContain('DIFFERS from the policy');
    expect(other.stderr).toMatch(/\+ global_deny: r[0-9a-f]{8} 00\.yaml:3 deny\/00\.yaml\/0 #/);
  });

  it('status without a policy directory reports what is enforced and says there is nothing to compare with', () => {
    const missing = join(state, 'no-such-policy-dir');
    egressctl('apply', policyDir(GOOD));
    const text = egressctl('status', missing);
    expect(text.status, text.stderr).toBe(1);
    expect(text.stderr).toMatch(/^enforced: table inet egressd, policy sha256:[0-9a-f]{16}…/);
    expect(text.stderr).toContain(`no policy directory at ${missing} to compare with`);
    expect(text.stderr).not.toContain('cannot read policy directory');
    const json = egressctl('status', missing, '--json');
    expect(json.status).toBe(1);
    expect(JSON.parse(json.stdout)).toMatchObject({
      enforced: true,
      digest: liveDigest(),
      matchesPolicyOnDisk: false,
      policyDirectory: null,
      notCompared: `no policy directory at ${missing} to compare with`,
      plan: null,
    });
    expect((JSON.parse(json.stdout) as { rules: number }).rules).toBeGreaterThan(0);

    expect(egressctl('release').status).toBe(0);
    const none = egressctl('status', missing, '--json');
    expect(none.status).toBe(1);
    expect(JSON.parse(none.stdout)).toMatchObject({ enforced: false, matchesPolicyOnDisk: false, policyDirectory: null, rules: 0 });
    expect(none.stderr).toContain('NOT ENFORCED');
    expect(none.stderr).toContain(`no policy directory at ${missing} to compare with`);
  });

  it('a bad policy exits 2 and leaves the live table byte-identical', () => {
    egressctl('apply', policyDir(GOOD));
    const before = nft('-j', 'list', 'ruleset').stdout;
    const bad = egressctl('apply', policyDir({ '00.yaml': 'deny:\n  - to: [203.0.113.1/24]\n' }));
    expect(bad.status).toBe(2);
    expect(bad.stderr).toContain('00.yaml:2:10: "203.0.113.1/24" has host bits set');
    expect(bad.stderr).toContain('nothing was changed');
    expect(nft('-j', 'list', 'ruleset').stdout).toBe(before);
  });

  it('lockdown survives re-applies until switched off, and status says so loudly', () => {
    const dir = policyDir(GOOD);
    egressctl('apply', dir);
    expect(egressctl('lockdown', 'on', dir).status).toBe(0);
    expect(liveText()).toContain('goto lockdown');
    expect(egressctl('apply', dir).stderr).toContain('LOCKDOWN IS ON');
    expect(liveText()).toContain('goto lockdown');
    const status = egressctl('status', dir);
    expect(status.stderr).toMatch(/^LOCKDOWN IS ON/);
    expect(egressctl('lockdown', 'off', dir).status).toBe(0);
    expect(liveText()).not.toContain('lockdown');
  });

  it('lockdown on works even with a broken policy', () => {
    egressctl('apply', policyDir(GOOD));
    const result = egressctl('lockdown', 'on', policyDir({ '00.yaml': 'nonsense: [' }));
    expect(result.status).toBe(0);
    expect(result.stderr).toContain('invalid; lockdown was applied without it');
    expect(liveText()).toContain('goto lockdown');
    // Which fault it was, as data too: the policy, not nftables.
    const json = egressctl('lockdown', 'on', policyDir({ '00.yaml': 'nonsense: [' }), '--json');
    expect(JSON.parse(json.stdout)).toMatchObject({ lockdown: true, policyUsable: false, fallback: 'policy invalid' });
    egressctl('lockdown', 'off', policyDir(GOOD));
    const missing = egressctl('lockdown', 'on', '/nonexistent/egressd');
    expect(missing.status).toBe(0);
    expect(liveText()).toContain('goto lockdown');
    egressctl('lockdown', 'off', policyDir(GOOD));
  });

  it('release removes only table inet egressd, and says so', () => {
    egressctl('apply', policyDir(GOOD));
    const released = egressctl('release');
    expect(released.status).toBe(0);
    expect(released.stderr).toContain('NO LONGER ENFORCED');
    expect(nft('list', 'table', 'inet', 'egressd').status).not.toBe(0);
    expect(nft('list', 'table', 'ip', 'foreign').status).toBe(0);
    expect(egressctl('status', policyDir(GOOD)).status).toBe(1);
    expect(egressctl('release').stderr).toContain('nothing to release');
  });

  it('two applies at once never mix their policies: the table ends as one of them, whole', async () => {
    const nets = (first: number) => Array.from({ length: 20_000 }, (_, i) => `${first}.${i >> 8}.${i & 255}.0/24`).join('\n');
    const policy = (first: number, port: number) =>
      policyDir({
        '00.yaml': `lists:\n  big: {file: big.txt}\ndeny:\n  - to: ["@big"]\n    ports: [${port}]\napps:\n  a:\n    identity: {user: root}\n    rules:\n      - deny: [198.51.100.${port % 250}]\n`,
        'big.txt': `${nets(first)}\n`,
      });
    const one = policy(10, 25);
    const two = policy(20, 443);
    for (let round = 0; round < 4; round++) {
      // The enforcement lock makes the second wait for the first, so both succeed.
      const codes = await Promise.all([one, two].map((dir) => egressctlInBackground('apply', dir).exited));
      expect(codes, `round ${round}`).toEqual([0, 0]);
      const matches = [egressctl('plan', one).status, egressctl('plan', two).status];
      expect(
        matches.filter((status) => status === 0),
        `round ${round}: exits ${String(codes)}, plan ${String(matches)}`,
      ).toHaveLength(1);
      const chains = [...nft('list', 'chains', 'inet').stdout.matchAll(/chain (\S+) \{/g)].map((m) => m[1]!).filter((c) => c !== 'output');
      expect(new Set(chains.map((c) => c.slice(-2))).size).toBe(1);
    }
  }, 120_000);

  it('lockdown switched on while applies run stays on: every change waits its turn, none is lost', async () => {
    const dir = policyDir(GOOD);
    expect(egressctl('apply', dir).status).toBe(0);
    let waited = 0;
    for (let round = 0; round < 3; round++) {
      const runs = [
        ['apply', dir],
        ['apply', dir],
        ['lockdown', 'on', dir],
        ['apply', dir],
        ['apply', dir],
      ].map((args) => egressctlInBackground(...args));
      const codes = await Promise.all(runs.map((r) => r.exited));
      expect(codes, runs.map((r) => r.stderr).join('\n')).toEqual([0, 0, 0, 0, 0]);
      waited += runs.filter((r) => r.stderr.includes('waiting for another change of enforcement to finish (pid ')).length;
      expect(JSON.parse(egressctl('status', dir, '--json').stdout)).toMatchObject({ lockdown: true, matchesPolicyOnDisk: true });
      expect(egressctl('lockdown', 'off', dir).status).toBe(0);
    }
    // Without any overlap this test would prove nothing.
    expect(waited).toBeGreaterThan(0);
  }, 120_000);

  it('release waits for a change that is running, and names it, before it removes the table', async () => {
    expect(egressctl('apply', policyDir(GOOD)).status).toBe(0);
    // This namespace's lock, held by a process of the test's own.
    const holder = await holdLock('-', 'apply by the test', ns);
    try {
      const release = egressctlInBackground('release');
      await until('release to say it waits', () => release.stderr.includes('waiting for another change'));
      expect(release.stderr).toContain(`waiting for another change of enforcement to finish (pid ${holder.child.pid}: apply by the test, since `);
      // Once it waits, the table is still there and release has not finished; that a held lock keeps a
      // change out for as long as it is held, not some guessed while, is test/enforce/lock.test.ts's timeout case.
      expect(nft('list', 'table', 'inet', 'egressd').status, 'release did not wait').toBe(0);
      expect(release.child.exitCode, 'release did not wait').toBeNull();
      holder.letGo();
      expect(await release.exited).toBe(0);
      expect(nft('list', 'table', 'inet', 'egressd').status).not.toBe(0);
    } finally {
      holder.child.kill('SIGKILL');
    }
  }, 60_000);

  it('fail-closed: apply killed with SIGKILL at any moment leaves the old table or the new one, never none', async () => {
    // A large list, different in each policy (an unchanged set is not written again), so that each
    // apply writes a big set, and removing the old one leaves time to be killed after the switch.
    const nets = (first: number) => Array.from({ length: 30_000 }, (_, i) => `${first + (i >> 16)}.${(i >> 8) & 255}.${i & 255}.0/24`).join('\n');
    const oldDir = policyDir({ '00.yaml': 'lists:\n  big: {file: big.txt}\ndeny:\n  - to: ["@big"]\n', 'big.txt': `${nets(10)}\n` });
    const newDir = policyDir({ '00.yaml': 'lists:\n  big: {file: big.txt}\ndeny:\n  - to: ["@big"]\n    ports: [443]\n', 'big.txt': `${nets(20)}\n` });
    expect(egressctl('apply', oldDir).status).toBe(0);
    const oldDigest = liveDigest();
    expect(egressctl('apply', newDir).status).toBe(0);
    const newDigest = liveDigest();
    expect(newDigest).not.toBe(oldDigest);
    // Each apply is killed at a step it announces, not after a guessed time: once it holds the
    // enforcement lock (loading and compiling, nothing written), once its prepare transaction is
    // in (nft monitor shows rules added to chains other than the base chain), once the switch is in
    // (rules added to the base chain after those), once the old generation goes (rules of other
    // chains deleted after those).
    const lock = lockPathFor(statSync(`/run/netns/${ns}`).ino);
    const holds = (pid: number) => {
      try {
        return readFileSync(lock, 'utf8').startsWith(`pid ${pid}:`);
      } catch {
        return false;
      }
    };
    const after = (events: string[], first: RegExp, then: RegExp) => events.slice(events.findIndex((l) => first.test(l)) + 1).some((l) => then.test(l));
    const prepared = /^add rule inet egressd (?!output )\S+ /;
    const stages: Record<string, (pid: number, events: string[]) => boolean> = {
      locked: (pid) => holds(pid),
      prepared: (_, events) => events.some((l) => prepared.test(l)),
      switched: (_, events) => events.some((l) => prepared.test(l)) && after(events, prepared, /^add rule inet egressd output /),
      removed: (_, events) => events.some((l) => prepared.test(l)) && after(events, prepared, /^delete rule inet egressd (?!output )\S+ /),
    };
    const monitor = await monitorRules();
    let live = newDigest;
    const seen = new Set<string>();
    const killedMidway: string[] = [];
    try {
      // Twice each: after a kill the next apply reads the table whole, which makes each run take seconds.
      for (let i = 0; i < 8; i++) {
        const stage = Object.keys(stages)[i % 4]!;
        // Always a change: an apply of the policy already in force would have no transaction to kill.
        const target = live === oldDigest ? newDir : oldDir;
        const from = monitor.events.length;
        const { child, exited } = egressctlInBackground('apply', target);
        let finished = false;
        void exited.then(() => (finished = true));
        // Polled often: after the switch only the removal and the state files are left to kill it in.
        await until(`apply (pid ${child.pid}) to reach "${stage}" or exit`, () => finished || stages[stage]!(child.pid!, monitor.events.slice(from)), {
          everyMs: 2,
        });
        if (child.exitCode === null && child.signalCode === null) {
          killedMidway.push(stage);
          child.kill('SIGKILL');
        }
        await exited;
        const digest = liveDigest();
        expect([oldDigest, newDigest], `killed at "${stage}"`).toContain(digest);
        seen.add(digest!);
        live = digest;
      }
    } finally {
      monitor.stop();
    }
    // Every step was cut at least once while the apply still ran, or this test would prove less than it says.
    expect(new Set(killedMidway), `killed mid-run at: ${killedMidway.join(', ')}`).toEqual(new Set(Object.keys(stages)));
    // The next apply clears what the killed ones left: one generation of chains, one set per name.
    expect(egressctl('apply', newDir).status).toBe(0);
    const chains = [...nft('list', 'chains', 'inet').stdout.matchAll(/chain (\S+) \{/g)].map((m) => m[1]!).filter((c) => c !== 'output');
    expect(new Set(chains.map((c) => c.slice(-2))).size).toBe(1);
    const sets = [...nft('-t', 'list', 'sets', 'inet').stdout.matchAll(/set (\S+)\.[0-9a-f]{16} \{/g)].map((m) => m[1]);
    expect(sets.length).toBeGreaterThan(0);
    expect(new Set(sets).size).toBe(sets.length);
  }, 120_000);
});
