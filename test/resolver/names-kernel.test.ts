import type { ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestNet, ensureTestUsers, harnessUnavailableReason, type Server, type TestNet, type TestUsers } from '../harness/index.js';
import { lastAcks, timeWaits } from '../support/close-first.js';
import { nflogPrefixes } from '../support/nflog.js';
import { policyDir } from '../support/policy-dir.js';
import { applyAndStartResolver, CLI, startAuthority } from '../support/resolver-net.js';
import { printed, until } from '../support/wait.js';

/**
 * Issue 18: names that hold. A real authoritative DNS server (dnsmasq) in
 * the "internet", egressd's resolver on the host's loopback, the table
 * applied by egressctl, and clients running as the test users. Every test
 * checks what the internet side saw, or what a real client got.
 */
const TRACKING = join(import.meta.dirname, '..', '..', 'policies/lists/tracking.txt');
const unavailable =
  harnessUnavailableReason() ??
  (existsSync('/usr/sbin/dnsmasq') && existsSync('/usr/bin/dig') ? undefined : 'dnsmasq or dig is not installed (scripts/setup.sh)');

const AUTHORITY = '198.51.100.53';
const RESOLVER = '127.0.0.153';
const GROUP = 7745;
/** A name of the shipped 143,876-name list, and one below it that the list does not name (its lines are exact names). */
const TRACKER = 'analytics-api.decluttr.com';

interface Dig {
  status: string;
  addresses: string[];
}

