import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseLogPrefix } from '../../src/compile/log-prefix.js';
import { readRuleTable } from '../../src/state/rule-table.js';
import { createTestNet, ensureTestUsers, harnessUnavailableReason, type Server, type TestNet, type TestUsers } from '../harness/index.js';
import { nflogPrefixes } from '../support/nflog.js';
import { policyDir } from '../support/policy-dir.js';
import { printed, until } from '../support/wait.js';

/**
 * dns.exclusive in the kernel: an app whose rules allow everything sends
 * DNS (udp 53) and DNS-over-TLS (tcp 853) to an internet server and nothing
 * arrives, the drop logged on the NFLOG group under dns/exclusive's id; a
 * socket carrying the resolver's mark (SO_MARK, as egressd's resolver sets
 * it) reaches the same server under a default deny and a global deny of its
 * address. The servers on the internet side count what arrives.
 */
const ROOT = join(import.meta.dirname, '..', '..');
const CLI = join(ROOT, 'src/cli/main.ts');
const unavailable = harnessUnavailableReason();
const PYTHON = '/usr/bin/python3';
const SERVER4 = '198.51.100.1';
const SERVER6 = '2001:db8:1::1';
const MARK = 0x45444e53;

/**
 * One query from a socket with SO_MARK (36) set to argv[4], 0 for none:
 * prints {"ok": true} when the server's "ok" came back, or why not.
 */
const MARKED = String.raw`
import errno, json, socket, sys
proto, addr, port, mark = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
family = socket.AF_INET6 if ':' in addr else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM if proto == 'tcp' else socket.SOCK_DGRAM)
if mark:
    s.setsockopt(socket.SOL_SOCKET, 36, mark)
s.settimeout(1.5)
try:
    if proto == 'tcp':
        s.connect((addr, port)); s.sendall(b'hi\n')
    else:
        s.sendto(b'hi\n', (addr, port))
    reply = s.recv(16).decode().strip()
    print(json.dumps({'ok': reply.startswith('ok')}))
except OSError as e:
    print(json.dumps({'ok': False, 'error': errno.errorcode.get(e.errno, str(e)) if e.errno else 'timeout'}))
`;

