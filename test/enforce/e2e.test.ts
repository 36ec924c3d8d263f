import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { createTestNet, ensureTestUsers, harnessUnavailableReason, type Server, type TestNet, type TestUsers } from '../harness/index.js';
import { parseLogPrefix } from '../../src/compile/log-prefix.js';
import { readRuleTable } from '../../src/state/rule-table.js';
import { closeFirst } from '../support/close-first.js';
import { describeNflog, nflogPrefixes, nflogRecords } from '../support/nflog.js';
import { policyDir } from '../support/policy-dir.js';
import { printed, until } from '../support/wait.js';

/**
 * egressd's table enforced for real: a host namespace with the table and
 * test apps (cgroups, users, groups), an internet namespace with recording
 * servers. Every test checks both sides: what the client got, and what the
 * server saw.
 */
const ROOT = join(import.meta.dirname, '..', '..');
const CLI = join(ROOT, 'src/cli/main.ts');
const unavailable = harnessUnavailableReason();
const TOR_UID = 4242;

let net: TestNet;
let users: TestUsers;
let servers: Record<string, Server>;
let state: string;
let E: string; // this run's cgroup prefix (the cgroup tree is shared with other test files)

async function apply(dir: string): Promise<void> {
  const result = await net.host.node(CLI, ['apply', dir], { env: { ...process.env, EGRESSD_STATE_DIR: state } });
  if (result.code !== 0) throw new Error(`apply failed: ${result.stderr}`);
}

async function status(dir: string): Promise<{ dropped: { id: string; app?: string; packets: number }[] }> {
  const result = await net.host.node(CLI, ['status', dir, '--json'], { env: { ...process.env, EGRESSD_STATE_DIR: state } });
  if (!result.stdout) throw new Error(`status printed nothing: ${result.stderr}`);
  return JSON.parse(result.stdout) as { dropped: { id: string; app?: string; packets: number }[] };
}

/** The packets a rule dropped; a global rule's for one app chosen by cgroup (its copy of the list), or else its own. */
const dropsOf = async (dir: string, id: string, app?: string) => (await status(dir)).dropped.find((d) => d.id === id && d.app === app)?.packets ?? 0;

function policyB(extraDeny = ''): string {
  return `
defaults: {egress: deny}
identities:
  web: {cgroup: "${E}/web"}
  vault: {cgroup: "${E}/vault"}
  both: {cgroup: "${E}/both"}
  u1: {user: egd-app1}
  grp: {group: egd-grp}
  updater: {user: egd-app2}
apps:
  web: {identity: web, rules: [{allow: [192.0.2.2], ports: [8443], proto: tcp}]}
  vault: {identity: vault, rules: [{allow: any}]}
  u1: {identity: u1, rules: [{allow: [203.0.113.0/24]}]}
  grp: {identity: grp, rules: [{allow: ["2001:db8:1::1"], ports: [8443], proto: tcp}]}
  updater: {identity: updater, rules: [{allow: any}]}
deny:
  - to: [203.0.113.0/24, "2001:db8:1::3"${extraDeny}]
systemDomains:
  offline: {members: [vault, both]}
tor:
  enabled: true
  socks: "[2001:db8::2]:9050"
  user: ${TOR_UID}
  updaters: [updater, both]
`;
}

