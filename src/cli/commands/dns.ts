import { join } from 'node:path';
import { EgressError, ErrorCode } from '../../errors.js';
import { loadPolicyOrThrow } from '../../policy/load.js';
import {
  DEFAULT_LISTEN,
  disableDns,
  dnsStatus,
  DROP_IN,
  enableDns,
  notRunning,
  RESOLV_CONF,
  systemResolved,
  type DnsSwitchDeps,
} from '../../system/resolv-conf.js';
import { DEFAULT_STATE_DIR, Exit, parseFlags, type Command, type Deps } from '../deps.js';

export interface DnsOptions {
  readonly action: 'enable' | 'disable' | 'status';
  readonly listen: readonly string[];
  readonly force: boolean;
  readonly json: boolean;
  /** An image's root instead of this machine's ("/"). */
  readonly root: string | undefined;
}

export const dns: Command<DnsOptions> = {
  name: 'dns',
  summary: "make egressd's resolver the machine's, or stop (enable|disable|status)",
  help: `Usage: egressctl dns enable [--listen ADDR]… | [--policy DIR] [--force] [--json] [--root DIR]
       egressctl dns disable [--force] [--json] [--root DIR]
       egressctl dns status [--json] [--root DIR]

Rules written with names hold only for lookups that go through egressd's
resolver: it puts each answer's addresses into the firewall's sets before the
answer reaches the program that asked. These commands point the machine at
it, and back.

enable   With systemd-resolved in charge (${RESOLV_CONF} a link into
         /run/systemd/resolve, or resolved running and resolv.conf naming
         only its stub), writes ${DROP_IN}
         (DNS=the resolver's addresses, Domains=~. so that every name goes
         there) and has resolved re-read its configuration — or says that
         resolved is not running and the drop-in waits for it. Otherwise it
         replaces ${RESOLV_CONF} with one naming the resolver's addresses,
         keeping its search, domain and options lines.
         First, before anything changes, it records exactly what was there
         in $EGRESSD_STATE_DIR (default ${DEFAULT_STATE_DIR}) as dns-enable.json.
         Enabling twice is enabling once.
disable  Puts back exactly what enable found: the same bytes, mode and owner,
         a link as the same link, a drop-in that was not there removed.
         Without an enable to undo, it changes nothing and says so.
status   Whether the machine's lookups go to egressd's resolver, and what
         someone else changed since enable.

Files are written whole or not at all (a new file renamed over the old).
Nothing else is touched.

If something else rewrote resolv.conf after enable (NetworkManager, dhclient,
a person), status says so, and enable and disable leave their change as it is
and say why. --force overrides: enable points it at egressd again (disable
still restores what was there before the first enable), disable restores
what was there before enable.

  --listen ADDR  an address egressd's resolver listens on (port 53); give it
                 once for each. Default: ${DEFAULT_LISTEN.join(' and ')}. It must be the
                 policy's dns.listen, or lookups go nowhere.
  --force        see above
  --json         print the outcome as JSON on stdout
  --root DIR     work on the system image at DIR instead of this machine
                 (for installers): its /etc, its /var/lib/egressd; nothing
                 is reloaded there

Exit status: 0 done (status: lookups go to egressd), 1 someone else changed
what enable wrote and nothing was done (status: lookups do not go to
egressd), 2 bad usage, 3 system error.`,

  parse(argv) {
    const { values, positionals } = parseFlags(
      'dns',
      argv,
      {
        listen: { type: 'string', multiple: true },
        policy: { type: 'string' },
        force: { type: 'boolean' },
        json: { type: 'boolean' },
        root: { type: 'string' },
      },
      1,
    );
    const usage = (message: string) => new EgressError(ErrorCode.Usage, `egressctl dns: ${message}`, { details: ['see: egressctl dns --help'] });
    const action = positionals[0];
    if (action !== 'enable' && action !== 'disable' && action !== 'status') throw usage('say "enable", "disable" or "status"');
    if ((values.listen || values.policy) && action !== 'enable') throw usage('--listen and --policy go with enable');
    if (values.listen && values.policy) throw usage('--listen or --policy, not both');
    // The addresses the policy tells egressd's resolver to listen on: what the machine must point at.
    const listen = values.policy === undefined ? values.listen : loadPolicyOrThrow(values.policy).policy.dns.listen;
    if (values.force && action === 'status') throw usage('--force goes with enable or disable');
    return { action, listen: listen ?? DEFAULT_LISTEN, force: values.force === true, json: values.json === true, root: values.root };
  },

  run(options, deps) {
    const switchDeps = switchDepsFor(options, deps);
    if (options.action === 'status') return printStatus(options, switchDeps, deps);
    const outcome =
      options.action === 'enable' ? enableDns(options.listen, { force: options.force }, switchDeps) : disableDns({ force: options.force }, switchDeps);
    if (options.json) deps.out(JSON.stringify({ action: options.action, ...outcome }, null, 2));
    for (const line of outcome.said) deps.err(line);
    return Exit.Ok;
  },
};

function switchDepsFor(options: DnsOptions, deps: Deps): DnsSwitchDeps {
  if (options.root === undefined) return { root: '/', stateDir: deps.stateDir, resolved: systemResolved, now: () => new Date() };
  return { root: options.root, stateDir: join(options.root, DEFAULT_STATE_DIR), resolved: notRunning, now: () => new Date() };
}

function printStatus(options: DnsOptions, switchDeps: DnsSwitchDeps, deps: Deps): number {
  const status = dnsStatus(switchDeps);
  if (options.json) deps.out(JSON.stringify(status, null, 2));
  const names = status.nameservers.length > 0 ? status.nameservers.join(', ') : 'no nameserver';
  if (!status.enabled) {
    deps.err(`not enabled: ${RESOLV_CONF} names ${names}; lookups do not go to egressd's resolver ("egressctl dns enable")`);
    return Exit.Answer;
  }
  const how = status.manager === 'systemd-resolved' ? `a drop-in (${DROP_IN}) has systemd-resolved forward every name to` : `${RESOLV_CONF} was written naming`;
  deps.err(`enabled since ${status.enabledAt}: ${how} egressd's resolver at ${status.listen.join(', ')}`);
  if (status.manager === 'systemd-resolved')
    deps.err(`  systemd-resolved is ${status.resolvedRunning ? 'running' : 'NOT running: lookups through its stub fail until it starts'}`);
  for (const line of status.changedElsewhere) deps.err(`  CHANGED by someone else since enable: ${line}`);
  if (status.changedElsewhere.length > 0)
    deps.err(
      '  "egressctl dns disable" leaves their change as it is; --force restores what was there before enable, "enable --force" points it at egressd again',
    );
  if (!status.pointsAtEgressd) deps.err(`  lookups do NOT all go to egressd's resolver now (${RESOLV_CONF} names ${names})`);
  return status.pointsAtEgressd ? Exit.Ok : Exit.Answer;
}
