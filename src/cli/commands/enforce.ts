import { statSync } from 'node:fs';
import { EgressError, ErrorCode } from '../../errors.js';
import { applyPolicy, liveSummary, planPolicy, release as releaseTable, setLockdown, type EnforcerDeps } from '../../enforce/enforcer.js';
import type { Plan } from '../../enforce/plan.js';
import type { SweepOutcome } from '../../enforce/sweep.js';
import type { TableSummary } from '../../enforce/summary.js';
import { entryOrigin } from '../../compile/rule-ids.js';
import { readRuleTable } from '../../state/rule-table.js';
import { readSwitches, SWITCHES_FILE } from '../../state/switches.js';
import { DEFAULT_POLICY_DIR, Exit, parseFlags, printIssues, type Command, type Deps } from '../deps.js';
import { expiredIssues } from '../../policy/expiry.js';

/** Said by every command that finds lockdown on, in the same words. */
const LOCKDOWN_IS_ON =
  'LOCKDOWN IS ON: all egress except loopback (and Tor itself, with updates over Tor) is denied. "egressctl lockdown off" restores the policy.';

/** The enforcement commands share their dependencies: the nft binding is opened once per command. */
export async function enforcerDeps(deps: Deps): Promise<EnforcerDeps> {
  return {
    nft: await deps.nft(),
    facts: deps.facts,
    ...(deps.now ? { now: deps.now } : {}),
    stateDir: deps.stateDir,
    audit: deps.audit,
    waiting: (holder) => deps.err(`waiting for another change of enforcement to finish (${holder})`),
    unserialised: (reason) => deps.err(`warning: ${reason}`),
  };
}

export function describePlan(plan: Plan): string[] {
  const lines: string[] = [];
  if (!plan.tablePresent) {
    const sets = plan.sets.filter((s) => !s.dynamic && (s.compiled ?? 0) > 0).reduce((n, s) => n + (s.compiled ?? 0), 0);
    return [
      `  table inet egressd is not in the kernel: applying creates it with ${plan.added.length} rules and ${plan.sets.length} sets and maps (${sets} static elements); policy sha256:${plan.digest.compiled ?? '?'}`,
    ];
  }
  if (plan.digest.live !== plan.digest.compiled) lines.push(`  policy sha256:${plan.digest.live ?? '(none)'} → sha256:${plan.digest.compiled ?? '(none)'}`);
  if (plan.lockdown.live !== plan.lockdown.compiled) lines.push(`  lockdown ${plan.lockdown.live ? 'on' : 'off'} → ${plan.lockdown.compiled ? 'on' : 'off'}`);
  for (const r of plan.added) lines.push(`  + ${r.chain}: ${r.comment}`);
  for (const r of plan.removed) lines.push(`  - ${r.chain}: ${r.comment}`);
  for (const s of plan.sets.filter((x) => x.change !== 'same')) {
    lines.push(
      `  ${s.change === 'added' ? '+' : s.change === 'removed' ? '-' : '~'} set ${s.name}: ${s.live ?? 0} → ${s.compiled ?? 0} elements${s.dynamic ? ' (filled at run time)' : ''}`,
    );
  }
  return lines;
}

/** The connections the apply cut (sweep.ts), one line each. */
function describeSweep(sweep: SweepOutcome): string[] {
  if (sweep.cut.length === 0) return [];
  return [
    `  cut ${sweep.cut.length} ${sweep.cut.length === 1 ? 'connection' : 'connections'} the policy explicitly denies (nothing they queued will leave):`,
    ...sweep.cut.map((c) => `    ${c.socket}: ${c.ruleId}`),
  ];
}

const onePolicyDir = (command: string, argv: readonly string[]) => {
  const { values, positionals } = parseFlags(command, argv, { json: { type: 'boolean' } }, 1);
  return { dir: positionals[0] ?? DEFAULT_POLICY_DIR, json: values.json === true };
};

