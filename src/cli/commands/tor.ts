import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { applyPolicy, planPolicy } from '../../enforce/enforcer.js';
import { EgressError, ErrorCode } from '../../errors.js';
import { nssAccounts } from '../../system/nss.js';
import { APT_DROP_IN, DEFAULT_UPDATERS, POLICY_DROP_IN, SYSTEMD_DROP_IN_NAME, TOR_SNIPPET_NAME, TORRC } from '../../tor/files.js';
import { listenerAt } from '../../tor/listener.js';
import { torSwitchStatus } from '../../tor/switch-status.js';
import { disableTor, enableTor, TOR_RECORD_FILE, type TorOutcome, type TorSwitchDeps } from '../../tor/switch.js';
import { DEFAULT_POLICY_DIR, DEFAULT_STATE_DIR, Exit, parseFlags, type Command, type Deps } from '../deps.js';
import { describePlan, enforcerDeps } from './enforce.js';

export interface TorOptions {
  readonly action: 'enable' | 'disable' | 'status';
  readonly socks: string;
  readonly updaters: readonly string[];
  readonly dryRun: boolean;
  readonly force: boolean;
  readonly json: boolean;
  /** An image's root instead of this machine's ("/"). */
  readonly root: string | undefined;
  /** With --root: apply the image's policy to this network namespace's table all the same (tests, a chroot sharing the host's network). */
  readonly apply: boolean;
  /** The policy directory of the target system. */
  readonly policy: string;
}

