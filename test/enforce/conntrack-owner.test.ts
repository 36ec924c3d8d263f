import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestNet, ensureTestUsers, harnessUnavailableReason, type Server, type Session, type TestNet, type TestUsers } from '../harness/index.js';
import { policyDir } from '../support/policy-dir.js';

/**
 * Issue 17, finding 3: a default deny let established packets through
 * whoever sent them, so a default-deny identity that bound the source port
 * of another identity's live UDP flow sent on that flow's conntrack entry.
 * Now a connection carries its identity's tag in its ct mark, and a default
 * deny passes only its own. Every test checks what the internet side saw.
 */
const ROOT = join(import.meta.dirname, '..', '..');
const CLI = join(ROOT, 'src/cli/main.ts');
const unavailable = harnessUnavailableReason();

/** A peer that asks ADDR:PORT one UDP question from SRCPORT and prints the answer (the harness's client runs on the host side only). */
const ASK_FROM_PORT = `
const [addr, port, srcPort] = process.argv.slice(-3);
const s = require('node:dgram').createSocket('udp4');
setTimeout(() => { console.log('timeout'); process.exit(0); }, 2000);
s.on('message', (m) => { console.log(m.toString().trim()); process.exit(0); });
s.bind(Number(srcPort), () => s.send('question', Number(port), addr));
`;

