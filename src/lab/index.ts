// Test harness for kernel tests: a "host" and an "internet" network namespace joined by a
// veth pair, a cgroup2 view for the host side, recording servers on the internet side,
// clients that run with a chosen cgroup/user/group on the host side.
//
//   const net = await createTestNet();          // beforeAll
//   const srv = await net.inet.listen({ proto: 'tcp', addr: net.addrs.inet.v4, port: 8080 });
//   expect((await net.host.connect({ proto: 'tcp', addr: net.addrs.inet.v4, port: 8080,
//     cgroup: 'apps/a1', user: 'egd-app1' })).ok).toBe(true);
//   expect(await srv.count()).toBe(1);
//   await net.destroy();                         // afterAll (idempotent)
//
// Nothing here touches the machine's own network: namespaces, links and tables are made
// inside namespaces the harness created; addresses are from the documentation ranges only.
import type { ChildProcess } from 'node:child_process';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import * as net from 'node:net';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';
import {
  HarnessError,
  type ExecResult,
  type NetRecord,
  cleanupStale,
  deleteNetns,
  describeFailure,
  ensureRunDir,
  execArgv,
  harnessUnavailableReason,
  killNetnsProcs,
  liveRecords,
  lookupGroup,
  lookupUser,
  procStart,
  readRecords,
  recordPath,
  requireTool,
  resolveGid,
  resolveUid,
  runSync,
  sleep,
  sleepSync,
  writeRecord,
  RUN_DIR,
} from './sys.js';

export { HarnessError, harnessUnavailableReason, cleanupStale, RUN_DIR };
export type { ExecResult };

// ================================================================== public types
export type Proto = 'tcp' | 'udp';
export type Ident = number | string;

export interface IdentityOptions {
  /** cgroup2 path relative to the root, e.g. 'apps/firefox' (created if needed). Host side only. */
  cgroup?: string;
  /** User name or uid. Without `group`, the user's primary group (or gid = uid). */
  user?: Ident;
  group?: Ident;
  /** Supplementary groups; default none (setpriv --clear-groups). */
  groups?: Ident[];
}

export interface ExecOptions extends IdentityOptions {
  input?: string | Buffer;
  /** Default 30 s; the process is SIGKILLed then and `timedOut` is set. */
  timeoutMs?: number;
  env?: NodeJS.ProcessEnv;
  /** Working directory; default the caller's. */
  cwd?: string;
}

export interface NftOptions {
  /** Throw on non-zero exit (default true). */
  check?: boolean;
  timeoutMs?: number;
}

export interface ConnectOptions extends IdentityOptions {
  proto: Proto;
  addr: string;
  port: number;
  /** Default 2000 ms. A dropped packet shows as { ok: false, error: 'ETIMEDOUT' }. */
  timeoutMs?: number;
  /** Bytes sent (default "hi\n"). */
  payload?: string;
  srcAddr?: string;
  srcPort?: number;
}

export interface ConnectResult {
  /** The server's "ok" reply came back. */
  ok: boolean;
  /** TCP: handshake completed; UDP: socket connected locally (says nothing of the path). */
  connected: boolean;
  /** Node error code, e.g. ECONNREFUSED, ETIMEDOUT, EPERM. */
  error?: string;
  reply?: string;
  durationMs: number;
}

export interface PingOptions extends IdentityOptions {
  /** Echo requests to send (default 1), 0.2 s apart. */
  count?: number;
  /** How long to wait for a reply (default 2000 ms); the run takes up to (count-1)·0.2 s + this. */
  timeoutMs?: number;
}

export interface PingResult {
  ok: boolean;
  transmitted: number;
  received: number;
  output: string;
}

export interface SendLoopOptions extends IdentityOptions {
  proto: Proto;
  addr: string;
  port: number;
  /** Upper bound on attempts. */
  count: number;
  /** Pause between attempts (default 50 ms). */
  intervalMs?: number;
  /** Upper bound on the loop's run time. */
  maxMs: number;
  /** Per-attempt timeout (default 1000 ms, never beyond maxMs). */
  attemptTimeoutMs?: number;
  payload?: string;
}

export interface LoopResult {
  attempts: number;
  successes: number;
  /** Failed attempts by error code (ETIMEDOUT, ECONNRESET, …), so a failure can be told apart from a drop. */
  errors: Record<string, number>;
}

export interface SendLoop {
  /** Attempts and successes reported so far. */
  readonly progress: LoopResult;
  /** Resolves when the loop ends by itself (count or maxMs reached) or is stopped. */
  readonly done: Promise<LoopResult>;
  /** Stops the loop (an attempt in flight is not counted) and returns the totals. */
  stop(): Promise<LoopResult>;
}

export interface Seen {
  proto: Proto;
  /** Client address as the server saw it ('::ffff:' prefix removed). */
  peer: string;
  peerPort: number;
  local: string;
  localPort: number;
  /** Epoch ms when accepted / received. */
  time: number;
  bytes: number;
  /** Line servers (`lines: true`): the line received, without its newline. */
  text?: string;
}

export interface ListenOptions {
  proto: Proto;
  /** Address to bind, e.g. '192.0.2.2', '2001:db8::2', '::' (all, dual-stack). */
  addr: string;
  /** 0 picks a free port (see `server.port`). */
  port: number;
  /**
   * TCP only: keep each connection open, record every line received as one
   * `Seen` (with its `text`) and answer it with "echo <line>". For sessions.
   */
  lines?: boolean;
}

export interface SessionOptions extends IdentityOptions {
  addr: string;
  port: number;
  /** How long the handshake may take (default 2000 ms). */
  timeoutMs?: number;
}

