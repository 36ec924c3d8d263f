import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestNet, ensureTestUsers, harnessUnavailableReason, type Server, type Session, type TestNet } from '../harness/index.js';
import { policyDir } from '../support/policy-dir.js';

/**
 * What a policy change does to connections already open, in the kernel.
 * Explicit denies apply to every packet, established connections and replies
 * included; a default deny applies to new connections only; and a table
 * without a default deny leaves connection tracking off. Every test checks
 * what the client got and what the server saw.
 */
const ROOT = join(import.meta.dirname, '..', '..');
const CLI = join(ROOT, 'src/cli/main.ts');
const unavailable = harnessUnavailableReason();

async function apply(net: TestNet, state: string, dir: string): Promise<void> {
  const result = await net.host.node(CLI, ['apply', dir], { env: { ...process.env, EGRESSD_STATE_DIR: state } });
  if (result.code !== 0) throw new Error(`apply failed: ${result.stderr}`);
}

/** Packets the live rule `id` dropped (counters start again at each apply). */
async function dropsOf(net: TestNet, state: string, dir: string, id: string): Promise<number> {
  const result = await net.host.node(CLI, ['status', dir, '--json'], { env: { ...process.env, EGRESSD_STATE_DIR: state } });
  if (!result.stdout) throw new Error(`status printed nothing: ${result.stderr}`);
  const report = JSON.parse(result.stdout) as { dropped: { id: string; packets: number }[] };
  return report.dropped.find((d) => d.id === id)?.packets ?? 0;
}

/**
 * Connections conntrack tracks in the host namespace (per namespace). No file
 * means the conntrack module is not loaded at all: nothing is tracked.
 */
async function conntrackCount(net: TestNet): Promise<number> {
  const r = await net.host.exec('cat', ['/proc/sys/net/netfilter/nf_conntrack_count']);
  if (r.code !== 0 && /No such file/.test(r.stderr)) return 0;
  if (r.code !== 0) throw new Error(`nf_conntrack_count: ${r.stderr}`);
  return Number(r.stdout.trim());
}

const texts = async (server: Server) => (await server.seen()).map((s) => s.text);

