import type { ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { createTestNet, ensureTestUsers, harnessUnavailableReason, type TestNet, type TestUsers } from '../harness/index.js';
import { policyDir } from '../support/policy-dir.js';
import { printed } from '../support/wait.js';

/**
 * Tor's SOCKS port on loopback is an unprivileged port: another user's
 * program may hold it before Tor starts or while Tor is down, and the
 * updaters would hand it every host name they update from. With updates over
 * Tor on, the table lets only Tor's user — or root, as Debian starts Tor,
 * which opens its listeners before it becomes debian-tor — answer from it.
 * The SYN-ACK leaves from a request socket, whose `meta skuid` is its
 * listener's owner: so another user's listener never completes a handshake.
 * A Python listener stands in for Tor, owned as each case says.
 */
const ROOT = join(import.meta.dirname, '..', '..');
const CLI = join(ROOT, 'src/cli/main.ts');
const unavailable = harnessUnavailableReason();
const SOCKS = { addr: '127.0.0.1', port: 9050 };

// Binds the SOCKS port (as root when spawned so), then becomes DROP_TO if given, as Tor does with its User; prints each
// connection it accepts and what it reads.
const LISTENER = `
import os, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("${SOCKS.addr}", ${SOCKS.port}))
s.listen(16)
if len(sys.argv) > 1:
    import pwd
    row = pwd.getpwnam(sys.argv[1])
    os.setgroups([])
    os.setgid(row.pw_gid)
    os.setuid(row.pw_uid)
print(os.getuid(), "ready", flush=True)
while True:
    c, _ = s.accept()
    c.settimeout(2)
    try:
        data = c.recv(64)
    except OSError:
        data = b""
    print("accepted", data.hex(), flush=True)
    c.sendall(b"ok\\n")
    c.close()
`;

let net: TestNet;
let users: TestUsers;
let dir: string;
let state: string;
let listener: ChildProcess | undefined;
let heard = '';

async function listen(as: { user?: string; dropTo?: string }): Promise<void> {
  heard = '';
  listener = net.host.spawn('/usr/bin/python3', ['-c', LISTENER, ...(as.dropTo ? [as.dropTo] : [])], as.user ? { user: as.user, group: as.user } : {});
  listener.stdout!.on('data', (chunk: Buffer) => (heard += chunk.toString()));
  await printed(listener, 'stdout', 'ready', 10_000);
}

async function stopListening(): Promise<void> {
  if (!listener) return;
  const done = new Promise((resolve) => listener!.once('exit', resolve));
  listener.kill('SIGKILL');
  await done;
  listener = undefined;
}

/** The live table's packets counted by the rule that drops other listeners' answers. */
async function answersDropped(): Promise<number> {
  const table = await net.host.nft(['list', 'table', 'inet', 'egressd']);
  return [...table.stdout.matchAll(/counter packets (\d+) .*tor\/socks-answer/g)].reduce((sum, m) => sum + Number(m[1]), 0);
}

const torStatus = () => net.host.node(CLI, ['tor', 'status', '--json'], { env: { ...process.env, EGRESSD_STATE_DIR: state }, timeoutMs: 60_000 });

describe.skipIf(unavailable)(`only Tor answers from its SOCKS port ${unavailable ? `(skipped: ${unavailable})` : ''}`, () => {
  beforeAll(async () => {
    users = ensureTestUsers();
    net = await createTestNet();
    dir = policyDir(
      {
        '00-base.yaml': `defaults: {egress: allow}
identities:
  apt: {user: _apt}
tor: {enabled: true, user: debian-tor, updaters: [apt]}
systemDomains: {offline: {members: [{user: ${users.app3.name}}]}}
`,
      },
      { keep: true },
    );
    state = mkdtempSync(join(tmpdir(), 'egd-socks-owner-'));
    const applied = await net.host.node(CLI, ['apply', dir], { env: { ...process.env, EGRESSD_STATE_DIR: state } });
    expect(applied.code, applied.stderr).toBe(0);
  });
  afterEach(stopListening);
  afterAll(async () => {
    await stopListening();
    await net?.destroy();
    for (const path of [dir, state]) if (path) rmSync(path, { recursive: true, force: true });
  });

  it("another user's listener on the SOCKS port never completes a handshake with _apt, nor with anyone; nothing reaches it", async () => {
    await listen({ user: users.app1.name });
    const before = await answersDropped();
    expect(await net.host.connect({ proto: 'tcp', ...SOCKS, user: '_apt', payload: 'GET deb.debian.org\n', timeoutMs: 1500 })).toMatchObject({
      connected: false,
      error: 'ETIMEDOUT',
    });
    expect(await net.host.connect({ proto: 'tcp', ...SOCKS, user: users.app2.name, timeoutMs: 1000 })).toMatchObject({ connected: false, error: 'ETIMEDOUT' });
    expect(heard.trim()).toBe(`${users.app1.uid} ready`);
    // Its SYN-ACKs, retransmitted, were dropped by that rule (and logged with it).
    expect(await answersDropped()).toBeGreaterThan(before);
  });

  it('`egressctl tor status` says updates are blocked, the SOCKS port held by another uid, not Tor', async () => {
    await listen({ user: users.app1.name });
    const status = await torStatus();
    expect(status.stderr).toContain(`updates: blocked — 127.0.0.1:9050 is held by uid ${users.app1.uid}, not Tor ("debian-tor")`);
    expect(JSON.parse(status.stdout)).toMatchObject({ torUpdates: true, tor: { reachable: false, socksHeld: true } });
    expect(status.code).toBe(1);
  });

  it('the same listener as debian-tor answers _apt, and status blames nothing but Tor', async () => {
    await listen({ user: 'debian-tor' });
    expect(await net.host.connect({ proto: 'tcp', ...SOCKS, user: '_apt' })).toMatchObject({ connected: true, ok: true });
    expect(heard).toContain('accepted');
    const status = await torStatus();
    expect(status.stderr).toMatch(/^updates: blocked — Tor /m);
    expect(status.stderr).not.toContain('not Tor');
  });

  it("opened by root and then run as debian-tor, as Debian's tor.service starts Tor: answers _apt (the listener stays root's)", async () => {
    await listen({ dropTo: 'debian-tor' });
    expect(heard).toMatch(/^[1-9]\d* ready/);
    expect(await net.host.connect({ proto: 'tcp', ...SOCKS, user: '_apt' })).toMatchObject({ connected: true, ok: true });
    expect((await torStatus()).stderr).not.toContain('not Tor');
  });

  it("Tor's port is network for all but the updaters: a system domain's member and anyone under lockdown never reach Tor; others do", async () => {
    await listen({ user: 'debian-tor' });
    // Tor would carry it anywhere: the member's own SYN to the port is dropped, as its SYN to the internet is.
    expect(await net.host.connect({ proto: 'tcp', ...SOCKS, user: users.app3.name, payload: 'CONNECT evil.example\n', timeoutMs: 1000 })).toMatchObject({
      connected: false,
      error: 'ETIMEDOUT',
    });
    expect(heard).not.toContain('accepted');
    // Other loopback services stay open to it.
    const other = net.host.spawn('/usr/bin/python3', [
      '-c',
      'import socket;s=socket.socket();s.bind(("127.0.0.1",8631));s.listen();print("ready",flush=True);c,_=s.accept();c.sendall(b"ok\\n")',
    ]);
    await printed(other, 'stdout', 'ready', 10_000);
    expect(await net.host.connect({ proto: 'tcp', addr: '127.0.0.1', port: 8631, user: users.app3.name })).toMatchObject({ connected: true, ok: true });
    expect(await net.host.connect({ proto: 'tcp', ...SOCKS, user: users.app1.name })).toMatchObject({ connected: true, ok: true });

    const lockdown = (on: boolean) => net.host.node(CLI, ['lockdown', on ? 'on' : 'off', dir], { env: { ...process.env, EGRESSD_STATE_DIR: state } });
    const locked = await lockdown(true);
    expect(locked.code, locked.stderr).toBe(0);
    try {
      heard = '';
      expect(await net.host.connect({ proto: 'tcp', ...SOCKS, user: users.app1.name, timeoutMs: 1000 })).toMatchObject({
        connected: false,
        error: 'ETIMEDOUT',
      });
      expect(await net.host.connect({ proto: 'tcp', ...SOCKS, timeoutMs: 1000 })).toMatchObject({ connected: false, error: 'ETIMEDOUT' });
      expect(heard).not.toContain('accepted');
      expect(await net.host.connect({ proto: 'tcp', ...SOCKS, user: '_apt' })).toMatchObject({ connected: true, ok: true });
    } finally {
      const released = await lockdown(false);
      expect(released.code, released.stderr).toBe(0);
    }
  });
});