/** One TCP connection kept open, to a line server (`listen({ lines: true })`). */
export interface Session {
  /** The handshake completed. */
  readonly connected: boolean;
  /** Why it did not: ETIMEDOUT, ECONNREFUSED, … */
  readonly error?: string;
  /** Local address and port of the connection (when connected). */
  readonly local?: string;
  readonly localPort?: number;
  /** Lines received so far, in order. */
  readonly received: readonly string[];
  /**
   * Sends `text` and a newline on the connection; true when "echo <text>"
   * came back within `timeoutMs` (default 2000). A line that got no answer
   * stays queued in the socket, and TCP keeps resending it.
   */
  send(text: string, timeoutMs?: number): Promise<boolean>;
  close(): Promise<void>;
}

export interface Server {
  readonly proto: Proto;
  readonly addr: string;
  readonly port: number;
  /** Everything seen so far (after a round trip to the server, so nothing is in flight). */
  seen(): Promise<Seen[]>;
  count(): Promise<number>;
  /** Waits until at least n records were seen (default timeout 5 s), returns them. */
  waitFor(n: number, timeoutMs?: number): Promise<Seen[]>;
  /** Forgets what was seen so far. */
  reset(): Promise<void>;
  close(): Promise<void>;
}

export interface NetAddrs {
  host: { v4: string; v6: string };
  inet: {
    v4: string;
    v6: string;
    /** Addresses on the internet side's loopback, routed from the host via the veth. */
    extra4: string[];
    extra6: string[];
  };
  /** Routed from the host but held by no one: connections are refused at once. */
  unused: { v4: string; v6: string };
}

interface SideCommon {
  /** Namespace name (as in /run/netns). */
  readonly netns: string;
  /** Name of the veth end in this namespace. */
  readonly ifname: string;
  /** Runs a command in the namespace; never throws for a non-zero exit. */
  exec(cmd: string, args?: readonly string[], opts?: ExecOptions): Promise<ExecResult>;
  /** Like exec but throws a HarnessError unless the exit code is 0; returns stdout. */
  run(cmd: string, args?: readonly string[], opts?: ExecOptions): Promise<string>;
  /** Starts a background process (killed at destroy at the latest). */
  spawn(cmd: string, args?: readonly string[], opts?: Omit<ExecOptions, 'input' | 'timeoutMs'>): ChildProcess;
  /** Runs `nft args…`, or `nft -f -` with the given text on stdin. */
  nft(args: readonly string[] | { stdin: string }, opts?: NftOptions): Promise<ExecResult>;
  /** A recording server in this namespace. */
  listen(opts: ListenOptions): Promise<Server>;
  /** Opens a TCP connection from this namespace and keeps it open (cgroups: host side only). */
  session(opts: SessionOptions): Promise<Session>;
}

export interface HostSide extends SideCommon {
  /** PID of the long-lived process holding the host netns + cgroup2 mount namespace. */
  readonly pid: number;
  /** Runs a Node script (.ts/.mts through tsx) in the host netns + mount namespace. */
  node(script: string, args?: readonly string[], opts?: ExecOptions): Promise<ExecResult>;
  connect(opts: ConnectOptions): Promise<ConnectResult>;
  ping(addr: string, opts?: PingOptions): Promise<PingResult>;
  sendLoop(opts: SendLoopOptions): SendLoop;
  /** Creates a cgroup2 directory (and its parents); returns the normalised path. */
  mkCgroup(path: string): string;
  /** Removes one (empty) cgroup2 directory. */
  rmCgroup(path: string): Promise<void>;
  /** Where the harness process can read/write the cgroup: /proc/PID/root/sys/fs/cgroup/…. */
  cgroupFsPath(path: string): string;
  /** Kernel cgroup id (inode number of its directory), as nft stores it. */
  cgroupId(path: string): bigint;
}

export interface InetSide extends SideCommon {
  /** Adds an address (documentation ranges only) to the internet side's loopback. */
  addAddr(addr: string): Promise<void>;
  /** ICMP/ICMPv6 echo requests that reached the internet side (for one address, or all). */
  icmpEchoCount(addr?: string): Promise<number>;
}

export interface TestNet {
  readonly id: string;
  readonly addrs: NetAddrs;
  readonly host: HostSide;
  readonly inet: InetSide;
  /** Kills every process of the net, removes its cgroups and namespaces. Idempotent. */
  destroy(): Promise<void>;
}

export interface CreateOptions {
  /** More addresses for the internet side (documentation ranges only). */
  inetAddrs?: string[];
}

// ================================================================== constants
const AGENT_SRC = fs.readFileSync(new URL('./agent.cjs', import.meta.url), 'utf8');
const TSX_LOADER = (() => {
  try {
    return pathToFileURL(createRequire(import.meta.url).resolve('tsx')).href;
  } catch {
    return undefined;
  }
})();

const IFNAME = 'eth0';
const INET_TABLE = 'egdharness';
const DEFAULT_ADDRS: NetAddrs = {
  host: { v4: '192.0.2.1', v6: '2001:db8::1' },
  inet: {
    v4: '192.0.2.2',
    v6: '2001:db8::2',
    extra4: ['198.51.100.1', '198.51.100.2', '198.51.100.3', '203.0.113.1', '203.0.113.2', '203.0.113.3'],
    extra6: ['2001:db8:1::1', '2001:db8:1::2', '2001:db8:1::3'],
  },
  unused: { v4: '198.51.100.250', v6: '2001:db8:1::250' },
};

