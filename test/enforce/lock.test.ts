import type { ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { setLockdown } from '../../src/enforce/enforcer.js';
import { withEnforcementLock } from '../../src/enforce/lock.js';
import { ErrorCode } from '../../src/errors.js';
import type { Nft } from '../../src/nft/client.js';
import { holdLock } from '../support/hold-lock.js';
import { policyDir } from '../support/policy-dir.js';

/** The enforcement lock between real processes: a holder in a child process, and this one waiting. */
let dir: string;
let lockPath: string;
let holder: ChildProcess | undefined;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'egd-lock-'));
  lockPath = join(dir, 'run', 'net-test.lock');
});
afterEach(() => {
  holder?.kill('SIGKILL');
  holder = undefined;
  rmSync(dir, { recursive: true, force: true });
});

/** Holds the test's lock in a child process; killed after each test. */
async function holdInChild(what: string) {
  const held = await holdLock(lockPath, what);
  holder = held.child;
  return held;
}

describe('the enforcement lock', () => {
  it('a second change waits for the first, is told who holds the lock, and runs only once it is free', async () => {
    const { child, letGo, exited } = await holdInChild('apply /etc/egressd');
    const told: string[] = [];
    let ranAt = 0;
    let refused!: () => void;
    const wasRefused = new Promise<void>((resolve) => (refused = resolve));
    const waiting = withEnforcementLock(lockPath, 'release', async () => (ranAt = Date.now()), {
      onWait: (who) => {
        told.push(who);
        refused();
      },
    });
    // Waits for the lock to turn it away, not for a time: that a held lock keeps a change out for as long as it is held is the timeout test below.
    await wasRefused;
    expect(ranAt).toBe(0);
    const letGoAt = Date.now();
    letGo();
    await waiting;
    expect(ranAt).toBeGreaterThanOrEqual(letGoAt);
    await exited;
    expect(told).toHaveLength(1);
    expect(told[0]).toMatch(new RegExp(`^pid ${child.pid}: apply /etc/egressd, since \\d{4}-`));
  });

  it('a holder killed with SIGKILL leaves no lock behind', async () => {
    const { child, exited } = await holdInChild('apply killed');
    child.kill('SIGKILL');
    await exited;
    const told: string[] = [];
    await expect(withEnforcementLock(lockPath, 'apply next', async () => 'ran', { onWait: (who) => told.push(who), timeoutMs: 2000 })).resolves.toBe('ran');
    expect(told).toEqual([]);
  });

  it('gives up after its timeout, naming the holder, and runs nothing', async () => {
    const { child } = await holdInChild('apply stuck');
    let ran = false;
    const attempt = withEnforcementLock(lockPath, 'lockdown on', async () => (ran = true), { timeoutMs: 300 });
    await expect(attempt).rejects.toMatchObject({ code: ErrorCode.Busy, message: expect.stringContaining(`pid ${child.pid}: apply stuck`) });
    await expect(attempt).rejects.toThrow(/nothing was changed/);
    expect(ran).toBe(false);
  });

  it('a lock directory it cannot write does not stop the change, and says it ran unserialised', async () => {
    const said: string[] = [];
    await expect(
      withEnforcementLock('/dev/null/egressd/net-1.lock', 'lockdown on', async () => 'ran', { onUnavailable: (why) => said.push(why) }),
    ).resolves.toBe('ran');
    expect(said).toEqual([
      expect.stringMatching(/^cannot open the enforcement lock \/dev\/null\/egressd\/net-1\.lock \(.*\); this change is not serialised with others$/),
    ]);
  });

  it('serialises changes within one process too', async () => {
    const order: string[] = [];
    let twoRefused!: () => void;
    const twoWaits = new Promise<void>((resolve) => (twoRefused = resolve));
    // One ends only once two has been turned away: the overlap is certain, not a matter of time.
    const change = (name: string, until: Promise<void>) => async () => {
      order.push(`${name} starts`);
      await until;
      order.push(`${name} ends`);
    };
    await Promise.all([
      withEnforcementLock(lockPath, 'one', change('one', twoWaits)),
      withEnforcementLock(lockPath, 'two', change('two', Promise.resolve()), {
        onWait: () => {
          order.push('two waits');
          twoRefused();
        },
      }),
    ]);
    expect(order).toEqual(['one starts', 'two waits', 'one ends', 'two starts', 'two ends']);
  });

  it('lockdown on that cannot get the lock fails and names the holder; it does not call the policy broken', async () => {
    const { child } = await holdInChild('apply stuck');
    const touched: string[] = [];
    // Nothing may reach nftables: the lock comes first.
    const nft = new Proxy(
      { backend: 'libnftables' },
      { get: (target, key) => (key in target ? target[key as 'backend'] : () => touched.push(String(key))) },
    ) as unknown as Nft;
    const audited: string[] = [];
    const deps = {
      nft,
      facts: () => ({ users: new Map(), groups: new Map(), cgroups: [] }),
      stateDir: join(dir, 'state'),
      audit: (event: string) => audited.push(event),
      lock: { path: lockPath, timeoutMs: 300 },
    };
    await expect(setLockdown(true, policyDir({ '00.yaml': 'defaults: {egress: allow}\n' }), deps)).rejects.toMatchObject({
      code: ErrorCode.Busy,
      message: expect.stringContaining(`pid ${child.pid}: apply stuck`),
    });
    expect(audited).toEqual([]);
    expect(touched).toEqual([]);
  });
});
