import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestNet, ensureTestUsers, harnessUnavailableReason, type Server, type TestNet } from '../harness/index.js';
import { policyDir } from '../support/policy-dir.js';

/**
 * What `explain` says about IPv4-mapped and loopback destinations, against
 * what the kernel does with the applied table: a dual-stack socket (Node's
 * default for an IPv6 address) sends to ::ffff:a.b.c.d as IPv4.
 */
const ROOT = join(import.meta.dirname, '..', '..');
const CLI = join(ROOT, 'src/cli/main.ts');
const unavailable = harnessUnavailableReason();

const POLICY = `
defaults: {egress: allow}
deny:
  - to: [203.0.113.0/24]
  - to: ["::/0"]
    ports: [8443]
    proto: tcp
systemDomains:
  offline: {members: [{user: egd-app1}]}
`;

let net: TestNet;
let state: string;
let dir: string;
let servers: Record<'denied4' | 'denied4udp' | 'allowed4' | 'allowed4udp' | 'denied6' | 'local', Server>;

async function explain(who: string, to: string): Promise<{ code: number | null; verdict: string; level: string }> {
  const result = await net.host.node(CLI, ['explain', dir, '--app', who, '--to', to, '--json']);
  if (!result.stdout) throw new Error(`explain printed nothing: ${result.stderr}`);
  const answer = JSON.parse(result.stdout) as { verdict: string; level: string };
  return { code: result.code, verdict: answer.verdict, level: answer.level };
}

describe.skipIf(unavailable)(`explain against the kernel ${unavailable ? `(skipped: ${unavailable})` : ''}`, () => {
  beforeAll(async () => {
    ensureTestUsers();
    net = await createTestNet();
    state = mkdtempSync(join(tmpdir(), 'egd-explain-state-'));
    dir = policyDir({ '00.yaml': POLICY }, { keep: true });
    servers = {
      denied4: await net.inet.listen({ proto: 'tcp', addr: '203.0.113.1', port: 8443 }),
      denied4udp: await net.inet.listen({ proto: 'udp', addr: '203.0.113.1', port: 8443 }),
      allowed4: await net.inet.listen({ proto: 'tcp', addr: '198.51.100.1', port: 8443 }),
      allowed4udp: await net.inet.listen({ proto: 'udp', addr: '198.51.100.1', port: 8443 }),
      denied6: await net.inet.listen({ proto: 'tcp', addr: '2001:db8:1::1', port: 8443 }),
      local: await net.host.listen({ proto: 'tcp', addr: '127.0.0.1', port: 8080 }),
    };
    const applied = await net.host.node(CLI, ['apply', dir], { env: { ...process.env, EGRESSD_STATE_DIR: state } });
    if (applied.code !== 0) throw new Error(`apply failed: ${applied.stderr}`);
  });
  afterAll(async () => {
    await net?.destroy();
    if (state) rmSync(state, { recursive: true, force: true });
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('[::ffff:203.0.113.1] is dropped by the IPv4 deny, tcp and udp, and explain says denied', async () => {
    expect(await explain('uid:0', '[::ffff:203.0.113.1]:8443/tcp')).toEqual({ code: 1, verdict: 'deny', level: 'global-deny' });
    expect(await explain('uid:0', '[::ffff:203.0.113.1]:8443/udp')).toEqual({ code: 1, verdict: 'deny', level: 'global-deny' });
    expect(await net.host.connect({ proto: 'tcp', addr: '::ffff:203.0.113.1', port: 8443, timeoutMs: 800 })).toMatchObject({ ok: false, error: 'ETIMEDOUT' });
    expect(await net.host.connect({ proto: 'udp', addr: '::ffff:203.0.113.1', port: 8443, timeoutMs: 800 })).toMatchObject({ ok: false });
    expect(await servers.denied4.count()).toBe(0);
    expect(await servers.denied4udp.count()).toBe(0);
  });

  it('[::ffff:198.51.100.1] passes the IPv6 deny of ::/0, which never sees it, and explain says allowed', async () => {
    expect(await explain('uid:0', '[::ffff:198.51.100.1]:8443/tcp')).toEqual({ code: 0, verdict: 'allow', level: 'default' });
    expect(await net.host.connect({ proto: 'tcp', addr: '::ffff:198.51.100.1', port: 8443 })).toMatchObject({ ok: true });
    expect(await net.host.connect({ proto: 'udp', addr: '::ffff:198.51.100.1', port: 8443 })).toMatchObject({ ok: true });
    expect(await servers.allowed4.count()).toBe(1);
    expect(await servers.allowed4udp.count()).toBe(1);
    // The IPv6 rule itself is live.
    expect(await explain('uid:0', '[2001:db8:1::1]:8443/tcp')).toEqual({ code: 1, verdict: 'deny', level: 'global-deny' });
    expect(await net.host.connect({ proto: 'tcp', addr: '2001:db8:1::1', port: 8443, timeoutMs: 800 })).toMatchObject({ ok: false, error: 'ETIMEDOUT' });
    expect(await servers.denied6.count()).toBe(0);
  });

  it('a system domain reaches loopback by [::ffff:127.0.0.1] and nothing else, as explain says', async () => {
    expect(await explain('user:egd-app1', '[::ffff:127.0.0.1]:8080/tcp')).toEqual({ code: 0, verdict: 'allow', level: 'loopback' });
    expect(await explain('user:egd-app1', '198.51.100.1:8443/tcp')).toEqual({ code: 1, verdict: 'deny', level: 'system-domain' });
    expect(await net.host.connect({ proto: 'tcp', addr: '::ffff:127.0.0.1', port: 8080, user: 'egd-app1' })).toMatchObject({ ok: true });
    expect(await servers.local.count()).toBe(1);
    const before = await servers.allowed4.count();
    expect(await net.host.connect({ proto: 'tcp', addr: '198.51.100.1', port: 8443, user: 'egd-app1', timeoutMs: 800 })).toMatchObject({
      ok: false,
      error: 'ETIMEDOUT',
    });
    expect(await servers.allowed4.count()).toBe(before);
  });
});