const DOC_RANGES = new net.BlockList();
DOC_RANGES.addSubnet('192.0.2.0', 24, 'ipv4');
DOC_RANGES.addSubnet('198.51.100.0', 24, 'ipv4');
DOC_RANGES.addSubnet('203.0.113.0', 24, 'ipv4');
DOC_RANGES.addSubnet('2001:db8::', 32, 'ipv6');

function assertDocAddr(addr: string): 4 | 6 {
  const fam = net.isIP(addr);
  if (fam !== 4 && fam !== 6) throw new HarnessError(`not an IP address: ${addr}`);
  if (!DOC_RANGES.check(addr, fam === 4 ? 'ipv4' : 'ipv6')) {
    throw new HarnessError(`${addr} is outside the documentation ranges the harness may use`);
  }
  return fam;
}

function normCgroup(p: string): string {
  const parts = p.split('/').filter((s) => s !== '');
  for (const s of parts) {
    if (s === '.' || s === '..' || /[\0\n]/.test(s)) throw new HarnessError(`bad cgroup path: ${JSON.stringify(p)}`);
  }
  return parts.join('/');
}

function ancestorsAndSelf(p: string): string[] {
  const parts = p.split('/');
  return parts.map((_, i) => parts.slice(0, i + 1).join('/'));
}

/** Splits a stream into lines and hands each parsed JSON object to `onObj`. */
function jsonLines(stream: NodeJS.ReadableStream, onObj: (o: Record<string, unknown>) => void): void {
  let buf = '';
  stream.on('data', (d: Buffer | string) => {
    buf += d.toString();
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i).trim();
      buf = buf.slice(i + 1);
      if (!line) continue;
      try {
        onObj(JSON.parse(line) as Record<string, unknown>);
      } catch {
        /* not ours */
      }
    }
  });
}

function lastJson(stdout: string, ev: string): Record<string, unknown> | undefined {
  const lines = stdout.trim().split('\n').reverse();
  for (const l of lines) {
    try {
      const o = JSON.parse(l) as Record<string, unknown>;
      if (o['ev'] === ev) return o;
    } catch {
      /* skip */
    }
  }
  return undefined;
}

// ================================================================== live nets, exit hook
const liveNets = new Set<TestNetImpl>();
let exitHookInstalled = false;
function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => {
    for (const n of liveNets) {
      try {
        n.teardownSync();
      } catch {
        /* last resort: the next run's stale clean-up handles the rest */
      }
    }
  });
}

// ================================================================== users
export interface TestUser {
  name: string;
  uid: number;
  gid: number;
}

export interface TestUsers {
  /** egd-app1, egd-app2: own primary groups. */
  app1: TestUser;
  app2: TestUser;
  /** egd-app3: primary group egd-grp. */
  app3: TestUser;
  grp: { name: string; gid: number };
}

let usersCache: TestUsers | undefined;

/** Creates (idempotently, under a lock) the system users/groups the kernel tests use. */
export function ensureTestUsers(): TestUsers {
  if (usersCache) return usersCache;
  ensureRunDir();
  const want = ['egd-app1', 'egd-app2', 'egd-app3'];
  if (!want.every((u) => lookupUser(u)) || !lookupGroup('egd-grp')) {
    requireTool('useradd', 'passwd');
    const add = 'useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin';
    const script = [
      'set -e',
      'getent group egd-grp >/dev/null || groupadd --system egd-grp',
      `getent passwd egd-app1 >/dev/null || ${add} --user-group egd-app1`,
      `getent passwd egd-app2 >/dev/null || ${add} --user-group egd-app2`,
      `getent passwd egd-app3 >/dev/null || ${add} --gid egd-grp egd-app3`,
    ].join('\n');
    runSync(['flock', `${RUN_DIR}/users.lock`, 'sh', '-c', script]);
  }
  const u = (name: string): TestUser => {
    const e = lookupUser(name);
    if (!e) throw new HarnessError(`user ${name} missing after useradd`);
    return e;
  };
  const g = lookupGroup('egd-grp');
  if (!g) throw new HarnessError('group egd-grp missing after groupadd');
  usersCache = { app1: u('egd-app1'), app2: u('egd-app2'), app3: u('egd-app3'), grp: g };
  return usersCache;
}

// ================================================================== implementation
abstract class Side implements SideCommon {
  readonly ifname = IFNAME;
  constructor(
    protected readonly owner: TestNetImpl,
    readonly netns: string,
  ) {}

  /** nsenter prefix entering this side. */
  protected abstract enter(cwd: string): string[];
  protected abstract cgroupWrap(cgroup: string): string[];

  protected argv(cmd: string, args: readonly string[], opts: IdentityOptions & { cwd?: string }): string[] {
    this.owner.assertUsable();
    let inner = [cmd, ...args];
    if (opts.user !== undefined || opts.group !== undefined || opts.groups !== undefined) {
      const pre = ['setpriv'];
      let gid: number | undefined;
      if (opts.user !== undefined) {
        const u = resolveUid(opts.user);
        pre.push(`--reuid=${u.uid}`);
        gid = u.gid;
      }
      if (opts.group !== undefined) gid = resolveGid(opts.group);
      if (gid !== undefined) pre.push(`--regid=${gid}`);
      pre.push(opts.groups?.length ? `--groups=${opts.groups.map(resolveGid).join(',')}` : '--clear-groups');
      inner = [...pre, '--', ...inner];
    }
    if (opts.cgroup !== undefined) inner = [...this.cgroupWrap(opts.cgroup), ...inner];
    const cwd = opts.cwd ?? (opts.user !== undefined ? '/' : process.cwd());
    return [...this.enter(cwd), ...inner];
  }

