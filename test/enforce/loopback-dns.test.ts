import type { ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestNet, ensureTestUsers, harnessUnavailableReason, type TestNet, type TestUsers } from '../harness/index.js';
import { policyDir } from '../support/policy-dir.js';
import { printed } from '../support/wait.js';

/**
 * A resolver on loopback (egressd's, systemd-resolved's, a dnsmasq) asks
 * upstream under its own identity, so a system domain's member that reached
 * one would have its names leave the machine. egressd's resolver refuses
 * members, but it learns who asks from the sending socket after the
 * datagram came; a member that sends from a port another user's socket
 * shares (SO_REUSEADDR, as avahi's 5353) and closes at once was taken for
 * that user, and its query went upstream. So the table drops a member's DNS
 * to any loopback address, by the socket that sent it. A Python server on
 * 127.0.0.1:53 and :853 stands in for the local resolver.
 */
const ROOT = join(import.meta.dirname, '..', '..');
const CLI = join(ROOT, 'src/cli/main.ts');
const unavailable = harnessUnavailableReason();

// Answers "ok" on UDP 53 and 5353 and TCP 53 and 853 of 127.0.0.1, and prints what it hears.
const SERVER = `
import selectors, socket
sel = selectors.DefaultSelector()
for port in (53, 5353):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    u.bind(("127.0.0.1" if port == 53 else "0.0.0.0", port))
    sel.register(u, selectors.EVENT_READ, "udp")
for port in (53, 853):
    t = socket.socket()
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(("127.0.0.1", port))
    t.listen(8)
    sel.register(t, selectors.EVENT_READ, "tcp")
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if key.data == "udp":
            data, peer = s.recvfrom(512)
            print("heard", s.getsockname()[1], data.decode(errors="replace").strip(), flush=True)
            s.sendto(b"ok\\n", peer)
        else:
            c, _ = s.accept()
            c.settimeout(2)
            try:
                print("heard", s.getsockname()[1], c.recv(512).decode(errors="replace").strip(), flush=True)
                c.sendall(b"ok\\n")
            except OSError:
                pass
            c.close()
`;

// As a member: shares 5353 with the server's wildcard socket (SO_REUSEADDR on both), sends to :53 from it and closes at once.
const SEND_AND_CLOSE = `
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 5353))
try:
    s.sendto(b"closed-at-once", ("127.0.0.1", 53))
    print("sent", flush=True)
except PermissionError:
    print("dropped on its way out", flush=True)
s.close()
`;

describe.skipIf(unavailable)(`DNS on loopback and system domains ${unavailable ? `(skipped: ${unavailable})` : ''}`, () => {
  let net: TestNet;
  let users: TestUsers;
  let dir: string;
  let state: string;
  let server: ChildProcess;
  let heard = '';

  beforeAll(async () => {
    users = ensureTestUsers();
    net = await createTestNet();
    dir = policyDir({ '00-base.yaml': `defaults: {egress: allow}\nsystemDomains: {offline: {members: [{user: ${users.app3.name}}]}}\n` }, { keep: true });
    state = mkdtempSync(join(tmpdir(), 'egd-loopback-dns-'));
    const applied = await net.host.node(CLI, ['apply', dir], { env: { ...process.env, EGRESSD_STATE_DIR: state } });
    expect(applied.code, applied.stderr).toBe(0);
    server = net.host.spawn('/usr/bin/python3', ['-c', SERVER]);
    server.stdout!.on('data', (chunk: Buffer) => (heard += chunk.toString()));
    await printed(server, 'stdout', 'ready', 10_000);
  });
  afterAll(async () => {
    await net?.destroy();
    for (const path of [dir, state]) if (path) rmSync(path, { recursive: true, force: true });
  });

  it("a member's DNS to a resolver on loopback never arrives, over UDP and TCP, nor DNS-over-TLS's port; another user's does", async () => {
    const member = users.app3.name;
    expect(await net.host.connect({ proto: 'udp', addr: '127.0.0.1', port: 53, user: member, payload: 'member-udp\n', timeoutMs: 1000 })).toMatchObject({
      ok: false,
      // A UDP datagram the output hook drops fails its send at once.
      error: 'EPERM',
    });
    expect(await net.host.connect({ proto: 'tcp', addr: '127.0.0.1', port: 53, user: member, payload: 'member-tcp\n', timeoutMs: 1000 })).toMatchObject({
      connected: false,
    });
    expect(await net.host.connect({ proto: 'tcp', addr: '127.0.0.1', port: 853, user: member, payload: 'member-dot\n', timeoutMs: 1000 })).toMatchObject({
      connected: false,
    });
    // The same member reaches other loopback services, and another user this one: the last, so that nothing of the member's is still on its way.
    expect(await net.host.connect({ proto: 'udp', addr: '127.0.0.1', port: 5353, user: member, payload: 'member-other-port\n' })).toMatchObject({ ok: true });
    expect(await net.host.connect({ proto: 'udp', addr: '127.0.0.1', port: 53, user: users.app1.name, payload: 'other-udp\n' })).toMatchObject({ ok: true });
    expect(await net.host.connect({ proto: 'tcp', addr: '127.0.0.1', port: 53, user: users.app1.name, payload: 'other-tcp\n' })).toMatchObject({ ok: true });
    expect(heard).toContain('heard 53 other-tcp');
    expect(heard).toContain('heard 5353 member-other-port');
    expect(heard).not.toContain('member-udp');
    expect(heard).not.toContain('member-tcp');
    expect(heard).not.toContain('member-dot');
  });

  it("a member sending from a port another user's socket shares, and closing at once, is judged by its own socket: nothing arrives", async () => {
    const sent = await net.host.run('/usr/bin/python3', ['-c', SEND_AND_CLOSE], { user: users.app3.name });
    expect(sent).toMatch(/^(sent|dropped on its way out)$/m);
    // A non-member's datagram after it: once it is heard, the member's, sent before, would have been too.
    expect(await net.host.connect({ proto: 'udp', addr: '127.0.0.1', port: 53, user: users.app1.name, payload: 'after\n' })).toMatchObject({ ok: true });
    expect(heard).toContain('heard 53 after');
    expect(heard).not.toContain('closed-at-once');
  });
});
