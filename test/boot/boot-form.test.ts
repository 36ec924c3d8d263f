import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BOOT_FORM_FILE, failsafeText } from '../../src/enforce/boot-form.js';
import { loadPolicyOrThrow } from '../../src/policy/load.js';
import { createTestNet, ensureTestUsers, harnessUnavailableReason, type Server, type TestNet, type TestUsers } from '../harness/index.js';
import { policyDir } from '../support/policy-dir.js';

/**
 * What egressd-early (systemd/egressd-early.sh, nft alone) puts in force at
 * boot, in the host namespace of the harness, whose cgroup2 is mounted at
 * /sys/fs/cgroup as on a systemd host. A "boot" here is: the table gone
 * (release), and the cgroups the policy names not made yet — as before
 * network-pre.target, when most units have not started.
 */
const ROOT = join(import.meta.dirname, '..', '..');
const CLI = join(ROOT, 'src/cli/main.ts');
const EARLY = join(ROOT, 'systemd/egressd-early.sh');
const FAILSAFE = join(ROOT, 'systemd/egressd-failsafe.nft');
const unavailable = harnessUnavailableReason();

describe('the shipped fail-safe ruleset', () => {
  it('is the shipped policy compiled with no machine facts (UPDATE_GOLDEN=1 rewrites it)', () => {
    const { policy } = loadPolicyOrThrow(join(ROOT, 'policies'));
    const text = failsafeText(policy);
    if (process.env.UPDATE_GOLDEN === '1') writeFileSync(FAILSAFE, text);
    expect(readFileSync(FAILSAFE, 'utf8')).toBe(text);
    // Nothing of one machine: no cgroup, and no uid or gid but root's.
    expect(text).not.toMatch(/typeof socket cgroupv2[^}]*elements|meta sk[ug]id [1-9]|meta sk[ug]id vmap/);
  });
});