  exec(cmd: string, args: readonly string[] = [], opts: ExecOptions = {}): Promise<ExecResult> {
    const argv = this.argv(cmd, args, opts);
    return execArgv(argv, {
      ...(opts.input !== undefined ? { input: opts.input } : {}),
      ...(opts.timeoutMs !== undefined ? { timeoutMs: opts.timeoutMs } : {}),
      ...(opts.env !== undefined ? { env: opts.env } : {}),
      onSpawn: (c) => this.owner.track(c),
    });
  }

  async run(cmd: string, args: readonly string[] = [], opts: ExecOptions = {}): Promise<string> {
    const r = await this.exec(cmd, args, opts);
    if (r.code !== 0) throw new HarnessError(describeFailure(`[${this.netns}] ${cmd} ${args.join(' ')}`, r));
    return r.stdout;
  }

  spawn(cmd: string, args: readonly string[] = [], opts: Omit<ExecOptions, 'input' | 'timeoutMs'> = {}): ChildProcess {
    const [c, ...a] = this.argv(cmd, args, opts);
    const child = spawn(c as string, a, { stdio: ['pipe', 'pipe', 'pipe'], env: opts.env ?? process.env });
    child.stdin.on('error', () => {});
    this.owner.track(child);
    return child;
  }

  async nft(args: readonly string[] | { stdin: string }, opts: NftOptions = {}): Promise<ExecResult> {
    const isStdin = !Array.isArray(args) && typeof (args as { stdin?: unknown }).stdin === 'string';
    const r = isStdin
      ? await this.exec('nft', ['-f', '-'], {
          input: (args as { stdin: string }).stdin,
          ...(opts.timeoutMs !== undefined ? { timeoutMs: opts.timeoutMs } : {}),
        })
      : await this.exec('nft', args as readonly string[], opts.timeoutMs !== undefined ? { timeoutMs: opts.timeoutMs } : {});
    if ((opts.check ?? true) && r.code !== 0) {
      const what = isStdin ? 'nft -f -' : `nft ${(args as readonly string[]).join(' ')}`;
      throw new HarnessError(describeFailure(`[${this.netns}] ${what}`, r));
    }
    return r;
  }

  protected agentArgs(cfg: Record<string, unknown>): string[] {
    return ['-e', AGENT_SRC, JSON.stringify(cfg)];
  }

  async listen(o: ListenOptions): Promise<Server> {
    if (o.lines && o.proto !== 'tcp') throw new HarnessError('line servers are TCP only');
    const child = this.spawn(process.execPath, this.agentArgs({ mode: 'server', proto: o.proto, addr: o.addr, port: o.port, lines: o.lines === true }));
    return ServerImpl.start(child, o);
  }

  session(o: SessionOptions): Promise<Session> {
    const child = this.spawn(process.execPath, this.agentArgs({ mode: 'session', addr: o.addr, port: o.port, timeoutMs: o.timeoutMs ?? 2000 }), identity(o));
    return SessionImpl.start(child, o.timeoutMs ?? 2000);
  }
}

class HostSideImpl extends Side implements HostSide {
  pid = 0;

  protected enter(cwd: string): string[] {
    return ['nsenter', `--target=${this.pid}`, '--mount', '--net', `--wd=${cwd}`, '--'];
  }

  protected cgroupWrap(cgroup: string): string[] {
    const cg = this.mkCgroup(cgroup);
    const procs = cg === '' ? '/sys/fs/cgroup/cgroup.procs' : `/sys/fs/cgroup/${cg}/cgroup.procs`;
    // $$ is the shell's pid; exec keeps it, so the command itself lands in the cgroup.
    return ['sh', '-c', 'echo $$ > "$0" && exec "$@"', procs];
  }

  cgroupFsPath(p: string): string {
    const cg = normCgroup(p);
    return `/proc/${this.pid}/root/sys/fs/cgroup${cg ? '/' + cg : ''}`;
  }

  mkCgroup(p: string): string {
    const cg = normCgroup(p);
    if (cg === '') return cg;
    this.owner.useCgroups(ancestorsAndSelf(cg));
    fs.mkdirSync(this.cgroupFsPath(cg), { recursive: true });
    return cg;
  }

  async rmCgroup(p: string): Promise<void> {
    const cg = normCgroup(p);
    if (cg === '') throw new HarnessError('cannot remove the root cgroup');
    await rmdirRetry(this.cgroupFsPath(cg), 2000);
    this.owner.forgetCgroup(cg);
  }

  cgroupId(p: string): bigint {
    return fs.statSync(this.cgroupFsPath(p), { bigint: true }).ino;
  }

  node(script: string, args: readonly string[] = [], opts: ExecOptions = {}): Promise<ExecResult> {
    const abs = path.resolve(opts.cwd ?? process.cwd(), script);
    const pre: string[] = [];
    if (/\.(c|m)?ts$/.test(abs)) {
      if (!TSX_LOADER) throw new HarnessError('tsx is not installed (npm ci)');
      pre.push('--import', TSX_LOADER);
    }
    return this.exec(process.execPath, [...pre, abs, ...args], opts);
  }

  async connect(o: ConnectOptions): Promise<ConnectResult> {
    const timeoutMs = o.timeoutMs ?? 2000;
    const cfg = {
      mode: 'client',
      proto: o.proto,
      addr: o.addr,
      port: o.port,
      timeoutMs,
      payload: o.payload,
      srcAddr: o.srcAddr,
      srcPort: o.srcPort,
    };
    const r = await this.exec(process.execPath, this.agentArgs(cfg), { ...identity(o), timeoutMs: timeoutMs + 10_000 });
    const res = lastJson(r.stdout, 'result');
    if (!res) throw new HarnessError(describeFailure('connect agent', r));
    return {
      ok: res['ok'] === true,
      connected: res['connected'] === true,
      ...(typeof res['error'] === 'string' ? { error: res['error'] } : {}),
      ...(typeof res['reply'] === 'string' ? { reply: res['reply'] } : {}),
      durationMs: r.durationMs,
    };
  }