export const apply: Command<{ dir: string; json: boolean; reread: boolean }> = {
  name: 'apply',
  summary: 'enforce a policy: switch table inet egressd to it, with no window',
  help: `Usage: egressctl apply [DIR] [--json] [--reread]

Loads and compiles the policy in DIR (default ${DEFAULT_POLICY_DIR}) and
switches the kernel's table inet egressd to it: the new sets and chains are
added first, then one transaction switches the base chain to them, then the
old ones are removed — so every packet is judged by the old policy or the
new one, never by neither. No other table is touched, and the ruleset is never
flushed. A policy with any error changes nothing.

Enforcement then stays in the kernel by itself: no daemon is needed for it
to hold. Only "egressctl release" removes it. If lockdown is on, it stays on.
The applied ruleset is kept in $EGRESSD_STATE_DIR (default /var/lib/egressd)
as last-good.nft, with its short rule ids (rules.json: what each log prefix
"egd rXXXXXXXX " stands for) and its switches (switches.json: lockdown,
updates over Tor), and the change is recorded in the system log.

The changes listed are against the live table. When its chains and sets are
still exactly those the last apply left (recorded in applied.json; checked
against the kernel each time), they are taken from that record instead of
reading every set element back — "liveFrom" in --json says which. The
record vouches for names, not elements: after elements of egressd's sets were
changed by hand, --reread reads the table whole, and every set whose elements
differ from the policy is written anew.

Changes of enforcement take turns: apply, lockdown, release and egressd's
re-applies hold the table's lock (/run/egressd/net-INODE.lock, one per
network namespace) while they run. One that finds another running waits
for it, says for whom (its pid and what it is doing), and gives up after a
minute without changing anything. A killed holder leaves no lock behind.

Right after the switch, apply cuts every TCP connection of this network
namespace that the new policy explicitly denies (system domain, lockdown,
updaters over Tor, an app's deny rule, the global deny list; not a default
deny), closed ones still sending included: a program that closes a socket
leaves data queued that no \`meta skuid\` rule can stop. Each cut connection
is listed; their programs get ECONNABORTED.

Exit status: 0 applied, 2 invalid policy, 3 nftables refused or another
change still running (nothing changed), or applied but some connections of
denied identities could not be cut (EGD_SOCKETS_NOT_CUT: the table stays).`,
  parse: (argv) => {
    const { values, positionals } = parseFlags('apply', argv, { json: { type: 'boolean' }, reread: { type: 'boolean' } }, 1);
    return { dir: positionals[0] ?? DEFAULT_POLICY_DIR, json: values.json === true, reread: values.reread === true };
  },
  async run(options, deps) {
    const enforcer = await enforcerDeps(deps);
    const applied = await applyPolicy(options.dir, enforcer, { reread: options.reread });
    printIssues(deps, options.dir, [...expiredIssues(applied.expired), ...applied.compiled.warnings]);
    const rules = applied.compiled.ruleset.chains.reduce((n, c) => n + c.rules.length, 0);
    if (options.json) {
      deps.out(
        JSON.stringify(
          {
            applied: true,
            digest: applied.digest,
            lockdown: applied.lockdown,
            rules,
            sets: applied.compiled.ruleset.sets.length,
            backend: enforcer.nft.backend,
            liveFrom: applied.liveFrom,
            liveNames: Object.fromEntries(applied.liveNames),
            plan: applied.plan,
            sweep: applied.sweep,
            expired: applied.expired.map((e) => ({ app: e.app, ruleId: e.rule.id, until: new Date(e.until).toISOString(), at: e.rule.at })),
          },
          null,
          2,
        ),
      );
    }
    deps.err(
      `applied ${options.dir}: ${rules} rules, ${applied.compiled.ruleset.sets.length} sets and maps; policy sha256:${applied.digest.slice(0, 16)}… (${enforcer.nft.backend})`,
    );
    for (const line of describePlan(applied.plan)) deps.err(line);
    for (const line of describeSweep(applied.sweep)) deps.err(line);
    if (applied.lockdown) deps.err(LOCKDOWN_IS_ON);
    return Exit.Ok;
  },
};

