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
 * An IPv6 routing header names destinations the output hook never sees: it
 * sees the first segment as `ip6 daddr`. Any unprivileged socket may set a
 * segment routing header (type 4) with setsockopt(IPV6_RTHDR), and the
 * internet side here processes it (seg6_enabled), as an SRv6 hop would:
 * a TCP connection to a denied address completed through an allowed first
 * segment before the table dropped routing headers (seen failing on that
 * code). The capture is a counter on the internet side's way in.
 */
const ROOT = join(import.meta.dirname, '..', '..');
const CLI = join(ROOT, 'src/cli/main.ts');
const unavailable = harnessUnavailableReason();
const PYTHON = '/usr/bin/python3';
const ALLOWED = '2001:db8:1::1';
const DENIED = '2001:db8:1::2';

/**
 * Sends with a segment routing header: the first segment `first`, the last
 * the address connected to. Prints one JSON line: for tcp whether the
 * handshake completed and the reply, for udp how many datagrams the kernel
 * sent and why it refused the others (EPERM: the output hook dropped it). Run as the test user: /usr/bin/python3 and the script text only.
 */
const SENDER = String.raw`
import errno, json, socket, struct, sys
proto, first, final, port, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
# segments[0] is where the kernel writes the destination connected to; segments[1] is the first hop.
srh = struct.pack('!BBBBBBH', 0, 4, 4, 1, 1, 0, 0) + socket.inet_pton(socket.AF_INET6, '::') + socket.inet_pton(socket.AF_INET6, first)
kind = socket.SOCK_STREAM if proto == 'tcp' else socket.SOCK_DGRAM
s = socket.socket(socket.AF_INET6, kind)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RTHDR, srh)
if proto == 'tcp':
    s.settimeout(1.5)
    try:
        s.connect((final, port)); s.sendall(b'hi\n'); print(json.dumps({'connected': True, 'reply': s.recv(16).decode()}))
    except OSError as e:
        print(json.dumps({'connected': False, 'error': errno.errorcode.get(e.errno, str(e)) if e.errno else 'timeout'}))
else:
    sent, refused = 0, []
    for _ in range(count):
        try:
            sent += s.sendto(b'hi\n', (final, port)) == 3
        except OSError as e:
            refused.append(errno.errorcode.get(e.errno, str(e.errno)))
    print(json.dumps({'sent': sent, 'refused': refused}))
`;