export const tor: Command<TorOptions> = {
  name: 'tor',
  summary: 'updates over Tor, in one command for installers (enable|disable|status)',
  help: `Usage: egressctl tor enable [--socks ADDR:PORT] [--updaters LIST] [--dry-run] [--json] [--policy DIR] [--root DIR [--apply]]
       egressctl tor disable [--force] [--json] [--policy DIR] [--root DIR [--apply]]
       egressctl tor status [--json] [--root DIR]

Sends the machine's updaters through Tor, and confines them so that if Tor
is down, updates fail instead of going direct. Non-interactive, idempotent
(enabling twice is enabling once) and reversible: it never asks anything.

enable   Writes, each file whole or not at all:
           /etc/tor/torrc.d/${TOR_SNIPPET_NAME} (only where ${TORRC} has
             "%include" of a directory): SocksPort with stream isolation
             (IsolateSOCKSAuth and the others), control socket, cookie
             authentication. Where torrc includes nothing, it says which
             lines to add by hand (Debian's defaults already isolate by
             SOCKS credentials on 127.0.0.1:9050).
           ${APT_DROP_IN}: apt's http and https through socks5h://
             (names resolve inside Tor), no SRV lookups; apt and apt-get
             get SOCKS credentials of their own, other apt front-ends
             (PackageKit, unattended-upgrades) theirs: own Tor circuits.
           /etc/systemd/system/UNIT.d/${SYSTEMD_DROP_IN_NAME} for
             packagekit.service, fwupd.service, fwupd-refresh.service and
             flatpak-system-helper.service: the proxy environment
             (ALL_PROXY, HTTPS_PROXY, http_proxy, …), one credential each.
           DIR/${POLICY_DROP_IN} (the policy, default ${DEFAULT_POLICY_DIR}):
             tor: {enabled: true, socks, updaters}.
         then applies the policy (as "egressctl apply" does, with the
         table's lock): the updaters may reach only the SOCKS port.
         Before anything changes, what was at each path is recorded in
         $EGRESSD_STATE_DIR (default ${DEFAULT_STATE_DIR}) as ${TOR_RECORD_FILE}.
         Configuration that is not egressd's is never overwritten: an apt
         proxy in any apt.conf.d file, a file of one of these names that
         egressd did not write, a later policy file setting tor, or the
         SOCKS port held by a process that is not Tor's user are reported,
         and nothing is changed. If a step fails, the steps before it are
         undone. Tor not running is a warning: updates then fail, never
         leak, until it runs.
disable  Lifts the confinement first (the policy drop-in put back as it
         was, applied), then puts every other file back exactly as enable
         found it (same bytes, mode and owner; one that was not there
         removed). Without an enable to undo, it changes nothing.
status   One line: "updates: over Tor (bootstrapped 100 %)", "updates:
         blocked — Tor not running", "updates: direct (updates over Tor
         off)"; with --json, the fields (switch, Tor's control port).

  --socks ADDR:PORT  Tor's SOCKS port (default 127.0.0.1:9050)
  --updaters LIST    comma-separated, of ${DEFAULT_UPDATERS.join(',')}
                     (default all)
  --dry-run          print every file it would write (new: its content;
                     changed: a diff) and the table change; change nothing
  --force            disable: put back what was there even over files
                     someone else changed since enable
  --json             the outcome as JSON on stdout
  --policy DIR       the policy directory (of the target system)
  --root DIR         work on the system image at DIR (for installers):
                     every path is taken under DIR, its state directory is
                     DIR${DEFAULT_STATE_DIR}, nothing is reloaded and no table is
                     changed — its egressd applies the policy when it starts
  --apply            with --root: apply DIR's policy to this network
                     namespace's table all the same

Exit status: 0 done (status: updates go over Tor and Tor is ready), 1 someone
else's configuration is in the way and nothing was changed (status: updates
go direct, or are blocked), 2 bad usage or a policy that does not load,
3 system error (Tor not installed, a file that cannot be written, nftables
refused): every step before it undone.`,

  parse(argv) {
    const { values, positionals } = parseFlags(
      'tor',
      argv,
      {
        socks: { type: 'string' },
        updaters: { type: 'string' },
        'dry-run': { type: 'boolean' },
        force: { type: 'boolean' },
        json: { type: 'boolean' },
        root: { type: 'string' },
        apply: { type: 'boolean' },
        policy: { type: 'string' },
      },
      1,
    );
    const usage = (message: string) => new EgressError(ErrorCode.Usage, `egressctl tor: ${message}`, { details: ['see: egressctl tor --help'] });
    const action = positionals[0];
    if (action !== 'enable' && action !== 'disable' && action !== 'status') throw usage('say "enable", "disable" or "status"');
    if ((values.socks !== undefined || values.updaters !== undefined || values['dry-run']) && action !== 'enable')
      throw usage('--socks, --updaters and --dry-run go with enable');
    if (values.force && action !== 'disable') throw usage('--force goes with disable');
    if (values.apply && values.root === undefined) throw usage('--apply goes with --root (without --root, the policy is always applied)');
    if ((values.apply || values.policy !== undefined) && action === 'status') throw usage('--apply and --policy go with enable or disable');
    if (values.policy !== undefined && !values.policy.startsWith('/')) throw usage('--policy takes an absolute path (of the target system)');
    return {
      action,
      socks: values.socks ?? '127.0.0.1:9050',
      updaters:
        values.updaters === undefined
          ? DEFAULT_UPDATERS
          : values.updaters
              .split(',')
              .map((s) => s.trim())
              .filter((s) => s !== ''),
      dryRun: values['dry-run'] === true,
      force: values.force === true,
      json: values.json === true,
      root: values.root,
      apply: values.apply === true,
      policy: values.policy ?? DEFAULT_POLICY_DIR,
    };
  },

  async run(options, deps) {
    if (options.action === 'status') return printStatus(options, deps);
    const switchDeps = await switchDepsFor(options, deps);
    const outcome =
      options.action === 'enable'
        ? await enableTor({ socks: options.socks, updaters: options.updaters, dryRun: options.dryRun }, switchDeps)
        : await disableTor({ force: options.force }, switchDeps);
    if (options.json) deps.out(JSON.stringify({ action: options.action, dryRun: options.dryRun, ...outcome }, null, 2));
    printOutcome(outcome, options.dryRun, deps);
    return Exit.Ok;
  },
};

