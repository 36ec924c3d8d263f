import { chownSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestNet, ensureTestUsers, harnessUnavailableReason, type Server, type TestNet, type TestUsers } from '../harness/index.js';
import { policyDir } from '../support/policy-dir.js';

/**
 * Cgroups are dispatched before uids and gids. A user identified by `user:`
 * (an app with default deny) made a scope in the subtree systemd delegated
 * to it, named to match another app's glob (the README's Firefox example),
 * moved itself in, and took that app's allowances. Now a cgroup a non-root
 * uid owns takes away from what the user's own app allows and never adds:
 * deny wins, both ways. A cgroup root made still decides alone.
 *
 * Each user's "user manager" cgroup is chowned to it, as systemd does for
 * `user@UID.service`; the user itself makes its scope there and writes its
 * own pid into it, as any process of that user can.
 */
const ROOT = join(import.meta.dirname, '..', '..');
const CLI = join(ROOT, 'src/cli/main.ts');
const unavailable = harnessUnavailableReason();

describe.skipIf(unavailable)(`a cgroup its user controls ${unavailable ? `(skipped: ${unavailable})` : ''}`, () => {
  let net: TestNet;
  let users: TestUsers;
  let state: string;
  let E: string;
  let server: Server;
  let dir: string;
  const cli = (...args: string[]) => net.host.node(CLI, args, { env: { ...process.env, EGRESSD_STATE_DIR: state } });
  /** The cgroup delegated to the n-th test user: chowned to it, as systemd chowns user@UID.service. */
  const manager = (n: 1 | 2 | 3) => `${E}/user-${n}.slice/user@${n}.service`;

  /**
   * As the test user, started in its delegated cgroup: makes `scope` there
   * (unless it exists), moves itself in and connects. Whether the connection
   * came up within 2 s.
   */
  const fromOwnScope = async (n: 1 | 2 | 3, scope: string, addr: string) => {
    const user = [users.app1, users.app2, users.app3][n - 1]!.name;
    const dir = `/sys/fs/cgroup/${manager(n)}/${scope}`;
    const script = `mkdir -p ${dir} && echo $$ > ${dir}/cgroup.procs && exec timeout 2 bash -c 'exec 3<>/dev/tcp/${addr}/8443'`;
    const r = await net.host.exec('bash', ['-c', script], { cgroup: manager(n), user });
    // Known to the harness now, so that it removes it at the end (made by the user, so owned by it).
    net.host.mkCgroup(`${manager(n)}/${scope}`);
    if (r.code !== 0 && r.code !== 124) throw new Error(`the connection from ${scope} could not be tried: ${r.code} ${r.stderr}`);
    return r.code === 0;
  };
  const connect = async (addr: string, cgroup: string, user: string) =>
    (await net.host.connect({ proto: 'tcp', addr, port: 8443, timeoutMs: 1500, cgroup, user })).ok;

  beforeAll(async () => {
    users = ensureTestUsers();
    net = await createTestNet();
    E = `egd-deleg-${net.id}`;
    for (const [n, user] of [
      [1, users.app1],
      [2, users.app2],
      [3, users.app3],
    ] as const) {
      net.host.mkCgroup(manager(n));
      const path = net.host.cgroupFsPath(manager(n));
      for (const file of ['', '/cgroup.procs', '/cgroup.subtree_control', '/cgroup.threads']) chownSync(`${path}${file}`, user.uid, user.gid);
    }
    net.host.mkCgroup(`${E}/sys.slice/web.service`);
    state = mkdtempSync(join(tmpdir(), 'egd-deleg-state-'));
    server = await net.inet.listen({ proto: 'tcp', addr: '::', port: 8443 });
    dir = policyDir(
      {
        '00.yaml': `
defaults: {egress: allow}
apps:
  firefox: {identity: {cgroup: "${E}/*/user@*.service/app-firefox-*.scope"}, rules: [{deny: [198.51.100.3]}]}
  locked: {identity: {cgroup: "${E}/*/user@*.service/app-locked-*.scope"}, default: deny}
  web: {identity: {cgroup: "${E}/sys.slice/web.service"}, rules: [{deny: [198.51.100.3]}]}
  build: {identity: {user: ${users.app1.name}}, default: deny, rules: [{allow: [192.0.2.2], ports: [8443], proto: tcp}]}
  open: {identity: {user: ${users.app2.name}}}
`,
      },
      { keep: true },
    );
    // The scopes exist when the policy is applied (the app tracker adds later ones; not this test's subject).
    for (const [n, scope] of [
      [1, 'app-firefox-1.scope'],
      [2, 'app-locked-2.scope'],
      [2, 'app-firefox-2.scope'],
      [3, 'app-firefox-3.scope'],
    ] as const) {
      const user = [users.app1, users.app2, users.app3][n - 1]!;
      const r = await net.host.exec('mkdir', [`/sys/fs/cgroup/${manager(n)}/${scope}`], { user: user.name });
      if (r.code !== 0) throw new Error(`${user.name} could not make ${scope}: ${r.stderr}`);
      net.host.mkCgroup(`${manager(n)}/${scope}`);
    }
    const applied = await cli('apply', dir);
    if (applied.code !== 0) throw new Error(`apply failed: ${applied.stderr}`);
  });
  afterAll(async () => {
    await server?.close();
    await net?.destroy();
    if (state) rmSync(state, { recursive: true, force: true });
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it("a default-deny user in a scope it made, named for a default-allow app's glob, gets nothing that app allows and its own app does not", async () => {
    await server.reset();
    // The escape: build denies 198.51.100.2, firefox allows it.
    expect(await fromOwnScope(1, 'app-firefox-1.scope', '198.51.100.2')).toBe(false);
    // What both allow still passes.
    expect(await fromOwnScope(1, 'app-firefox-1.scope', '192.0.2.2')).toBe(true);
    // From its own manager cgroup, which matches no glob: its own app, as before.
    expect(await connect('198.51.100.2', manager(1), users.app1.name)).toBe(false);
    expect((await server.waitFor(1)).map((s) => s.local)).toEqual(['192.0.2.2']);
  });

  it("the other way: a user whose own app allows, in a scope of a default-deny app's glob or of an app's deny rule, is denied — deny wins", async () => {
    await server.reset();
    expect(await fromOwnScope(2, 'app-locked-2.scope', '198.51.100.2')).toBe(false);
    expect(await fromOwnScope(2, 'app-firefox-2.scope', '198.51.100.3')).toBe(false);
    expect(await fromOwnScope(2, 'app-firefox-2.scope', '198.51.100.2')).toBe(true);
    expect((await server.waitFor(1)).map((s) => s.local)).toEqual(['198.51.100.2']);
  });

  it("a user with no app of its own: the scope's app decides alone; a cgroup root made decides alone whatever its process's user", async () => {
    await server.reset();
    expect(await fromOwnScope(3, 'app-firefox-3.scope', '198.51.100.2')).toBe(true);
    expect(await fromOwnScope(3, 'app-firefox-3.scope', '198.51.100.3')).toBe(false);
    // web.service is root's: build's user in it gets web's allowances, as a system unit's identity holds.
    expect(await connect('198.51.100.2', `${E}/sys.slice/web.service`, users.app1.name)).toBe(true);
    expect(await connect('198.51.100.3', `${E}/sys.slice/web.service`, users.app1.name)).toBe(false);
    expect((await server.waitFor(2)).map((s) => s.local)).toEqual(['198.51.100.2', '198.51.100.2']);
  });

  it('explain reads the owner as compile does, and answers for a cgroup asked with its user as the kernel did', async () => {
    const explain = async (...args: string[]) => {
      const r = await net.host.node(CLI, ['explain', dir, '--to', '198.51.100.2:8443/tcp', '--json', ...args]);
      if (!r.stdout) throw new Error(`explain printed nothing: ${r.stderr}`);
      return { code: r.code, ...(JSON.parse(r.stdout) as { verdict: string; ruleId: string; steps: string[] }) };
    };
    const scope = `${manager(1)}/app-firefox-1.scope`;
    const asUser = await explain('--app', `cgroup:${scope}`, '--as', `user:${users.app1.name}`);
    expect(asUser).toMatchObject({ code: 1, verdict: 'deny', ruleId: 'app/build/default' });
    expect(asUser.steps).toContain(
      `cgroup ${scope} is owned by uid ${users.app1.uid} (delegated), so what app "firefox" lets out, app "build" of its user or group must let out too`,
    );
    expect(await explain('--app', `cgroup:${scope}`)).toMatchObject({ code: 0, verdict: 'allow', ruleId: 'app/firefox/default' });
    expect(await explain('--app', `cgroup:${E}/sys.slice/web.service`, '--as', `uid:${users.app1.uid}`)).toMatchObject({
      code: 0,
      verdict: 'allow',
      ruleId: 'app/web/default',
    });
  });
});
