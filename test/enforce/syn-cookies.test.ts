import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestNet, ensureTestUsers, harnessUnavailableReason, type TestNet, type TestUsers } from '../harness/index.js';
import { policyDir } from '../support/policy-dir.js';

const ROOT = join(import.meta.dirname, '..', '..');
const CLI = join(ROOT, 'src/cli/main.ts');
const unavailable = harnessUnavailableReason();

/**
 * The host side: listens with a backlog of 1, and writes what it was given to
 * each connection it accepts, then closes it at once — leaving what the
 * kernel has not yet sent to a closed socket.
 */
const LISTENER = String.raw`
import socket, sys
addr, size = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ':' in addr else socket.AF_INET, socket.SOCK_STREAM)
s.bind((addr, 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    try:
        c.sendall(b'x' * size)
    except OSError:
        pass
    c.close()
`;

/**
 * The internet side: first `count` connections from HELD_PORTS, which it
 * never completes (the test's own table there drops what comes to those
 * ports), then one more; prints whether that one connected and how many
 * bytes came over it. Two held connections fill a backlog of 1 on this
 * kernel (6.18: the queue is full past the backlog; kernels that count it
 * full at the backlog answer the second with a cookie already), so the
 * third is answered with a SYN cookie.
 */
const PEER = String.raw`
import json, socket, sys, time
addr, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
HELD_PORTS = [int(p) for p in sys.argv[4].split(',')]
family = socket.AF_INET6 if ':' in addr else socket.AF_INET
held = []
for i in range(count):
    h = socket.socket(family, socket.SOCK_STREAM)
    h.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    h.bind(('', HELD_PORTS[i]))
    h.setblocking(False)
    h.connect_ex((addr, port))
    held.append(h)
time.sleep(0.3)
s = socket.socket(family, socket.SOCK_STREAM)
s.settimeout(3)
try:
    s.connect((addr, port))
except OSError as e:
    print(json.dumps({'connected': False, 'bytes': 0, 'error': str(e)}), flush=True)
    sys.exit(0)
got = 0
deadline = time.time() + 4
while time.time() < deadline:
    s.settimeout(max(0.1, deadline - time.time()))
    try:
        d = s.recv(65536)
    except socket.timeout:
        break
    except OSError:
        break
    if not d:
        break
    got += len(d)
print(json.dumps({'connected': True, 'bytes': got}), flush=True)
`;

const HELD_PORTS = [40001, 40002];