  async ping(addr: string, o: PingOptions = {}): Promise<PingResult> {
    requireTool('ping', 'iputils-ping');
    const count = o.count ?? 1;
    const timeoutMs = o.timeoutMs ?? 2000;
    // -W bounds the wait for the last reply; no -w, which would send past `count` while unanswered.
    const secs = Math.max(0.1, timeoutMs / 1000).toFixed(1);
    const args = ['-n', '-c', String(count), '-i', '0.2', '-W', secs, addr];
    const r = await this.exec('ping', args, { ...identity(o), timeoutMs: timeoutMs + count * 200 + 5000 });
    const m = /(\d+) packets transmitted, (\d+) received/.exec(r.stdout);
    if (!m) throw new HarnessError(describeFailure(`ping ${addr}`, r));
    const transmitted = Number(m[1]);
    const received = Number(m[2]);
    return { ok: received > 0, transmitted, received, output: r.stdout + r.stderr };
  }

  sendLoop(o: SendLoopOptions): SendLoop {
    const cfg = {
      mode: 'loop',
      proto: o.proto,
      addr: o.addr,
      port: o.port,
      count: o.count,
      intervalMs: o.intervalMs ?? 50,
      maxMs: o.maxMs,
      attemptTimeoutMs: o.attemptTimeoutMs ?? 1000,
      payload: o.payload,
    };
    const child = this.spawn(process.execPath, this.agentArgs(cfg), identity(o));
    const progress: LoopResult = { attempts: 0, successes: 0, errors: {} };
    let stderr = '';
    child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
    jsonLines(child.stdout!, (obj) => {
      if (obj['ev'] === 'attempt') {
        progress.attempts++;
        if (obj['ok'] === true) progress.successes++;
        else {
          const error = obj['error'];
          const code = typeof error === 'string' ? error : JSON.stringify(error ?? 'unknown');
          progress.errors[code] = (progress.errors[code] ?? 0) + 1;
        }
      }
    });
    // Hard bound, whatever happens inside the loop.
    const killer = setTimeout(() => child.kill('SIGKILL'), o.maxMs + 5000);
    const done = new Promise<LoopResult>((resolve, reject) => {
      child.on('error', (e) => reject(new HarnessError(`sendLoop: ${e.message}`)));
      child.on('close', (code, signal) => {
        clearTimeout(killer);
        if (code !== 0 && signal === null) reject(new HarnessError(`sendLoop agent exit ${code}: ${stderr.trim()}`));
        else resolve({ ...progress, errors: { ...progress.errors } });
      });
    });
    done.catch(() => {}); // reported through stop()/done when awaited
    return {
      get progress() {
        return { ...progress, errors: { ...progress.errors } };
      },
      done,
      async stop() {
        if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
        return done;
      },
    };
  }
}

function identity(o: IdentityOptions): IdentityOptions {
  const r: IdentityOptions = {};
  if (o.cgroup !== undefined) r.cgroup = o.cgroup;
  if (o.user !== undefined) r.user = o.user;
  if (o.group !== undefined) r.group = o.group;
  if (o.groups !== undefined) r.groups = o.groups;
  return r;
}

class InetSideImpl extends Side implements InetSide {
  protected enter(cwd: string): string[] {
    return ['nsenter', `--net=/run/netns/${this.netns}`, `--wd=${cwd}`, '--'];
  }

  protected cgroupWrap(): string[] {
    throw new HarnessError('cgroups are only available on the host side');
  }

  async addAddr(addr: string): Promise<void> {
    const fam = assertDocAddr(addr);
    await this.run('ip', fam === 4 ? ['addr', 'add', `${addr}/32`, 'dev', 'lo'] : ['addr', 'add', `${addr}/128`, 'dev', 'lo', 'nodad']);
    await this.nft({ stdin: icmpCounterRule(addr) });
  }

  async icmpEchoCount(addr?: string): Promise<number> {
    const r = await this.nft(['-j', 'list', 'chain', 'inet', INET_TABLE, 'input']);
    const doc = JSON.parse(r.stdout) as { nftables: Array<Record<string, unknown>> };
    let sum = 0;
    for (const item of doc.nftables) {
      const rule = item['rule'] as { comment?: string; expr?: Array<Record<string, unknown>> } | undefined;
      if (!rule || (addr !== undefined && rule.comment !== addr)) continue;
      for (const e of rule.expr ?? []) {
        const c = e['counter'] as { packets?: number } | undefined;
        if (c) sum += c.packets ?? 0;
      }
    }
    return sum;
  }
}

function icmpCounterRule(addr: string): string {
  const m = net.isIP(addr) === 4 ? `ip daddr ${addr} icmp type echo-request` : `ip6 daddr ${addr} icmpv6 type echo-request`;
  return `add rule inet ${INET_TABLE} input ${m} counter comment "${addr}"\n`;
}

class ServerImpl implements Server {
  private records: Seen[] = [];
  private syncSeq = 0;
  private syncWaiters = new Map<number, () => void>();
  private exited = false;
  private closed: Promise<void>;
  port = 0;