export const plan: Command<{ dir: string; json: boolean }> = {
  name: 'plan',
  summary: 'show what applying a policy would change',
  help: `Usage: egressctl plan [DIR] [--json]

Compiles the policy in DIR (default ${DEFAULT_POLICY_DIR}) and compares it with
the live table inet egressd, changing nothing: rules added (+) and removed
(-), named by file:line and rule id, and sets whose contents would change
(~, with sizes). Sets filled at run time (DNS answers, cgroups) are compared
by size only. An allowed entry whose \`until\` has passed is left out, as
apply leaves it out, and named as expired.

Exit status: 0 nothing would change, 1 something would, 2 invalid policy,
3 system error.`,
  parse: (argv) => onePolicyDir('plan', argv),
  async run(options, deps) {
    const { plan: result, expired } = await planPolicy(options.dir, await enforcerDeps(deps));
    if (options.json)
      deps.out(
        JSON.stringify(
          { ...result, expired: expired.map((e) => ({ app: e.app, ruleId: e.rule.id, until: new Date(e.until).toISOString(), at: e.rule.at })) },
          null,
          2,
        ),
      );
    else printIssues(deps, options.dir, expiredIssues(expired));
    if (!result.changes) {
      deps.err(`${options.dir}: the live table already matches; nothing would change`);
      return Exit.Ok;
    }
    deps.err(`${options.dir}: applying would change the live table:`);
    for (const line of describePlan(result)) deps.err(line);
    return Exit.Answer;
  },
};

