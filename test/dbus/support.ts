/**
 * Real dbus-daemons for the D-Bus tests: a system-like bus configured as
 * Debian's system bus is (default deny for method calls, signals allowed)
 * plus the shipped systemd/org.egressd.Firewall1.conf, and a session bus
 * any test user may join (the notification server lives on it). Clients run
 * as the test users through setpriv, with --clear-groups: group membership
 * is the service's to look up, never the caller's to bring.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import type { DenialRecord } from '../../src/denials/record.js';
import { aggregateKey } from '../../src/denials/record.js';
import { telemetryDenial } from '../denials/store-records.js';
import type { DenialCounters, DenialFeed, DenialFilter, DenialStore, DenialStoreCounters, DenialSummary, StoredDenial } from '../../src/dbus/contracts.js';
import { lookupGroup, lookupUser, RUN_DIR, runSync } from '../harness/sys.js';

export const ROOT = join(import.meta.dirname, '..', '..');
export const POLICY_FILE = join(ROOT, 'systemd', 'org.egressd.Firewall1.conf');
const CLIENT = join(import.meta.dirname, 'fixtures', 'client.ts');

export function dbusUnavailable(): string | null {
  if (spawnSync('sh', ['-c', 'command -v dbus-daemon']).status !== 0) return 'dbus-daemon is not installed (Debian package dbus-daemon)';
  if (process.getuid?.() !== 0) return 'needs root (clients run as test users)';
  return null;
}

export const quietLog = () => pino({ level: process.env['EGD_TEST_LOG'] ?? 'silent' });

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

export interface Buses {
  readonly system: string;
  readonly session: string;
  readonly dir: string;
  stop(): void;
}

/** `systemPolicy`: more <policy> elements for the system bus (a test's own services on it, e.g. a polkit authority). */
export async function startBuses(systemPolicy = ''): Promise<Buses> {
  const dir = mkdtempSync(join(tmpdir(), 'egd-dbus-'));
  chmodSync(dir, 0o755);
  const systemConf = join(dir, 'system.conf');
  writeFileSync(
    systemConf,
    `<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=${dir}/system_bus_socket</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus" send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Debug.Stats"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.systemd1.Activator"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.systemd1.Activator"/>
  </policy>
  <include>${POLICY_FILE}</include>
${systemPolicy}
</busconfig>
`,
  );
  const sessionConf = join(dir, 'session.conf');
  writeFileSync(
    sessionConf,
    `<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path=${dir}/session_bus_socket</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
`,
  );
  const children: ChildProcess[] = [];
  const start = async (conf: string) => {
    const { child, line } = await startAndWait('dbus-daemon', [`--config-file=${conf}`, '--nofork', '--print-address'], (l) => l.startsWith('unix:'));
    children.push(child);
    return line.trim();
  };
  const system = await start(systemConf);
  const session = await start(sessionConf);
  return {
    system,
    session,
    dir,
    stop() {
      for (const child of children) child.kill('SIGTERM');
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

export interface AuditUsers {
  readonly group: string;
  readonly gid: number;
  /** A listed member of the audit group (gr_mem), its primary group its own. */
  readonly auditor: { name: string; uid: number; gid: number };
}

/** egd-audit and its member egd-auditor, created once under the harness's user lock. */
export function ensureAuditUser(): AuditUsers {
  if (!lookupUser('egd-auditor') || !lookupGroup('egd-audit')) {
    const script = [
      'set -e',
      'getent group egd-audit >/dev/null || groupadd --system egd-audit',
      'getent passwd egd-auditor >/dev/null || useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin --user-group --groups egd-audit egd-auditor',
    ].join('\n');
    runSync(['flock', `${RUN_DIR}/users.lock`, 'sh', '-c', script]);
  }
  const user = lookupUser('egd-auditor')!;
  const group = lookupGroup('egd-audit')!;
  return { group: group.name, gid: group.gid, auditor: { name: user.name, uid: user.uid, gid: user.gid } };
}

export type ClientLine = { ok?: unknown; error?: string; message?: string; denied?: DenialRecord & { id?: number }; id?: number; name?: string };

function clientArgv(user: { uid: number; gid: number }, busAddress: string, calls: unknown[]): string[] {
  return [
    'setpriv',
    `--reuid=${user.uid}`,
    `--regid=${user.gid}`,
    '--clear-groups',
    '--',
    process.execPath,
    '--import',
    'tsx',
    CLIENT,
    busAddress,
    JSON.stringify(calls),
  ];
}

/** Runs the calls as `user` and returns one line per call (asynchronously: the service under test runs in this process). */
export function runClient(user: { uid: number; gid: number }, busAddress: string, calls: unknown[]): Promise<ClientLine[]> {
  const [cmd, ...args] = clientArgv(user, busAddress, calls);
  const child = spawn(cmd!, args, { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'], timeout: 30_000 });
  let out = '';
  let err = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  return new Promise((resolve, reject) => {
    child.on('close', (code) => {
      if (code !== 0) reject(new Error(`client as uid ${user.uid} failed (${String(code)}): ${err}`));
      else
        resolve(
          out
            .trim()
            .split('\n')
            .filter(Boolean)
            .map((l) => JSON.parse(l) as ClientLine),
        );
    });
  });
}

/** A subscribed client kept running: its lines as they come. */
export interface Agent {
  readonly lines: ClientLine[];
  waitFor(predicate: (lines: ClientLine[]) => boolean, timeoutMs?: number): Promise<void>;
  stop(): void;
}

export function startClient(user: { uid: number; gid: number }, busAddress: string, calls: unknown[]): Agent {
  const [cmd, ...args] = clientArgv(user, busAddress, calls);
  const child = spawn(cmd!, args, { cwd: ROOT, stdio: ['pipe', 'pipe', 'pipe'] });
  const lines: ClientLine[] = [];
  let buffer = '';
  let err = '';
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  child.stdout.on('data', (d: Buffer) => {
    buffer += d.toString();
    const parts = buffer.split('\n');
    buffer = parts.pop()!;
    for (const l of parts) if (l.trim()) lines.push(JSON.parse(l) as ClientLine);
  });
  return {
    lines,
    async waitFor(predicate, timeoutMs = 40_000) {
      const end = Date.now() + timeoutMs;
      while (!predicate(lines)) {
        if (Date.now() > end) throw new Error(`client as uid ${user.uid}: timed out; lines: ${JSON.stringify(lines)}; stderr: ${err}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    },
    stop() {
      child.stdin.end();
      child.kill('SIGTERM');
    },
  };
}

/**
 * The store's interface over an array: what these tests check is who may
 * read and change through D-Bus, not the store (src/denials/store.ts, on
 * its own branch, has its own tests). Filters as the contract says.
 */
export class MemoryStore implements DenialStore {
  readonly rows: StoredDenial[] = [];
  flushes = 0;
  private readonly ids = new WeakMap<DenialRecord, number>();

  add(records: readonly DenialRecord[]): void {
    for (const r of records) {
      this.rows.push({ ...r, id: this.rows.length + 1 });
      this.ids.set(r, this.rows.length);
    }
  }
  idOf(record: DenialRecord): number | undefined {
    return this.ids.get(record);
  }
  /** Counted as the real store counts what its bounded queue could not take. */
  dropped = 0;
  flush(): Promise<void> {
    this.flushes += 1;
    return Promise.resolve();
  }
  query(filter: DenialFilter): Promise<StoredDenial[]> {
    return Promise.resolve(this.rows_(filter));
  }
  private rows_(filter: DenialFilter): StoredDenial[] {
    return this.rows
      .filter(
        (r) =>
          (filter.since === undefined || r.lastSeen >= filter.since) &&
          (filter.until === undefined || r.lastSeen <= filter.until) &&
          (filter.app === undefined || r.app === filter.app || r.domain === filter.app) &&
          (filter.dest === undefined || r.name === filter.dest || r.address === filter.dest) &&
          (filter.rule === undefined || r.shortId === filter.rule || r.ruleId === filter.rule) &&
          (filter.uid === undefined || r.uid === filter.uid),
      )
      .sort((a, b) => b.lastSeen - a.lastSeen || b.id - a.id)
      .slice(0, filter.limit ?? 1000);
  }
  get(id: number): Promise<StoredDenial | undefined> {
    return Promise.resolve(this.rows.find((r) => r.id === id));
  }
  summary(filter: DenialFilter): Promise<DenialSummary> {
    const rows = this.rows_(filter);
    return Promise.resolve({ records: rows.length, packets: rows.reduce((n, r) => n + r.count, 0), apps: [], destinations: [], rules: [] });
  }
  counters(): DenialStoreCounters {
    return { queued: 0, queuedPeak: 0, written: this.rows.length, dropped: this.dropped, droppedEvents: this.dropped, failed: 0, failedEvents: 0 };
  }
  close(): Promise<void> {
    return Promise.resolve();
  }
}

/** A feed the test drives; the store subscribes first, as the daemon wires it. */
export class TestFeed implements DenialFeed {
  private readonly listeners = new Set<(r: DenialRecord) => void>();
  events = 0;
  subscribe(listener: (r: DenialRecord) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }
  emit(record: DenialRecord): void {
    this.events += record.count;
    for (const l of this.listeners) l(record);
  }
  counters(): DenialCounters {
    return { events: this.events, records: 0, lost: 3, enobufs: 1, sequenceGaps: 2, unparsed: 0 };
  }
}

let clock = 1_780_000_000_000;
/** A global rule's denial of firefox's connection to a telemetry name, each a second after the one before; `over` replaces fields. */
export function denial(over: Partial<DenialRecord> = {}): DenialRecord {
  clock += 1000;
  return telemetryDenial({ firstSeen: clock, lastSeen: clock, ...over });
}

export { aggregateKey };
