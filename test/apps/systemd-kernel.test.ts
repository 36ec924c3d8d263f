import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestNet, harnessUnavailableReason, type TestNet } from '../harness/index.js';
import { policyDir } from '../support/policy-dir.js';
import { startTracker, wallNow, type RunningTracker } from './support.js';

/**
 * systemd's signals drive the tracker alone: inotify is off and the
 * periodic look far away, so a cgroup is written only because a signal
 * named its unit. The bus is a real dbus-daemon; systemd is stood in for
 * (fixtures/systemd-units.py: Subscribe, GetUnit, UnitNew, UnitRemoved,
 * JobRemoved and each unit's ControlGroup) — there is no systemd here. The
 * cgroups and the table are real, in the test net's host namespaces.
 */
const PYTHON = '/usr/bin/python3';
const STANDIN = join(import.meta.dirname, 'fixtures', 'systemd-units.py');

function unavailable(): string | null {
  const harness = harnessUnavailableReason();
  if (harness) return harness;
  if (spawnSync('sh', ['-c', 'command -v dbus-daemon']).status !== 0) return 'dbus-daemon is not installed (Debian package dbus-daemon)';
  if (!existsSync(PYTHON) || spawnSync(PYTHON, ['-c', 'import dbus.service, dbus.mainloop.glib; from gi.repository import GLib']).status !== 0)
    return 'the systemd stand-in needs python3-dbus and python3-gi';
  return null;
}
const skip = unavailable();

/** A child and its stdout lines as they come. */
function startLines(
  command: string,
  args: string[],
): { child: ChildProcess; lines: string[]; waitLine: (match: (l: string) => boolean, timeoutMs?: number) => Promise<string> } {
  const child = spawn(command, args, { stdio: ['pipe', 'pipe', 'pipe'] });
  const lines: string[] = [];
  const waiters = new Set<() => void>();
  let err = '';
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  createInterface({ input: child.stdout }).on('line', (line) => {
    lines.push(line);
    for (const wake of waiters) wake();
  });
  const waitLine = (match: (l: string) => boolean, timeoutMs = 10_000): Promise<string> =>
    new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        waiters.delete(check);
        reject(new Error(`${command}: no such line within ${timeoutMs} ms: ${JSON.stringify(lines)} ${err}`));
      }, timeoutMs);
      function check(): void {
        const found = lines.find(match);
        if (found === undefined) return;
        clearTimeout(timer);
        waiters.delete(check);
        resolve(found);
      }
      waiters.add(check);
      check();
    });
  return { child, lines, waitLine };
}

describe.skipIf(skip)(`systemd's signals on a real bus drive the app tracker ${skip ? `(skipped: ${skip})` : ''}`, () => {
  let net: TestNet;
  let E: string;
  let tracker: RunningTracker;
  let bus: ReturnType<typeof startLines>;
  let standin: ReturnType<typeof startLines>;
  let commands = 0;
  const dir = mkdtempSync(join(tmpdir(), 'egd-apps-bus-'));
  const tell = async (line: string): Promise<void> => {
    commands++;
    const n = commands;
    standin.child.stdin!.write(`${line}\n`);
    await standin.waitLine((l) => l === `ok ${n}`);
  };
  const added = (path: string, from: number) => tracker.waitFor((e) => e.ev === 'change' && e.added === true && e.path === path, 5000, from);

  beforeAll(async () => {
    net = await createTestNet();
    E = `egdapps-bus-${net.id}`;
    net.host.mkCgroup(E);
    bus = startLines('dbus-daemon', ['--session', `--address=unix:path=${join(dir, 'bus')}`, '--nofork', '--print-address']);
    const address = (await bus.waitLine((l) => l.startsWith('unix:'))).trim();
    standin = startLines(PYTHON, [STANDIN, address]);
    await standin.waitLine((l) => l === 'ready');
    const policy = policyDir(
      {
        '00.yaml': `defaults: {egress: deny}\napps:\n  browser: {identity: {cgroup: "${E}/browser-*"}, rules: [{allow: [198.51.100.1], ports: [8443], proto: tcp}]}\n`,
      },
      { keep: true },
    );
    const state = mkdtempSync(join(dir, 'state-'));
    tracker = await startTracker(net, { policy, state, watch: false, systemd: { busAddress: address }, reconcileMs: 600_000 });
    await standin.waitLine((l) => l === 'subscribed');
  });
  afterAll(async () => {
    await tracker?.stop();
    standin?.child.kill();
    bus?.child.kill();
    await net?.destroy();
    rmSync(dir, { recursive: true, force: true });
  });

  it('with inotify off, a new cgroup no signal names is not written', async () => {
    const from = tracker.events.length;
    net.host.mkCgroup(`${E}/browser-quiet`);
    await new Promise((resolve) => setTimeout(resolve, 700));
    expect(tracker.events.slice(from).filter((e) => e.ev === 'change')).toEqual([]);
  });

  it("UnitNew: the unit's cgroup is written, by the id cgroupfs gives it", async () => {
    net.host.mkCgroup(`${E}/browser-new`);
    const from = tracker.events.length;
    const sent = wallNow();
    await tell(`new app-browser-new.scope /${E}/browser-new`);
    const change = await added(`${E}/browser-new`, from);
    expect(BigInt(change.id!)).toBe(net.host.cgroupId(`${E}/browser-new`));
    expect(change.at! - sent).toBeLessThan(1000);
  });

  it('JobRemoved: a unit that appeared without UnitNew is asked for by name when its job is done', async () => {
    net.host.mkCgroup(`${E}/browser-job`);
    await tell(`load browser-job.service /${E}/browser-job`);
    const from = tracker.events.length;
    await tell('job browser-job.service');
    await added(`${E}/browser-job`, from);
  });

  it("UnitRemoved: the unit's last known cgroup is looked at again, and its id taken out", async () => {
    const first = tracker.events.find((e) => e.ev === 'change' && e.added && e.path === `${E}/browser-new`)!;
    await net.host.rmCgroup(`${E}/browser-new`);
    const from = tracker.events.length;
    await tell('remove app-browser-new.scope');
    const gone = await tracker.waitFor((e) => e.ev === 'change' && e.added === false && e.path === `${E}/browser-new`, 5000, from);
    expect(gone.id).toBe(first.id);
  });

  it('a signal naming a cgroup no selector matches, or one that does not exist, writes nothing', async () => {
    net.host.mkCgroup(`${E}/other-1`);
    const from = tracker.events.length;
    await tell(`new other-1.scope /${E}/other-1`);
    await tell(`new ghost.scope /${E}/browser-ghost`);
    await tell(`new odd.scope /../../${E}/browser-quiet/../browser-x`);
    await new Promise((resolve) => setTimeout(resolve, 500));
    expect(tracker.events.slice(from).filter((e) => e.ev === 'change')).toEqual([]);
  });

  it('the bus going away stops the part (the daemon starts it again)', async () => {
    bus.child.kill();
    await tracker.waitFor((e) => e.ev === 'stopped', 5000);
  });
});