describe.skipIf(unavailable)(
  `dns.exclusive: only the resolver's marked sockets send DNS off the host ${unavailable ? `(skipped: ${unavailable})` : ''}`,
  () => {
    let net: TestNet;
    let users: TestUsers;
    let state: string;
    let dns4: Server;
    let dns6: Server;
    let dot: Server;
    let other: Server;

    const apply = async (dir: string) => {
      const result = await net.host.node(CLI, ['apply', dir], { env: { ...process.env, EGRESSD_STATE_DIR: state } });
      if (result.code !== 0) throw new Error(`apply failed: ${result.stderr}`);
    };
    const marked = async (proto: 'tcp' | 'udp', addr: string, port: number, mark: number) => {
      const result = await net.host.exec(PYTHON, ['-c', MARKED, proto, addr, String(port), String(mark)]);
      if (result.code !== 0) throw new Error(`sender: ${result.stderr}`);
      return JSON.parse(result.stdout) as { ok: boolean; error?: string };
    };

    beforeAll(async () => {
      users = ensureTestUsers();
      net = await createTestNet();
      state = mkdtempSync(join(tmpdir(), 'egd-dns-state-'));
      dns4 = await net.inet.listen({ proto: 'udp', addr: SERVER4, port: 53 });
      dns6 = await net.inet.listen({ proto: 'udp', addr: SERVER6, port: 53 });
      dot = await net.inet.listen({ proto: 'tcp', addr: SERVER4, port: 853 });
      other = await net.inet.listen({ proto: 'udp', addr: SERVER4, port: 5353 });
    });
    afterAll(async () => {
      for (const server of [dns4, dns6, dot, other]) await server?.close().catch(() => {});
      await net?.destroy();
      if (state) rmSync(state, { recursive: true, force: true });
    });

    it('without the table, an app and an unmarked root socket reach the DNS servers (the path is real)', async () => {
      expect(await net.host.connect({ proto: 'udp', addr: SERVER4, port: 53, user: users.app1.uid })).toMatchObject({ ok: true });
      expect(await net.host.connect({ proto: 'udp', addr: SERVER6, port: 53, user: users.app1.uid })).toMatchObject({ ok: true });
      expect(await net.host.connect({ proto: 'tcp', addr: SERVER4, port: 853, user: users.app1.uid })).toMatchObject({ ok: true });
      expect(await marked('udp', SERVER4, 53, 0)).toEqual({ ok: true });
      expect(await dns4.count()).toBe(2);
      for (const server of [dns4, dns6, dot]) await server.reset();
    });

    it("drops and logs an app's DNS and DNS-over-TLS though its rules allow everything; the resolver's marked queries pass a default deny and a deny of the server's address", async () => {
      const dir = policyDir({
        '00.yaml': `defaults: {egress: deny}\napps:\n  u1: {identity: {user: egd-app1}, rules: [{allow: any}]}\ndeny:\n  - to: ["${SERVER4}", "${SERVER6}"]\n`,
      });
      await apply(dir);
      const pcap = join(state, 'nflog.pcap');
      const capture = net.host.spawn('tcpdump', ['-i', 'nflog:7745', '-U', '-w', pcap]);
      const exited = new Promise<void>((resolve) => capture.once('exit', () => resolve()));
      await printed(capture, 'stderr', 'listening on nflog:7745');

      // The app's DNS, over IPv4 and IPv6, and its DNS-over-TLS: refused on the way out (EPERM) or never answered.
      for (const addr of [SERVER4, SERVER6])
        expect(await net.host.connect({ proto: 'udp', addr, port: 53, user: users.app1.uid, timeoutMs: 800 })).toMatchObject({ ok: false });
      expect(await net.host.connect({ proto: 'tcp', addr: SERVER4, port: 853, user: users.app1.uid, timeoutMs: 800 })).toMatchObject({ ok: false });
      // Its other traffic to the same server is its rules' to decide: allowed.
      expect(await net.host.connect({ proto: 'udp', addr: SERVER4, port: 5353, user: users.app1.uid })).toMatchObject({ ok: true });
      // Root without the mark, or with another one: dropped too.
      expect(await marked('udp', SERVER4, 53, 0)).toMatchObject({ ok: false });
      expect(await marked('udp', SERVER4, 53, 7)).toMatchObject({ ok: false });
      // The resolver's mark: DNS and DNS-over-TLS pass the default deny and the deny of the address.
      expect(await marked('udp', SERVER4, 53, MARK)).toEqual({ ok: true });
      expect(await marked('udp', SERVER6, 53, MARK)).toEqual({ ok: true });
      expect(await marked('tcp', SERVER4, 853, MARK)).toEqual({ ok: true });
      // The mark lets out DNS only: the same socket to another port meets the deny of the address.
      expect(await marked('udp', SERVER4, 5353, MARK)).toMatchObject({ ok: false });

      expect((await dns4.seen()).map((s) => s.peer)).toEqual(['192.0.2.1']);
      expect(await dns6.count()).toBe(1);
      expect(await dot.count()).toBe(1);
      expect(await other.count()).toBe(1);

      const table = readRuleTable(state);
      if (table.state !== 'ok') throw new Error(`rules.json: ${JSON.stringify(table)}`);
      const logged = () =>
        nflogPrefixes(existsSync(pcap) ? readFileSync(pcap) : Buffer.alloc(0)).map((prefix) => table.value.byId.get(parseLogPrefix(prefix) ?? '')?.ruleId);
      // The app's three queries (a SYN may be resent) and root's two unmarked ones, all under dns/exclusive; root's 5353 under the global deny.
      await until('NFLOG records of every dropped query', () => {
        const ids = logged();
        return ids.filter((id) => id === 'dns/exclusive').length >= 5 && ids.includes('deny/00.yaml/0');
      });
      capture.kill('SIGINT');
      await exited;
      expect(logged().filter((id) => id === 'dns/exclusive').length).toBeGreaterThanOrEqual(5);
      expect(new Set(logged())).toEqual(new Set(['dns/exclusive', 'deny/00.yaml/0']));
    });

    it('with dns.exclusive off, DNS is the rules’ to decide, and the resolver’s mark still passes', async () => {
      for (const server of [dns4, dns6, dot, other]) await server.reset();
      await apply(
        policyDir({ '00.yaml': `defaults: {egress: deny}\napps:\n  u1: {identity: {user: egd-app1}, rules: [{allow: any}]}\ndns: {exclusive: false}\n` }),
      );
      expect(await net.host.connect({ proto: 'udp', addr: SERVER4, port: 53, user: users.app1.uid })).toMatchObject({ ok: true });
      expect(await marked('udp', SERVER4, 53, MARK)).toEqual({ ok: true });
      // Root's unmarked query meets the default deny.
      expect(await marked('udp', SERVER4, 53, 0)).toMatchObject({ ok: false });
      expect(await dns4.count()).toBe(2);
    });
  },
);
