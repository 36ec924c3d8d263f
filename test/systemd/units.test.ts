import { spawnSync } from 'node:child_process';
import { accessSync, constants, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';

/**
 * The shipped units as systemd reads them: `systemd-analyze verify` finds
 * nothing to say, and `systemd-analyze security` scores the hardening. These
 * are the unit files themselves, not a test's idea of them; only where the
 * ExecStart binary is not at the unit's path (node installed elsewhere) does
 * verify read a copy with that one path pointed at this Node.
 */

const SYSTEMD_DIR = join(import.meta.dirname, '../../systemd');
const UNITS = ['egressd.service', 'egressd-early.service'];
/** The target; both units reach it (measured 1.9 and 1.4 with systemd 252). */
const MAX_EXPOSURE = 2.0;

const has = (tool: string) => spawnSync(tool, ['--version'], { stdio: 'ignore' }).status === 0;
const analyze = has('systemd-analyze');
const scratch = mkdtempSync(join(tmpdir(), 'egressd-units-'));
afterAll(() => rmSync(scratch, { recursive: true, force: true }));

function executable(path: string): boolean {
  try {
    accessSync(path, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/** The unit files to verify: the shipped ones, or copies with /usr/bin/node pointed at this Node where it is not there. */
function unitsToVerify(): string[] {
  if (executable('/usr/bin/node')) return UNITS.map((u) => join(SYSTEMD_DIR, u));
  const dir = join(scratch, 'verify');
  mkdirSync(dir, { recursive: true });
  return UNITS.map((u) => {
    writeFileSync(join(dir, u), readFileSync(join(SYSTEMD_DIR, u), 'utf8').replaceAll('/usr/bin/node', process.execPath));
    return join(dir, u);
  });
}

/** verify exits 0 on unknown keys and bad values (it only warns), so anything it prints is a finding. */
function verify(paths: readonly string[]): { status: number | null; said: string } {
  const run = spawnSync('systemd-analyze', ['verify', ...paths], { encoding: 'utf8' });
  return { status: run.status, said: `${run.stdout}${run.stderr}`.trim() };
}

function exposure(path: string): number {
  const run = spawnSync('systemd-analyze', ['security', '--offline=yes', '--no-pager', path], { encoding: 'utf8' });
  const line = /Overall exposure level for \S+: (\d+(?:\.\d+)?)/.exec(run.stdout);
  if (!line?.[1]) throw new Error(`no exposure level in systemd-analyze security's output:\n${run.stdout}${run.stderr}`);
  return Number(line[1]);
}

describe.skipIf(!analyze)('the shipped units (systemd-analyze)', () => {
  it('every unit file in systemd/ is one of those checked here', () => {
    expect(
      readdirSync(SYSTEMD_DIR)
        .filter((f) => /\.(service|socket|timer|path|target)$/.test(f))
        .sort(),
    ).toEqual([...UNITS].sort());
  });

  it('systemd-analyze verify says nothing about any of them', () => {
    expect(verify(unitsToVerify())).toEqual({ status: 0, said: '' });
  });

  it('verify would say it: a unit with an unknown key or a missing binary is reported', () => {
    const dir = join(scratch, 'broken');
    mkdirSync(dir, { recursive: true });
    const text = readFileSync(join(SYSTEMD_DIR, 'egressd.service'), 'utf8');
    writeFileSync(join(dir, 'egressd.service'), text.replace('NoNewPrivileges=yes', 'NoNewPrivilege=yes'));
    expect(verify([join(dir, 'egressd.service')]).said).toMatch(/Unknown key 'NoNewPrivilege'/);
    writeFileSync(join(dir, 'egressd.service'), text.replace('/usr/bin/node', join(dir, 'no-node')));
    expect(verify([join(dir, 'egressd.service')])).toMatchObject({ status: 1, said: expect.stringMatching(/is not executable/) as unknown });
  });

  it.each(UNITS)(`%s: exposure (systemd-analyze security --offline=yes) is at most ${MAX_EXPOSURE}`, (unit) => {
    expect(exposure(join(SYSTEMD_DIR, unit))).toBeLessThanOrEqual(MAX_EXPOSURE);
  });

  it('the score counts: the daemon unit without its hardening scores far worse', () => {
    const bare = readFileSync(join(SYSTEMD_DIR, 'egressd.service'), 'utf8')
      .split('\n')
      .filter((line) => !/^(Protect|Private|Restrict|SystemCall|CapabilityBoundingSet|NoNewPrivileges)/.test(line))
      .join('\n');
    const path = join(scratch, 'egressd.service');
    writeFileSync(path, bare);
    expect(exposure(path)).toBeGreaterThan(5);
  });
});

describe('egressd.service as the daemon needs it', () => {
  const unit = readFileSync(join(SYSTEMD_DIR, 'egressd.service'), 'utf8');
  const settings = (key: string) => [...unit.matchAll(new RegExp(`^${key}=(.*)$`, 'gm'))].map((m) => m[1]);

  it('runs node itself, so that NotifyAccess=main accepts its READY=1', () => {
    expect(settings('Type')).toEqual(['notify']);
    expect(settings('NotifyAccess')).toEqual(['main']);
    expect(settings('ExecStart')[0]).toMatch(/^\/usr\/bin\/node \/usr\/lib\/egressd\/dist\/daemon\/main\.js /);
  });

  it('keeps /run/egressd across restarts: the table lock and the control socket outlive the service, like the table', () => {
    expect(settings('RuntimeDirectory')).toEqual(['egressd']);
    expect(settings('RuntimeDirectoryPreserve')).toEqual(['yes']);
    expect(settings('StateDirectory')).toEqual(['egressd']);
  });

  it('lets node, executed by root, keep the capabilities nftables needs: no SecureBits=noroot (root would exec with none), or the capabilities ambient', () => {
    const noroot = settings('SecureBits').some((bits) => /\bnoroot\b/.test(bits ?? ''));
    const ambient = settings('AmbientCapabilities').join(' ');
    expect(settings('User')).toEqual([]);
    if (noroot) expect(ambient).toContain('CAP_NET_ADMIN');
    expect(settings('CapabilityBoundingSet')[0]).toContain('CAP_NET_ADMIN');
  });

  it('keeps the address families sd_notify, nftables and sock_diag need', () => {
    expect(settings('RestrictAddressFamilies')).toEqual(['AF_UNIX AF_NETLINK AF_INET AF_INET6']);
  });

  it('reaches no address but loopback by itself: the resolver adds its upstreams at run time (test/boot checks the kernel holds to it)', () => {
    expect(settings('IPAddressDeny')).toEqual(['any']);
    expect(settings('IPAddressAllow')).toEqual(['localhost']);
  });
});

/** Node's JIT writes code and then runs it: under MemoryDenyWriteExecute (PR_SET_MDWE, Linux 6.3) V8 aborts, so the unit cannot set it. */
describe.skipIf(!executable('/usr/bin/python3'))('MemoryDenyWriteExecute and Node', () => {
  const underMdwe = (args: readonly string[]) =>
    spawnSync(
      '/usr/bin/python3',
      [
        '-c',
        'import ctypes, os, sys\nlibc = ctypes.CDLL(None, use_errno=True)\nif libc.prctl(65, 1, 0, 0, 0) != 0: sys.exit(77)\nos.execv(sys.argv[1], sys.argv[1:])',
        process.execPath,
        ...args,
      ],
      { encoding: 'utf8', timeout: 30_000 },
    );
  const hot = 'let s = 0; for (let i = 0; i < 1e7; i++) s += i; console.log(s)';

  it('Node with its JIT dies under it; only --jitless runs', (ctx) => {
    const jit = underMdwe(['-e', hot]);
    if (jit.status === 77) ctx.skip(); // a kernel without PR_SET_MDWE
    expect(jit.status).not.toBe(0);
    expect(jit.stdout).toBe('');
    const jitless = underMdwe(['--jitless', '-e', hot]);
    expect(jitless.status).toBe(0);
    expect(jitless.stdout.trim()).toBe('49999995000000');
  });

  it('so the unit leaves it off', () => {
    expect(readFileSync(join(SYSTEMD_DIR, 'egressd.service'), 'utf8')).toMatch(/^MemoryDenyWriteExecute=no$/m);
  });
});

describe.skipIf(!has('systemd-tmpfiles') || !has('systemd-sysusers'))('the sysusers and tmpfiles snippets', () => {
  it('make group egressd-audit and the directories with their modes in a staging root', () => {
    const root = join(scratch, 'root');
    mkdirSync(join(root, 'etc'), { recursive: true });
    const sysusers = spawnSync('systemd-sysusers', [`--root=${root}`, join(SYSTEMD_DIR, 'egressd-sysusers.conf')], { encoding: 'utf8' });
    expect(sysusers.status, sysusers.stderr).toBe(0);
    expect(readFileSync(join(root, 'etc/group'), 'utf8')).toMatch(/^egressd-audit:x:\d+:$/m);
    const tmpfiles = spawnSync('systemd-tmpfiles', [`--root=${root}`, '--create', join(SYSTEMD_DIR, 'egressd-tmpfiles.conf')], { encoding: 'utf8' });
    expect(tmpfiles.status, tmpfiles.stderr).toBe(0);
    expect(statSync(join(root, 'var/lib/egressd')).mode & 0o7777).toBe(0o751);
    const denials = statSync(join(root, 'var/lib/egressd/denials'));
    expect(denials.mode & 0o7777).toBe(0o2750);
    expect(denials.gid).toBe(Number(/^egressd-audit:x:(\d+):$/m.exec(readFileSync(join(root, 'etc/group'), 'utf8'))![1]));
    expect(statSync(join(root, 'run/egressd')).mode & 0o7777).toBe(0o755);
  });
});

describe('egressd-early.service as the boot needs it', () => {
  const unit = readFileSync(join(SYSTEMD_DIR, 'egressd-early.service'), 'utf8');
  const settings = (key: string) => [...unit.matchAll(new RegExp(`^${key}=(.*)$`, 'gm'))].map((m) => m[1]);

  it('sets up no /dev of its own (it raced with the boot and failed the unit: systemd/README.md), and opens no device', () => {
    expect(settings('PrivateDevices')).toEqual(['no']);
    expect(settings('DevicePolicy')).toEqual(['closed']);
    expect(settings('DeviceAllow')).toEqual([]);
  });
});