describe.skipIf(unavailable)(`IPv6 routing headers ${unavailable ? `(skipped: ${unavailable})` : ''}`, () => {
  let net: TestNet;
  let users: TestUsers;
  let state: string;
  let tcp: Server;
  let udp: Server;
  let allowedTcp: Server;

  const apply = async (dir: string) => {
    const result = await net.host.node(CLI, ['apply', dir], { env: { ...process.env, EGRESSD_STATE_DIR: state } });
    if (result.code !== 0) throw new Error(`apply failed: ${result.stderr}`);
  };
  const dropsOf = async (dir: string, ruleId: string) => {
    const result = await net.host.node(CLI, ['status', dir, '--json'], { env: { ...process.env, EGRESSD_STATE_DIR: state } });
    if (!result.stdout) throw new Error(`status printed nothing: ${result.stderr}`);
    return (JSON.parse(result.stdout) as { dropped: { id: string; packets: number }[] }).dropped.find((d) => d.id === ruleId)?.packets ?? 0;
  };
  const send = async (proto: 'tcp' | 'udp', port: number, count = 1, first = ALLOWED) => {
    const result = await net.host.exec(PYTHON, ['-c', SENDER, proto, first, DENIED, String(port), String(count)], { user: users.app1.uid });
    if (result.code !== 0) throw new Error(`sender: ${result.stderr}`);
    return JSON.parse(result.stdout) as { connected?: boolean; reply?: string; error?: string; sent?: number; refused?: string[] };
  };
  /** Packets with a routing header that reached the internet side. */
  const arrived = async () => {
    const listed = await net.inet.nft(['-j', 'list', 'counter', 'inet', 'egdt_rthdr', 'routed']);
    const counter = (JSON.parse(listed.stdout) as { nftables: { counter?: { packets: number } }[] }).nftables.find((o) => o.counter)?.counter;
    if (!counter) throw new Error(`no counter in ${listed.stdout}`);
    return counter.packets;
  };

  beforeAll(async () => {
    users = ensureTestUsers();
    net = await createTestNet();
    state = mkdtempSync(join(tmpdir(), 'egd-rthdr-state-'));
    // An SRv6 hop: the internet side processes segment routing headers addressed to it.
    for (const conf of ['all', 'default', 'eth0', 'lo']) await net.inet.run('sysctl', ['-qw', `net.ipv6.conf.${conf}.seg6_enabled=1`]);
    await net.inet.nft({
      stdin:
        'table inet egdt_rthdr {\n\tcounter routed {}\n\tchain in {\n\t\ttype filter hook prerouting priority -400; policy accept;\n\t\texthdr rt exists counter name "routed"\n\t}\n}\n',
    });
    tcp = await net.inet.listen({ proto: 'tcp', addr: DENIED, port: 0 });
    udp = await net.inet.listen({ proto: 'udp', addr: DENIED, port: 0 });
    allowedTcp = await net.inet.listen({ proto: 'tcp', addr: ALLOWED, port: 0 });
  });
  afterAll(async () => {
    for (const server of [tcp, udp, allowedTcp]) await server?.close().catch(() => {});
    await net?.destroy();
    if (state) rmSync(state, { recursive: true, force: true });
  });

  it('without the table, the internet side takes a routing header through an allowed first segment to the denied last one (the path is real)', async () => {
    expect(await send('tcp', tcp.port)).toEqual({ connected: true, reply: 'ok\n' });
    expect(await send('udp', udp.port, 3)).toEqual({ sent: 3, refused: [] });
    await udp.waitFor(3);
    expect((await tcp.seen()).map((s) => s.local)).toEqual([DENIED]);
    expect(await arrived()).toBeGreaterThan(0);
    await tcp.reset();
    await udp.reset();
  });

  it('an unprivileged user allowed only the first segment gets nothing through with a routing header, TCP or UDP; the drop is counted and logged under its own id; plain IPv6 still passes', async () => {
    const dir = policyDir({
      '00.yaml': `defaults: {egress: allow}\napps:\n  u1: {identity: {user: egd-app1}, default: deny, rules: [{allow: ["${ALLOWED}"]}]}\ndeny:\n  - to: ["${DENIED}"]\n`,
    });
    await apply(dir);
    const before = await arrived();
    const pcap = join(state, 'nflog.pcap');
    const capture = net.host.spawn('tcpdump', ['-i', 'nflog:7745', '-U', '-w', pcap]);
    const exited = new Promise<void>((resolve) => capture.once('exit', () => resolve()));
    await printed(capture, 'stderr', 'listening on nflog:7745');

    expect(await send('tcp', tcp.port)).toMatchObject({ connected: false });
    // The kernel built them; the table dropped them on the way out, which a UDP socket hears as EPERM.
    expect(await send('udp', udp.port, 3)).toEqual({ sent: 0, refused: ['EPERM', 'EPERM', 'EPERM'] });
    const dropped = await dropsOf(dir, 'routing-header');
    // A SYN and its resends within 1.5 s, and three datagrams.
    expect(dropped).toBeGreaterThanOrEqual(4);
    await until(`${dropped} NFLOG records in ${pcap}`, () => nflogPrefixes(existsSync(pcap) ? readFileSync(pcap) : Buffer.alloc(0)).length >= dropped);
    capture.kill('SIGINT');
    await exited;
    const prefixes = nflogPrefixes(readFileSync(pcap));
    expect(prefixes).toHaveLength(dropped);
    expect(new Set(prefixes).size).toBe(1);
    const table = readRuleTable(state);
    if (table.state !== 'ok') throw new Error(`rules.json: ${JSON.stringify(table)}`);
    expect(table.value.byId.get(parseLogPrefix(prefixes[0]!) ?? '')).toMatchObject({ ruleId: 'routing-header', kind: 'routing-header', verdict: 'deny' });

    // Ordinary IPv6 from the same user to the allowed address passes; to the denied one it does not.
    expect(await net.host.connect({ proto: 'tcp', addr: ALLOWED, port: allowedTcp.port, user: users.app1.uid })).toMatchObject({ ok: true });
    expect(await net.host.connect({ proto: 'tcp', addr: DENIED, port: tcp.port, user: users.app1.uid, timeoutMs: 800 })).toMatchObject({ ok: false });
    expect(await allowedTcp.count()).toBe(1);
    expect(await tcp.count()).toBe(0);
    expect(await udp.count()).toBe(0);
    expect((await arrived()) - before).toBe(0);
  });

  it("a first segment that is the host's own address leaves by lo, and a host that forwards with seg6_enabled sends it on past the output hook: dropped before loopback", async () => {
    // Root's settings, not the sender's; the table must hold under them too.
    for (const conf of ['all.seg6_enabled', 'lo.seg6_enabled', 'all.forwarding']) await net.host.run('sysctl', ['-qw', `net.ipv6.conf.${conf}=1`]);
    const dir = policyDir({
      '00.yaml': `defaults: {egress: allow}
deny:
  - to: ["${DENIED}"]
`,
    });
    await apply(dir);
    const before = await arrived();
    expect(await send('tcp', tcp.port, 1, net.addrs.host.v6)).toMatchObject({ connected: false });
    expect(await send('udp', udp.port, 3, net.addrs.host.v6)).toEqual({ sent: 0, refused: ['EPERM', 'EPERM', 'EPERM'] });
    expect(await dropsOf(dir, 'routing-header')).toBeGreaterThanOrEqual(4);
    expect(await tcp.count()).toBe(0);
    expect(await udp.count()).toBe(0);
    expect((await arrived()) - before).toBe(0);
  });
});
