import { spawnSync } from 'node:child_process';
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { parseProcCgroup, type CapabilityProbe, type TaskReading, type TasksRead, type UnitConfig, type UnitsRead } from './capabilities.js';

/**
 * Reads, for capabilities.ts, the machine's threads from /proc and service
 * units from systemd over the system bus. Kept thin: what it reads is
 * judged there.
 *
 * systemd is asked through busctl, which is part of systemd itself: where
 * systemd is on the system bus, busctl is there too, and Node has no D-Bus
 * client of its own (no D-Bus package is a dependency). busctl honours
 * DBUS_SYSTEM_BUS_ADDRESS, like every D-Bus client; `busAddress` overrides it.
 */
export function systemCapabilityProbe(options: { procRoot?: string; busAddress?: string; busctl?: string } = {}): CapabilityProbe {
  const proc = options.procRoot ?? '/proc';
  return {
    tasks: () => readTasks(proc),
    units: (names) => readUnits(names, options.busAddress, options.busctl ?? 'busctl'),
  };
}

/** A process or thread that exited while it was read is no problem: it holds nothing now. */
const gone = (error: unknown) => ['ENOENT', 'ESRCH'].includes((error as NodeJS.ErrnoException).code ?? '');

/** A namespace link's target ("user:[4026531837]"), or undefined where it cannot be read (another user's process, for a non-root reader). */
function nsLink(path: string): string | undefined {
  try {
    return readlinkSync(path);
  } catch {
    return undefined;
  }
}

function readTasks(proc: string): TasksRead {
  const tasks: TaskReading[] = [];
  const problems: string[] = [];
  const userNs = nsLink(`${proc}/self/ns/user`);
  let pids: string[];
  try {
    pids = readdirSync(proc).filter((name) => /^\d+$/.test(name));
  } catch (error) {
    return {
      tasks,
      problems: [`running processes not checked: ${proc} cannot be read (${(error as Error).message})`],
      ...(userNs !== undefined && { userNs }),
    };
  }
  for (const pid of pids) {
    let tids: string[];
    try {
      tids = readdirSync(`${proc}/${pid}/task`).filter((name) => /^\d+$/.test(name));
    } catch (error) {
      if (!gone(error)) problems.push(`capabilities of PID ${pid} not checked: ${(error as Error).message}`);
      continue;
    }
    for (const tid of tids) {
      try {
        const status = readFileSync(`${proc}/${pid}/task/${tid}/status`, 'utf8');
        const cgroup = parseProcCgroup(readFileSync(`${proc}/${pid}/task/${tid}/cgroup`, 'utf8'));
        const ns = nsLink(`${proc}/${pid}/task/${tid}/ns/user`);
        tasks.push({ pid: Number(pid), tid: Number(tid), cgroup, status, ...(ns !== undefined && { userNs: ns }) });
      } catch (error) {
        if (!gone(error)) problems.push(`capabilities of PID ${pid} (thread ${tid}) not checked: ${(error as Error).message}`);
      }
    }
  }
  return { tasks, problems, ...(userNs !== undefined && { userNs }) };
}

type Busctl = (args: readonly string[]) => { ok: true; lines: string[] } | { ok: false; why: string; missing?: true };

function readUnits(names: readonly string[], address: string | undefined, command: string): UnitsRead {
  const busctl: Busctl = (args) => {
    const result = spawnSync(command, [address === undefined ? '--system' : `--address=${address}`, '--timeout=3', ...args], {
      encoding: 'utf8',
      timeout: 10_000,
    });
    if (result.error) {
      const missing = (result.error as NodeJS.ErrnoException).code === 'ENOENT';
      return {
        ok: false,
        why: missing ? `${command} is not installed (it comes with systemd)` : result.error.message,
        ...(missing && { missing: true as const }),
      };
    }
    if (result.status !== 0)
      return { ok: false, why: (result.stderr.trim().split('\n').pop() ?? '') || `${command} exited with status ${String(result.status)}` };
    return { ok: true, lines: result.stdout.split('\n').filter((l) => l !== '') };
  };
  // Asked of the bus itself, so that "no bus" and "no systemd on it" are told apart without reading error text.
  const owner = busctl(['call', 'org.freedesktop.DBus', '/org/freedesktop/DBus', 'org.freedesktop.DBus', 'NameHasOwner', 's', 'org.freedesktop.systemd1']);
  if (!owner.ok) return { available: false, why: owner.missing ? owner.why : `no system bus (${owner.why})` };
  if (owner.lines[0] !== 'b true') return { available: false, why: 'systemd is not on the system bus' };
  const units = new Map<string, UnitConfig | { problem: string }>();
  for (const name of names) units.set(name, readUnit(busctl, name));
  return { available: true, units };
}

const SYSTEMD = 'org.freedesktop.systemd1';

function readUnit(busctl: Busctl, name: string): UnitConfig | { problem: string } {
  // LoadUnit, as `systemctl show` does: a unit not started yet is still configured.
  const loaded = busctl(['call', SYSTEMD, '/org/freedesktop/systemd1', `${SYSTEMD}.Manager`, 'LoadUnit', 's', name]);
  if (!loaded.ok) return { problem: loaded.why };
  const path = parseValue(loaded.lines[0], 'o');
  if (typeof path !== 'string' || !path.startsWith('/')) return { problem: `LoadUnit answered ${JSON.stringify(loaded.lines[0] ?? '')}` };
  const unit = busctl(['get-property', SYSTEMD, path, `${SYSTEMD}.Unit`, 'LoadState']);
  if (!unit.ok) return { problem: unit.why };
  const loadState = parseValue(unit.lines[0], 's');
  if (typeof loadState !== 'string') return { problem: `LoadState answered ${JSON.stringify(unit.lines[0] ?? '')}` };
  const props = ['User', 'DynamicUser', 'CapabilityBoundingSet', 'AmbientCapabilities', 'PrivateNetwork'] as const;
  const types = ['s', 'b', 't', 't', 'b'] as const;
  const service = busctl(['get-property', SYSTEMD, path, `${SYSTEMD}.Service`, ...props]);
  if (!service.ok) return { problem: service.why };
  const values = props.map((_, i) => parseValue(service.lines[i], types[i]!));
  const bad = values.findIndex((v) => v === undefined);
  if (bad >= 0) return { problem: `${props[bad]!} answered ${JSON.stringify(service.lines[bad] ?? '')}` };
  const [user, dynamicUser, boundingSet, ambient, privateNetwork] = values as [string, boolean, bigint, bigint, boolean];
  return { loadState, user, dynamicUser, boundingSet, ambient, privateNetwork };
}

/**
 * One value as busctl prints it: `s "text"`, `o "/path"`, `b true`, `t 123`.
 * A 64-bit mask is read as a bigint: a JSON number would lose its low bits,
 * where CAP_NET_ADMIN and CAP_NET_RAW are.
 */
export function parseValue(line: string | undefined, type: 's' | 'o' | 'b' | 't'): string | boolean | bigint | undefined {
  if (line === undefined || !line.startsWith(`${type} `)) return undefined;
  const value = line.slice(2);
  if (type === 'b') return value === 'true' ? true : value === 'false' ? false : undefined;
  if (type === 't') return /^\d{1,20}$/.test(value) ? BigInt(value) : undefined;
  const quoted = /^"((?:[^"\\]|\\.)*)"$/.exec(value);
  return quoted ? quoted[1]!.replace(/\\(.)/g, '$1') : undefined;
}