describe.skipIf(unavailable)(`names in rules are enforced once the resolver answered them ${unavailable ? `(skipped: ${unavailable})` : ''}`, () => {
  let net: TestNet;
  let users: TestUsers;
  let state: string;
  let hosts: string;
  let authority: ChildProcess;
  let resolver: ChildProcess;
  let web: Server;
  let dir: string;
  const env = () => ({ ...process.env, EGRESSD_STATE_DIR: state });

  /** The authority's records: one "ADDRESS NAME" per line, re-read on SIGHUP. */
  function setRecords(lines: readonly string[]): void {
    writeFileSync(hosts, `${lines.join('\n')}\n`);
  }

  async function dig(name: string, user: string, type: 'A' | 'AAAA' = 'A', server = RESOLVER): Promise<Dig> {
    const result = await net.host.exec('dig', [`@${server}`, '+tries=1', '+time=2', '+noall', '+comments', '+answer', name, type], { user, timeoutMs: 6000 });
    const status =
      /status: ([A-Z]+)/.exec(result.stdout)?.[1] ?? (result.stdout.includes('timed out') || result.code === 9 ? 'TIMEOUT' : `dig exit ${result.code}`);
    const addresses = result.stdout
      .split('\n')
      .filter((line) => !line.startsWith(';'))
      .map((line) => line.trim().split(/\s+/))
      .filter((fields) => fields[3] === type)
      .map((fields) => fields[4] ?? '');
    return { status, addresses };
  }

  const reach = (addr: string, user: string, timeoutMs = 800) => net.host.connect({ proto: 'tcp', addr, port: web.port, user, timeoutMs });

  /** Whether the live DNS sets hold `addr` (the resolver put it there, or it has not expired yet). */
  async function inSets(addr: string): Promise<boolean> {
    const listing = await net.host.nft(['-j', 'list', 'table', 'inet', 'egressd']);
    return listing.stdout.includes(`"${addr}"`);
  }

  beforeAll(async () => {
    users = ensureTestUsers();
    net = await createTestNet({
      inetAddrs: [
        AUTHORITY,
        '203.0.113.10',
        '203.0.113.11',
        '203.0.113.12',
        '203.0.113.13',
        '203.0.113.14',
        // No name answers it: an address nothing of this file's lookups ever opened.
        '203.0.113.15',
        '203.0.113.20',
        '203.0.113.30',
        '203.0.113.31',
        '203.0.113.32',
        '203.0.113.40',
        '2001:db8:1::10',
      ],
    });
    state = mkdtempSync(join(tmpdir(), 'egd-names-state-'));
    hosts = join(state, 'authority.hosts');
    setRecords([
      '203.0.113.10 api.example.test',
      '2001:db8:1::10 api.example.test',
      '203.0.113.13 new.example.test',
      `203.0.113.20 ${TRACKER}`,
      `203.0.113.40 sub.${TRACKER}`,
      '203.0.113.20 telemetry.example.test',
      '203.0.113.20 a.telemetry.example.test',
      '203.0.113.31 fine.example.test',
      '203.0.113.31 spared.tracker.test',
      '203.0.113.32 spared2.tracker.test',
      '203.0.113.32 later.example.test',
    ]);
    authority = startAuthority(net, AUTHORITY, [
      `--addn-hosts=${hosts}`,
      // Short TTLs: expiry is part of what is tested.
      '--local-ttl=2',
      `--cname=alias.example.test,${TRACKER}`,
      // A long TTL: what a re-apply must keep.
      '--host-record=long.example.test,203.0.113.12,3600',
      // An IPv4-mapped AAAA: a dual-stack socket connects to it as IPv4.
      '--host-record=mapped.example.test,::ffff:203.0.113.14,3600',
      // The shared address: long enough for explain and status to be asked while both names hold.
      '--host-record=good.example.test,203.0.113.30,3600',
      '--host-record=shared.tracker.test,203.0.113.30,3600',
      // Longer than the resolver's EDNS buffer upstream (1232 bytes): truncated over UDP, asked again over TCP.
      `--txt-record=big.example.test,${['a', 'b', 'c', 'd', 'e', 'f'].map((c) => c.repeat(250)).join(',')}`,
    ]);
    web = await net.inet.listen({ proto: 'tcp', addr: '::', port: 0 });
    dir = policyDir(
      {
        'lists/tracking.txt': readFileSync(TRACKING),
        '00.yaml': `
defaults: {egress: allow, log: {denials: true, group: ${GROUP}}}
dns: {upstreams: ["${AUTHORITY}"], listen: ["${RESOLVER}"], ttlFloor: 1, ttlCap: 3600}
lists:
  tracking: {file: lists/tracking.txt, format: plain}
deny:
  - to: ["@tracking", "*.telemetry.example.test", "shared.tracker.test"]
  - to: ["spared.tracker.test", "spared2.tracker.test"]
    sharedAddresses: spare
apps:
  api:
    identity: {user: ${users.app2.name}}
    default: deny
    rules:
      - allow: ["api.example.test", "long.example.test"]
        ports: [${web.port}]
        proto: tcp
      - allow: ["mapped.example.test"]
        ports: [${web.port}]
        proto: tcp
  fan:
    identity: {user: ${users.app1.name}}
    rules:
      - allow: ["${TRACKER}"]
`,
      },
      { keep: true },
    );
    resolver = await applyAndStartResolver(net, dir, env());
  }, 90_000);

  afterAll(async () => {
    authority?.kill();
    resolver?.kill();
    await web?.close().catch(() => {});
    await net?.destroy();
    if (state) rmSync(state, { recursive: true, force: true });
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('a default-deny app reaches a name it may reach only after looking it up, on the first try, and not after the answer expired', async () => {
    const app = users.app2.name;
    expect(await reach('203.0.113.10', app), 'before any lookup').toMatchObject({ ok: false });
    expect(await dig('api.example.test', app)).toEqual({ status: 'NOERROR', addresses: ['203.0.113.10'] });
    expect(await reach('203.0.113.10', app), 'first connection after the lookup').toMatchObject({ ok: true });
    expect(await reach('2001:db8:1::10', app), 'IPv6, before its lookup').toMatchObject({ ok: false });
    expect(await dig('api.example.test', app, 'AAAA')).toEqual({ status: 'NOERROR', addresses: ['2001:db8:1::10'] });
    expect(await reach('2001:db8:1::10', app), 'IPv6, after').toMatchObject({ ok: true });
    // TTL 2 s: the set element expires with it, and no lookup renews it.
    await until('the element of 203.0.113.10 expired', async () => !(await inSets('203.0.113.10')), { timeoutMs: 10_000, everyMs: 250 });
    expect(await reach('203.0.113.10', app), 'after expiry').toMatchObject({ ok: false });

    // The authority rotates the name to another address: the next lookup follows it.
    setRecords(readFileSync(hosts, 'utf8').replace('203.0.113.10 api.example.test', '203.0.113.11 api.example.test').split('\n').filter(Boolean));
    authority.kill('SIGHUP');
    await until('the rotated address answered', async () => (await dig('api.example.test', app)).addresses[0] === '203.0.113.11', {
      timeoutMs: 10_000,
      everyMs: 300,
    });
    expect(await reach('203.0.113.11', app)).toMatchObject({ ok: true });
    expect(await reach('203.0.113.10', app), 'the old address').toMatchObject({ ok: false });
  });

  it('an IPv4-mapped AAAA opens the IPv4 address the kernel sends a connection to it as', async () => {
    const app = users.app2.name;
    expect(await reach('::ffff:203.0.113.14', app), 'before any lookup').toMatchObject({ ok: false });
    expect(await dig('mapped.example.test', app, 'AAAA')).toEqual({ status: 'NOERROR', addresses: ['::ffff:203.0.113.14'] });
    // The address as the answer gave it, from a dual-stack socket: it leaves as IPv4 to 203.0.113.14.
    expect(await reach('::ffff:203.0.113.14', app), 'the answer, as given').toMatchObject({ ok: true });
    expect(await reach('203.0.113.14', app), 'the same address, as IPv4').toMatchObject({ ok: true });
    // Not 203.0.113.11: the test before learned it for this app, and its answer may still stand.
    expect(await reach('203.0.113.15', app), 'another address').toMatchObject({ ok: false });
  });

  it('a listed name is NXDOMAIN for everyone but the app allowed it, and its address is dropped for others once learned', async () => {
    expect(await dig(TRACKER, users.app3.name)).toMatchObject({ status: 'NXDOMAIN', addresses: [] });
    expect(await dig(TRACKER, users.app1.name)).toEqual({ status: 'NOERROR', addresses: ['203.0.113.20'] });
    // Learned for the deny rule too: the address hard-coded by anyone else is dropped.
    const before = await web.count();
    expect(await reach('203.0.113.20', users.app3.name)).toMatchObject({ ok: false });
    expect(await reach('203.0.113.20', users.app1.name), 'the app allowed it').toMatchObject({ ok: true });
    expect(await web.count()).toBe(before + 1);
    // The list's lines are exact names: a name below one is not on it.
    expect(await dig(`sub.${TRACKER}`, users.app3.name)).toEqual({ status: 'NOERROR', addresses: ['203.0.113.40'] });
    // "*.x" covers x and every name below it.
    expect((await dig('telemetry.example.test', users.app3.name)).status).toBe('NXDOMAIN');
    expect((await dig('a.telemetry.example.test', users.app3.name)).status).toBe('NXDOMAIN');
  });

  it('a CNAME chain that ends in a denied name is denied', async () => {
    expect(await dig('alias.example.test', users.app3.name)).toMatchObject({ status: 'NXDOMAIN', addresses: [] });
  });

  it('nobody but the resolver sends DNS or DNS-over-TLS off the host: dropped, logged with its rule, never seen', async () => {
    const dns = await net.inet.listen({ proto: 'udp', addr: '203.0.113.30', port: 53 });
    const dot = await net.inet.listen({ proto: 'tcp', addr: '203.0.113.30', port: 853 });
    const pcap = join(state, 'nflog.pcap');
    const capture = net.host.spawn('tcpdump', ['-i', `nflog:${GROUP}`, '-U', '-w', pcap]);
    const exited = new Promise<void>((resolve) => capture.once('exit', () => resolve()));
    await printed(capture, 'stderr', `listening on nflog:${GROUP}`);
    try {
      expect(await dig('api.example.test', users.app3.name, 'A', AUTHORITY), 'straight to the authority').toMatchObject({ status: 'TIMEOUT' });
      expect(await net.host.connect({ proto: 'udp', addr: '203.0.113.30', port: 53, user: users.app3.name, timeoutMs: 800 })).toMatchObject({ ok: false });
      expect(await net.host.connect({ proto: 'tcp', addr: '203.0.113.30', port: 853, user: users.app3.name, timeoutMs: 800 })).toMatchObject({ ok: false });
      // Root is no exception: only the resolver's marked sockets are.
      expect(await net.host.connect({ proto: 'udp', addr: '203.0.113.30', port: 53, timeoutMs: 800 })).toMatchObject({ ok: false });
      await until('three NFLOG records', () => nflogPrefixes(existsSync(pcap) ? readFileSync(pcap) : Buffer.alloc(0)).length >= 3, { timeoutMs: 5000 });
    } finally {
      capture.kill('SIGINT');
      await exited;
    }
    expect(await dns.count()).toBe(0);
    expect(await dot.count()).toBe(0);
    const prefixes = nflogPrefixes(readFileSync(pcap));
    expect(prefixes.every((p) => p.startsWith('egd '))).toBe(true);
    // While the resolver's own upstream queries pass.
    expect((await dig('fine.example.test', users.app3.name)).status).toBe('NOERROR');
    await dns.close();
    await dot.close();
  });

  it("the resolver's own TCP queries upstream end cleanly: its last ACK leaves while it holds the socket, nothing is dropped", async () => {
    const drops = async () => {
      const result = await net.host.node(CLI, ['status', dir, '--json'], { env: env() });
      return (JSON.parse(result.stdout) as { dropped: { id: string; packets: number }[] }).dropped.find((d) => d.id === 'dns/exclusive')?.packets ?? 0;
    };
    const before = { drops: await drops(), timeWaits: await timeWaits(net, AUTHORITY, 53) };
    const result = await net.host.exec('dig', [`@${RESOLVER}`, '+tries=1', '+time=4', '+bufsize=4096', '+noall', '+answer', 'TXT', 'big.example.test'], {
      user: users.app3.name,
      timeoutMs: 8000,
    });
    expect(result.stdout).toContain('f'.repeat(250));
    // It went over TCP, and the resolver closed first and cleanly (a reset leaves no TIME_WAIT): its socket waits in TIME_WAIT.
    expect(await timeWaits(net, AUTHORITY, 53)).toBeGreaterThan(before.timeWaits);
    // Closed at once, its last ACK would have left from TIME_WAIT without an owner, been dropped as anyone's DNS, and left the
    // authority in LAST_ACK resending its FIN for minutes (measured before the resolver waited for the server's FIN).
    await until('the authority to hold no connection in LAST_ACK', async () => (await lastAcks(net, 53)) === 0, { timeoutMs: 3000 });
    expect(await drops()).toBe(before.drops);
  });

  it('an address shared by a denied name and an allowed one stays denied by default, and spared where the rule says so', async () => {
    const user = users.app3.name;
    expect((await dig('good.example.test', user)).addresses).toEqual(['203.0.113.30']);
    expect(await reach('203.0.113.30', user), 'nothing denies it yet').toMatchObject({ ok: true });
    expect((await dig('shared.tracker.test', user)).status).toBe('NXDOMAIN');
    expect(await reach('203.0.113.30', user), 'the deny holds for the shared address').toMatchObject({ ok: false });
    const explained = await net.host.node(CLI, ['explain', dir, '--app', `user:${user}`, '--to', '203.0.113.30:443/tcp'], { env: env() });
    expect(explained.stderr).toContain('shared.tracker.test');
    expect(explained.stderr).toContain('good.example.test');
    expect(explained.stderr).toMatch(/^DENIED/);
    const status = await net.host.node(CLI, ['status', dir], { env: env() });
    expect(status.stderr).toMatch(
      /shared: 203\.0\.113\.30 answers (good\.example\.test and shared\.tracker\.test|shared\.tracker\.test and good\.example\.test)/,
    );

    expect((await dig('fine.example.test', user)).addresses).toEqual(['203.0.113.31']);
    expect((await dig('spared.tracker.test', user)).status).toBe('NXDOMAIN');
    expect(await reach('203.0.113.31', user), 'the rule spares addresses shared with names it does not deny').toMatchObject({ ok: true });
    // The other order: denied first, then an allowed name answers the same address, which the rule gives up.
    expect((await dig('spared2.tracker.test', user)).status).toBe('NXDOMAIN');
    expect(await reach('203.0.113.32', user), 'only a denied name answered it so far').toMatchObject({ ok: false });
    expect((await dig('later.example.test', user)).addresses).toEqual(['203.0.113.32']);
    expect(await reach('203.0.113.32', user), 'spared once a name the rule does not deny answers it').toMatchObject({ ok: true });
  });

  it('a re-apply keeps what was learned for names that still stand, and new names work without restarting the resolver', async () => {
    const app = users.app2.name;
    expect((await dig('long.example.test', app)).addresses).toEqual(['203.0.113.12']);
    expect(await reach('203.0.113.12', app)).toMatchObject({ ok: true });
    expect(await reach('203.0.113.13', app), 'not allowed yet').toMatchObject({ ok: false });
    const setHolding = async (addr: string) => {
      const listing = JSON.parse((await net.host.nft(['-j', 'list', 'sets', 'inet'])).stdout) as { nftables: { set?: { name: string } }[] };
      const names = listing.nftables.flatMap((item) => (item.set ? [item.set.name] : [])).filter((name) => name.includes('_dns4'));
      for (const name of names) if ((await net.host.nft(['list', 'set', 'inet', 'egressd', name])).stdout.includes(addr)) return name;
      return undefined;
    };
    const before = await setHolding('203.0.113.12');
    // The rule gains a name: its set is made anew (sets are named by the names that fill them).
    const reloaded = printed(resolver, 'stdout', '"event":"resolver-reloaded"', 20_000);
    writeFileSync(
      join(dir, '00.yaml'),
      readFileSync(join(dir, '00.yaml'), 'utf8').replace(
        '["api.example.test", "long.example.test"]',
        '["api.example.test", "long.example.test", "new.example.test"]',
      ),
    );
    const applied = await net.host.node(CLI, ['apply', dir], { env: env() });
    expect(applied.code, applied.stderr).toBe(0);
    await reloaded;
    const after = await setHolding('203.0.113.12');
    expect(after).toBeDefined();
    expect(after).not.toBe(before);
    expect(await reach('203.0.113.12', app), 'learned before the re-apply, no lookup since').toMatchObject({ ok: true });
    expect((await dig('new.example.test', app)).addresses).toEqual(['203.0.113.13']);
    expect(await reach('203.0.113.13', app), 'a name the re-apply added').toMatchObject({ ok: true });
  });
});
