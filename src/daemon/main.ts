#!/usr/bin/env node
/**
 * egressd, as far as it goes today: applies the policy, keeps it, re-applies
 * it on SIGHUP, and runs the DNS resolver that fills the table's name sets
 * (src/resolver), telling systemd where it is (readiness.ts). The app
 * tracker, denial reader and D-Bus service come with the full daemon; this loop is the part they will plug
 * into. `egressd resolver` runs the resolver alone, against the table in
 * force (for tests, `egressctl try`, and hosts where something else applies).
 *
 * Fail-closed: a policy that does not load on reload keeps the running table;
 * stopping never removes the rules (only `egressctl release` does).
 */
import { parseArgs } from 'node:util';
import { pino } from 'pino';
import { compile, factsNeeded, TABLE } from '../compile/compile.js';
import { applyPolicy, type EnforcerDeps } from '../enforce/enforcer.js';
import { isEgressError } from '../errors.js';
import { openNft } from '../nft/open.js';
import { loadPolicyOrThrow } from '../policy/load.js';
import { dnsSetsInForce, readLiveTable, startResolverRuntime, type InForce, type ResolverRuntime } from '../resolver/runtime.js';
import { systemAudit } from '../system/audit.js';
import { accountFilesToWatch, gatherFacts } from '../system/facts.js';
import { openNotifier } from '../system/sd-notify.js';
import { watchAccounts } from './accounts.js';
import { readiness } from './readiness.js';

const USAGE = `Usage: egressd [--policy DIR] [--state DIR]
       egressd resolver [--policy DIR] [--state DIR]

Applies the egress policy in DIR (default /etc/egressd) as table inet
egressd and keeps it: SIGHUP re-reads and re-applies it (a broken policy
leaves the running rules in force and logs every error), and so does a
change to what the policy's users and groups resolve to (/etc/passwd,
/etc/group, /etc/subuid, /etc/subgid); SIGTERM stops egressd and leaves
the rules in force. Logs are JSON lines on stdout. Under systemd
(NOTIFY_SOCKET), it says READY=1 once a table is enforced.

Once the policy is applied, egressd answers DNS on the policy's dns.listen
addresses (default 127.0.0.153 and ::1, port 53): every address an answer
holds goes into the sets of the rules that name it before the answer
leaves, so rules written with names are enforced. Point the machine at it
with 'egressctl dns enable'. A resolver that cannot start (the port is
taken, no upstream) is logged; enforcement goes on without it.

'egressd resolver' runs only the resolver, for the table some other run
applied: it follows that table (re-reading DIR when an apply changed it)
and never changes the rules itself.

  --policy DIR   the policy directory (default /etc/egressd)
  --state DIR    where the last good ruleset is kept (default /var/lib/egressd)

Exit status: 0 stopped by a signal, 2 bad usage or no usable policy at start
with no table in force, 3 system error.`;

const log = pino({ base: { service: 'egressd' }, timestamp: pino.stdTimeFunctions.isoTime, formatters: { level: (label) => ({ level: label }) } });

