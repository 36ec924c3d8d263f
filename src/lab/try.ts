/**
 * `egressctl try`, the scenario: a throwaway lab (the same network
 * namespaces the tests build: a "host" with a private cgroup2 view and a
 * small "internet"), egressd started in it on a copy of the shipped
 * policies, three sample apps — one phoning home to a name the shipped lists
 * deny, one allowed, one in a system domain — and what happened to each,
 * with the rule that decided it. Everything is removed at the end, also when
 * the run is interrupted: the lab's `destroy` kills its processes and
 * removes its cgroups and namespaces; the policy copy and state live in one
 * temporary directory.
 */
import type { ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { factsNeeded } from '../compile/compile.js';
import { explain, type Explanation } from '../compile/explain.js';
import { ruleIdTable, shortIdOf } from '../compile/rule-ids.js';
import { LOCK_DIR } from '../enforce/lock.js';
import type { DenialRecord } from '../denials/record.js';
import { denialStorePath, openDenialReader } from '../denials/store.js';
import { loadPolicyOrThrow } from '../policy/load.js';
import { gatherFacts } from '../system/facts.js';
import { createTestNet, RUN_DIR, type Server, type TestNet } from './index.js';

const here = path.dirname(fileURLToPath(import.meta.url));
/** .js when built, .ts when run through tsx: the scripts beside this file have the same extension. */
const scriptExt = path.extname(fileURLToPath(import.meta.url));

/** The lab's names: one the shipped catalogue denies (Ubuntu's desktop metrics), one nobody denies. */
const TELEMETRY = { name: 'metrics.ubuntu.com', address: '198.51.100.81' };
const MIRROR = { name: 'mirror.example.org', address: '198.51.100.80' };
const LAB_DNS = '198.51.100.53';
const PORT = 443;
const OFFLINE_CGROUP = 'try/offline';
const DROP_IN = '90-try.yaml';
const DROP_IN_TEXT = `# Written by egressctl try into its throwaway copy of the policies.
systemDomains:
  try-offline:
    members:
      - cgroup: ${OFFLINE_CGROUP}
    why: a stand-in for a system process that must never reach the network
dns:
  # The lab's own DNS server, in its small internet.
  upstreams: [${LAB_DNS}]
`;

/** What a sample app printed (sample-app.ts). */
export interface SampleOutcome {
  readonly lookup: { readonly addresses: readonly string[] } | { readonly error: string };
  readonly address: string | undefined;
  readonly connect: string | undefined;
}

export interface SampleResult {
  readonly title: string;
  readonly who: string;
  readonly name: string;
  readonly outcome: SampleOutcome;
  /** Connections the small internet's server for this name saw. */
  readonly serverSaw: number;
  readonly blocked: boolean;
  /** What the policy says of it, as `egressctl explain` would. */
  readonly rule: {
    readonly verdict: 'allow' | 'deny';
    readonly ruleId: string;
    readonly shortId: string | undefined;
    readonly at: string | undefined;
    readonly why: string | undefined;
  };
  /** Whether it went as the shipped policies say it should. */
  readonly asExpected: boolean;
  /** What egressd's denial log recorded of its connection, as `egressctl denials` shows it; undefined when no packet was dropped. */
  readonly recorded?: Pick<DenialRecord, 'shortId' | 'ruleId' | 'file' | 'line' | 'uid' | 'protocol' | 'address' | 'port' | 'count'>;
}

export interface TryResult {
  readonly lab: { readonly id: string; readonly host: string; readonly internet: string; readonly hostNetnsInode: number };
  readonly policyFiles: readonly string[];
  readonly rules: number;
  readonly samples: readonly SampleResult[];
}

export type TryStep =
  | { readonly kind: 'lab'; readonly id: string; readonly host: string; readonly internet: string }
  | { readonly kind: 'enforcing'; readonly rules: number; readonly files: readonly string[] }
  | { readonly kind: 'sample'; readonly result: SampleResult }
  | { readonly kind: 'removed' };

export interface TryOptions {
  readonly policyDir: string;
  readonly progress: (step: TryStep) => void;
  /** Aborts the run (Ctrl-C): everything is removed and the promise rejects. */
  readonly signal?: AbortSignal;
}

export class TryInterrupted extends Error {
  constructor() {
    super('interrupted');
  }
}

/** The shipped policies: beside the build in a checkout (policies/), else where the install put them. */
export function shippedPolicyDir(): string {
  const beside = path.resolve(here, '../../policies');
  return fs.existsSync(path.join(beside, '00-defaults.yaml')) ? beside : '/etc/egressd';
}

export async function runTry(options: TryOptions): Promise<TryResult> {
  // Run-time directories the lab and egressd make if missing; removed again if they were missing and are left empty.
  const madeDirs = [LOCK_DIR, RUN_DIR].filter((dir) => !fs.existsSync(dir));
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'egressctl-try-'));
  let net: TestNet | undefined;
  let daemon: ChildProcess | undefined;
  const aborted = (): void => {
    if (options.signal?.aborted) throw new TryInterrupted();
  };
  // A wait that Ctrl-C cuts short: the lab exists by then, and the finally below removes it.
  const interruptible = <T>(waiting: Promise<T>): Promise<T> => {
    const { signal } = options;
    if (!signal) return waiting;
    return Promise.race([
      waiting,
      new Promise<never>((_, reject) => {
        if (signal.aborted) reject(new TryInterrupted());
        signal.addEventListener('abort', () => reject(new TryInterrupted()), { once: true });
      }),
    ]);
  };
  try {
    const policyDir = path.join(work, 'policies');
    fs.cpSync(options.policyDir, policyDir, { recursive: true });
    // Not group- or world-writable whatever the umask: the policy loader refuses a file others could write.
    fs.writeFileSync(path.join(policyDir, DROP_IN), DROP_IN_TEXT, { mode: 0o644 });
    fs.chmodSync(path.join(policyDir, DROP_IN), 0o644);
    const { policy } = loadPolicyOrThrow(policyDir);

    net = await createTestNet({ inetAddrs: [LAB_DNS, MIRROR.address, TELEMETRY.address] });
    options.progress({ kind: 'lab', id: net.id, host: net.host.netns, internet: net.inet.netns });
    const hostNetnsInode = fs.statSync(`/run/netns/${net.host.netns}`).ino;
    aborted();
    net.host.mkCgroup(OFFLINE_CGROUP);
    net.host.mkCgroup('try/apps');
    const servers = {
      mirror: await net.inet.listen({ proto: 'tcp', addr: MIRROR.address, port: PORT }),
      telemetry: await net.inet.listen({ proto: 'tcp', addr: TELEMETRY.address, port: PORT }),
    };
    const authority = net.inet.spawn(process.execPath, [
      ...process.execArgv,
      script('authority'),
      LAB_DNS,
      `${MIRROR.name}=${MIRROR.address},${TELEMETRY.name}=${TELEMETRY.address}`,
    ]);
    await interruptible(printed(authority, 'ready', 10_000, 'the lab DNS server'));
    aborted();

    const stateDir = path.join(work, 'state');
    fs.mkdirSync(stateDir);
    // The lab's egressd keeps to the lab: not on the host's system bus (where users' agents would take it for the real one), its denials not in the host's journal.
    daemon = net.host.spawn(
      process.execPath,
      [...process.execArgv, path.resolve(here, `../daemon/main${scriptExt}`), '--policy', policyDir, '--state', stateDir, '--no-dbus'],
      { env: { ...process.env, EGRESSD_JOURNAL_SOCKET: path.join(work, 'no-journal') } },
    );
    await interruptible(printed(daemon, '"event":"resolver-ready"', 60_000, 'egressd'));
    // Its log goes on; a pipe nobody reads would stop egressd at its next line.
    daemon.stdout?.resume();
    daemon.stderr?.resume();
    aborted();
    const rules = ruleIdTable(policy).length;
    options.progress({ kind: 'enforcing', rules, files: policy.files });

    const facts = gatherFacts(factsNeeded(policy));
    const judge = (who: Parameters<typeof explain>[1]['who'], host: string): SampleResult['rule'] => {
      const answer = explain(policy, { who, host, port: PORT, proto: 'tcp' }, facts);
      if ('error' in answer) throw new Error(`explain: ${answer.error}`);
      return describeRule(answer, ruleIdTable(policy));
    };
    const samples: SampleResult[] = [];
    const run = async (
      title: string,
      who: string,
      cgroup: string,
      target: { name: string; address: string },
      server: Server,
      fallback: boolean,
    ): Promise<void> => {
      const before = await server.count();
      const args = [...process.execArgv, script('sample-app'), target.name, String(PORT), '127.0.0.153', ...(fallback ? [target.address] : [])];
      const ran = await interruptible(net!.host.exec(process.execPath, args, { cgroup, timeoutMs: 15_000 }));
      const outcome = JSON.parse(ran.stdout.trim().split('\n').pop() ?? '') as SampleOutcome;
      const serverSaw = (await server.count()) - before;
      const rule = judge({ kind: 'cgroup', path: cgroup }, target.name);
      const blocked = serverSaw === 0;
      const recorded = outcome.connect === 'ETIMEDOUT' && outcome.address !== undefined ? await denialOf(stateDir, outcome.address) : undefined;
      const result: SampleResult = {
        title,
        who,
        name: target.name,
        outcome,
        serverSaw,
        blocked,
        rule,
        asExpected: blocked === (rule.verdict === 'deny'),
        ...(recorded && { recorded }),
      };
      samples.push(result);
      options.progress({ kind: 'sample', result });
      aborted();
    };
    await run('An app phoning home', 'an ordinary app', 'try/apps', TELEMETRY, servers.telemetry, false);
    await run('An app reaching a mirror', 'an ordinary app', 'try/apps', MIRROR, servers.mirror, false);
    await run('A system process in a system domain', `cgroup ${OFFLINE_CGROUP} (system domain try-offline)`, OFFLINE_CGROUP, MIRROR, servers.mirror, true);
    return { lab: { id: net.id, host: net.host.netns, internet: net.inet.netns, hostNetnsInode }, policyFiles: policy.files, rules, samples };
  } finally {
    // egressd stops by itself first (it removes its resolver's socket); destroy then kills whatever is left in the lab.
    if (daemon) await stopped(daemon, 3000);
    await net?.destroy();
    fs.rmSync(work, { recursive: true, force: true });
    for (const dir of madeDirs) if (fs.existsSync(dir) && fs.readdirSync(dir).length === 0) fs.rmdirSync(dir);
    options.progress({ kind: 'removed' });
  }
}