function printOutcome(outcome: TorOutcome, dryRun: boolean, deps: Deps): void {
  if (dryRun) {
    for (const file of outcome.files) {
      if (file.action === 'keep') {
        deps.err(`${file.path}: already as it would be written`);
        continue;
      }
      if (file.action === 'restore') {
        deps.err(`${file.path}: would be put back as it was before enable`);
        continue;
      }
      deps.err(`${file.path}: would be written:`);
      for (const line of file.shown ?? []) deps.err(`    ${line}`);
    }
    deps.err('the table:');
    for (const line of outcome.plan ?? []) deps.err(line.startsWith('  ') ? line : `  ${line}`);
  }
  for (const line of outcome.said) deps.err(line);
  for (const line of outcome.warnings) deps.err(line.startsWith(' ') ? line : `warning: ${line}`);
}

const isLive = (options: TorOptions) => options.root === undefined || options.apply;

async function switchDepsFor(options: TorOptions, deps: Deps): Promise<TorSwitchDeps> {
  const root = options.root ?? '/';
  const stateDir = options.root === undefined ? deps.stateDir : join(options.root, DEFAULT_STATE_DIR);
  const accounts = nssAccounts();
  const base: TorSwitchDeps = {
    root,
    stateDir,
    policyDir: options.policy,
    uidOf: (name) => {
      if (typeof name === 'number') return name;
      const row = accounts.user(name);
      return row && !('error' in row) ? row.uid : undefined;
    },
    now: () => new Date(),
  };
  if (!isLive(options)) return base;
  // The table of this network namespace: its enforcement deps, opened once for the command.
  // Under --root, the image's state directory keeps what the apply leaves (last-good, switches.json), beside the record.
  const enforcer = { ...(await enforcerDeps(deps)), stateDir };
  const services = options.root === undefined && existsSync('/run/systemd/system') ? systemServices : undefined;
  return {
    ...base,
    apply: async (dir) => {
      const applied = await applyPolicy(dir, enforcer);
      return [`applied ${dir}: policy sha256:${applied.digest.slice(0, 16)}…`, ...describePlan(applied.plan)];
    },
    plan: async (dir) => {
      const { plan } = await planPolicy(dir, enforcer);
      return plan.changes ? describePlan(plan) : ['  the live table already matches; nothing would change'];
    },
    socksListener: listenerAt,
    ...(services && { services }),
  };
}

function systemctl(args: string[]): string | undefined {
  const done = spawnSync('systemctl', args, { encoding: 'utf8', timeout: 60_000 });
  if (done.error) return `systemctl could not be run: ${done.error.message}`;
  return done.status === 0 ? undefined : `systemctl ${args.join(' ')} failed: ${done.stderr.trim() || `exit ${done.status}`}`;
}

const systemServices = {
  daemonReload: () => systemctl(['daemon-reload']),
  reloadTor: () => systemctl(['try-reload-or-restart', 'tor.service']),
};

async function printStatus(options: TorOptions, deps: Deps): Promise<number> {
  const root = options.root ?? '/';
  const stateDir = options.root === undefined ? deps.stateDir : join(options.root, DEFAULT_STATE_DIR);
  const status = await torSwitchStatus({ root, stateDir });
  if (options.json) deps.out(JSON.stringify(status, null, 2));
  deps.err(status.line);
  if (status.switchesProblem) deps.err(`  ${status.switchesProblem}`);
  if (status.enabled)
    deps.err(`  enabled by "egressctl tor enable" on ${status.enabled.at}: SOCKS ${status.enabled.socks}, updaters ${status.enabled.updaters.join(', ')}`);
  if (status.since) deps.err(`  updates over Tor ${status.torUpdates ? 'on' : 'off'} since ${status.since} (the last apply)`);
  const ready = status.torUpdates && status.tor?.reachable === true && status.tor.bootstrap >= 100 && status.tor.circuitEstablished;
  return ready ? Exit.Ok : Exit.Answer;
}