async function main(): Promise<number> {
  let values, positionals;
  try {
    ({ values, positionals } = parseArgs({
      options: { policy: { type: 'string' }, state: { type: 'string' }, help: { type: 'boolean' } },
      strict: true,
      allowPositionals: true,
    }));
    if (positionals.length > 1 || (positionals.length === 1 && positionals[0] !== 'resolver')) throw new Error(`unknown command '${positionals.join(' ')}'`);
  } catch (error) {
    process.stderr.write(`egressd: ${(error as Error).message}\n\n${USAGE}\n`);
    return 2;
  }
  if (values.help) {
    process.stderr.write(`${USAGE}\n`);
    return 0;
  }
  const dir = values.policy ?? '/etc/egressd';
  const stateDir = values.state ?? process.env['EGRESSD_STATE_DIR'] ?? '/var/lib/egressd';
  if (positionals[0] === 'resolver') return resolverAlone(dir, stateDir);
  const deps: EnforcerDeps = {
    nft: await openNft(),
    facts: gatherFacts,
    stateDir,
    audit: systemAudit,
    waiting: (holder) => log.info({ event: 'waiting-for-lock', holder }, 'waiting for another change of enforcement to finish'),
    unserialised: (reason) => log.warn({ event: 'no-lock', reason }, 'applying without the enforcement lock'),
  };
  log.info({ event: 'starting', policy: dir, backend: deps.nft.backend }, 'egressd starting');
  const notifier = openNotifier({ failed: (reason) => log.warn({ event: 'notify-failed', reason }, 'could not notify systemd; notifications stop') });
  const service = readiness(notifier);
  notifier.startWatchdog();

  let resolver: ResolverRuntime | undefined;
  let inForce: InForce | undefined;
  const apply = async (why: string): Promise<void> => {
    service.applying(why);
    try {
      const applied = await applyPolicy(dir, deps);
      log.info(
        {
          event: 'applied',
          why,
          digest: applied.digest,
          lockdown: applied.lockdown,
          warnings: applied.compiled.warnings.length,
          connectionsCut: applied.sweep.cut,
        },
        'policy applied',
      );
      inForce = { ...applied, liveNames: new Map([...applied.liveNames].map(([name, live]) => [name, [live]])) };
      let answering = true;
      try {
        if (resolver) await resolver.update(inForce);
        else resolver = await startResolverRuntime(inForce, { nft: deps.nft, log, stateDir });
      } catch (error) {
        answering = false;
        // Names stop being learned; every rule with an address, and every set element learned so far, still holds.
        log.error({ event: 'resolver-failed', why, error: describe(error) }, 'the resolver is not running; enforcement goes on');
      }
      service.enforcing({
        digest: applied.digest,
        rules: applied.compiled.ruleIds.length,
        lockdown: applied.lockdown,
        resolver: answering ? resolver?.resolver.addresses : undefined,
      });
    } catch (error) {
      const code = isEgressError(error) ? error.code : 'EGD_INTERNAL';
      const details = isEgressError(error) ? error.details : [String(error)];
      log.error({ event: 'apply-failed', why, code, errors: details }, `${(error as Error).message}; the running rules stay in force`);
      service.failed(code, details, await deps.nft.tableExists(TABLE.family, TABLE.name).catch(() => false));
    }
  };

  // Handlers first: a SIGHUP that arrives while the first apply runs must not kill the daemon (Node's default).
  let reloading: Promise<void> | undefined;
  let again = false;
  const reload = (why: string): void => {
    if (reloading) {
      again = true;
      return;
    }
    reloading = (async () => {
      do {
        again = false;
        await apply(why);
        // eslint-disable-next-line @typescript-eslint/no-unnecessary-condition -- a SIGHUP during apply() sets it
      } while (again);
      reloading = undefined;
    })();
  };
  let stopWith: ((code: number) => void) | undefined;
  const stopped = new Promise<number>((resolve) => (stopWith = resolve));
  // Signal handlers do not keep Node's event loop alive; until the daemon has sockets of its own, a timer does.
  const keepAlive = setInterval(() => undefined, 1 << 30);
  const stop = (signal: string): void => {
    clearInterval(keepAlive);
    service.stopping(signal);
    notifier.close();
    accounts.close();
    void resolver?.close();
    log.info({ event: 'stopping', signal }, 'egressd stopping; the rules stay in force');
    stopWith?.(0);
  };
  process.on('SIGHUP', () => reload('SIGHUP'));
  const accounts = watchAccounts({
    files: accountFilesToWatch(),
    inForce: () => inForce,
    gather: gatherFacts,
    changed: (files) => {
      log.info({ event: 'accounts-changed', files }, 'what users and groups of the policy resolve to changed');
      reload('accounts changed');
    },
    unchanged: (files) => log.info({ event: 'accounts-unchanged', files }, 'account files changed; nothing the policy uses did'),
    failed: (error) => log.error({ event: 'accounts-unreadable', error: describe(error) }, 'could not read users and groups again'),
  });
  process.once('SIGTERM', () => stop('SIGTERM'));
  process.once('SIGINT', () => stop('SIGINT'));

  reload('start');
  await reloading;
  if (!(await deps.nft.tableExists(TABLE.family, TABLE.name))) {
    clearInterval(keepAlive);
    accounts.close();
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
async function resolverAlone(dir: string, stateDir: string): Promise<number> {
  const nft = await openNft();
  const load = async (): Promise<InForce & { marker: string | undefined }> => {
    const { policy } = loadPolicyOrThrow(dir);
    const facts = gatherFacts(factsNeeded(policy));
    const live = await readLiveTable(nft);
    const compiled = compile(policy, facts);
    return { policy, facts, compiled, liveNames: dnsSetsInForce(compiled, live.sets), marker: live.marker };
  };
  let inForce = await load();
  if (inForce.marker === undefined) log.warn({ event: 'no-table' }, 'no egressd table in force: answers teach the kernel nothing until one is applied');
  const runtime = await startResolverRuntime(inForce, { nft, log, stateDir });
  let reloading = false;
  const reload = async (why: string): Promise<void> => {
    if (reloading) return;
    reloading = true;
    try {
      inForce = await load();
      await runtime.update(inForce);
      log.info({ event: 'resolver-reloaded', why }, 'resolver: policy in force re-read');
    } catch (error) {
      log.error({ event: 'resolver-reload-failed', why, error: describe(error) }, 'resolver: kept the policy it had');
    } finally {
      reloading = false;
    }
  };
  // An apply is followed once: a policy that does not load is not loaded again every second, only at the next apply or SIGHUP.
  let followed = inForce.marker;
  const follow = setInterval(() => {
    void readLiveTable(nft).then(
      (live) => {
        if (live.marker === followed) return;
        followed = live.marker;
        return reload('table changed');
      },
      (error: unknown) => log.warn({ event: 'resolver-table-unreadable', error: describe(error) }, 'resolver: could not read the table'),
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

function describe(error: unknown): string | readonly string[] {
  return isEgressError(error) && error.details.length > 0 ? [error.message, ...error.details] : String(error);
}

main().then(
  (code) => process.exit(code),
  (error: unknown) => {
    log.fatal({ event: 'crashed', error: String(error) }, 'egressd crashed; the rules stay in force');
    process.exit(3);
  },
);
