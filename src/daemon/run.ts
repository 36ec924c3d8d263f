/**
 * egressd's command line: parses it, builds the daemon (daemon.ts) from the
 * enforcer, systemd's notifications, the account watch and the parts, and
 * runs it until a signal. `egressd resolver` runs the resolver alone, against
 * the table in force (for tests, `egressctl try`, and hosts where something
 * else applies).
 *
 * The parts are given by the caller (main.ts: parts.ts's list), which is also
 * how a test runs the real daemon with a part of its own.
 */
import { parseArgs } from 'node:util';
import { pino, type Logger } from 'pino';
import { compile, factsNeeded, TABLE } from '../compile/compile.js';
import { applyLoadedPolicy, applyPolicy, type EnforcerDeps } from '../enforce/enforcer.js';
import { openNft } from '../nft/open.js';
import { policyAt } from '../policy/expiry.js';
import { loadPolicyOrThrow } from '../policy/load.js';
import { dnsSetsInForce, readLiveTable, startResolverRuntime, type InForce } from '../resolver/runtime.js';
import { systemAudit } from '../system/audit.js';
import { accountFilesToWatch, gatherFacts } from '../system/facts.js';
import { openNotifier } from '../system/sd-notify.js';
import { watchAccounts } from './accounts.js';
import { Daemon, describeError } from './daemon.js';
import type { PartSpec } from './part.js';
import { readiness } from './readiness.js';

function usage(parts: readonly PartSpec[]): string {
  const flags = parts.map((p) => `  --no-${p.name.padEnd(11)} do not run the ${p.name}`).join('\n');
  return `Usage: egressd [--policy DIR] [--state DIR] ${parts.map((p) => `[--no-${p.name}]`).join(' ')}
       egressd resolver [--policy DIR] [--state DIR]

Applies the egress policy in DIR (default /etc/egressd) as table inet
egressd and keeps it: SIGHUP re-reads and re-applies it (a broken policy
leaves the running rules in force and logs every error), and so does a
change to what the policy's users and groups resolve to (/etc/passwd,
/etc/group, /etc/subuid, /etc/subgid); SIGTERM stops egressd and leaves
the rules in force. Logs are JSON lines on stdout. Under systemd
(NOTIFY_SOCKET), it says READY=1 once a table is enforced.

Once the policy is applied, egressd runs its parts (${parts.map((p) => p.name).join(', ')}):
each on its own, started again with back-off when it fails; enforcement
never depends on them. The resolver answers DNS on the policy's dns.listen
addresses (default 127.0.0.153 and ::1, port 53): every address an answer
holds goes into the sets of the rules that name it before the answer
leaves, so rules written with names are enforced. Point the machine at it
with 'egressctl dns enable'.

'egressd resolver' runs only the resolver, for the table some other run
applied: it follows that table (re-reading DIR when an apply changed it)
and never changes the rules itself.

  --policy DIR   the policy directory (default /etc/egressd)
  --state DIR    where the last good ruleset is kept (default /var/lib/egressd)
${flags}

Exit status: 0 stopped by a signal, 2 bad usage or no usable policy at start
with no table in force, 3 system error.`;
}

function openLog(): Logger {
  return pino({ base: { service: 'egressd' }, timestamp: pino.stdTimeFunctions.isoTime, formatters: { level: (label) => ({ level: label }) } });
}

export interface Invocation {
  readonly mode: 'daemon' | 'resolver';
  readonly policyDir: string;
  readonly stateDir: string;
  /** Parts turned off with --no-NAME. */
  readonly off: readonly string[];
}

/** The command line, or a usage error's text. */
export function parseInvocation(
  argv: readonly string[],
  parts: readonly PartSpec[],
  env: NodeJS.ProcessEnv = process.env,
): Invocation | { help: true } | { error: string } {
  const switches = Object.fromEntries(parts.map((p) => [`no-${p.name}`, { type: 'boolean' as const }]));
  try {
    const { values, positionals } = parseArgs({
      args: [...argv],
      options: { policy: { type: 'string' }, state: { type: 'string' }, help: { type: 'boolean' }, ...switches },
      strict: true,
      allowPositionals: true,
    });
    if (positionals.length > 1 || (positionals.length === 1 && positionals[0] !== 'resolver')) return { error: `unknown command '${positionals.join(' ')}'` };
    if (values.help) return { help: true };
    const flags = values as Record<string, string | boolean | undefined>;
    return {
      mode: positionals[0] === 'resolver' ? 'resolver' : 'daemon',
      policyDir: values.policy ?? '/etc/egressd',
      stateDir: values.state ?? env['EGRESSD_STATE_DIR'] ?? '/var/lib/egressd',
      off: parts.filter((p) => flags[`no-${p.name}`] === true).map((p) => p.name),
    };
  } catch (error) {
    return { error: (error as Error).message };
  }
}

/** Runs egressd with `parts`; resolves with the exit status. */
export async function runEgressd(argv: readonly string[], parts: readonly PartSpec[]): Promise<number> {
  const invocation = parseInvocation(argv, parts);
  if ('error' in invocation) {
    process.stderr.write(`egressd: ${invocation.error}\n\n${usage(parts)}\n`);
    return 2;
  }
  if ('help' in invocation) {
    process.stderr.write(`${usage(parts)}\n`);
    return 0;
  }
  const log = openLog();
  try {
    return invocation.mode === 'resolver' ? await resolverAlone(invocation.policyDir, invocation.stateDir, log) : await daemon(invocation, parts, log);
  } catch (error) {
    log.fatal({ event: 'crashed', error: String(error) }, 'egressd crashed; the rules stay in force');
    return 3;
  }
}

