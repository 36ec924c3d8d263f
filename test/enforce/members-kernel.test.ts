import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestNet, ensureTestUsers, harnessUnavailableReason, type Server, type TestNet, type TestUsers } from '../harness/index.js';
import { policyDir } from '../support/policy-dir.js';

/**
 * Identities that cannot be left by changing ids (issue 17, findings 4 and
 * 5), against the kernel, with the internet side counting what arrives.
 * A system-domain member by user sends from its subordinate uids — as
 * setpriv, and from a real user namespace mapped to its range as newuidmap
 * maps it; members of a system-domain group send with another group —
 * supplementary members with their own, a primary member after an `sg`-like
 * change; a member of a system-domain group sends from its own subordinate
 * ids, as setpriv and from a real user namespace. Nothing may arrive.
 *
 * The machine's /etc/subuid, /etc/subgid and /etc/group stay as they are:
 * the host side runs in a private mount namespace, and the test binds its
 * own copies over them there, where egressctl runs.
 */
const ROOT = join(import.meta.dirname, '..', '..');
const CLI = join(ROOT, 'src/cli/main.ts');
const unavailable =
  harnessUnavailableReason() ??
  (['/etc/subuid', '/etc/subgid', '/etc/group'].every(existsSync) ? null : 'needs /etc/subuid, /etc/subgid and /etc/group to bind over');

const SUB_FROM = 300000;
/** egd-app2's subordinate ranges: it is a member of a system-domain group, not a member by user. */
const MEMBER_SUB_FROM = 400000;
const SUB_COUNT = 65536;
const DEST = '198.51.100.1';
const PORT = 8443;

