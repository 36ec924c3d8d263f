import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { allowListFor, allowUnitUpstreams, ownUnit, prefixText } from '../../src/system/unit-address-allow.js';

/**
 * The unit's address list as egressd sets it. The real systemctl and
 * systemd's BPF program are exercised by test/boot/systemd.test.ts (a booted
 * Debian 12: an upstream answers from inside the unit's cgroup, others are
 * refused); here, what egressd asks for and what it makes of the answers.
 */
describe('allowListFor', () => {
  it('is loopback and each upstream alone, whatever the port, once each', () => {
    expect(allowListFor(['192.0.2.53', '192.0.2.53#5353', '2001:db8::1#53', '198.51.100.7']).map(prefixText)).toEqual([
      '127.0.0.0/8',
      '::1/128',
      '192.0.2.53/32',
      '2001:db8::1/128',
      '198.51.100.7/32',
    ]);
    expect(allowListFor([]).map(prefixText)).toEqual(['127.0.0.0/8', '::1/128']);
  });

  it('adds nothing for a loopback upstream (stubby on 127.0.0.1#5353): loopback is on the list already', () => {
    expect(allowListFor(['127.0.0.1#5353', '127.0.1.53', '::1#5353']).map(prefixText)).toEqual(['127.0.0.0/8', '::1/128']);
  });

  it('gives systemctl each address in its canonical form, the whole address as the prefix', () => {
    expect(allowListFor(['2001:0db8:0:0::0053'])[2]).toEqual({ family: 6, address: '2001:db8::53', prefix: 128 });
    expect(allowListFor(['203.0.113.9'])[2]).toEqual({ family: 4, address: '203.0.113.9', prefix: 32 });
  });

  it('refuses what is not an address: a network, a name, a zone', () => {
    for (const bad of ['192.0.2.0/24', 'dns.example', 'fe80::1%eth0', '']) expect(() => allowListFor([bad]), bad).toThrow(/is not ADDR or ADDR#PORT/);
  });
});

describe('ownUnit', () => {
  const dir = mkdtempSync(join(tmpdir(), 'egd-unit-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const cgroup = (text: string) => {
    const path = join(dir, `cgroup-${Math.random()}`);
    writeFileSync(path, text);
    return path;
  };

  it("is the service of the process's cgroup when systemd started this very process", () => {
    expect(ownUnit({ SYSTEMD_EXEC_PID: '42' }, 42, cgroup('0::/system.slice/egressd.service\n'))).toBe('egressd.service');
    expect(ownUnit({ SYSTEMD_EXEC_PID: '42' }, 42, cgroup('0::/system.slice/system-egressd.slice/egressd@lab.service\n'))).toBe('egressd@lab.service');
  });

  it('is none for a child of a unit (a CI runner, a shell in a service), which inherits the variable, or outside systemd', () => {
    expect(ownUnit({ SYSTEMD_EXEC_PID: '41' }, 42, cgroup('0::/system.slice/runner.service\n'))).toBeUndefined();
    expect(ownUnit({}, 42, cgroup('0::/system.slice/egressd.service\n'))).toBeUndefined();
    expect(ownUnit({ SYSTEMD_EXEC_PID: '42' }, 42, cgroup('0::/user.slice/user-1000.slice/session-2.scope\n'))).toBeUndefined();
    expect(ownUnit({ SYSTEMD_EXEC_PID: '42' }, 42, join(dir, 'missing'))).toBeUndefined();
  });
});

/** systemctl as systemd 252 answers it: an empty IPAddressAllow= clears the list, a non-empty one is merged in. */
function fakeSystemctl(deny: string, allow: string[], options: { ignoreSets?: boolean } = {}) {
  const calls: string[][] = [];
  let list = [...allow];
  const run = (args: readonly string[]): Promise<string> => {
    calls.push([...args]);
    if (args[0] === 'show') return Promise.resolve(`IPAddressDeny=${deny}\nIPAddressAllow=${list.join(' ')}\n`);
    if (args[0] === 'set-property' && !options.ignoreSets) {
      for (const assignment of args.slice(3)) {
        const value = assignment.slice('IPAddressAllow='.length);
        list = value === '' ? [] : [...new Set([...list, ...value.split(' ')])];
      }
    }
    return Promise.resolve('');
  };
  return { run, calls, list: () => list };
}

describe('allowUnitUpstreams', () => {
  it('in a unit that denies addresses: one set-property call that clears the list and sets loopback and the upstreams, read back', async () => {
    const systemctl = fakeSystemctl('0.0.0.0/0 ::/0', ['127.0.0.0/8', '::1/128', '192.0.2.1/32']);
    const outcome = await allowUnitUpstreams(['192.0.2.53', '2001:db8::53#5353'], { unit: 'egressd.service', systemctl: systemctl.run });
    expect(outcome).toEqual({ kind: 'set', unit: 'egressd.service', allowed: ['127.0.0.0/8', '::1/128', '192.0.2.53/32', '2001:db8::53/128'] });
    expect(systemctl.calls.filter((c) => c[0] === 'set-property')).toEqual([
      ['set-property', '--runtime', 'egressd.service', 'IPAddressAllow=', 'IPAddressAllow=127.0.0.0/8 ::1/128 192.0.2.53/32 2001:db8::53/128'],
    ]);
    // The old upstream is let through no longer.
    expect(systemctl.list()).not.toContain('192.0.2.1/32');
  });

  it('asks nothing of a unit that denies no address, nor outside a unit', async () => {
    const systemctl = fakeSystemctl('', []);
    expect(await allowUnitUpstreams(['192.0.2.53'], { unit: 'egressd.service', systemctl: systemctl.run })).toEqual({
      kind: 'unconfined',
      why: 'egressd.service denies no address',
    });
    expect(systemctl.calls.map((c) => c[0])).toEqual(['show']);
    const none = fakeSystemctl('0.0.0.0/0 ::/0', []);
    expect(await allowUnitUpstreams(['192.0.2.53'], { unit: undefined, systemctl: none.run })).toEqual({ kind: 'unconfined', why: 'not started by systemd' });
    expect(none.calls).toEqual([]);
  });

  it('takes what systemd holds in its own form (its order, IPv6 written out)', async () => {
    const folded = fakeSystemctl('0.0.0.0/0 ::/0', []);
    const run = async (args: readonly string[]) =>
      args[0] === 'show' ? 'IPAddressDeny=::/0 0.0.0.0/0\nIPAddressAllow=::1/128 127.0.0.0/8 192.0.2.53/32 2001:db8:0:0:0:0:0:53/128\n' : folded.run(args);
    expect(await allowUnitUpstreams(['192.0.2.53', '2001:db8::53'], { unit: 'egressd.service', systemctl: run })).toMatchObject({ kind: 'set' });
    const narrower = async (args: readonly string[]) => (args[0] === 'show' ? 'IPAddressDeny=any\nIPAddressAllow=127.0.0.0/8 ::1/128 192.0.2.53/33\n' : '');
    await expect(allowUnitUpstreams(['192.0.2.54'], { unit: 'egressd.service', systemctl: narrower })).rejects.toThrow(/lacks 192\.0\.2\.54\/32/);
  });

  it('fails when systemd kept more than it was given (merged instead of cleared: the old upstream still let through)', async () => {
    const merging = async (args: readonly string[]) =>
      args[0] === 'show' ? 'IPAddressDeny=any\nIPAddressAllow=127.0.0.0/8 ::1/128 192.0.2.1/32 192.0.2.53/32\n' : '';
    await expect(allowUnitUpstreams(['192.0.2.53'], { unit: 'egressd.service', systemctl: merging })).rejects.toThrow('still lets through 192.0.2.1/32');
  });

  it('one call at a time, in the order asked: a reset and the next set never interleave', async () => {
    const systemctl = fakeSystemctl('any', ['127.0.0.0/8', '::1/128']);
    const slow = async (args: readonly string[]) => {
      await new Promise((resolve) => setTimeout(resolve, args[0] === 'show' ? 20 : 5));
      return systemctl.run(args);
    };
    const reset = allowUnitUpstreams([], { unit: 'egressd.service', systemctl: slow });
    const set = allowUnitUpstreams(['192.0.2.53'], { unit: 'egressd.service', systemctl: slow });
    expect(await Promise.all([reset, set])).toMatchObject([{ kind: 'set' }, { kind: 'set' }]);
    expect(systemctl.calls.map((c) => c[0])).toEqual(['show', 'set-property', 'show', 'show', 'set-property', 'show']);
    expect(systemctl.list()).toContain('192.0.2.53/32');
  });

  it('fails when systemd kept another list, or systemctl fails: the resolver must not ask servers it cannot reach', async () => {
    const deaf = fakeSystemctl('0.0.0.0/0 ::/0', ['127.0.0.0/8', '::1/128'], { ignoreSets: true });
    await expect(allowUnitUpstreams(['192.0.2.53'], { unit: 'egressd.service', systemctl: deaf.run })).rejects.toThrow(
      "egressd.service's IPAddressAllow lacks 192.0.2.53/32 after it was set",
    );
    const broken = (args: readonly string[]) =>
      args[0] === 'show' ? Promise.resolve('IPAddressDeny=0.0.0.0/0 ::/0\nIPAddressAllow=\n') : Promise.reject(new Error('Access denied'));
    await expect(allowUnitUpstreams(['192.0.2.53'], { unit: 'egressd.service', systemctl: broken })).rejects.toThrow('Access denied');
  });
});
