import { readFileSync, mkdtempSync, rmSync } from 'node:fs';
import type { ChildProcess } from 'node:child_process';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestNet, ensureTestUsers, harnessUnavailableReason, type TestNet, type TestUsers } from '../harness/index.js';
import { policyDir } from '../support/policy-dir.js';
import { until } from '../support/wait.js';

/**
 * AF_PACKET frames never meet the output hook, and CAP_NET_ADMIN can change
 * the table: a system domain member holding CAP_NET_RAW or CAP_NET_ADMIN is
 * not confined by it (issue 17, finding 7). `check` and `status` say so for
 * real processes: one in a member cgroup running as root, one of a member
 * user given CAP_NET_RAW as an ambient capability (as AmbientCapabilities=
 * would) — and stay quiet for members' processes that hold neither.
 */
const ROOT = join(import.meta.dirname, '..', '..');
const CLI = join(ROOT, 'src/cli/main.ts');
const unavailable = harnessUnavailableReason();

interface Report {
  warnings: { line: number; message: string }[];
  capabilities: { problems: string[]; notes: string[] };
}

/** Sends one UDP datagram to 192.0.2.2:PORT from 192.0.2.1:SPORT as a frame written on eth0 through an AF_PACKET socket, never through IP. */
const RAW_FRAME = `
import socket, struct, sys
dst, src = (bytes.fromhex(m.replace(':', '')) for m in sys.argv[1:3])
sport, port, payload = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5].encode()
def checksum(b):
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff)
    return ~(s + (s >> 16)) & 0xffff
udp = struct.pack('!HHHH', sport, port, 8 + len(payload), 0) + payload
ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, socket.inet_aton('192.0.2.1'), socket.inet_aton('192.0.2.2'))
ip = ip[:10] + struct.pack('!H', checksum(ip)) + ip[12:]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(('eth0', 0))
s.send(dst + src + b'\\x08\\x00' + ip + udp)
`;

/** The same datagram through an ordinary UDP socket, which the table judges; prints the error a drop gives. */
const UDP_SEND = `
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('192.0.2.1', int(sys.argv[1])))
try:
    s.sendto(sys.argv[3].encode(), ('192.0.2.2', int(sys.argv[2])))
    print('sent')
except OSError as e:
    print(e.strerror)
`;

