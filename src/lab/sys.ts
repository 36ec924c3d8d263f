// Low-level helpers of the test harness: running commands, records of live harnesses under
// /run/egressd-test, clean-up of what a crashed run left, user and group look-ups.
// Nothing here touches the machine's own network: every `ip`/`nft` call names a namespace
// whose name matches NETNS_RE, i.e. one the harness itself made.
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { lockPathFor } from '../enforce/lock.js';
import { controlSocketPathFor } from '../resolver/control.js';

export const RUN_DIR = '/run/egressd-test';
/** Namespaces the harness makes: `egdt<6 hex>-host` / `egdt<6 hex>-inet` (15 chars). */
export const NETNS_RE = /^egdt([0-9a-f]{6})-(host|inet)$/;

export class HarnessError extends Error {
  override name = 'HarnessError';
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export function sleepSync(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

export interface ExecResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
  durationMs: number;
}

export interface RawExecOptions {
  input?: string | Buffer;
  timeoutMs?: number;
  env?: NodeJS.ProcessEnv;
  /** Called with the child right after spawn (for tracking). */
  onSpawn?: (child: import('node:child_process').ChildProcess) => void;
}

/** Runs argv[0] with argv[1..], collects output; never throws for a non-zero exit. */
export function execArgv(argv: readonly string[], opts: RawExecOptions = {}): Promise<ExecResult> {
  const [cmd, ...args] = argv;
  if (cmd === undefined) throw new HarnessError('execArgv: empty argv');
  const started = Date.now();
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'], env: opts.env ?? process.env });
    opts.onSpawn?.(child);
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, opts.timeoutMs ?? 30_000);
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => err.push(d));
    child.stdin.on('error', () => {}); // EPIPE when the child does not read its input
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(new HarnessError(`cannot run ${cmd}: ${e.message}`));
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({
        code,
        signal,
        stdout: Buffer.concat(out).toString(),
        stderr: Buffer.concat(err).toString(),
        timedOut,
        durationMs: Date.now() - started,
      });
    });
    if (opts.input !== undefined) child.stdin.end(opts.input);
    else child.stdin.end();
  });
}

/** Synchronous run that throws with stderr on failure (set-up and tear-down steps). */
export function runSync(argv: readonly string[], input?: string): string {
  const [cmd, ...args] = argv;
  if (cmd === undefined) throw new HarnessError('runSync: empty argv');
  const r = spawnSync(cmd, args, { input: input ?? '', encoding: 'utf8', timeout: 20_000 });
  if (r.error) throw new HarnessError(`cannot run ${argv.join(' ')}: ${r.error.message}`);
  if (r.status !== 0) {
    throw new HarnessError(`${argv.join(' ')} failed (${r.status ?? r.signal}): ${r.stderr.trim()}`);
  }
  return r.stdout;
}

/** Like runSync but ignores failure; returns stdout or ''. */
export function trySync(argv: readonly string[]): string {
  const [cmd, ...args] = argv;
  if (cmd === undefined) return '';
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 20_000 });
  return r.status === 0 ? r.stdout : '';
}

export function describeFailure(what: string, r: ExecResult): string {
  const how = r.timedOut ? 'timed out' : `exit ${r.code ?? r.signal}`;
  return `${what} ${how}: ${(r.stderr || r.stdout).trim()}`;
}

// ------------------------------------------------------------------ prerequisites
const TOOLS: Record<string, string> = {
  ip: 'iproute2',
  nsenter: 'util-linux',
  unshare: 'util-linux',
  setpriv: 'util-linux',
  flock: 'util-linux',
  nft: 'nftables',
  sysctl: 'procps',
};

function which(cmd: string): string | undefined {
  for (const dir of (process.env['PATH'] ?? '/usr/sbin:/usr/bin:/sbin:/bin').split(':')) {
    const p = path.join(dir, cmd);
    try {
      fs.accessSync(p, fs.constants.X_OK);
      return p;
    } catch {
      /* next */
    }
  }
  return undefined;
}

