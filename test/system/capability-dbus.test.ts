import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { systemCapabilityProbe } from '../../src/system/capability-probe.js';
import { policyDir } from '../support/policy-dir.js';

/**
 * Reading units' capabilities from systemd over D-Bus, against a real
 * dbus-daemon on a private bus. systemd itself is stood in for
 * (fixtures/systemd-standin.py, exporting org.freedesktop.systemd1's
 * LoadUnit and unit properties): there is no systemd running where the tests
 * run — no system bus, cgroup v1 on the host — and a booted one (nspawn,
 * qemu) costs minutes per run. What is real: the bus, busctl (systemd's own
 * client, as egressctl uses it), the wire format of every answer.
 */
const ROOT = join(import.meta.dirname, '..', '..');
const STANDIN = join(import.meta.dirname, 'fixtures', 'systemd-standin.py');
const PYTHON = '/usr/bin/python3';

function unavailable(): string | null {
  for (const [tool, pkg] of [
    ['dbus-daemon', 'dbus'],
    ['busctl', 'systemd'],
  ] as const)
    if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0) return `${tool} is not installed (Debian package ${pkg})`;
  if (!existsSync(PYTHON) || spawnSync(PYTHON, ['-c', 'import dbus.service, dbus.mainloop.glib; from gi.repository import GLib']).status !== 0)
    return 'the systemd stand-in needs python3-dbus and python3-gi';
  return null;
}
const skip = unavailable();

/** Starts a child and resolves with the first line it prints that `ready` accepts. */
function startAndWait(command: string, args: string[], ready: (line: string) => boolean): Promise<{ child: ChildProcess; line: string }> {
  const child = spawn(command, args, { stdio: ['pipe', 'pipe', 'pipe'] });
  return new Promise((resolve, reject) => {
    let out = '';
    let err = '';
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      const line = out.split('\n').find((l) => ready(l));
      if (line !== undefined) resolve({ child, line });
    });
    child.on('exit', (code) => reject(new Error(`${command} exited (${String(code)}) before it was ready: ${err}`)));
  });
}

const MASK_ALL = '18446744073709551615';
const UNITS = {
  'rooted.service': { User: 'root', CapabilityBoundingSet: MASK_ALL },
  'pinger.service': { User: 'pinger', CapabilityBoundingSet: MASK_ALL, AmbientCapabilities: 0x2000 },
  'bounded.service': { User: '', CapabilityBoundingSet: 0x400 },
  'private.service': { User: '', PrivateNetwork: true },
  FAIL: ['denied.service'],
};