export const status: Command<{ dir: string; json: boolean }> = {
  name: 'status',
  summary: 'what is enforced now, and whether it matches the policy on disk',
  help: `Usage: egressctl status [DIR] [--json]

Summarises the live table inet egressd: whether it is in force, lockdown,
the policy digest it was compiled from, rules, set sizes and how many
packets each denying rule has dropped (by short id, rule id and file:line,
from the state directory's rules.json; a global deny rule counts apart for
each app chosen by cgroup, which meets the list in a copy of its own), and
the switches as the last apply recorded them, saying where they disagree
with the live table (the table is what is enforced); then compares it with
the policy in DIR (default
${DEFAULT_POLICY_DIR}).

Without a directory at DIR (a host that takes its table from elsewhere),
status still reports what is enforced, and says that there is nothing to
compare it with; --json then has "policyDirectory": null.

Like check, it warns where a system domain member, or an updater while
updates go over Tor, holds CAP_NET_RAW or CAP_NET_ADMIN — a running process
(from /proc) or a unit: member as systemd would start it (over the system
bus, when there is one) — since the table does not confine it; --json has
them under "capabilities" (null when the policy in DIR cannot be read).

Exit status: 0 enforced and matching the policy on disk, 1 not enforced or
different from it (or the policy on disk is invalid, or there is no policy
directory to compare with), 3 system error.`,
  parse: (argv) => onePolicyDir('status', argv),
  async run(options, deps) {
    const enforcer = await enforcerDeps(deps);
    let planned: Awaited<ReturnType<typeof planPolicy>> | undefined;
    let policyError: string[] | undefined;
    // Only a directory that is not there: one that cannot be read is still a system error.
    const noPolicyDir = isMissing(options.dir);
    try {
      if (!noPolicyDir) planned = await planPolicy(options.dir, enforcer);
    } catch (error) {
      // A name service that failed leaves the policy as uncomparable as an invalid one; what is enforced is still reported.
      if (!(error instanceof EgressError) || (error.code !== ErrorCode.PolicyInvalid && error.code !== ErrorCode.NameLookup)) throw error;
      policyError = [error.message, ...error.details];
    }
    const notCompared = noPolicyDir
      ? `no policy directory at ${options.dir} to compare with`
      : policyError
        ? `the policy in ${options.dir} cannot be compiled here`
        : null;
    const live = planned ? planned.live : await liveSummary(enforcer.nft);
    const drops = live
      ? [...live.chains.values()]
          .flat()
          .filter((r) => r.drops && (r.packets ?? 0) > 0)
          .map((r) => ({ id: r.id, shortId: r.shortId ?? null, packets: r.packets ?? 0, bytes: r.bytes ?? 0 }))
      : [];
    // Loaded here only, as the Tor status below: apply shares this module and needs neither (the resolver's client loads dns-packet).
    const [{ capabilityCheck, capabilityCheckJson, printCapabilityCheck }, { resolverStatusLine }] = await Promise.all([
      import('../capability-warnings.js'),
      import('../learned.js'),
    ]);
    const capabilities = planned ? capabilityCheck(planned.policy, deps) : null;
    const switches = recordedSwitches(deps.stateDir, live);
    const matches = planned !== undefined && live !== null && !planned.plan.changes;
    const resolver = deps.resolverSocket === undefined ? undefined : await resolverStatusLine(deps.resolverSocket);
    // Loaded here only: apply and plan share this module and need none of it. No table: nothing holds updaters, they go direct.
    const { torSwitchStatus } = await import('../../tor/switch-status.js');
    const updates = await torSwitchStatus({ root: '/', stateDir: deps.stateDir, liveTorUpdates: live ? live.chains.has('tor_updaters') : false });
    const report = {
      enforced: live !== null,
      lockdown: live?.lockdown ?? false,
      digest: live?.digest ?? null,
      matchesPolicyOnDisk: matches,
      policyDirectory: noPolicyDir ? null : options.dir,
      notCompared,
      policyErrors: policyError ?? [],
      rules: live ? [...live.chains.values()].reduce((n, r) => n + r.length, 0) : 0,
      sets: live ? [...live.sets.entries()].map(([name, s]) => ({ name, kind: s.kind, size: s.size, dynamic: s.dynamic })) : [],
      dropped: withOrigins(deps.stateDir, live?.digest ?? null, dedupeDrops(drops)),
      switches,
      backend: enforcer.nft.backend,
      plan: planned?.plan ?? null,
      capabilities: capabilities && capabilityCheckJson(options.dir, capabilities),
      ...(resolver && { resolver: resolver.json }),
      updates: { line: updates.line, torUpdates: updates.torUpdates, tor: updates.tor },
    };
    if (options.json) deps.out(JSON.stringify(report, null, 2));
    if (!live) {
      deps.err('NOT ENFORCED: there is no table inet egressd in the kernel. "egressctl apply" enforces the policy.');
      if (noPolicyDir) deps.err(notCompared!);
    } else {
      if (report.lockdown) deps.err(LOCKDOWN_IS_ON);
      deps.err(
        `enforced: table inet egressd, policy sha256:${report.digest?.slice(0, 16) ?? '(unknown)'}…, ${report.rules} rules, ${report.sets.length} sets and maps`,
      );
      for (const s of report.sets.filter((x) => x.size > 0)) deps.err(`  ${s.kind} ${s.name}: ${s.size} elements${s.dynamic ? ' (run time)' : ''}`);
      for (const d of report.dropped)
        deps.err(
          `  dropped by ${d.shortId ? `${d.shortId} ` : ''}${d.id}${d.at ? ` (${d.at})` : ''}${d.app ? ` for app ${d.app}` : ''}: ${d.packets} ${d.packets === 1 ? 'packet' : 'packets'}`,
        );
      for (const line of describeSwitches(switches)) deps.err(line);
      if (noPolicyDir) {
        deps.err(`${notCompared!}; "egressctl status DIR" compares it with the policy in DIR`);
      } else if (policyError) {
        deps.err(`the policy in ${options.dir} cannot be compiled here, so it cannot be compared:`);
        for (const line of policyError.slice(1)) deps.err(`  ${line}`);
      } else if (matches) {
        deps.err(`matches the policy in ${options.dir}`);
      } else {
        deps.err(
          `DIFFERS from the policy in ${options.dir}; "egressctl plan" shows how, "egressctl apply" enforces it ("--reread" if the table was changed by hand):`,
        );
        for (const line of describePlan(planned!.plan)) deps.err(line);
      }
    }
    if (resolver) deps.err(resolver.line);
    deps.err(updates.line);
    // Whether the table is in force or not: what it cannot confine is worth saying either way.
    if (capabilities) printCapabilityCheck(deps, options.dir, capabilities);
    return matches ? Exit.Ok : Exit.Answer;
  },
};

