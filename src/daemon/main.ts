#!/usr/bin/env node
/**
 * egressd, as far as it goes today: applies the policy, keeps it, and
 * re-applies it on SIGHUP. The app tracker, resolver, denial reader, D-Bus
 * service and sd_notify come with the full daemon; this loop is the part they
 * will plug into.
 *
 * Fail-closed: a policy that does not load on reload keeps the running table;
 * stopping never removes the rules (only `egressctl release` does).
 */
import { parseArgs } from 'node:util';
import { pino } from 'pino';
import { TABLE } from '../compile/compile.js';
import { applyPolicy, type EnforcerDeps } from '../enforce/enforcer.js';
import { isEgressError } from '../errors.js';
import { openNft } from '../nft/open.js';
import { systemAudit } from '../system/audit.js';
import { gatherFacts } from '../system/facts.js';

const USAGE = `Usage: egressd [--policy DIR] [--state DIR]

Applies the egress policy in DIR (default /etc/egressd) as table inet
egressd and keeps it: SIGHUP re-reads and re-applies it (a broken policy
leaves the running rules in force and logs every error), SIGTERM stops
egressd and leaves the rules in force. Logs are JSON lines on stdout.

  --policy DIR   the policy directory (default /etc/egressd)
  --state DIR    where the last good ruleset is kept (default /var/lib/egressd)

Exit status: 0 stopped by a signal, 2 bad usage or no usable policy at start
with no table in force, 3 system error.`;

const log = pino({ base: { service: 'egressd' }, timestamp: pino.stdTimeFunctions.isoTime, formatters: { level: (label) => ({ level: label }) } });

async function main(): Promise<number> {
  let values;
  try {
    ({ values } = parseArgs({ options: { policy: { type: 'string' }, state: { type: 'string' }, help: { type: 'boolean' } }, strict: true }));
  } catch (error) {
    process.stderr.write(`egressd: ${(error as Error).message}\n\n${USAGE}\n`);
    return 2;
  }
  if (values.help) {
    process.stderr.write(`${USAGE}\n`);
    return 0;
  }
  const dir = values.policy ?? '/etc/egressd';
  const deps: EnforcerDeps = {
    nft: await openNft(),
    facts: gatherFacts,
    stateDir: values.state ?? process.env['EGRESSD_STATE_DIR'] ?? '/var/lib/egressd',
    audit: systemAudit,
    waiting: (holder) => log.info({ event: 'waiting-for-lock', holder }, 'waiting for another change of enforcement to finish'),
    unserialised: (reason) => log.warn({ event: 'no-lock', reason }, 'applying without the enforcement lock'),
  };
  log.info({ event: 'starting', policy: dir, backend: deps.nft.backend }, 'egressd starting');

  const apply = async (why: string): Promise<void> => {
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
    } catch (error) {
      const code = isEgressError(error) ? error.code : 'EGD_INTERNAL';
      const details = isEgressError(error) ? error.details : [String(error)];
      log.error({ event: 'apply-failed', why, code, errors: details }, `${(error as Error).message}; the running rules stay in force`);
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
    log.info({ event: 'stopping', signal }, 'egressd stopping; the rules stay in force');
    stopWith?.(0);
  };
  process.on('SIGHUP', () => reload('SIGHUP'));
  process.once('SIGTERM', () => stop('SIGTERM'));
  process.once('SIGINT', () => stop('SIGINT'));

  reload('start');
  await reloading;
  if (!(await deps.nft.tableExists(TABLE.family, TABLE.name))) {
    clearInterval(keepAlive);
    log.error({ event: 'stopping' }, 'no usable policy and no table in force; nothing to keep');
    return 2;
  }
  return stopped;
}

main().then(
  (code) => process.exit(code),
  (error: unknown) => {
    log.fatal({ event: 'crashed', error: String(error) }, 'egressd crashed; the rules stay in force');
    process.exit(3);
  },
);