describe.skipIf(unavailable)(`established connections and policy changes ${unavailable ? `(skipped: ${unavailable})` : ''}`, () => {
  let net: TestNet;
  let state: string;
  let E: string;
  const open: (Server | Session)[] = [];
  /** A line server on the internet side, closed after the file (a late resend then meets a closed port). */
  const lineServer = async (addr: string) => {
    const server = await net.inet.listen({ proto: 'tcp', addr, port: 0, lines: true });
    open.push(server);
    return server;
  };
  const session = async (...args: Parameters<TestNet['host']['session']>) => {
    const s = await net.host.session(...args);
    open.push(s);
    return s;
  };

  beforeAll(async () => {
    ensureTestUsers();
    net = await createTestNet();
    E = `egd-est-${net.id}`;
    net.host.mkCgroup(`${E}/web`);
    state = mkdtempSync(join(tmpdir(), 'egd-est-state-'));
  });
  afterAll(async () => {
    for (const x of open) await x.close().catch(() => {});
    await net?.destroy();
    if (state) rmSync(state, { recursive: true, force: true });
  });

  // The first two tests need conntrack never to have been on in this namespace: they come first.

  it('default allow: a global deny applied later cuts a connection opened before it; new connections fail too', async () => {
    const server = await lineServer('192.0.2.2');
    await apply(net, state, policyDir({ '00.yaml': 'defaults: {egress: allow}\n' }));
    const s = await session({ addr: '192.0.2.2', port: server.port });
    expect(s.connected).toBe(true);
    expect(await s.send('before the deny')).toBe(true);

    const dir = policyDir({ '00.yaml': `defaults: {egress: allow}\ndeny:\n  - to: [192.0.2.2]\n    ports: [${server.port}]\n    proto: tcp\n` });
    await apply(net, state, dir);
    expect(await s.send('after the deny', 1500)).toBe(false);
    expect(await net.host.connect({ proto: 'tcp', addr: '192.0.2.2', port: server.port, timeoutMs: 800 })).toMatchObject({ ok: false, error: 'ETIMEDOUT' });
    expect(await texts(server)).toEqual(['before the deny']);
    expect(s.received).toEqual(['echo before the deny']);
    // The deny rule dropped them (resends of the line, and the new SYN).
    expect(await dropsOf(net, state, dir, 'deny/00.yaml/0')).toBeGreaterThanOrEqual(2);
  });

  it('a connection opened while conntrack was off is new to it: after a switch to default deny it passes only where a rule allows it', async () => {
    const server = await lineServer('192.0.2.2');
    await apply(net, state, policyDir({ '00.yaml': 'defaults: {egress: allow}\n' }));
    const other = await session({ addr: '192.0.2.2', port: server.port });
    const web = await session({ addr: '192.0.2.2', port: server.port, cgroup: `${E}/web` });
    expect(await other.send('other, before')).toBe(true);
    expect(await web.send('web, before')).toBe(true);
    expect(await conntrackCount(net)).toBe(0); // the precondition: neither connection is tracked

    await apply(
      net,
      state,
      policyDir({
        '00.yaml': `defaults: {egress: deny}\napps:\n  web: {identity: {cgroup: "${E}/web"}, rules: [{allow: [192.0.2.2], ports: [${server.port}], proto: tcp}]}\n`,
      }),
    );
    expect(await other.send('other, after', 1500)).toBe(false);
    expect(await web.send('web, after')).toBe(true);
    expect((await texts(server)).sort()).toEqual(['other, before', 'web, after', 'web, before']);
  });

  it('default deny: an app connection outlives a re-apply that drops its allow, until an explicit deny cuts it; new connections fail', async () => {
    const server = await lineServer('2001:db8:1::2');
    const app = (rules: string) => `defaults: {egress: deny}\napps:\n  web: {identity: {cgroup: "${E}/web"}, rules: ${rules}}\n`;
    await apply(net, state, policyDir({ '00.yaml': app(`[{allow: ["2001:db8:1::2"], ports: [${server.port}], proto: tcp}]`) }));
    const s = await session({ addr: '2001:db8:1::2', port: server.port, cgroup: `${E}/web` });
    expect(s.connected).toBe(true);
    expect(await s.send('allowed')).toBe(true);
    expect(await conntrackCount(net)).toBeGreaterThan(0); // tracked now

    const withoutAllow = policyDir({ '00.yaml': app('[]') });
    await apply(net, state, withoutAllow);
    expect(await s.send('no longer allowed, established')).toBe(true);
    expect(await net.host.connect({ proto: 'tcp', addr: '2001:db8:1::2', port: server.port, cgroup: `${E}/web`, timeoutMs: 800 })).toMatchObject({
      ok: false,
      error: 'ETIMEDOUT',
    });
    expect(await dropsOf(net, state, withoutAllow, 'app/web/default')).toBeGreaterThan(0);

    const denied = policyDir({ '00.yaml': `${app('[]')}deny:\n  - to: ["2001:db8:1::2"]\n` });
    await apply(net, state, denied);
    expect(await s.send('explicitly denied', 1500)).toBe(false);
    expect(await dropsOf(net, state, denied, 'deny/00.yaml/0')).toBeGreaterThan(0);
    expect(await texts(server)).toEqual(['allowed', 'no longer allowed, established']);
    expect(s.received).toEqual(['echo allowed', 'echo no longer allowed, established']);
  });

  for (const [family, host, inet] of [
    ['IPv4', '192.0.2.1', '192.0.2.2'],
    ['IPv6', '2001:db8::1', '2001:db8::2'],
  ] as const) {
    it(`default deny: a server on the host answers a client on the internet (${family}), while the host cannot open a connection out`, async () => {
      await apply(net, state, policyDir({ '00.yaml': 'defaults: {egress: deny}\n' }));
      const server = await net.host.listen({ proto: 'tcp', addr: host, port: 0, lines: true });
      open.push(server);
      const client = await net.inet.session({ addr: host, port: server.port });
      open.push(client);
      expect(client.connected).toBe(true); // the SYN-ACK got out
      expect(await client.send('hello')).toBe(true); // and so did the echo
      expect(client.received).toEqual(['echo hello']);
      expect((await server.seen()).map((r) => [r.text, r.peer])).toEqual([['hello', inet]]);

      const outward = await lineServer(inet);
      expect(await net.host.connect({ proto: 'tcp', addr: inet, port: outward.port, timeoutMs: 800 })).toMatchObject({ ok: false, error: 'ETIMEDOUT' });
      expect(await outward.count()).toBe(0);
    });
  }
});