function isMissing(path: string): boolean {
  try {
    statSync(path);
    return false;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'ENOENT';
  }
}

interface Drop {
  readonly id: string;
  readonly shortId: string | null;
  readonly packets: number;
  readonly bytes: number;
}

function dedupeDrops(drops: Drop[]): Drop[] {
  const byId = new Map<string, Drop>();
  for (const d of drops) {
    const key = d.shortId ?? d.id;
    const seen = byId.get(key);
    byId.set(key, seen ? { ...d, packets: seen.packets + d.packets, bytes: seen.bytes + d.bytes } : d);
  }
  return [...byId.values()].sort((a, b) => b.packets - a.packets);
}

/** Each drop's file:line, from the id table of the last apply (rules.json): a comment may be cut short, the table is not. */
function withOrigins(stateDir: string, digest: string | null, drops: Drop[]): (Drop & { at: string | null; app?: string })[] {
  const table = readRuleTable(stateDir);
  // Short ids outlive applies, but file:line is the table's only for the policy it was compiled from
  // (the live table carries the digest's first 32 digits; an empty one proves nothing).
  const current = table.state === 'ok' && digest !== null && digest.length > 0 && table.value.digest.startsWith(digest);
  return drops.map((d) => {
    const entry = current && d.shortId ? table.value.byId.get(d.shortId) : undefined;
    // A global rule counts apart for each app with a copy of its own (rule-ids.ts, appsWithOwnGlobalDeny).
    const copyFor = entry?.kind === 'global-deny' ? entry.app : undefined;
    return { ...d, ...(entry && { id: entry.ruleId }), at: entry ? entryOrigin(entry) : null, ...(copyFor !== undefined && { app: copyFor }) };
  });
}

interface SwitchReport {
  /** As the last apply recorded them (switches.json), or null. */
  readonly recorded: { lockdown: boolean; lockdownSince: string; torUpdates: boolean; torUpdatesSince: string } | null;
  /** Why the record cannot be used, when it is there but damaged. */
  readonly problem: string | null;
  /** Switches the record and the live table disagree on; the table is what is enforced. */
  readonly disagree: { switch: 'lockdown' | 'torUpdates'; recorded: boolean; live: boolean }[];
}

function recordedSwitches(stateDir: string, live: TableSummary | null): SwitchReport {
  const read = readSwitches(stateDir);
  if (read.state !== 'ok') return { recorded: null, problem: read.state === 'damaged' ? read.problem : null, disagree: [] };
  const { lockdown, torUpdates } = read.value;
  const disagree: SwitchReport['disagree'] = [];
  if (live) {
    if (lockdown.on !== live.lockdown) disagree.push({ switch: 'lockdown', recorded: lockdown.on, live: live.lockdown });
    const torLive = live.chains.has('tor_updaters');
    if (torUpdates.on !== torLive) disagree.push({ switch: 'torUpdates', recorded: torUpdates.on, live: torLive });
  }
  return {
    recorded: { lockdown: lockdown.on, lockdownSince: lockdown.since, torUpdates: torUpdates.on, torUpdatesSince: torUpdates.since },
    problem: null,
    disagree,
  };
}

function describeSwitches(report: SwitchReport): string[] {
  if (report.problem) return [`the switch record (${SWITCHES_FILE}) is damaged and was not used: ${report.problem}`];
  const { recorded } = report;
  if (!recorded) return [];
  const onOff = (on: boolean) => (on ? 'on' : 'off');
  const name = { lockdown: 'lockdown', torUpdates: 'updates over Tor' } as const;
  return [
    `  switches as recorded at the last apply: lockdown ${onOff(recorded.lockdown)} since ${recorded.lockdownSince}, updates over Tor ${onOff(recorded.torUpdates)} since ${recorded.torUpdatesSince}`,
    ...report.disagree.map(
      (d) => `  the switch record says ${name[d.switch]} ${onOff(d.recorded)}, but the live table has it ${onOff(d.live)}: the table is what is enforced`,
    ),
  ];
}