  private constructor(
    private readonly child: ChildProcess,
    readonly proto: Proto,
    readonly addr: string,
  ) {
    this.closed = new Promise((resolve) =>
      child.on('close', () => {
        this.exited = true;
        for (const w of this.syncWaiters.values()) w();
        resolve();
      }),
    );
  }

  static start(child: ChildProcess, o: ListenOptions): Promise<Server> {
    const s = new ServerImpl(child, o.proto, o.addr);
    let stderr = '';
    child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        child.kill('SIGKILL');
        reject(new HarnessError(`server ${o.proto} ${o.addr}:${o.port} did not start: ${stderr.trim()}`));
      }, 10_000);
      child.on('error', (e) => reject(new HarnessError(`server: ${e.message}`)));
      child.on('close', () => {
        clearTimeout(timer);
        reject(new HarnessError(`server ${o.proto} ${o.addr}:${o.port} exited: ${stderr.trim()}`));
      });
      jsonLines(child.stdout!, (obj) => {
        switch (obj['ev']) {
          case 'listening':
            clearTimeout(timer);
            s.port = Number(obj['port']);
            resolve(s);
            break;
          case 'error':
            clearTimeout(timer);
            reject(new HarnessError(`server ${o.proto} ${o.addr}:${o.port}: ${String(obj['error'])}`));
            break;
          case 'seen': {
            const { ev: _ev, ...rest } = obj;
            s.records.push(rest as unknown as Seen);
            break;
          }
          case 'sync':
            s.syncWaiters.get(Number(obj['n']))?.();
            break;
        }
      });
    });
  }

  private sync(): Promise<void> {
    if (this.exited) return Promise.resolve();
    const n = ++this.syncSeq;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.syncWaiters.delete(n);
        reject(new HarnessError('server did not answer a sync request'));
      }, 5000);
      this.syncWaiters.set(n, () => {
        clearTimeout(timer);
        this.syncWaiters.delete(n);
        resolve();
      });
      this.child.stdin?.write(`sync ${n}\n`);
    });
  }

  async seen(): Promise<Seen[]> {
    await this.sync();
    return [...this.records];
  }

  async count(): Promise<number> {
    return (await this.seen()).length;
  }

  async waitFor(n: number, timeoutMs = 5000): Promise<Seen[]> {
    const end = Date.now() + timeoutMs;
    for (;;) {
      const s = await this.seen();
      if (s.length >= n) return s;
      if (Date.now() >= end || this.exited) {
        throw new HarnessError(`server ${this.proto} ${this.addr}:${this.port} saw ${s.length} of ${n}`);
      }
      await sleep(20);
    }
  }

  async reset(): Promise<void> {
    await this.sync();
    this.records = [];
  }

  async close(): Promise<void> {
    if (!this.exited) {
      this.child.stdin?.end();
      const t = setTimeout(() => this.child.kill('SIGKILL'), 2000);
      await this.closed;
      clearTimeout(t);
    }
  }
}

class SessionImpl implements Session {
  connected = false;
  error?: string;
  local?: string;
  localPort?: number;
  readonly received: string[] = [];
  private readonly waiters = new Set<() => void>();
  private readonly closed: Promise<void>;
  private exited = false;

  private constructor(private readonly child: ChildProcess) {
    this.closed = new Promise((resolve) =>
      child.on('close', () => {
        this.exited = true;
        for (const w of this.waiters) w();
        resolve();
      }),
    );
  }

  static start(child: ChildProcess, timeoutMs: number): Promise<Session> {
    const s = new SessionImpl(child);
    let stderr = '';
    child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        child.kill('SIGKILL');
        reject(new HarnessError(`session: no result in ${timeoutMs + 10_000} ms: ${stderr.trim()}`));
      }, timeoutMs + 10_000);
      child.on('error', (e) => reject(new HarnessError(`session: ${e.message}`)));
      let reported = false;
      child.on('close', () => {
        clearTimeout(timer);
        if (!reported) reject(new HarnessError(`session agent exited: ${stderr.trim()}`));
      });
      jsonLines(child.stdout!, (obj) => {
        if (obj['ev'] === 'connected') {
          reported = true;
          clearTimeout(timer);
          s.connected = obj['ok'] === true;
          if (typeof obj['error'] === 'string') s.error = obj['error'];
          if (typeof obj['local'] === 'string') s.local = obj['local'];
          if (typeof obj['localPort'] === 'number') s.localPort = obj['localPort'];
          resolve(s);
        } else if (obj['ev'] === 'line') {
          s.received.push(String(obj['text']));
          for (const w of s.waiters) w();
        }
      });
    });
  }

  send(text: string, timeoutMs = 2000): Promise<boolean> {
    if (/[\r\n]/.test(text)) throw new HarnessError('session: one line at a time');
    if (!this.connected || this.exited) return Promise.resolve(false);
    const want = `echo ${text}`;
    const already = this.received.length;
    return new Promise((resolve) => {
      const check = () => {
        if (this.received.slice(already).includes(want)) finish(true);
        else if (this.exited) finish(false);
      };
      const finish = (ok: boolean) => {
        clearTimeout(timer);
        this.waiters.delete(check);
        resolve(ok);
      };
      const timer = setTimeout(() => finish(false), timeoutMs);
      this.waiters.add(check);
      this.child.stdin?.write(`send ${text}\n`);
    });
  }

  async close(): Promise<void> {
    if (this.exited) return;
    this.child.stdin?.end();
    const t = setTimeout(() => this.child.kill('SIGKILL'), 2000);
    await this.closed;
    clearTimeout(t);
  }
}