/** The denial egressd's reader recorded for a dropped connection to `address` (its store writes within a second). */
async function denialOf(stateDir: string, address: string): Promise<SampleResult['recorded']> {
  const path = denialStorePath(stateDir);
  for (let waited = 0; waited <= 3000; waited += 250) {
    if (fs.existsSync(path)) {
      const reader = openDenialReader(path);
      try {
        const found = reader.query({ dest: address, limit: 1 })[0];
        if (found) {
          const { shortId, ruleId, file, line, uid, protocol, port, count } = found;
          return { shortId, ruleId, file, line, uid, protocol, address, port, count };
        }
      } finally {
        reader.close();
      }
    }
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
  return undefined;
}

/** SIGTERM, and up to `ms` for the process to exit. */
function stopped(child: ChildProcess, ms: number): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    child.once('exit', () => {
      clearTimeout(timer);
      resolve();
    });
    child.kill('SIGTERM');
  });
}

function script(name: string): string {
  return path.resolve(here, `${name}${scriptExt}`);
}

function describeRule(answer: Explanation, table: ReturnType<typeof ruleIdTable>): SampleResult['rule'] {
  return {
    verdict: answer.verdict,
    ruleId: answer.ruleId,
    shortId: shortIdOf(table, answer),
    at: answer.at ? `${answer.at.file}:${answer.at.line}` : undefined,
    why: answer.why,
  };
}