describe.skipIf(unavailable)(`subordinate ids and group members against the kernel ${unavailable ? `(skipped: ${unavailable})` : ''}`, () => {
  let net: TestNet;
  let users: TestUsers;
  let work: string;
  let tcp: Server;
  let udp: Server;
  let supGroup: string;
  let supGid: number;
  let dir: string;
  /** A directory egd-app1 can read, for the script its user namespace runs. */
  let probe: string;
  const cli = (...args: string[]) => net.host.node(CLI, args, { env: { ...process.env, EGRESSD_STATE_DIR: join(work, 'state') } });

  /** Sends one TCP connection and one UDP datagram as `who`; returns how many of each arrived. */
  const send = async (who: { user: number | string; group?: number; groups?: number[] }): Promise<{ tcp: number; udp: number }> => {
    await tcp.reset();
    await udp.reset();
    await net.host.connect({ proto: 'tcp', addr: DEST, port: PORT, timeoutMs: 1000, ...who });
    await net.host.connect({ proto: 'udp', addr: DEST, port: PORT, timeoutMs: 1000, ...who });
    return { tcp: await tcp.count(), udp: await udp.count() };
  };

  /** What `server` saw, once it saw something or 1.5 s passed. */
  const settled = async (server: Server): Promise<number> => {
    for (const end = Date.now() + 1500; ; await new Promise((resolve) => setTimeout(resolve, 100))) {
      const seen = await server.count();
      if (seen > 0 || Date.now() >= end) return seen;
    }
  };

  /**
   * A real user namespace made by `user` (egd-app1 unless said) and mapped,
   * as newuidmap and newgidmap map it, to its subordinate ranges from `from`
   * (root writes the maps); the shell inside sends a UDP datagram and a TCP
   * connection. Returns what arrived and the uid the kernel sees the process as.
   */
  const sendFromUserNamespace = async (user = users.app1, from = SUB_FROM): Promise<{ tcp: number; udp: number; kernelUid: string }> => {
    await tcp.reset();
    await udp.reset();
    const script = [
      'set -e',
      `setpriv --reuid=${user.uid} --regid=${user.gid} --clear-groups -- unshare --user -- bash ${probe}/inside.sh &`,
      'pid=$!',
      // Should a step fail, the child must not wait for its maps for ever (it holds the output open).
      "trap 'kill $pid 2>/dev/null || true' EXIT",
      // Until the child is in its own user namespace: a map written before would be the parent's.
      'while [ "$(readlink /proc/$pid/ns/user)" = "$(readlink /proc/self/ns/user)" ]; do sleep 0.01; done',
      // As newuidmap maps a rootless container: its own id as 0, its subordinate range from 1 on. A map is
      // written once, in one write(2): cat writes what it read whole, where printf writes line by line.
      `cat > /proc/$pid/uid_map <<< '0 ${user.uid} 1\n1 ${from} ${SUB_COUNT}'`,
      `cat > /proc/$pid/gid_map <<< '0 ${user.gid} 1\n1 ${from} ${SUB_COUNT}'`,
      // The uid the kernel sees once the child took uid 1 of its namespace (its process keeps its pid through exec).
      'for i in $(seq 200); do uid=$(stat -c %u /proc/$pid); [ "$uid" != ' + String(user.uid) + ' ] && break; sleep 0.01; done',
      'echo $uid',
      'wait $pid',
    ].join('\n');
    const run = await net.host.exec('bash', ['-c', script]);
    if (run.code !== 0) throw new Error(`user namespace probe failed: ${run.code} ${run.stderr}`);
    // The shell only opens and closes its connection: give the servers a moment to record it, so that a 0 means none came.
    return { tcp: await settled(tcp), udp: await settled(udp), kernelUid: run.stdout.trim() };
  };

  beforeAll(async () => {
    users = ensureTestUsers();
    net = await createTestNet();
    work = mkdtempSync(join(tmpdir(), 'egd-members-'));
    supGroup = `egd-sup-${net.id}`;
    supGid = 64000 + (parseInt(net.id, 16) % 1000);
    // The test's own account files, bound over the machine's in the host side's mount namespace only.
    const ranges = `${users.app1.name}:${SUB_FROM}:${SUB_COUNT}\n${users.app2.name}:${MEMBER_SUB_FROM}:${SUB_COUNT}\n`;
    writeFileSync(join(work, 'subuid'), ranges);
    writeFileSync(join(work, 'subgid'), ranges);
    writeFileSync(join(work, 'group'), `${readFileSync('/etc/group', 'utf8').replace(/\n?$/, '\n')}${supGroup}:x:${supGid}:${users.app2.name}\n`);
    probe = mkdtempSync(join(tmpdir(), 'egd-members-probe-'));
    chmodSync(probe, 0o755);
    // Waits for its maps (a proc file's size is 0 whatever it holds: read it), takes a uid and gid of its
    // namespace's subordinate part as a rootless container does, and sends.
    writeFileSync(
      join(probe, 'inside.sh'),
      [
        'until grep -q . /proc/self/gid_map; do sleep 0.02; done',
        // Now uid 0 of its namespace: what it executes has the namespace's capabilities, and can take uid 1 (the first subordinate uid).
        `exec setpriv --reuid=1 --regid=1 --clear-groups -- bash -c 'sleep 0.3; echo hi > /dev/udp/${DEST}/${PORT}; timeout 3 bash -c "exec 3<>/dev/tcp/${DEST}/${PORT}" || true'`,
        '',
      ].join('\n'),
      { mode: 0o644 },
    );
    for (const file of ['subuid', 'subgid', 'group']) await net.host.run('mount', ['--bind', join(work, file), `/etc/${file}`]);
    tcp = await net.inet.listen({ proto: 'tcp', addr: DEST, port: PORT });
    udp = await net.inet.listen({ proto: 'udp', addr: DEST, port: PORT });
  });
  afterAll(async () => {
    await net?.destroy();
    for (const made of [work, probe, dir]) if (made) rmSync(made, { recursive: true, force: true });
  });

  it('before apply, every probe arrives: the probes themselves reach the internet side', async () => {
    expect(await send({ user: SUB_FROM + 5, group: SUB_FROM + 5 })).toEqual({ tcp: 1, udp: 1 });
    expect(await sendFromUserNamespace()).toEqual({ tcp: 1, udp: 1, kernelUid: String(SUB_FROM) });
    expect(await send({ user: users.app2.name, group: users.app2.gid, groups: [supGid] })).toEqual({ tcp: 1, udp: 1 });
    expect(await send({ user: users.app3.name, group: users.app1.gid })).toEqual({ tcp: 1, udp: 1 });
    expect(await send({ user: MEMBER_SUB_FROM + 5, group: MEMBER_SUB_FROM + 5 })).toEqual({ tcp: 1, udp: 1 });
    expect(await sendFromUserNamespace(users.app2, MEMBER_SUB_FROM)).toEqual({ tcp: 1, udp: 1, kernelUid: String(MEMBER_SUB_FROM) });
  });

  it('applies a system domain of a user and two groups; the subordinate ranges and members are in its maps', async () => {
    dir = policyDir(
      {
        '00.yaml': `defaults: {egress: allow}\nsystemDomains:\n  offline:\n    members: [{user: ${users.app1.name}}, {group: ${supGroup}}, {group: ${users.grp.name}}]\n`,
      },
      { keep: true },
    );
    const applied = await cli('apply', dir);
    expect(applied.stderr).toContain('applied');
    expect(applied.code).toBe(0);
    const listed = (await net.host.nft(['list', 'table', 'inet', 'egressd'])).stdout;
    expect(listed).toContain(`${SUB_FROM}-${SUB_FROM + SUB_COUNT - 1} : goto sd_offline`);
    expect(listed).toContain(`${users.app2.uid} : goto sd_offline`);
    expect(listed).toContain(`${users.app3.uid} : goto sd_offline`);
    // egd-app2 is in the domain as a member of its group: its subordinate ranges are there with it.
    expect(listed).toContain(`${MEMBER_SUB_FROM}-${MEMBER_SUB_FROM + SUB_COUNT - 1} : goto sd_offline`);
    // The interval map lists back as compiled: status finds the table in force matching the policy.
    const status = await cli('status', dir);
    expect(status.code, status.stderr).toBe(0);
    // explain says what the kernel does.
    for (const who of [
      `uid:${SUB_FROM + 5}`,
      `gid:${SUB_FROM + 7}`,
      `user:${users.app2.name}`,
      `user:${users.app3.name}`,
      `uid:${MEMBER_SUB_FROM + 5}`,
      `gid:${MEMBER_SUB_FROM + 7}`,
    ]) {
      const answer = await cli('explain', dir, '--app', who, '--to', `${DEST}:${PORT}/tcp`, '--json');
      expect(JSON.parse(answer.stdout), who).toMatchObject({ verdict: 'deny', level: 'system-domain' });
    }
  });

  it('(finding 4) a member by user sending from a uid of its subordinate range: nothing arrives', async () => {
    expect(await send({ user: SUB_FROM + 5, group: SUB_FROM + 5 })).toEqual({ tcp: 0, udp: 0 });
    expect(await send({ user: SUB_FROM + SUB_COUNT - 1, group: 4242 })).toEqual({ tcp: 0, udp: 0 });
    // Its subordinate gid alone, with a uid of nobody's: still its own.
    expect(await send({ user: 4242, group: SUB_FROM + 9 })).toEqual({ tcp: 0, udp: 0 });
  });

  it('(finding 4) from a real user namespace mapped to its subordinate ranges: nothing arrives', async () => {
    expect(await sendFromUserNamespace()).toEqual({ tcp: 0, udp: 0, kernelUid: String(SUB_FROM) });
  });

  it('(finding 5) a supplementary member of a system-domain group, sending with its own primary group: nothing arrives', async () => {
    expect(await send({ user: users.app2.name, group: users.app2.gid, groups: [supGid] })).toEqual({ tcp: 0, udp: 0 });
    // It stays a member without the group in its list: membership is the name service's, not the process's.
    expect(await send({ user: users.app2.name, group: users.app2.gid })).toEqual({ tcp: 0, udp: 0 });
  });

  it('(finding 5) a primary member after an sg-like change of group, and a non-member running with the group: nothing arrives', async () => {
    expect(await send({ user: users.app3.name, group: users.app1.gid })).toEqual({ tcp: 0, udp: 0 });
    expect(await send({ user: 4242, group: users.grp.gid })).toEqual({ tcp: 0, udp: 0 });
  });

  it('a member of a system-domain group sending from its own subordinate ids, as setpriv and from a real user namespace: nothing arrives', async () => {
    expect(await send({ user: MEMBER_SUB_FROM + 5, group: MEMBER_SUB_FROM + 5 })).toEqual({ tcp: 0, udp: 0 });
    expect(await send({ user: MEMBER_SUB_FROM + SUB_COUNT - 1, group: 4242 })).toEqual({ tcp: 0, udp: 0 });
    // Its subordinate gid alone, with a uid of nobody's.
    expect(await send({ user: 4242, group: MEMBER_SUB_FROM + 9 })).toEqual({ tcp: 0, udp: 0 });
    // As `unshare --user --map-auto` and then `setpriv --reuid=1` send: host uid MEMBER_SUB_FROM.
    expect(await sendFromUserNamespace(users.app2, MEMBER_SUB_FROM)).toEqual({ tcp: 0, udp: 0, kernelUid: String(MEMBER_SUB_FROM) });
  });

  it('ids outside the ranges and the groups still arrive: the domain holds its own and no more', async () => {
    expect(await send({ user: SUB_FROM + SUB_COUNT, group: 4242 })).toEqual({ tcp: 1, udp: 1 });
    expect(await send({ user: MEMBER_SUB_FROM + SUB_COUNT, group: 4242 })).toEqual({ tcp: 1, udp: 1 });
    expect(await send({ user: SUB_FROM - 1, group: 4242 })).toEqual({ tcp: 1, udp: 1 });
    const answer = await cli('explain', dir, '--app', `uid:${SUB_FROM + SUB_COUNT}`, '--to', `${DEST}:${PORT}/tcp`, '--json');
    expect(answer.stdout ? JSON.parse(answer.stdout) : answer.stderr).toMatchObject({ verdict: 'allow', level: 'default' });
  });
});