describe.skipIf(unavailable)(`connection tracking only for a default deny ${unavailable ? `(skipped: ${unavailable})` : ''}`, () => {
  let net: TestNet;
  let state: string;
  let E: string;
  let server: Server;
  beforeAll(async () => {
    ensureTestUsers();
    net = await createTestNet(); // a namespace of its own, where conntrack has never been on
    E = `egd-notrack-${net.id}`;
    for (const cg of ['web', 'vault']) net.host.mkCgroup(`${E}/${cg}`);
    state = mkdtempSync(join(tmpdir(), 'egd-ct-state-'));
    server = await net.inet.listen({ proto: 'tcp', addr: '::', port: 8443 });
  });
  afterAll(async () => {
    await server?.close();
    await net?.destroy();
    if (state) rmSync(state, { recursive: true, force: true });
  });

  it('a policy without a default deny leaves conntrack off through traffic; a default deny turns it on', async () => {
    // The shape of the shipped policy: default allow, deny lists, apps with explicit rules; plus a system domain.
    const noDefaultDeny = `
defaults: {egress: allow}
apps:
  web: {identity: {cgroup: "${E}/web"}, rules: [{deny: [198.51.100.1]}, {allow: [192.0.2.2], ports: [8443], proto: tcp}]}
deny:
  - to: [203.0.113.0/24, "2001:db8:1::3"]
systemDomains:
  offline: {members: [{cgroup: "${E}/vault"}]}
`;
    await apply(net, state, policyDir({ '00.yaml': noDefaultDeny }));
    const live = (await net.host.nft(['list', 'table', 'inet', 'egressd'])).stdout;
    expect(live).toContain('jump global_deny');
    expect(live).not.toMatch(/\bct (state|direction|status|mark|label|zone|helper|count)\b/);

    const tries = [
      { addr: '192.0.2.2', cgroup: `${E}/web`, ok: true },
      { addr: '2001:db8::2', ok: true },
      { addr: '198.51.100.2', ok: true },
      { addr: '192.0.2.2', ok: true },
      { addr: '198.51.100.1', cgroup: `${E}/web`, ok: false },
      { addr: '203.0.113.1', ok: false },
      { addr: '192.0.2.2', cgroup: `${E}/vault`, ok: false },
    ];
    for (const t of tries) {
      const r = await net.host.connect({ proto: 'tcp', addr: t.addr, port: 8443, timeoutMs: t.ok ? 2000 : 500, ...(t.cgroup ? { cgroup: t.cgroup } : {}) });
      expect(r.ok, t.addr).toBe(t.ok);
    }
    expect((await server.seen()).map((s) => s.local)).toEqual(['192.0.2.2', '2001:db8::2', '198.51.100.2', '192.0.2.2']);
    expect(await conntrackCount(net)).toBe(0);

    // The control: the same measurement sees connections once a default deny is in force.
    await apply(net, state, policyDir({ '00.yaml': noDefaultDeny.replace('egress: allow', 'egress: deny') }));
    // Its own identity's established connections (egressd's bits of the ct mark, listed by nft as a /16 prefix).
    expect((await net.host.nft(['list', 'table', 'inet', 'egressd'])).stdout).toMatch(/ct state established,related ct mark 0x[0-9a-f]{4}0000\/16 accept/);
    for (let i = 0; i < 3; i++) expect((await net.host.connect({ proto: 'tcp', addr: '192.0.2.2', port: 8443, cgroup: `${E}/web` })).ok).toBe(true);
    expect(await server.count()).toBe(7);
    expect(await conntrackCount(net)).toBeGreaterThanOrEqual(3);
  });
});
