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

describe.skipIf(unavailable)(`capabilities of confined processes ${unavailable ? `(skipped: ${unavailable})` : ''}`, () => {
  let net: TestNet;
  let users: TestUsers;
  let state: string;
  let E: string;
  const pids: Record<'raw' | 'plain' | 'ambient' | 'quiet', number> = { raw: 0, plain: 0, ambient: 0, quiet: 0 };
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
});