/** Resolves once `child` printed `text` on stdout; rejects if it exits first or takes longer than `timeoutMs`. */
function printed(child: ChildProcess, text: string, timeoutMs: number, what: string): Promise<void> {
  return new Promise((resolve, reject) => {
    let out = '';
    let err = '';
    const done = (error?: Error): void => {
      clearTimeout(timer);
      child.stdout?.off('data', onOut);
      child.stderr?.off('data', onErr);
      child.off('exit', onExit);
      if (error) reject(error);
      else resolve();
    };
    const onOut = (chunk: Buffer): void => {
      out += chunk.toString();
      if (out.includes(text)) done();
    };
    const onErr = (chunk: Buffer): void => {
      err = (err + chunk.toString()).slice(-2000);
    };
    const onExit = (code: number | null): void => done(new Error(`${what} exited (${String(code)}) before it was ready: ${lastLines(out + err)}`));
    const timer = setTimeout(() => done(new Error(`${what} was not ready within ${timeoutMs / 1000} s: ${lastLines(out + err)}`)), timeoutMs);
    child.stdout?.on('data', onOut);
    child.stderr?.on('data', onErr);
    child.once('exit', onExit);
  });
}

function lastLines(text: string): string {
  return text.trim().split('\n').slice(-5).join('\n');
}