async function rmdirRetry(dir: string, maxMs: number): Promise<void> {
  const end = Date.now() + maxMs;
  for (;;) {
    try {
      fs.rmdirSync(dir);
      return;
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') return;
      // EBUSY: tasks that were just killed are still leaving the cgroup.
      if (code !== 'EBUSY' || Date.now() >= end) throw new HarnessError(`rmdir ${dir}: ${String(e)}`);
    }
    await sleep(20);
  }
}

function rmdirRetrySync(dir: string, maxMs: number): void {
  const end = Date.now() + maxMs;
  for (;;) {
    try {
      fs.rmdirSync(dir);
      return;
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code !== 'EBUSY' || Date.now() >= end) return;
    }
    sleepSync(20);
  }
}

class TestNetImpl implements TestNet {
  readonly addrs: NetAddrs;
  readonly host: HostSideImpl;
  readonly inet: InetSideImpl;
  private readonly record: NetRecord;
  private readonly children = new Set<ChildProcess>();
  private shell: ChildProcess | undefined;
  private destroyed = false;

  constructor(
    readonly id: string,
    opts: CreateOptions,
  ) {
    this.addrs = structuredClone(DEFAULT_ADDRS);
    for (const a of opts.inetAddrs ?? []) {
      (assertDocAddr(a) === 4 ? this.addrs.inet.extra4 : this.addrs.inet.extra6).push(a);
    }
    const start = procStart(process.pid);
    if (start === undefined) throw new HarnessError('cannot read /proc/self/stat');
    this.record = {
      id,
      pid: process.pid,
      pidStart: start,
      host: `egdt${id}-host`,
      inet: `egdt${id}-inet`,
      cgroups: [],
      created: new Date().toISOString(),
    };
    this.host = new HostSideImpl(this, this.record.host);
    this.inet = new InetSideImpl(this, this.record.inet);
  }

  assertUsable(): void {
    if (this.destroyed) throw new HarnessError(`test net ${this.id} was destroyed`);
    if (this.host.pid !== 0 && (this.shell?.exitCode !== null || this.shell.signalCode !== null)) {
      throw new HarnessError(`host shell of test net ${this.id} died`);
    }
  }

  track(c: ChildProcess): void {
    this.children.add(c);
    c.on('close', () => this.children.delete(c));
  }

  useCgroups(paths: string[]): void {
    const before = this.record.cgroups.length;
    for (const p of paths) if (!this.record.cgroups.includes(p)) this.record.cgroups.push(p);
    if (this.record.cgroups.length !== before) writeRecord(this.record);
  }

  forgetCgroup(p: string): void {
    this.record.cgroups = this.record.cgroups.filter((c) => c !== p);
    writeRecord(this.record);
  }

  async setUp(): Promise<void> {
    const { host: H, inet: I } = this.record;
    writeRecord(this.record); // before the namespaces exist: see cleanupStale
    runSync(['ip', 'netns', 'add', H]);
    runSync(['ip', 'netns', 'add', I]);
    runSync([
      'nsenter',
      `--net=/run/netns/${H}`,
      'sysctl',
      '-qw',
      'net.ipv6.conf.all.accept_dad=0',
      'net.ipv6.conf.default.accept_dad=0',
      // unprivileged ping (ICMP datagram sockets) for every gid
      'net.ipv4.ping_group_range=0 2147483647',
    ]);
    runSync([
      'nsenter',
      `--net=/run/netns/${I}`,
      'sysctl',
      '-qw',
      'net.ipv6.conf.all.accept_dad=0',
      'net.ipv6.conf.default.accept_dad=0',
      // the internet side answers every refused packet at once
      'net.ipv4.icmp_ratelimit=0',
      'net.ipv6.icmp.ratelimit=0',
    ]);
    runSync(['ip', '-n', H, 'link', 'add', IFNAME, 'type', 'veth', 'peer', 'name', IFNAME, 'netns', I]);
    const a = this.addrs;
    runSync(
      ['ip', '-n', H, '-batch', '-'],
      [
        'link set lo up',
        `addr add ${a.host.v4}/24 dev ${IFNAME}`,
        `addr add ${a.host.v6}/64 dev ${IFNAME} nodad`,
        `link set ${IFNAME} up`,
        `route add 198.51.100.0/24 via ${a.inet.v4}`,
        `route add 203.0.113.0/24 via ${a.inet.v4}`,
        `route add 2001:db8::/32 via ${a.inet.v6}`,
        '',
      ].join('\n'),
    );
    runSync(
      ['ip', '-n', I, '-batch', '-'],
      [
        'link set lo up',
        `addr add ${a.inet.v4}/24 dev ${IFNAME}`,
        `addr add ${a.inet.v6}/64 dev ${IFNAME} nodad`,
        `link set ${IFNAME} up`,
        ...a.inet.extra4.map((x) => `addr add ${x}/32 dev lo`),
        ...a.inet.extra6.map((x) => `addr add ${x}/128 dev lo nodad`),
        '',
      ].join('\n'),
    );
    // The internet side's own table: refuse at once what is addressed to no one there
    // (so a wrong address fails fast instead of timing out) and count echo requests.
    const refuse = 'fib daddr type { unicast, unreachable, blackhole, prohibit }';
    runSync(
      ['nsenter', `--net=/run/netns/${I}`, 'nft', '-f', '-'],
      [
        `table inet ${INET_TABLE} {`,
        '  chain pre {',
        '    type filter hook prerouting priority 0; policy accept;',
        `    ${refuse} meta l4proto tcp reject with tcp reset`,
        `    ${refuse} reject with icmpx type port-unreachable`,
        '  }',
        '  chain input {',
        '    type filter hook input priority 0; policy accept;',
        '  }',
        '}',
        ...[a.inet.v4, a.inet.v6, ...a.inet.extra4, ...a.inet.extra6].map(icmpCounterRule),
      ].join('\n'),
    );
    await this.startShell();
  }