/** Why the harness cannot run here, or null when it can. */
export function harnessUnavailableReason(): string | null {
  if (process.platform !== 'linux') return 'the test harness needs Linux';
  if (process.getuid?.() !== 0) return 'the test harness needs root (network namespaces, nftables, cgroups)';
  const missing = Object.entries(TOOLS).filter(([cmd]) => which(cmd) === undefined);
  if (missing.length > 0) {
    const pkgs = [...new Set(missing.map(([, p]) => p))].join(' ');
    return `the test harness needs ${missing.map(([c]) => c).join(', ')}: apt-get install ${pkgs} (scripts/setup.sh)`;
  }
  return null;
}

export function requireTool(cmd: string, pkg: string): void {
  if (which(cmd) === undefined) {
    throw new HarnessError(`'${cmd}' is not installed: apt-get install ${pkg} (scripts/setup.sh should do this)`);
  }
}

// ------------------------------------------------------------------ process identity
/** Start time of a process (field 22 of /proc/PID/stat), or undefined if it is gone. */
export function procStart(pid: number): string | undefined {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // comm (field 2) may contain spaces and parentheses: split after the last ')'.
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return rest[19]; // field 22 overall
  } catch {
    return undefined;
  }
}

export function isAlive(pid: number, start: string): boolean {
  return procStart(pid) === start;
}

// ------------------------------------------------------------------ records
export interface NetRecord {
  id: string;
  /** Process that made the namespaces, and its start time (guards against PID reuse). */
  pid: number;
  pidStart: string;
  host: string;
  inet: string;
  /** cgroup2 paths (relative to the root) this net created or used. */
  cgroups: string[];
  created: string;
}

export function recordPath(id: string): string {
  return path.join(RUN_DIR, `${id}.json`);
}

export function ensureRunDir(): void {
  fs.mkdirSync(RUN_DIR, { recursive: true, mode: 0o755 });
}