async function daemon(invocation: Invocation, parts: readonly PartSpec[], log: Logger): Promise<number> {
  const { policyDir, stateDir } = invocation;
  const deps: EnforcerDeps = {
    nft: await openNft(),
    facts: gatherFacts,
    stateDir,
    audit: systemAudit,
    waiting: (holder) => log.info({ event: 'waiting-for-lock', holder }, 'waiting for another change of enforcement to finish'),
    unserialised: (reason) => log.warn({ event: 'no-lock', reason }, 'applying without the enforcement lock'),
  };
  log.info({ event: 'starting', policy: policyDir, backend: deps.nft.backend, parts: parts.map((p) => p.name), off: invocation.off }, 'egressd starting');
  const notifier = openNotifier({ failed: (reason) => log.warn({ event: 'notify-failed', reason }, 'could not notify systemd; notifications stop') });
  const egressd = new Daemon({
    policyDir,
    stateDir,
    nft: deps.nft,
    log,
    readiness: readiness(notifier),
    apply: () => applyPolicy(policyDir, deps),
    applyInForce: (policy) => applyLoadedPolicy(policy, deps, { source: `${policyDir} (the policy in force, without expired allows)` }),
    tableInForce: () => deps.nft.tableExists(TABLE.family, TABLE.name),
    parts,
    off: invocation.off,
  });
  notifier.startWatchdog();

  // Handlers first: a SIGHUP that arrives while the first apply runs must not kill the daemon (Node's default).
  process.on('SIGHUP', () => void egressd.reload('SIGHUP'));
  const accounts = watchAccounts({
    files: accountFilesToWatch(),
    inForce: () => egressd.inForce,
    gather: gatherFacts,
    changed: (files) => {
      log.info({ event: 'accounts-changed', files }, 'what users and groups of the policy resolve to changed');
      void egressd.reload('accounts changed');
    },
    unchanged: (files) => log.info({ event: 'accounts-unchanged', files }, 'account files changed; nothing the policy uses did'),
    failed: (error) => log.error({ event: 'accounts-unreadable', error: describeError(error) }, 'could not read users and groups again'),
  });
  // Signal handlers do not keep Node's event loop alive; parts with sockets may be off, so a timer does.
  const keepAlive = setInterval(() => undefined, 1 << 30);
  const stopped = new Promise<number>((resolve) => {
    const stop = (signal: string): void => {
      clearInterval(keepAlive);
      accounts.close();
      void egressd.stop(signal).finally(() => {
        notifier.close();
        resolve(0);
      });
    };
    process.once('SIGTERM', () => stop('SIGTERM'));
    process.once('SIGINT', () => stop('SIGINT'));
  });

  if (!(await egressd.start()) && egressd.state === 'starting') {
    clearInterval(keepAlive);
    accounts.close();
    notifier.close();
    log.error({ event: 'stopping' }, 'no usable policy and no table in force; nothing to keep');
    return 2;
  }
  return stopped;
}

/**
 * The resolver alone, for the table in force: it follows applies made by
 * others (a changed apply marker means the policy and its sets changed) and
 * SIGHUP, re-reading the policy directory, and changes no rule.
 */
async function resolverAlone(dir: string, stateDir: string, log: Logger): Promise<number> {
  const nft = await openNft();
  const load = async (): Promise<InForce & { marker: string | undefined }> => {
    const started = performance.now();
    // As the apply that made the table: without the allowed entries whose time is up.
    const { policy } = policyAt(loadPolicyOrThrow(dir).policy, Date.now());
    const facts = gatherFacts(factsNeeded(policy));
    const live = await readLiveTable(nft);
    const compiled = compile(policy, facts);
    log.info({ event: 'resolver-policy-loaded', policyLoadMs: Math.round(performance.now() - started) }, 'resolver: policy read and compiled');
    return { policy, facts, compiled, liveNames: dnsSetsInForce(compiled, live.sets), marker: live.marker };
  };
  // Not kept: the runtime keeps what it needs of a policy, and a reload loads the next one.
  const first = await load();
  if (first.marker === undefined) log.warn({ event: 'no-table' }, 'no egressd table in force: answers teach the kernel nothing until one is applied');
  const runtime = await startResolverRuntime(first, { nft, log, stateDir });
  let reloading = false;
  const reload = async (why: string): Promise<void> => {
    if (reloading) return;
    reloading = true;
    try {
      await runtime.update(await load());
      log.info({ event: 'resolver-reloaded', why }, 'resolver: policy in force re-read');
    } catch (error) {
      log.error({ event: 'resolver-reload-failed', why, error: describeError(error) }, 'resolver: kept the policy it had');
    } finally {
      reloading = false;
    }
  };
  // An apply is followed once: a policy that does not load is not loaded again every second, only at the next apply or SIGHUP.
  let followed = first.marker;
  const follow = setInterval(() => {
    void readLiveTable(nft).then(
      (live) => {
        if (live.marker === followed) return;
        followed = live.marker;
        return reload('table changed');
      },
      (error: unknown) => log.warn({ event: 'resolver-table-unreadable', error: describeError(error) }, 'resolver: could not read the table'),
    );
  }, FOLLOW_TABLE_MS);
  process.on('SIGHUP', () => void reload('SIGHUP'));
  return new Promise<number>((resolve) => {
    const stop = (signal: string): void => {
      clearInterval(follow);
      log.info({ event: 'stopping', signal }, 'resolver stopping');
      void runtime.close().then(() => resolve(0));
    };
    process.once('SIGTERM', () => stop('SIGTERM'));
    process.once('SIGINT', () => stop('SIGINT'));
  });
}

/** How often 'egressd resolver' looks for an apply by someone else (listing names costs milliseconds). */
const FOLLOW_TABLE_MS = 1000;