  /**
   * The host shell: a process in a private mount namespace (sysfs of the host netns, cgroup2
   * at /sys/fs/cgroup) joined to the host netns. It exits when its stdin (our pipe) closes.
   * `ip netns exec` would remount /sys per command, hence nsenter.
   */
  private startShell(): Promise<void> {
    const script = 'mount -t sysfs sysfs /sys && mount -t cgroup2 cgroup2 /sys/fs/cgroup && echo ready && exec cat >/dev/null';
    const child = spawn('unshare', ['--mount', '--propagation', 'private', '--', 'nsenter', `--net=/run/netns/${this.record.host}`, '--', 'sh', '-c', script], {
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    child.stdin.on('error', () => {});
    this.shell = child;
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    return new Promise((resolve, reject) => {
      const fail = (why: string) => reject(new HarnessError(`host shell: ${why}: ${stderr.trim()}`));
      const timer = setTimeout(() => {
        child.kill('SIGKILL');
        fail('no ready signal in 10 s');
      }, 10_000);
      child.on('error', (e) => fail(e.message));
      child.on('exit', () => {
        clearTimeout(timer);
        fail('exited');
      });
      child.stdout.on('data', (d: Buffer) => {
        if (d.toString().includes('ready')) {
          clearTimeout(timer);
          this.host.pid = child.pid ?? 0;
          resolve();
        }
      });
    });
  }

  /** Removes cgroups of dead runs that no live run uses. Needs the host shell. */
  sweepCgroups(paths: string[]): void {
    const inUse = new Set(liveRecords(this.id).flatMap((r) => r.cgroups));
    for (const p of [...new Set(paths)].sort((x, y) => y.split('/').length - x.split('/').length)) {
      if (inUse.has(p)) continue;
      try {
        rmdirRetrySync(this.host.cgroupFsPath(p), 200);
      } catch {
        /* bad path in a record */
      }
    }
  }

  async destroy(): Promise<void> {
    if (this.destroyed) return;
    // Kill every process of ours but the host shell (the cgroup2 view needs it), wait.
    const waits: Promise<void>[] = [];
    for (const c of this.children) {
      if (c.exitCode === null && c.signalCode === null) {
        waits.push(new Promise((r) => c.once('close', () => r())));
        c.kill('SIGKILL');
      }
    }
    await Promise.race([Promise.all(waits), sleep(3000)]);
    this.teardownSync();
  }

  teardownSync(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    liveNets.delete(this);
    const { host: H, inet: I } = this.record;
    for (const c of this.children) c.kill('SIGKILL');
    const shellPid = this.shell?.pid;
    // Everything in our namespaces except the host shell: stray clients, servers.
    for (const ns of [H, I]) {
      for (const pid of nsPidsExcept(ns, shellPid)) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          /* gone */
        }
      }
    }
    if (this.host.pid !== 0 && this.shell && this.shell.exitCode === null) {
      // Our cgroups, deepest first, unless another live net uses them too.
      const others = new Set(liveRecords(this.id).flatMap((r) => r.cgroups));
      const mine = [...this.record.cgroups].sort((x, y) => y.split('/').length - x.split('/').length);
      for (const p of mine) {
        if (!others.has(p)) rmdirRetrySync(this.host.cgroupFsPath(p), 1000);
      }
    }
    this.shell?.kill('SIGKILL');
    for (const ns of [H, I]) {
      killNetnsProcs(ns);
      deleteNetns(ns);
    }
    try {
      fs.unlinkSync(recordPath(this.id));
    } catch {
      /* gone */
    }
  }
}

function nsPidsExcept(ns: string, except: number | undefined): number[] {
  const r = execSyncLines(['ip', 'netns', 'pids', ns]);
  return r.map(Number).filter((p) => Number.isInteger(p) && p > 1 && p !== except && p !== process.pid);
}

function execSyncLines(argv: string[]): string[] {
  try {
    return runSync(argv)
      .split('\n')
      .map((l) => l.trim())
      .filter(Boolean);
  } catch {
    return [];
  }
}

function newId(): string {
  const taken = new Set(readRecords().map((r) => r.id));
  for (;;) {
    const id = randomBytes(3).toString('hex');
    if (!taken.has(id) && !fs.existsSync(`/run/netns/egdt${id}-host`) && !fs.existsSync(`/run/netns/egdt${id}-inet`)) {
      return id;
    }
  }
}

/**
 * Builds a fresh host/internet pair. Cleans up what crashed earlier runs left first.
 * Throws a HarnessError with the reason when the machine cannot run it (not root, tools missing).
 */
export async function createTestNet(opts: CreateOptions = {}): Promise<TestNet> {
  const reason = harnessUnavailableReason();
  if (reason) throw new HarnessError(reason);
  const stale = cleanupStale();
  installExitHook();
  const n = new TestNetImpl(newId(), opts);
  liveNets.add(n);
  try {
    await n.setUp();
    if (stale.cgroups.length > 0) n.sweepCgroups(stale.cgroups);
  } catch (e) {
    try {
      await n.destroy();
    } catch {
      /* report the set-up error */
    }
    throw e;
  }
  return n;
}

/** Names of all harness namespaces currently on the machine (any run). */
export function harnessNamespaces(): string[] {
  return fs.existsSync('/run/netns') ? fs.readdirSync('/run/netns').filter((n) => /^egdt[0-9a-f]{6}-(host|inet)$/.test(n)) : [];
}