describe.skipIf(unavailable)(`conntrack entries belong to the identity that opened or answered them ${unavailable ? `(skipped: ${unavailable})` : ''}`, () => {
  let net: TestNet;
  let users: TestUsers;
  let state: string;
  const open: (Server | Session)[] = [];

  async function apply(yaml: string): Promise<string> {
    const dir = policyDir({ '00.yaml': yaml });
    const result = await net.host.node(CLI, ['apply', dir], { env: { ...process.env, EGRESSD_STATE_DIR: state } });
    if (result.code !== 0) throw new Error(`apply failed: ${result.stderr}`);
    return dir;
  }

  /** Packets the live rule `id` dropped (counters start again at each apply). */
  async function dropsOf(dir: string, id: string): Promise<number> {
    const result = await net.host.node(CLI, ['status', dir, '--json'], { env: { ...process.env, EGRESSD_STATE_DIR: state } });
    if (!result.stdout) throw new Error(`status printed nothing: ${result.stderr}`);
    const report = JSON.parse(result.stdout) as { dropped: { id: string; packets: number }[] };
    return report.dropped.find((d) => d.id === id)?.packets ?? 0;
  }

  async function udpServer(side: TestNet['host'] | TestNet['inet'], addr: string, port = 0): Promise<Server> {
    const server = await side.listen({ proto: 'udp', addr, port });
    open.push(server);
    return server;
  }

  beforeAll(async () => {
    users = ensureTestUsers();
    net = await createTestNet();
    state = mkdtempSync(join(tmpdir(), 'egd-ctowner-state-'));
  });
  afterAll(async () => {
    for (const x of open) await x.close().catch(() => {});
    await net?.destroy();
    if (state) rmSync(state, { recursive: true, force: true });
  });

  it("a default-deny identity that binds the source port of another identity's live UDP flow sends nothing on it, while the flow goes on", async () => {
    const upstream = await udpServer(net.inet, '192.0.2.2');
    // The resolver may reach its upstream; egd-app2 (the global default) and egd-app3 (an app) deny by default.
    const dir = await apply(
      `defaults: {egress: deny}\napps:\n  resolver: {identity: {user: ${users.app1.name}}, rules: [{allow: [192.0.2.2], ports: [${upstream.port}], proto: udp}]}\n  other: {identity: {user: ${users.app3.name}}}\n`,
    );
    const flow = { proto: 'udp' as const, addr: '192.0.2.2', port: upstream.port, srcPort: 41053 };
    expect(await net.host.connect({ ...flow, user: users.app1.name, payload: 'resolver 1' })).toMatchObject({ ok: true });
    // The resolver's socket is closed now; its conntrack entry (answered, so established) lives on for 30 s.
    for (const who of [users.app2.name, users.app3.name]) {
      // Dropped on the output hook: the send itself fails (EPERM), as for any UDP packet a rule drops.
      expect(await net.host.connect({ ...flow, user: who, payload: `borrower ${who}`, timeoutMs: 800 }), who).toMatchObject({ ok: false, error: 'EPERM' });
    }
    expect(await net.host.connect({ ...flow, user: users.app1.name, payload: 'resolver 2' })).toMatchObject({ ok: true });
    expect((await upstream.seen()).map((s) => [s.peerPort, s.bytes])).toEqual([
      [41053, 'resolver 1'.length],
      [41053, 'resolver 2'.length],
    ]);
    expect(await dropsOf(dir, 'default')).toBeGreaterThanOrEqual(1);
    expect(await dropsOf(dir, 'app/other/default')).toBeGreaterThanOrEqual(1);
  });

  it("answers on a connection that came in: the identity that answered first keeps answering; another one that binds the server's port sends nothing", async () => {
    // The host's server runs as root, an identity of the global default; egd-app2 is an app that denies by default.
    await apply(`defaults: {egress: deny}\napps:\n  other: {identity: {user: ${users.app2.name}}}\n`);
    const service = await udpServer(net.host, '192.0.2.1', 41054);
    // A peer on the internet asks from port 41055; the answer goes out as the connection's reply direction, and claims it.
    const asked = await net.inet.exec(process.execPath, ['-e', ASK_FROM_PORT, '192.0.2.1', '41054', '41055']);
    expect(asked.stdout.trim(), asked.stderr).toBe('ok');
    expect(await service.count()).toBe(1);
    await service.close();
    const peer = await udpServer(net.inet, '192.0.2.2', 41055);
    const reply = { proto: 'udp' as const, addr: '192.0.2.2', port: 41055, srcPort: 41054 };
    expect(await net.host.connect({ ...reply, user: users.app2.name, payload: 'borrower', timeoutMs: 800 })).toMatchObject({ ok: false, error: 'EPERM' });
    expect(await peer.count()).toBe(0);
    // The service's own identity still answers on it (reply direction, its own mark).
    expect(await net.host.connect({ ...reply, payload: 'service' })).toMatchObject({ ok: true });
    expect((await peer.seen()).map((s) => [s.peer, s.peerPort, s.bytes])).toEqual([['192.0.2.1', 41054, 'service'.length]]);
  });

  it("a uid-identified default-deny app's TCP connection outlives a re-apply that drops its allow; its new connections fail", async () => {
    const server = await net.inet.listen({ proto: 'tcp', addr: '192.0.2.2', port: 0, lines: true });
    open.push(server);
    const app = (rules: string) => `defaults: {egress: deny}\napps:\n  web: {identity: {user: ${users.app1.name}}, rules: ${rules}}\n`;
    await apply(app(`[{allow: [192.0.2.2], ports: [${server.port}], proto: tcp}]`));
    const s = await net.host.session({ addr: '192.0.2.2', port: server.port, user: users.app1.name });
    open.push(s);
    expect(s.connected).toBe(true);
    expect(await s.send('allowed')).toBe(true);
    const dir = await apply(app('[]'));
    expect(await s.send('no longer allowed, established')).toBe(true);
    expect(await net.host.connect({ proto: 'tcp', addr: '192.0.2.2', port: server.port, user: users.app1.name, timeoutMs: 800 })).toMatchObject({
      ok: false,
      error: 'ETIMEDOUT',
    });
    expect(await dropsOf(dir, 'app/web/default')).toBeGreaterThan(0);
    expect((await server.seen()).map((r) => r.text)).toEqual(['allowed', 'no longer allowed, established']);
  });

  it("a uid-identified app's connection, closed, still ends cleanly under a global default deny: its orphaned socket's packets have no owner", async () => {
    const server = await net.inet.listen({ proto: 'tcp', addr: '192.0.2.2', port: 0, lines: true });
    open.push(server);
    await apply(
      `defaults: {egress: deny}\napps:\n  web: {identity: {user: ${users.app1.name}}, rules: [{allow: [192.0.2.2], ports: [${server.port}], proto: tcp}]}\n`,
    );
    const s = await net.host.session({ addr: '192.0.2.2', port: server.port, user: users.app1.name });
    expect(await s.send('hello')).toBe(true);
    await s.close();
    // The server answers the client's FIN with its own; the client's ACK of it comes from its orphaned socket, found by
    // no uid, so it meets the global default: dropped, the server would stay in LAST-ACK, resending its FIN.
    const lingering = async () => (await net.inet.run('ss', ['-tanH', 'state', 'close-wait', 'state', 'last-ack', `sport = :${server.port}`])).trim();
    const end = Date.now() + 5000;
    while ((await lingering()) !== '' && Date.now() < end) await new Promise((r) => setTimeout(r, 100));
    expect(await lingering()).toBe('');
    expect((await server.seen()).map((r) => r.text)).toEqual(['hello']);
  });
});