describe.skipIf(unavailable)(`SYN cookies and a system domain's members found by user or group ${unavailable ? `(skipped: ${unavailable})` : ''}`, () => {
  let net: TestNet;
  let users: TestUsers;
  let state: string;
  let dir: string;
  let E: string; // this run's cgroup prefix (the cgroup tree is shared with other test files)

  /** Applies the policy; returns what apply warned about. */
  const apply = async (policy: string) => {
    dir = policyDir({ '00.yaml': policy });
    const result = await net.host.node(CLI, ['apply', dir], { env: { ...process.env, EGRESSD_STATE_DIR: state } });
    if (result.code !== 0) throw new Error(`apply failed (${result.code}): ${result.stderr}`);
    return result.stderr;
  };
  const dropsOf = async (id: string) => {
    const result = await net.host.node(CLI, ['status', dir, '--json'], { env: { ...process.env, EGRESSD_STATE_DIR: state } });
    const status = JSON.parse(result.stdout) as { dropped: { id: string; packets: number }[] };
    return status.dropped.find((d) => d.id === id)?.packets ?? 0;
  };
  const cookiesSent = async () => {
    const netstat = await net.host.run('cat', ['/proc/net/netstat']);
    const [names, values] = netstat.split('\n').filter((line) => line.startsWith('TcpExt:'));
    const at = names!.split(/\s+/).indexOf('SyncookiesSent');
    if (at < 0) throw new Error('no TcpExt SyncookiesSent in /proc/net/netstat');
    return Number(values!.split(/\s+/)[at]);
  };
  /** A listener run as `who`, and a peer that first holds `held` half-open connections to it: what reached the peer. */
  const attempt = async (who: { user: string; group?: string; cgroup?: string }, held: number, family: 'v4' | 'v6' = 'v4') => {
    const address = net.addrs.host[family];
    const listener = net.host.spawn('/usr/bin/python3', ['-c', LISTENER, address, '1900'], who);
    try {
      const port = await new Promise<number>((resolve, reject) => {
        listener.stdout!.once('data', (d: Buffer) => resolve(Number(d.toString().trim())));
        listener.once('exit', (code) => reject(new Error(`the listener exited (${code})`)));
      });
      const before = await cookiesSent();
      const peer = await net.inet.run('/usr/bin/python3', ['-c', PEER, address, String(port), String(held), HELD_PORTS.join(',')]);
      return { ...(JSON.parse(peer) as { connected: boolean; bytes: number }), cookies: (await cookiesSent()) - before };
    } finally {
      listener.kill('SIGKILL');
    }
  };

  beforeAll(async () => {
    users = ensureTestUsers();
    net = await createTestNet();
    E = `egd-cookies-${net.id}`;
    net.host.mkCgroup(`${E}/offline`);
    state = mkdtempSync(join(tmpdir(), 'egd-syncookies-state-'));
    // The held connections stay half-open at the listener: nothing of theirs comes back to the peer.
    await net.inet.nft({
      stdin: `table inet syncookies {\n  chain input {\n    type filter hook input priority 0;\n    tcp dport { ${HELD_PORTS.join(', ')} } drop\n  }\n}\n`,
    });
  });
  afterAll(async () => {
    await net?.destroy();
    if (state) rmSync(state, { recursive: true, force: true });
  });

  const byUser = () => `defaults: {egress: allow}\nsystemDomains:\n  offline: {members: [{user: ${users.app2.name}}]}\n`;

  it('without members found by user or group, a SYN cookie opens a connection (what the cases below would meet)', async () => {
    await apply(`defaults: {egress: allow}\nsystemDomains:\n  offline: {members: [{cgroup: "${E}/offline"}]}\n`);
    const result = await attempt({ user: users.app1.name }, 2);
    expect(result).toMatchObject({ connected: true, bytes: 1900 });
    expect(result.cookies).toBeGreaterThan(0);
  });

  for (const family of ['v4', 'v6'] as const) {
    it(`a member found by user: its SYN cookie is dropped, and nothing it wrote reaches the peer (IP${family})`, async () => {
      await apply(byUser());
      const before = await dropsOf('syn-cookies');
      const result = await attempt({ user: users.app2.name }, 2, family);
      expect(result).toMatchObject({ connected: false, bytes: 0 });
      expect(result.cookies).toBeGreaterThan(0);
      // Dropped there, not anywhere else: every cookie sent, each once at least (the peer's kernel resends its SYN).
      expect(await dropsOf('syn-cookies')).toBeGreaterThanOrEqual(before + result.cookies);
    });
  }

  it('a member found by its socket group alone: the same', async () => {
    await apply(`defaults: {egress: allow}\nsystemDomains:\n  offline: {members: [{group: ${users.grp.name}}]}\n`);
    const before = await dropsOf('syn-cookies');
    const result = await attempt({ user: users.app1.name, group: users.grp.name }, 2);
    expect(result).toMatchObject({ connected: false, bytes: 0 });
    expect(result.cookies).toBeGreaterThan(0);
    expect(await dropsOf('syn-cookies')).toBeGreaterThanOrEqual(before + result.cookies);
  });

  it("while there are such members, anyone's SYN cookie is dropped, and counted; connections answered from a listener's queue open", async () => {
    await apply(byUser());
    const before = await dropsOf('syn-cookies');
    const flooded = await attempt({ user: users.app1.name }, 2);
    expect(flooded).toMatchObject({ connected: false, bytes: 0 });
    expect(flooded.cookies).toBeGreaterThan(0);
    expect(await dropsOf('syn-cookies')).toBeGreaterThanOrEqual(before + flooded.cookies);
    expect(await attempt({ user: users.app1.name }, 0)).toEqual({ connected: true, bytes: 1900, cookies: 0 });
  });

  it('with tcp_syncookies=2 every SYN-ACK is a cookie: apply says that no connection can come in, and none does', async () => {
    const was = (await net.host.run('sysctl', ['-n', 'net.ipv4.tcp_syncookies'])).trim();
    await net.host.run('sysctl', ['-q', '-w', 'net.ipv4.tcp_syncookies=2']);
    try {
      expect(await apply(byUser())).toContain('net.ipv4.tcp_syncookies is 2 here: every SYN-ACK is sent with a SYN cookie');
      const result = await attempt({ user: users.app1.name }, 0);
      expect(result).toMatchObject({ connected: false, bytes: 0 });
      expect(result.cookies).toBeGreaterThan(0);
    } finally {
      await net.host.run('sysctl', ['-q', '-w', `net.ipv4.tcp_syncookies=${was}`]);
    }
    expect(await apply(byUser())).not.toContain('tcp_syncookies');
  });

  it('a member found by cgroup keeps it on a closed socket: its SYN cookie opens the connection, but nothing it wrote reaches the peer', async () => {
    await apply(`defaults: {egress: allow}\nsystemDomains:\n  offline: {members: [{cgroup: "${E}/offline"}]}\n`);
    const result = await attempt({ user: users.app1.name, cgroup: `${E}/offline` }, 2);
    expect(result).toMatchObject({ connected: true, bytes: 0 });
    expect(result.cookies).toBeGreaterThan(0);
  });
});