describe.skipIf(unavailable)(`egressd-early at boot ${unavailable ? `(skipped: ${unavailable})` : ''}`, () => {
  let net: TestNet;
  let users: TestUsers;
  let E: string;
  let server: Server;
  let dns: Server;
  const states: string[] = [];
  const newState = () => {
    const dir = mkdtempSync(join(tmpdir(), 'egd-boot-state-'));
    states.push(dir);
    return dir;
  };
  const cli = (state: string, ...args: string[]) => net.host.node(CLI, args, { env: { ...process.env, EGRESSD_STATE_DIR: state } });
  const early = (state: string) => net.host.exec('sh', [EARLY, state, FAILSAFE]);
  // Without what the kernel itself adds to the log meters (an entry per sending uid, with its time left), which traffic changes.
  const tableText = async () =>
    (await net.host.nft(['list', 'table', 'inet', 'egressd'], { check: false })).stdout.replace(/^\t\telements = \{[^}]*\bexpires\b[^}]*\}\n/gm, '');
  /** Boot: no table, and the unit's cgroup not there yet. */
  const boot = async (cgroup?: string) => {
    await net.host.nft(['delete', 'table', 'inet', 'egressd'], { check: false });
    if (cgroup) await net.host.rmCgroup(cgroup);
    expect(await tableText()).toBe('');
  };
  const connects = async (o: { user?: number; cgroup?: string; port?: number } = {}) =>
    (await net.host.connect({ proto: 'tcp', addr: '192.0.2.2', port: o.port ?? 8443, timeoutMs: 1500, ...o })).ok;

  beforeAll(async () => {
    users = ensureTestUsers();
    net = await createTestNet();
    E = `egd-boot-${net.id}`;
    server = await net.inet.listen({ proto: 'tcp', addr: '::', port: 8443 });
    dns = await net.inet.listen({ proto: 'tcp', addr: '::', port: 53 });
  });
  afterAll(async () => {
    await server?.close();
    await dns?.close();
    await net?.destroy();
    for (const dir of states) rmSync(dir, { recursive: true, force: true });
  });

  it('a last good ruleset naming a cgroup that does not exist yet is refused whole by nft; its boot form loads, and default deny and uid identities hold until egressd applies', async () => {
    const svc = `${E}/svc.service`;
    net.host.mkCgroup(svc);
    const state = newState();
    const dir = policyDir({
      '00.yaml': `
defaults: {egress: deny}
apps:
  svc: {identity: {cgroup: "${svc}"}, default: allow}
  user1: {identity: {user: ${users.app1.name}}, default: allow}
`,
    });
    const applied = await cli(state, 'apply', dir);
    expect(applied.code, applied.stderr).toBe(0);
    expect(await connects({ cgroup: svc })).toBe(true);
    expect(await connects()).toBe(false);
    const lastGood = readFileSync(join(state, 'last-good.nft'), 'utf8');
    expect(lastGood).toContain(`"${svc}" : goto`);
    const bootForm = readFileSync(join(state, BOOT_FORM_FILE), 'utf8');
    expect(bootForm).not.toContain(svc);
    // Nothing else differs: the boot form is last-good with the cgroup elements left out.
    expect(bootForm).toBe(lastGood.replace(/\n\t\telements = \{ "[^\n]*" : goto [^\n]* \}/g, ''));

    await boot(svc);
    // The fault the boot form exists for: the whole file is refused, nothing is in force.
    const refused = await net.host.nft(['-f', join(state, 'last-good.nft')], { check: false });
    expect(refused.code).not.toBe(0);
    expect(refused.stderr).toContain('cgroupv2 path fails');
    expect(await tableText()).toBe('');

    const ran = await early(state);
    expect(ran.stdout).toContain(`last good ruleset in force (${join(state, BOOT_FORM_FILE)})`);
    expect(ran.code).toBe(0);
    expect(await connects()).toBe(false);
    expect(await connects({ user: users.app1.uid })).toBe(true);
    // The unit's cgroup appears after the table: until egressd adds it, the default decides — deny, not an accidental allow.
    expect(await connects({ cgroup: svc })).toBe(false);

    // A re-run over the table in force loads nothing.
    const before = await tableText();
    const again = await early(state);
    expect(again.stdout).toContain('already in force; nothing loaded');
    expect(again.code).toBe(0);
    expect(await tableText()).toBe(before);

    // egressd's first apply swaps over the boot form, and the cgroup is back in its set.
    const reapplied = await cli(state, 'apply', dir);
    expect(reapplied.code, reapplied.stderr).toBe(0);
    expect(await connects({ cgroup: svc })).toBe(true);
    expect(await connects()).toBe(false);
  });

  it('keeps the system domains by user, the Tor confinement and lockdown as they were switched', async () => {
    const vault = `${E}/vault.service`;
    net.host.mkCgroup(vault);
    const state = newState();
    const dir = policyDir({
      '00.yaml': `
defaults: {egress: allow}
identities:
  updater: {user: ${users.app2.name}}
systemDomains:
  offline: {members: [{user: ${users.app1.name}}, {cgroup: "${vault}"}]}
tor: {enabled: true, socks: "127.0.0.1:9050", user: ${users.app3.name}, updaters: [updater]}
`,
    });
    expect((await cli(state, 'apply', dir)).code).toBe(0);
    await boot(vault);
    expect((await early(state)).code).toBe(0);
    expect(await connects()).toBe(true);
    expect(await connects({ user: users.app1.uid })).toBe(false);
    expect(await connects({ user: users.app2.uid })).toBe(false);
    expect(await connects({ user: users.app3.uid })).toBe(true);

    net.host.mkCgroup(vault);
    const locked = await cli(state, 'lockdown', 'on', dir);
    expect(locked.code, locked.stderr).toBe(0);
    await boot(vault);
    expect((await early(state)).code).toBe(0);
    expect(await tableText()).toMatch(/chain lockdown/);
    expect(await connects()).toBe(false);
    expect(await connects({ user: users.app1.uid })).toBe(false);
  });

  it('leaves out an allow that ends at a time: at boot it may have ended long ago, and only an apply takes a rule out; an allow for always holds', async () => {
    // No table from the test before (it left lockdown on, which an apply keeps).
    await boot();
    const state = newState();
    const later = new Date(Date.now() + 3_600_000).toISOString();
    const dir = policyDir({
      '00.yaml': `
defaults: {egress: deny}
apps:
  for-a-while: {identity: {user: ${users.app1.name}}, default: deny}
  for-always: {identity: {user: ${users.app2.name}}, default: deny}
allowed:
  - {app: for-a-while, allow: ["192.0.2.2"], until: "${later}", why: boot test}
  - {app: for-always, allow: ["192.0.2.2"], why: boot test}
`,
    });
    expect((await cli(state, 'apply', dir)).code).toBe(0);
    expect(await connects({ user: users.app1.uid })).toBe(true);
    expect(await connects({ user: users.app2.uid })).toBe(true);
    // The rule goes (its address set stays, unused).
    expect(readFileSync(join(state, 'last-good.nft'), 'utf8')).toMatch(/accept comment "[^"]* app\/for-a-while\/allowed\/0/);
    expect(readFileSync(join(state, BOOT_FORM_FILE), 'utf8')).not.toMatch(/accept comment "[^"]* app\/for-a-while\/allowed\/0/);
    await boot();
    expect((await early(state)).code).toBe(0);
    expect(await connects({ user: users.app1.uid })).toBe(false);
    expect(await connects({ user: users.app2.uid })).toBe(true);
    // egressd's apply puts back what is still in time.
    expect((await cli(state, 'apply', dir)).code).toBe(0);
    expect(await connects({ user: users.app1.uid })).toBe(true);
  });

  it('with no last good ruleset, loads the shipped default in its fail-safe form: its DNS confinement holds, the rest is allowed', async () => {
    const state = newState();
    await boot();
    const ran = await early(state);
    expect(ran.stdout).toContain(`no last good ruleset yet; the shipped default's fail-safe form is in force (${FAILSAFE})`);
    expect(ran.code).toBe(0);
    expect(await tableText()).toContain('dns/exclusive');
    expect(await connects({ port: 53 })).toBe(false);
    expect(await connects()).toBe(true);
  });

  it('falls back to the fail-safe form when the last good ruleset cannot be loaded, and says so (exit 1)', async () => {
    const state = newState();
    writeFileSync(join(state, BOOT_FORM_FILE), 'table inet egressd { this is not nft }\n');
    await boot();
    const ran = await early(state);
    expect(ran.stderr).toContain(`nft refused ${join(state, BOOT_FORM_FILE)}`);
    expect(ran.stderr).toContain("the shipped default's fail-safe form is in force");
    expect(ran.code).toBe(1);
    expect(await tableText()).toContain('dns/exclusive');
  });
});