describe.skipIf(unavailable)(`enforcement end to end ${unavailable ? `(skipped: ${unavailable})` : ''}`, () => {
  beforeAll(async () => {
    users = ensureTestUsers();
    net = await createTestNet();
    E = `egd-e2e-${net.id}`;
    for (const cg of ['web', 'vault', 'both']) net.host.mkCgroup(`${E}/${cg}`);
    state = mkdtempSync(join(tmpdir(), 'egd-e2e-state-'));
    servers = {
      v4: await net.inet.listen({ proto: 'tcp', addr: '192.0.2.2', port: 8443 }),
      v4other: await net.inet.listen({ proto: 'tcp', addr: '192.0.2.2', port: 8444 }),
      v6: await net.inet.listen({ proto: 'tcp', addr: '2001:db8::2', port: 8443 }),
      denied4: await net.inet.listen({ proto: 'tcp', addr: '203.0.113.1', port: 8443 }),
      allowed6: await net.inet.listen({ proto: 'tcp', addr: '2001:db8:1::1', port: 8443 }),
      denied6: await net.inet.listen({ proto: 'tcp', addr: '2001:db8:1::3', port: 8443 }),
      socks: await net.inet.listen({ proto: 'tcp', addr: '2001:db8::2', port: 9050 }),
      udp: await net.inet.listen({ proto: 'udp', addr: '192.0.2.2', port: 5353 }),
    };
  });
  afterAll(async () => {
    await net?.destroy();
    if (state) rmSync(state, { recursive: true, force: true });
  });
  beforeEach(async () => {
    for (const server of Object.values(servers ?? {})) await server.reset();
  });

  it('global deny of an IPv4 and an IPv6 network; everything else passes under default allow', async () => {
    await apply(policyDir({ '00.yaml': 'defaults: {egress: allow}\ndeny:\n  - to: [203.0.113.0/24, "2001:db8:1::/64"]\n' }));
    expect(await net.host.connect({ proto: 'tcp', addr: '203.0.113.1', port: 8443, timeoutMs: 800 })).toMatchObject({ ok: false, error: 'ETIMEDOUT' });
    expect(await net.host.connect({ proto: 'tcp', addr: '2001:db8:1::3', port: 8443, timeoutMs: 800 })).toMatchObject({ ok: false, error: 'ETIMEDOUT' });
    expect(await net.host.connect({ proto: 'tcp', addr: '192.0.2.2', port: 8443 })).toMatchObject({ ok: true });
    expect(await net.host.connect({ proto: 'tcp', addr: '2001:db8::2', port: 8443 })).toMatchObject({ ok: true });
    expect(await servers.denied4!.count()).toBe(0);
    expect(await servers.denied6!.count()).toBe(0);
    expect(await servers.v4!.count()).toBe(1);
    expect(await servers.v6!.count()).toBe(1);
  });

  it('a big list of one prefix length, looked up as a hash set under its mask, denies its networks and nothing else', async () => {
    // 2,048 /64s from 2001:db8:1::/64 on: 2001:db8:1::3 is in one of them, 2001:db8::2 in none.
    const list = Array.from({ length: 2048 }, (_, i) => `2001:db8:${(i + 1).toString(16)}::/64`).join('\n');
    await apply(policyDir({ '00.yaml': 'defaults: {egress: allow}\nlists:\n  big: {file: big.txt}\ndeny:\n  - to: ["@big"]\n', 'big.txt': `${list}\n` }));
    const live = (await net.host.exec('nft', ['list', 'table', 'inet', 'egressd'])).stdout;
    // nft lists the lookup under a mask with an explicit "==".
    expect(live).toMatch(/ip6 daddr & ffff:ffff:ffff:ffff:: (== )?@g0_net6_p64\.[0-9a-f]{16} /);
    expect(await net.host.connect({ proto: 'tcp', addr: '2001:db8:1::3', port: 8443, timeoutMs: 800 })).toMatchObject({ ok: false, error: 'ETIMEDOUT' });
    expect(await net.host.connect({ proto: 'tcp', addr: '2001:db8::2', port: 8443 })).toMatchObject({ ok: true });
    expect(await servers.denied6!.count()).toBe(0);
    expect(await servers.v6!.count()).toBe(1);
  });

  it('a system-domain member written as a template instance is held in the cgroup systemd runs it in: nothing it sends arrives', async () => {
    // systemd runs an instance of a template whose file sets no Slice= in its template's slice, escaped ("-" as \x2d).
    const unit = `vault-agent@${E}.service`;
    const instance = `system.slice/system-vault\\x2dagent.slice/${unit}`;
    net.host.mkCgroup(instance);
    const dir = policyDir({ '00.yaml': `defaults: {egress: allow}\nsystemDomains:\n  offline: {members: [{unit: "${unit}"}]}\n` });
    await apply(dir);
    expect(await net.host.connect({ proto: 'tcp', addr: '192.0.2.2', port: 8443, cgroup: instance, timeoutMs: 800 })).toMatchObject({
      ok: false,
      error: 'ETIMEDOUT',
    });
    expect(await servers.v4!.count()).toBe(0);
    // Where the unit was once looked for, directly in system.slice, is nobody's: the default lets it out.
    expect(await net.host.connect({ proto: 'tcp', addr: '192.0.2.2', port: 8443, cgroup: `system.slice/${unit}` })).toMatchObject({ ok: true });
    expect(await servers.v4!.count()).toBe(1);
    // explain says what the kernel does, for the unit by name.
    const answer = await net.host.node(CLI, ['explain', dir, '--app', `unit:${unit}`, '--to', '192.0.2.2:8443/tcp', '--json'], {
      env: { ...process.env, EGRESSD_STATE_DIR: state },
    });
    expect(JSON.parse(answer.stdout)).toMatchObject({ verdict: 'deny', level: 'system-domain' });
    // The table in force lists back as compiled, the backslash in the path included.
    const shown = await net.host.node(CLI, ['status', dir], { env: { ...process.env, EGRESSD_STATE_DIR: state } });
    expect(shown.code, shown.stderr).toBe(0);
  });

  describe('default deny, one policy with every precedence level', () => {
    let dir: string;
    beforeAll(async () => {
      dir = policyDir({ '00.yaml': policyB() }, { keep: true });
      await apply(dir);
    });
    afterAll(() => rmSync(dir, { recursive: true, force: true }));

    it('an app found by its cgroup reaches exactly its one destination and port; the root cgroup reaches nothing', async () => {
      expect(await net.host.connect({ proto: 'tcp', addr: '192.0.2.2', port: 8443, cgroup: `${E}/web` })).toMatchObject({ ok: true });
      expect(await net.host.connect({ proto: 'tcp', addr: '192.0.2.2', port: 8444, cgroup: `${E}/web`, timeoutMs: 800 })).toMatchObject({
        ok: false,
        error: 'ETIMEDOUT',
      });
      expect(await net.host.connect({ proto: 'tcp', addr: '192.0.2.2', port: 8443, timeoutMs: 800 })).toMatchObject({ ok: false, error: 'ETIMEDOUT' });
      expect(await servers.v4!.count()).toBe(1);
      expect(await servers.v4other!.count()).toBe(0);
    });

    it('apps found by user and by (primary) group; IPv6 neighbour discovery works under default deny', async () => {
      // With the neighbour cache empty, the kernel must solicit the router's address first.
      await net.host.run('ip', ['-6', 'neigh', 'flush', 'all']);
      expect(await net.host.connect({ proto: 'tcp', addr: '2001:db8:1::1', port: 8443, user: users.app3.uid })).toMatchObject({ ok: true });
      expect(await net.host.connect({ proto: 'tcp', addr: '2001:db8:1::1', port: 8443, user: users.app2.uid, timeoutMs: 800 })).toMatchObject({ ok: false });
      expect(await servers.allowed6!.count()).toBe(1);
    });

    it('app rules outrank the global deny list; the global deny list outranks the app default', async () => {
      expect(await net.host.connect({ proto: 'tcp', addr: '203.0.113.1', port: 8443, user: users.app1.uid })).toMatchObject({ ok: true });
      expect(await servers.denied4!.count()).toBe(1);
      const before = await dropsOf(dir, 'deny/00.yaml/0');
      expect(await net.host.connect({ proto: 'tcp', addr: '2001:db8:1::3', port: 8443, user: users.app3.uid, timeoutMs: 800 })).toMatchObject({ ok: false });
      expect(await servers.denied6!.count()).toBe(0);
      expect(await dropsOf(dir, 'deny/00.yaml/0')).toBeGreaterThan(before);
      const defaultBefore = await dropsOf(dir, 'app/grp/default');
      expect(await net.host.connect({ proto: 'tcp', addr: '192.0.2.2', port: 8444, user: users.app3.uid, timeoutMs: 800 })).toMatchObject({ ok: false });
      expect(await dropsOf(dir, 'app/grp/default')).toBeGreaterThan(defaultBefore);
      expect(await servers.v4other!.count()).toBe(0);
    });

    it("an app's connection to an address its own rule allows and the global deny list names ends cleanly: what its closed socket sends passes the list", async () => {
      const before = await dropsOf(dir, 'deny/00.yaml/0');
      // Closed by the client first, the connection's last ACK leaves from TIME_WAIT without an owner: no app is found for it.
      // Its connection's tag names u1, whose own rule lets it reach the address (measured before: the ACK was dropped and
      // logged under the list, and the server stayed in LAST_ACK).
      await closeFirst(net, { addr: '203.0.113.1', port: 8446, user: users.app1.uid });
      expect(await dropsOf(dir, 'deny/00.yaml/0')).toBe(before);
    });

    it('an app chosen by cgroup meets the global deny list too, counted apart in status under its name', async () => {
      const before = await dropsOf(dir, 'deny/00.yaml/0', 'web');
      expect(await net.host.connect({ proto: 'tcp', addr: '203.0.113.1', port: 8443, cgroup: `${E}/web`, timeoutMs: 800 })).toMatchObject({ ok: false });
      expect(await servers.denied4!.count()).toBe(0);
      expect(await dropsOf(dir, 'deny/00.yaml/0', 'web')).toBeGreaterThan(before);
    });

    it('a system domain is offline even where its app rule allows everything; loopback still works', async () => {
      expect(await net.host.connect({ proto: 'tcp', addr: '192.0.2.2', port: 8443, cgroup: `${E}/vault`, timeoutMs: 800 })).toMatchObject({
        ok: false,
        error: 'ETIMEDOUT',
      });
      expect(await net.host.ping('192.0.2.2', { cgroup: `${E}/vault`, timeoutMs: 800 })).toMatchObject({ ok: false });
      expect(await net.host.ping('127.0.0.1', { cgroup: `${E}/vault` })).toMatchObject({ ok: true });
      expect(await servers.v4!.count()).toBe(0);
      expect(await net.inet.icmpEchoCount('192.0.2.2')).toBe(0);
    });

    it('the system domain outranks Tor confinement: a member that is also an updater cannot reach the SOCKS port', async () => {
      expect(await net.host.connect({ proto: 'tcp', addr: '2001:db8::2', port: 9050, cgroup: `${E}/both`, timeoutMs: 800 })).toMatchObject({ ok: false });
      expect(await servers.socks!.count()).toBe(0);
    });

    it('Tor confinement outranks the app rule: an updater reaches only the SOCKS port; Tor itself reaches the network', async () => {
      expect(await net.host.connect({ proto: 'tcp', addr: '2001:db8::2', port: 9050, user: users.app2.uid })).toMatchObject({ ok: true });
      expect(await net.host.connect({ proto: 'tcp', addr: '192.0.2.2', port: 8443, user: users.app2.uid, timeoutMs: 800 })).toMatchObject({ ok: false });
      expect(await net.host.connect({ proto: 'tcp', addr: '192.0.2.2', port: 8444, user: TOR_UID })).toMatchObject({ ok: true });
      // Not even loopback: a local resolver or proxy would do the updater's lookups and fetches for it.
      expect(await net.host.ping('127.0.0.1', { user: users.app2.uid, timeoutMs: 800 })).toMatchObject({ ok: false });
      expect(await servers.socks!.count()).toBe(1);
      expect(await servers.v4!.count()).toBe(0);
      expect(await servers.v4other!.count()).toBe(1);
    });

    it('denials are logged to NFLOG with the id of the rule that dropped them', async () => {
      const pcap = join(state, 'nflog.pcap');
      const capture = net.host.spawn('tcpdump', ['-i', 'nflog:7745', '-U', '-w', pcap]);
      const exited = new Promise<void>((resolve) => capture.once('exit', () => resolve()));
      // tcpdump says so once it is bound to the log group: from then on no logged packet is missed.
      await printed(capture, 'stderr', 'listening on nflog:7745');
      const before = await dropsOf(dir, 'deny/00.yaml/0');
      await net.host.connect({ proto: 'tcp', addr: '2001:db8:1::3', port: 8443, user: users.app3.uid, timeoutMs: 1500 });
      const dropped = (await dropsOf(dir, 'deny/00.yaml/0')) - before;
      // Far under the rule's log limit, so every packet the rule dropped is logged: wait until the capture holds them all.
      const captured = () => nflogPrefixes(existsSync(pcap) ? readFileSync(pcap) : Buffer.alloc(0));
      await until(`${dropped} NFLOG records in ${pcap}`, () => captured().length >= dropped);
      capture.kill('SIGINT');
      await exited;
      const prefixes = nflogPrefixes(readFileSync(pcap));
      const records = nflogRecords(readFileSync(pcap));
      const described = describeNflog(records);
      // app3's own SYNs, logged with its uid, each counted drop once; nothing else. (Before what a closed socket sends met its
      // app's own rules, an ACK of the earlier tests' closed connections from app1 to 203.0.113.1 came too, in every run under
      // load: "uid ? tcp 39108 → 203.0.113.1 8443 … flags 0x10".)
      expect(records.filter((r) => r.uid === users.app3.uid).length, described).toBeGreaterThan(0);
      expect(
        records.filter((r) => r.uid !== users.app3.uid),
        described,
      ).toEqual([]);
      expect(prefixes, described).toHaveLength(dropped);
      // One prefix, a short id that the id table apply left in the state directory maps back to the rule.
      expect(new Set(prefixes).size).toBe(1);
      const table = readRuleTable(state);
      if (table.state !== 'ok') throw new Error(`rules.json: ${JSON.stringify(table)}`);
      expect(table.value.byId.get(parseLogPrefix(prefixes[0]!) ?? '')).toMatchObject({ ruleId: 'deny/00.yaml/0', file: '00.yaml', kind: 'global-deny' });
    });
  });

  it('lockdown: nothing leaves but loopback and Tor itself, until it is switched off', async () => {
    const dir = policyDir({ '00.yaml': policyB() });
    await apply(dir);
    const lockdown = (state_: 'on' | 'off') => net.host.node(CLI, ['lockdown', state_, dir], { env: { ...process.env, EGRESSD_STATE_DIR: state } });
    expect((await lockdown('on')).code).toBe(0);
    expect(await net.host.connect({ proto: 'tcp', addr: '192.0.2.2', port: 8443, cgroup: `${E}/web`, timeoutMs: 800 })).toMatchObject({ ok: false });
    expect(await net.host.connect({ proto: 'tcp', addr: '2001:db8::2', port: 9050, user: users.app2.uid, timeoutMs: 800 })).toMatchObject({ ok: false });
    expect(await net.host.connect({ proto: 'tcp', addr: '192.0.2.2', port: 8444, user: TOR_UID })).toMatchObject({ ok: true });
    expect(await net.host.ping('127.0.0.1')).toMatchObject({ ok: true });
    expect(await servers.v4!.count()).toBe(0);
    expect(await servers.socks!.count()).toBe(0);
    expect(await servers.v4other!.count()).toBe(1);
    expect((await lockdown('off')).code).toBe(0);
    expect(await net.host.connect({ proto: 'tcp', addr: '192.0.2.2', port: 8443, cgroup: `${E}/web` })).toMatchObject({ ok: true });
    expect(await servers.v4!.count()).toBe(1);
  });

  it('atomic replace under load: 50 applies while a denied app floods and an allowed app keeps connecting', async () => {
    const a = policyDir({ '00.yaml': policyB() });
    const b = policyDir({ '00.yaml': policyB(', 198.51.100.0/25') });
    await apply(a);
    const denied = net.host.sendLoop({
      proto: 'udp',
      addr: '192.0.2.2',
      port: 5353,
      user: users.app1.uid,
      count: 200_000,
      intervalMs: 0,
      attemptTimeoutMs: 2,
      maxMs: 60_000,
    });
    // 900 ms per attempt: a SYN lost to the replace is resent only after 1 s, so it would show.
    const allowed = net.host.sendLoop({
      proto: 'tcp',
      addr: '192.0.2.2',
      port: 8443,
      cgroup: `${E}/web`,
      count: 100_000,
      intervalMs: 5,
      attemptTimeoutMs: 900,
      maxMs: 60_000,
    });
    const revisions = await net.host.node(join(import.meta.dirname, 'fixtures', 'apply-revisions.ts'), ['50', b, a], { timeoutMs: 120_000 });
    const floods = await denied.stop();
    const connects = await allowed.stop();
    expect(revisions.code, revisions.stderr).toBe(0);
    // Every generation, the 50 new ones and the first, dropped some of the flood before it was replaced.
    expect(JSON.parse(revisions.stdout)).toMatchObject({ applied: 50, hit: 51 });
    expect(floods.attempts).toBeGreaterThan(51);
    expect(floods.successes).toBe(0);
    expect(await servers.udp!.count()).toBe(0);
    expect(connects.attempts).toBeGreaterThan(20);
    expect(connects.errors).toEqual({});
    expect(connects.successes).toBe(connects.attempts);
  }, 150_000);

  it('no leak while replacing under default allow: a globally denied destination sees nothing during 50 applies', async () => {
    // Measured before applies swapped generations (src/enforce/swap.ts):
    // ~10 of ~70,000 such datagrams got through during 50 applies.
    const deny = (extra: string) =>
      policyDir({ '00.yaml': `defaults: {egress: allow}\ndeny:\n  - to: [192.0.2.2${extra}]\n    ports: [5353]\n    proto: udp\n` });
    const a = deny('');
    const b = deny(', 198.51.100.0/25');
    await apply(a);
    const flood = net.host.sendLoop({
      proto: 'udp',
      addr: '192.0.2.2',
      port: 5353,
      user: users.app1.uid,
      count: 1_000_000,
      intervalMs: 0,
      attemptTimeoutMs: 1,
      maxMs: 60_000,
    });
    const revisions = await net.host.node(join(import.meta.dirname, 'fixtures', 'apply-revisions.ts'), ['50', b, a], { timeoutMs: 120_000 });
    const sent = await flood.stop();
    expect(revisions.code, revisions.stderr).toBe(0);
    // The flood ran across every swap: each generation dropped some of it before the next came.
    expect(JSON.parse(revisions.stdout)).toMatchObject({ applied: 50, hit: 51 });
    expect(sent.attempts).toBeGreaterThan(51);
    expect(await servers.udp!.count()).toBe(0);
  }, 150_000);
});