export const release: Command<{ json: boolean }> = {
  name: 'release',
  summary: 'stop enforcing: remove table inet egressd',
  help: `Usage: egressctl release [--json]

Removes table inet egressd from the kernel. This is the only way
enforcement ends: stopping or crashing egressd leaves the rules in force.
The removal is recorded in the system log. Like apply, it waits for a
change of enforcement that is running to finish first.

Exit status: 0 removed (or there was none), 3 system error or another
change still running after a minute (nothing changed).`,
  parse(argv) {
    const { values } = parseFlags('release', argv, { json: { type: 'boolean' } }, 0);
    return { json: values.json === true };
  },
  async run(options, deps) {
    const existed = await releaseTable(await enforcerDeps(deps));
    if (options.json) deps.out(JSON.stringify({ released: existed }));
    deps.err(existed ? 'released: table inet egressd removed; egress is NO LONGER ENFORCED' : 'nothing to release: there was no table inet egressd');
    return Exit.Ok;
  },
};

export const lockdown: Command<{ on: boolean; dir: string; json: boolean }> = {
  name: 'lockdown',
  summary: 'the kill switch: deny all egress but loopback, or restore the policy',
  help: `Usage: egressctl lockdown on|off [DIR] [--json]

on    In one atomic step, deny all egress except loopback — and Tor's own
      traffic when updates over Tor are on — cutting established
      connections too, and logging every denied packet. It stays on across
      "egressctl apply" until switched off; "egressctl status" says so.
      It works even if the policy in DIR is broken (then Tor is not excepted).
off   Re-applies the policy in DIR (default ${DEFAULT_POLICY_DIR}).

Like apply, it first waits for a change of enforcement that is running (an
apply, say) to finish, so that one cannot switch lockdown off again behind
its back; it says whom it waits for.

On cuts every TCP connection of this network namespace but Tor's, closed
ones still sending included, as apply does for what it denies.

Exit status: 0 done, 2 bad usage or (for off) invalid policy, 3 system
error or another change still running after a minute (nothing changed), or
lockdown on but some connections could not be cut (EGD_SOCKETS_NOT_CUT).`,
  parse(argv) {
    const { values, positionals } = parseFlags('lockdown', argv, { json: { type: 'boolean' } }, 2);
    const [state, dir] = positionals;
    if (state !== 'on' && state !== 'off')
      throw new EgressError(ErrorCode.Usage, 'egressctl lockdown: say "on" or "off"', { details: ['see: egressctl lockdown --help'] });
    return { on: state === 'on', dir: dir ?? DEFAULT_POLICY_DIR, json: values.json === true };
  },
  async run(options, deps) {
    const result = await setLockdown(options.on, options.dir, await enforcerDeps(deps));
    if (options.json)
      deps.out(
        JSON.stringify({
          lockdown: result.lockdown,
          digest: result.digest,
          policyUsable: result.policyUsable,
          ...(result.fallback && { fallback: result.fallback }),
          sweep: result.sweep,
        }),
      );
    if (result.fallback === 'policy invalid') deps.err(`the policy in ${options.dir} is invalid; lockdown was applied without it (Tor is not excepted)`);
    if (result.fallback === 'names not looked up')
      deps.err(`a user or group name the policy in ${options.dir} uses could not be looked up; lockdown was applied without the policy (Tor is not excepted)`);
    if (result.fallback === 'nftables refused')
      deps.err(`nftables refused what the policy in ${options.dir} compiles to; lockdown was applied without it (Tor is not excepted)`);
    for (const line of describeSweep(result.sweep)) deps.err(line);
    deps.err(result.lockdown ? LOCKDOWN_IS_ON : `lockdown off: the policy in ${options.dir} is enforced again`);
    return Exit.Ok;
  },
};
