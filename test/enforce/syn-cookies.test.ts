import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestNet, ensureTestUsers, harnessUnavailableReason, type TestNet, type TestUsers } from '../harness/index.js';
import { cookieAttempt, holdHalfOpen } from '../support/cookie-connection.js';
import { policyDir } from '../support/policy-dir.js';

const ROOT = join(import.meta.dirname, '..', '..');
const CLI = join(ROOT, 'src/cli/main.ts');
const unavailable = harnessUnavailableReason();

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
  /** A listener run as `who`, and a peer that first holds `held` half-open connections to it: what reached the peer. */
  const attempt = (who: { user: string; group?: string; cgroup?: string }, held: number, family: 'v4' | 'v6' = 'v4') =>
    cookieAttempt(net, who, { held, family });

  beforeAll(async () => {
    users = ensureTestUsers();
    net = await createTestNet();
    E = `egd-cookies-${net.id}`;
    net.host.mkCgroup(`${E}/offline`);
    state = mkdtempSync(join(tmpdir(), 'egd-syncookies-state-'));
    await holdHalfOpen(net);
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
