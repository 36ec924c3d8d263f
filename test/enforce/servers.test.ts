import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestNet, ensureTestUsers, harnessUnavailableReason, type TestNet, type TestUsers } from '../harness/index.js';
import { policyDir } from '../support/policy-dir.js';

/**
 * A server in an app whose default is deny answers the connections that come
 * in: its replies pass as that app's own connection (conntrack marks,
 * compile.ts). A SYN-ACK leaves from a request socket, not yet a full one:
 * `socket cgroupv2` does not see its cgroup, so it meets the apps by uid and
 * the global default. Were it claimed there, the connection would be the
 * default's, and the server's own answers would be dropped as another
 * identity's. Each case talks to the server from the internet side.
 */
const ROOT = join(import.meta.dirname, '..', '..');
const CLI = join(ROOT, 'src/cli/main.ts');
const unavailable = harnessUnavailableReason();

/** Accepts one connection on PORT, echoes each line back as "echo LINE", and exits when it closes, or after SECONDS. */
const LINE_SERVER = `
import socket, sys, threading
port, seconds = int(sys.argv[1]), float(sys.argv[2])
timer = threading.Timer(seconds, lambda: __import__('os')._exit(0)); timer.daemon = True; timer.start()
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('::', port)); s.listen(1)
print('listening', flush=True)
c, _ = s.accept(); f = c.makefile('rwb')
for line in f:
    f.write(b'echo ' + line); f.flush()
`;

describe.skipIf(unavailable)(`servers in apps whose default is deny answer what comes in ${unavailable ? `(skipped: ${unavailable})` : ''}`, () => {
  let net: TestNet;
  let users: TestUsers;
  let state: string;
  let E: string;
  let port = 47100;

  async function apply(yaml: string): Promise<void> {
    const dir = policyDir({ '00.yaml': yaml });
    const result = await net.host.node(CLI, ['apply', dir], { env: { ...process.env, EGRESSD_STATE_DIR: state } });
    if (result.code !== 0) throw new Error(`apply failed: ${result.stderr}`);
  }

  /** Starts the line server on the host side (in `cgroup`, as `user`), connects from the internet side and sends three lines: how many came back. */
  async function talk(identity: { cgroup?: string; user?: string }, addr: string): Promise<number> {
    port += 1;
    const server = net.host.exec('/usr/bin/python3', ['-c', LINE_SERVER, String(port), '6'], { ...identity, timeoutMs: 10_000 });
    await new Promise((resolve) => setTimeout(resolve, 400));
    const session = await net.inet.session({ addr, port, timeoutMs: 2000 });
    let echoed = 0;
    if (session.connected) for (const line of ['one', 'two', 'three']) if (await session.send(line, 1500)) echoed += 1;
    await session.close();
    await server;
    return echoed;
  }

  beforeAll(async () => {
    users = ensureTestUsers();
    net = await createTestNet();
    E = `egd-servers-${net.id}`;
    net.host.mkCgroup(`${E}/srv`);
    state = mkdtempSync(join(tmpdir(), 'egd-servers-state-'));
  });
  afterAll(async () => {
    await net?.destroy();
    if (state) rmSync(state, { recursive: true, force: true });
  });

  for (const egress of ['deny', 'allow'] as const) {
    it(`a server found by cgroup, in an app whose default is deny, answers every line (global default ${egress}), v4 and v6`, async () => {
      await apply(`defaults: {egress: ${egress}}\napps:\n  srv: {identity: {cgroup: "${E}/srv"}, default: deny}\n`);
      expect(await talk({ cgroup: `${E}/srv` }, '192.0.2.1')).toBe(3);
      expect(await talk({ cgroup: `${E}/srv` }, '2001:db8::1')).toBe(3);
    });
  }

  it('a server found by user, in an app whose default is deny, answers every line; one outside every app meets the global default deny but for its answers', async () => {
    await apply(`defaults: {egress: deny}\napps:\n  srv: {identity: {user: ${users.app1.name}}, default: deny}\n`);
    expect(await talk({ user: users.app1.name }, '192.0.2.1')).toBe(3);
    expect(await talk({ user: users.app2.name }, '192.0.2.1')).toBe(3);
  });
});