describe.skipIf(skip)(`units' capabilities over D-Bus ${skip ? `(skipped: ${skip})` : ''}`, () => {
  const dir = mkdtempSync(join(tmpdir(), 'egd-dbus-'));
  const children: ChildProcess[] = [];
  let address = '';
  let bare = '';

  const bus = async (name: string) => {
    const { child, line } = await startAndWait('dbus-daemon', ['--session', `--address=unix:path=${join(dir, name)}`, '--nofork', '--print-address'], (l) =>
      l.startsWith('unix:'),
    );
    children.push(child);
    return line.trim();
  };

  beforeAll(async () => {
    address = await bus('bus');
    bare = await bus('bare');
    // The stand-in's numbers go as JSON; a 64-bit mask is written as a string and read by Python as an int.
    const units = JSON.stringify(UNITS).replace(/"(\d{6,})"/g, '$1');
    const { child } = await startAndWait(PYTHON, [STANDIN, address, units], (l) => l === 'ready');
    children.push(child);
  });
  afterAll(() => {
    for (const child of children.reverse()) {
      child.stdin?.end();
      child.kill('SIGTERM');
    }
    rmSync(dir, { recursive: true, force: true });
  });

  it("reads what systemd says of each unit: user, bounding and ambient sets (all 64 bits), private network; an error is the unit's problem", () => {
    const read = systemCapabilityProbe({ busAddress: address }).units([
      'rooted.service',
      'pinger.service',
      'bounded.service',
      'private.service',
      'absent.service',
      'denied.service',
    ]);
    expect(read.available).toBe(true);
    const units = read.available ? Object.fromEntries(read.units) : {};
    expect(units).toEqual({
      'rooted.service': { loadState: 'loaded', user: 'root', dynamicUser: false, boundingSet: 0xffffffffffffffffn, ambient: 0n, privateNetwork: false },
      'pinger.service': { loadState: 'loaded', user: 'pinger', dynamicUser: false, boundingSet: 0xffffffffffffffffn, ambient: 0x2000n, privateNetwork: false },
      'bounded.service': { loadState: 'loaded', user: '', dynamicUser: false, boundingSet: 0x400n, ambient: 0n, privateNetwork: false },
      'private.service': { loadState: 'loaded', user: '', dynamicUser: false, boundingSet: 0xffffffffffffffffn, ambient: 0n, privateNetwork: true },
      'absent.service': { loadState: 'not-found', user: '', dynamicUser: false, boundingSet: 0xffffffffffffffffn, ambient: 0n, privateNetwork: false },
      'denied.service': { problem: expect.stringContaining('Access denied') },
    });
  });

  it('a bus without systemd on it, and no bus at all, are one note each, not an error', () => {
    expect(systemCapabilityProbe({ busAddress: bare }).units(['rooted.service'])).toEqual({ available: false, why: 'systemd is not on the system bus' });
    const none = systemCapabilityProbe({ busAddress: `unix:path=${join(dir, 'nothing-here')}` }).units(['rooted.service']);
    expect(none).toEqual({ available: false, why: expect.stringMatching(/^no system bus \(/) });
    expect(systemCapabilityProbe({ busAddress: address, busctl: '/nonexistent/busctl' }).units(['rooted.service'])).toEqual({
      available: false,
      why: '/nonexistent/busctl is not installed (it comes with systemd)',
    });
  });

  it('egressctl check, with DBUS_SYSTEM_BUS_ADDRESS at the bus: a warning per unit that holds them, at its line; exit 0; --json well-formed', () => {
    const policy = policyDir({
      'a.yaml': `systemDomains:
  offline:
    members:
      - {unit: rooted.service}
      - {unit: pinger.service}
      - {unit: bounded.service}
      - {unit: private.service}
      - {unit: absent.service}
      - {unit: denied.service}
`,
    });
    const cli = (...args: string[]) =>
      spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'src/cli/main.ts'), ...args], {
        encoding: 'utf8',
        cwd: ROOT,
        env: { ...process.env, DBUS_SYSTEM_BUS_ADDRESS: address },
      });
    const text = cli('check', policy);
    expect(text.status, text.stderr).toBe(0);
    expect(text.stderr).toContain(
      `${policy}/a.yaml:4:9: warning: system domain offline member unit rooted.service: systemd starts rooted.service with CAP_NET_ADMIN and CAP_NET_RAW (it runs as root and CapabilityBoundingSet keeps CAP_NET_ADMIN and CAP_NET_RAW)`,
    );
    expect(text.stderr).toContain(
      `${policy}/a.yaml:5:9: warning: system domain offline member unit pinger.service: systemd starts pinger.service with CAP_NET_RAW (AmbientCapabilities gives user pinger CAP_NET_RAW)`,
    );
    expect(text.stderr).toContain('warning: capabilities of denied.service not read from systemd: Call failed: Access denied');
    for (const quiet of ['bounded.service', 'private.service', 'absent.service']) expect(text.stderr).not.toContain(`systemd starts ${quiet}`);
    const json = cli('check', policy, '--json');
    expect(json.status).toBe(0);
    const report = JSON.parse(json.stdout) as { warnings: { line: number; hint: string }[]; capabilities: { problems: string[]; notes: string[] } };
    expect(report.warnings.map((w) => w.line)).toEqual([4, 5]);
    expect(report.warnings[0]!.hint).toBe(
      'add to it with "systemctl edit rooted.service": CapabilityBoundingSet=~CAP_NET_RAW CAP_NET_ADMIN, AmbientCapabilities=, RestrictAddressFamilies=~AF_PACKET',
    );
    expect(report.capabilities).toEqual({ problems: ['capabilities of denied.service not read from systemd: Call failed: Access denied'], notes: [] });
  });
});