export function writeRecord(rec: NetRecord): void {
  const p = recordPath(rec.id);
  const tmp = `${p}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, JSON.stringify(rec, null, 2) + '\n');
  fs.renameSync(tmp, p);
}

export function readRecords(): NetRecord[] {
  let names: string[];
  try {
    names = fs.readdirSync(RUN_DIR);
  } catch {
    return [];
  }
  const recs: NetRecord[] = [];
  for (const n of names) {
    if (!/^[0-9a-f]{6}\.json$/.test(n)) continue;
    try {
      // Records written by older harnesses may lack cgroups.
      const rec = JSON.parse(fs.readFileSync(path.join(RUN_DIR, n), 'utf8')) as Omit<NetRecord, 'cgroups'> & { cgroups?: string[] };
      recs.push({ ...rec, cgroups: rec.cgroups ?? [] });
    } catch {
      /* being written or removed */
    }
  }
  return recs;
}

export function liveRecords(exceptId?: string): NetRecord[] {
  return readRecords().filter((r) => r.id !== exceptId && isAlive(r.pid, r.pidStart));
}

// ------------------------------------------------------------------ namespaces
export function listHarnessNetns(): string[] {
  return trySync(['ip', 'netns', 'list'])
    .split('\n')
    .map((l) => l.split(' ')[0] ?? '')
    .filter((n) => NETNS_RE.test(n));
}

/** SIGKILLs every process in one of the harness's namespaces (all started by a harness). */
export function killNetnsProcs(ns: string): number[] {
  if (!NETNS_RE.test(ns)) throw new HarnessError(`refusing to touch namespace ${ns}`);
  const pids = trySync(['ip', 'netns', 'pids', ns])
    .split('\n')
    .map((l) => Number(l.trim()))
    .filter((p) => Number.isInteger(p) && p > 1 && p !== process.pid);
  for (const pid of pids) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* already gone */
    }
  }
  return pids;
}

export function deleteNetns(ns: string): void {
  if (!NETNS_RE.test(ns)) throw new HarnessError(`refusing to delete namespace ${ns}`);
  deleteNamedNetns(ns);
}

/**
 * Deletes any named namespace and what egressd left for it under /run/egressd. Only for namespaces the caller made: tests'
 * own, named outside the harness's pattern, come here directly.
 */
export function deleteNamedNetns(ns: string): void {
  if (!fs.existsSync(`/run/netns/${ns}`)) return;
  // Applies inside the namespace left its enforcement lock file, and a resolver killed in it its control socket (one each per
  // namespace). Removed while the namespace still holds its inode number: once it is gone the kernel gives that number to the
  // next namespace made, whose own lock, taken meanwhile, this would remove.
  const inode = fs.statSync(`/run/netns/${ns}`).ino;
  fs.rmSync(lockPathFor(inode), { force: true });
  fs.rmSync(controlSocketPathFor(inode), { force: true });
  const r = spawnSync('ip', ['netns', 'delete', ns], { encoding: 'utf8' });
  if (r.status !== 0 && fs.existsSync(`/run/netns/${ns}`)) {
    throw new HarnessError(`ip netns delete ${ns}: ${r.stderr.trim()}`);
  }
}

/**
 * Removes what crashed earlier runs left: namespaces whose record's process is gone (or that
 * have no record at all), with the processes inside them, and those records. Returns the
 * cgroup paths the dead runs had used, for the caller to remove once it has a cgroup2 mount.
 */
export function cleanupStale(): { namespaces: string[]; cgroups: string[] } {
  ensureRunDir();
  const removedNs: string[] = [];
  const cgroups: string[] = [];
  const records = readRecords();
  const live = new Set<string>();
  for (const rec of records) {
    if (isAlive(rec.pid, rec.pidStart)) {
      live.add(rec.host).add(rec.inet);
      continue;
    }
    for (const ns of [rec.host, rec.inet]) {
      if (!NETNS_RE.test(ns)) continue;
      killNetnsProcs(ns);
      try {
        deleteNetns(ns);
        removedNs.push(ns);
      } catch {
        /* another cleaner got there first */
      }
    }
    cgroups.push(...rec.cgroups);
    try {
      fs.unlinkSync(recordPath(rec.id));
    } catch {
      /* gone */
    }
  }
  for (const ns of listHarnessNetns()) {
    if (live.has(ns)) continue;
    // A live harness writes its record before it creates its namespaces: re-check
    // the record in case it appeared after we listed them.
    const id = NETNS_RE.exec(ns)?.[1] ?? '';
    const rec = readRecords().find((r) => r.id === id);
    if (rec && isAlive(rec.pid, rec.pidStart)) continue;
    killNetnsProcs(ns);
    try {
      deleteNetns(ns);
      removedNs.push(ns);
    } catch {
      /* raced */
    }
  }
  return { namespaces: removedNs, cgroups };
}

// ------------------------------------------------------------------ users and groups
export interface PasswdEntry {
  name: string;
  uid: number;
  gid: number;
}

function readColonFile(file: string): string[][] {
  return fs
    .readFileSync(file, 'utf8')
    .split('\n')
    .filter((l) => l && !l.startsWith('#'))
    .map((l) => l.split(':'));
}

export function lookupUser(user: number | string): PasswdEntry | undefined {
  for (const f of readColonFile('/etc/passwd')) {
    const [name, , uid, gid] = f;
    if (name === undefined || uid === undefined || gid === undefined) continue;
    if ((typeof user === 'number' && Number(uid) === user) || name === user) {
      return { name, uid: Number(uid), gid: Number(gid) };
    }
  }
  return undefined;
}

export function lookupGroup(group: number | string): { name: string; gid: number } | undefined {
  for (const f of readColonFile('/etc/group')) {
    const [name, , gid] = f;
    if (name === undefined || gid === undefined) continue;
    if ((typeof group === 'number' && Number(gid) === group) || name === group) {
      return { name, gid: Number(gid) };
    }
  }
  return undefined;
}

export function resolveUid(user: number | string): { uid: number; gid: number } {
  const e = lookupUser(user);
  if (e) return { uid: e.uid, gid: e.gid };
  if (typeof user === 'number') return { uid: user, gid: user };
  throw new HarnessError(`no such user: ${user} (did you call ensureTestUsers()?)`);
}

export function resolveGid(group: number | string): number {
  const g = lookupGroup(group);
  if (g) return g.gid;
  if (typeof group === 'number') return group;
  throw new HarnessError(`no such group: ${group} (did you call ensureTestUsers()?)`);
}