describe.skipIf(unavailable)(`capabilities of confined processes ${unavailable ? `(skipped: ${unavailable})` : ''}`, () => {
  let net: TestNet;
  let users: TestUsers;
  let state: string;
  let E: string;
  const pids: Record<'raw' | 'plain' | 'ambient' | 'quiet' | 'userns', number> = { raw: 0, plain: 0, ambient: 0, quiet: 0, userns: 0 };
  const children: Partial<Record<keyof typeof pids, ChildProcess>> = {};
  const cli = (...args: string[]) => net.host.node(CLI, args, { env: { ...process.env, EGRESSD_STATE_DIR: state } });
  /** The policy: lines 4 to 7 are the members, in this order. */
  const policy = () =>
    policyDir({
      '00.yaml': `systemDomains:
  sealed:
    members:
      - {cgroup: "${E}/sealed/raw"}
      - {cgroup: "${E}/sealed/plain"}
      - {user: egd-app2}
      - {user: egd-app3}
`,
    });
  /** Starts `sleep` and waits until it runs as itself (the wrappers exec'd away), holding exactly `net` of CAP_NET_ADMIN (0x1000) and CAP_NET_RAW (0x2000). */
  const start = async (key: keyof typeof pids, child: ChildProcess, net: bigint) => {
    children[key] = child;
    pids[key] = child.pid!;
    await until(`${key}: sleep running`, () => {
      try {
        const eff = /CapEff:\s*([0-9a-f]+)/.exec(readFileSync(`/proc/${child.pid}/status`, 'utf8'))?.[1];
        return readFileSync(`/proc/${child.pid}/comm`, 'utf8') === 'sleep\n' && eff !== undefined && (BigInt(`0x${eff}`) & 0x3000n) === net;
      } catch {
        return false;
      }
    });
  };

  beforeAll(async () => {
    users = ensureTestUsers();
    net = await createTestNet();
    E = `egd-caps-${net.id}`;
    state = mkdtempSync(join(tmpdir(), 'egd-caps-state-'));
    // Root in a member cgroup: every capability.
    await start('raw', net.host.spawn('sleep', ['300'], { cgroup: `${E}/sealed/raw` }), 0x3000n);
    // A member cgroup, a user without capabilities.
    await start('plain', net.host.spawn('sleep', ['300'], { cgroup: `${E}/sealed/plain`, user: users.app1.name }), 0n);
    // A member cgroup, a user's own user namespace (as a rootless container's root): every capability, but over its own namespaces only.
    const userns = ['--reuid', users.app1.name, '--regid', String(users.app1.gid), '--clear-groups', 'unshare', '--user', '--map-root-user', 'sleep', '300'];
    await start('userns', net.host.spawn('setpriv', userns, { cgroup: `${E}/sealed/plain` }), 0x3000n);
    // A member user with CAP_NET_RAW, as AmbientCapabilities=CAP_NET_RAW gives it; nothing else.
    const ambient = [
      '--inh-caps=+net_raw',
      '--ambient-caps=+net_raw',
      `--reuid=${users.app2.uid}`,
      `--regid=${users.app2.gid}`,
      '--clear-groups',
      'sleep',
      '300',
    ];
    await start('ambient', net.host.spawn('setpriv', ambient, { cgroup: `${E}/other` }), 0x2000n);
    // A member user without.
    await start('quiet', net.host.spawn('sleep', ['300'], { cgroup: `${E}/other`, user: users.app3.name }), 0n);
  });
  afterAll(async () => {
    for (const child of Object.values(children)) child.kill('SIGKILL');
    await net?.destroy();
    if (state) rmSync(state, { recursive: true, force: true });
  });

  it('check warns at the member holding them, naming the PID and each capability; not for members without; exit 0', async () => {
    const dir = policy();
    const result = await cli('check', dir, '--json');
    expect(result.code, result.stderr).toBe(0);
    const report = JSON.parse(result.stdout) as Report;
    const at = (line: number) => report.warnings.filter((w) => w.line === line).map((w) => w.message);
    expect(at(4)).toEqual([
      expect.stringContaining(
        `system domain sealed member cgroup ${E}/sealed/raw is not confined by the table: PID ${pids.raw} ("sleep") holds CAP_NET_ADMIN and CAP_NET_RAW`,
      ),
    ]);
    expect(at(4)[0]).not.toContain(`PID ${pids.plain}`);
    // Neither the member without capabilities nor the one holding them in a user namespace of its own.
    expect(at(5)).toEqual([]);
    expect(at(6)).toEqual([expect.stringContaining(`PID ${pids.ambient} ("sleep") holds CAP_NET_RAW`)]);
    expect(at(6)[0]).not.toMatch(new RegExp(`PID ${pids.ambient} \\("sleep"\\) holds CAP_NET_ADMIN`));
    expect(at(7)).toEqual([]);
    expect(report.capabilities.problems).toEqual([]);

    const text = await cli('check', dir);
    expect(text.code).toBe(0);
    expect(text.stderr).toContain(
      `${dir}/00.yaml:4:9: warning: system domain sealed member cgroup ${E}/sealed/raw is not confined by the table: PID ${pids.raw} ("sleep")`,
    );
    expect(text.stderr).toContain('RestrictAddressFamilies=~AF_PACKET');
  });

  it('status says the same beside what is enforced, exit status unchanged; once the process is gone, so is the warning', async () => {
    const dir = policy();
    const applied = await cli('apply', dir);
    expect(applied.code, applied.stderr).toBe(0);
    const status = await cli('status', dir, '--json');
    expect(status.code, status.stderr).toBe(0);
    const report = JSON.parse(status.stdout) as { enforced: boolean; matchesPolicyOnDisk: boolean; capabilities: Report };
    expect(report).toMatchObject({ enforced: true, matchesPolicyOnDisk: true });
    expect(report.capabilities.warnings.map((w) => w.line)).toEqual([4, 6]);
    expect(report.capabilities.warnings[0]!.message).toContain(`PID ${pids.raw} ("sleep") holds CAP_NET_ADMIN and CAP_NET_RAW`);
    const text = await cli('status', dir);
    expect(text.code).toBe(0);
    expect(text.stderr).toContain(`matches the policy in ${dir}`);
    expect(text.stderr).toContain(
      `${dir}/00.yaml:6:9: warning: system domain sealed member user egd-app2 is not confined by the table: PID ${pids.ambient} ("sleep") holds CAP_NET_RAW`,
    );

    children.raw!.kill('SIGKILL');
    await until('the root sleep is gone', () => {
      try {
        readFileSync(`/proc/${pids.raw}/status`);
        return false;
      } catch {
        return true;
      }
    });
    const after = JSON.parse((await cli('status', dir, '--json')).stdout) as { capabilities: Report };
    expect(after.capabilities.warnings.map((w) => w.line)).toEqual([6]);
    expect((await cli('release')).code).toBe(0);
  });

  it('why: a system domain member holding CAP_NET_RAW gets an AF_PACKET frame out past the table, while its UDP socket is dropped (the residue the threat model names)', async () => {
    const server = await net.inet.listen({ proto: 'udp', addr: '192.0.2.2', port: 0 });
    try {
      const dir = policy();
      expect((await cli('apply', dir)).code).toBe(0);
      const mac = async (side: typeof net.host | typeof net.inet) =>
        (JSON.parse(await side.run('ip', ['-j', 'link', 'show', 'eth0'])) as { address: string }[])[0]!.address;
      const [hostMac, inetMac] = [await mac(net.host), await mac(net.inet)];
      const cgroup = `${E}/sealed/raw`;
      // The socket first: the frame goes after it on the same link, so had the datagram passed, it would be seen first.
      const udp = await net.host.exec('/usr/bin/python3', ['-c', UDP_SEND, '40002', String(server.port), 'through-the-table'], { cgroup });
      expect(udp.stdout.trim()).toBe('Operation not permitted');
      const raw = await net.host.exec('/usr/bin/python3', ['-c', RAW_FRAME, inetMac, hostMac, '40001', String(server.port), 'around-the-table'], { cgroup });
      expect(raw.code, raw.stderr).toBe(0);
      const seen = await server.waitFor(1);
      expect(seen.map((s) => [s.peer, s.peerPort, s.bytes])).toEqual([['192.0.2.1', 40001, 'around-the-table'.length]]);
      // The same frame from a member without CAP_NET_RAW cannot even open the socket.
      const denied = await net.host.exec('/usr/bin/python3', ['-c', RAW_FRAME, inetMac, hostMac, '40003', String(server.port), 'x'], {
        cgroup: `${E}/sealed/plain`,
        user: users.app1.name,
      });
      expect(denied.code).not.toBe(0);
      expect(denied.stderr).toContain('PermissionError');
      // Nor from its own user namespace, where it holds every capability: the host's network namespace is not its namespace's.
      const nested = await net.host.exec(
        'setpriv',
        [
          '--reuid',
          users.app1.name,
          '--regid',
          String(users.app1.gid),
          '--clear-groups',
          'unshare',
          '--user',
          '--map-root-user',
          '/usr/bin/python3',
          '-c',
          RAW_FRAME,
          inetMac,
          hostMac,
          '40004',
          String(server.port),
          'x',
        ],
        { cgroup: `${E}/sealed/plain` },
      );
      expect(nested.code).not.toBe(0);
      expect(nested.stderr).toContain('PermissionError');
      expect((await server.seen()).map((s) => s.peerPort)).toEqual([40001]);
    } finally {
      await server.close();
      await cli('release');
    }
  });
});
