import { isIP } from 'node:net';
import { factsNeeded } from '../../compile/compile.js';
import { explain as explainPolicy, type Who } from '../../compile/explain.js';
import { ruleIdTable, shortIdOf } from '../../compile/rule-ids.js';
import { EgressError, ErrorCode } from '../../errors.js';
import type { Protocol } from '../../policy/model.js';
import { expiredIssues, policyAt } from '../../policy/expiry.js';
import { unitCgroup, unitNameProblem } from '../../policy/units.js';
import { describeLearned, learnedFrom, type LearnedReport } from '../learned.js';
import { DEFAULT_POLICY_DIR, Exit, loadForCommand, parseFlags, type Command } from '../deps.js';

export interface ExplainOptions {
  readonly dir: string;
  readonly who: Who;
  readonly host: string;
  readonly port: number | undefined;
  readonly proto: Protocol | undefined;
  readonly json: boolean;
  readonly lockdown: boolean;
  /** The socket's mark (SO_MARK): `resolver` is the policy's dns.mark, the one the resolver's upstream sockets carry. */
  readonly mark: number | 'resolver' | undefined;
}

export const explain: Command<ExplainOptions> = {
  name: 'explain',
  summary: 'say which rule decides a connection, and why',
  help: `Usage: egressctl explain [DIR] --app WHO [--as ID]… --to HOST[:PORT][/PROTO] [--mark N|resolver] [--json] [--lockdown]

Walks the policy in DIR (default ${DEFAULT_POLICY_DIR}) in its fixed order of
precedence — loopback, system domain, Tor confinement, DNS, app rules,
global deny, default — and prints the verdict, the rule id, its short id (the one
log prefixes, counters and "egressctl status" show, e.g. [r1a2b3c4d]) and
the FILE:LINE that decides it.

  --app WHO    an app or identity name from the policy, or one of
               user:NAME  uid:N  group:NAME  gid:N
               unit:NAME.service  cgroup:PATH
               (unit: asks from the cgroup systemd gives a unit whose file
               sets no Slice=: system.slice/NAME.service, and for an
               instance of a template, T@I.service,
               system.slice/system-T.slice/T@I.service, T escaped as systemd
               escapes it: "-" as \\x2d; for a unit elsewhere, cgroup:PATH)
  --as ID      with a unit or cgroup: the socket's user or group as well
               (user:NAME, uid:N, group:NAME, gid:N; up to one of each).
               A cgroup its user owns (delegated by systemd: user@UID.service
               and below) may take away from what the user's and group's
               apps allow, never add: both must let the connection out
  --to DEST    example.org, example.org:443/tcp, 192.0.2.7:53/udp,
               [2001:db8::1]:443, 203.0.113.9/icmp
  --mark N     the socket's mark (SO_MARK), e.g. 0x45444e53; "resolver" is
               the policy's dns.mark, which egressd's resolver puts on its
               upstream queries: with dns.exclusive, only such packets
               leave for udp/tcp ports 53 and 853
  --json       print the explanation as JSON on stdout
  --lockdown   answer as if the kill switch were on

Names are matched as the resolver will match them; for an address, rules
written with names match only while it is a recent DNS answer for one of
them, and the output says so. For an address, when egressd's resolver runs,
explain also asks it which names the address was learned from ("learned
from: NAME (expires in …)") and says when those names are judged
differently (a shared address: a CDN's), naming both.

An address is answered for the packet the kernel sees for a new connection:
an IPv4-mapped address (::ffff:192.0.2.5) is sent as IPv4 (to 192.0.2.5),
so rules for IPv4 decide it; 0.0.0.0 and :: reach 127.0.0.1 and ::1.
Loopback is decided by the interface (meta oif "lo"): explain takes
127.0.0.0/8 and ::1 to leave through lo and every other address through the
network. A connection to one of this machine's own addresses also leaves
through lo and is allowed; explain does not look at the interfaces, so ask
for 127.0.0.1 to see that case.

Exit status: 0 allowed, 1 denied, 2 bad input, 3 a user or group name could
not be looked up (the name service failed).`,

  parse(argv) {
    const { values, positionals } = parseFlags(
      'explain',
      argv,
      {
        app: { type: 'string' },
        as: { type: 'string', multiple: true },
        to: { type: 'string' },
        json: { type: 'boolean' },
        lockdown: { type: 'boolean' },
        mark: { type: 'string' },
      },
      1,
    );
    if (!values.app) throw new EgressError(ErrorCode.Usage, 'egressctl explain: --app WHO is required', { details: ['see: egressctl explain --help'] });
    if (!values.to)
      throw new EgressError(ErrorCode.Usage, 'egressctl explain: --to HOST[:PORT][/PROTO] is required', { details: ['see: egressctl explain --help'] });
    return {
      dir: positionals[0] ?? DEFAULT_POLICY_DIR,
      who: withIds(parseWho(values.app), values.as ?? []),
      ...parseDestinationFlag(values.to),
      json: values.json === true,
      lockdown: values.lockdown === true,
      mark: values.mark === undefined ? undefined : parseMark(values.mark),
    };
  },

  async run(options, deps) {
    const read = loadForCommand(options.dir, deps, true);
    if (!read) return Exit.BadInput;
    // Judged as apply would apply it now: an allowed entry whose time is up decides nothing.
    const { policy: inForce, expired } = policyAt(read.policy, (deps.now ?? Date.now)());
    const loaded = { ...read, policy: inForce };
    // The names the policy mentions and the one asked about; numeric ids need no lookup.
    const needed = factsNeeded(loaded.policy);
    const { who } = options;
    const user = who.kind === 'user' || who.kind === 'cgroup' ? who.user : undefined;
    const group = who.kind === 'group' || who.kind === 'cgroup' ? who.group : undefined;
    const users = typeof user === 'string' ? [...needed.users, user] : needed.users;
    const groups = typeof group === 'string' ? [...needed.groups, group] : needed.groups;
    // A cgroup's owner as compile sees it: whether it was delegated decides whether its user's app has a say too.
    const facts = deps.facts({ ...needed, users, groups, cgroupDepth: who.kind === 'cgroup' ? needed.cgroupDepth : 0 });
    for (const [kind, ids] of [
      ['user', facts.users],
      ['group', facts.groups],
    ] as const) {
      for (const [name, id] of ids)
        if (typeof id !== 'number') throw new EgressError(ErrorCode.NameLookup, `egressctl explain: cannot look up ${kind} "${name}": ${id.error}`);
    }
    // Unknown ranges or members would make "not a member" a guess.
    for (const [what, found] of [
      ['subordinate ids of uid', facts.subordinate],
      ['members of gid', facts.members],
    ] as const) {
      for (const [id, value] of found ?? [])
        if ('error' in value) throw new EgressError(ErrorCode.NameLookup, `egressctl explain: cannot read the ${what} ${id}: ${value.error}`);
    }
    const query = {
      who: options.who,
      host: options.host,
      ...(options.port !== undefined ? { port: options.port } : {}),
      ...(options.proto ? { proto: options.proto } : {}),
      ...(options.mark === undefined ? {} : { mark: options.mark === 'resolver' ? loaded.policy.dns.mark : options.mark }),
    };
    // For an address, the names the running resolver learned it from, each judged as the same connection to that name would be;
    // and the address judged as the kernel does: in the sets of the rules that name them.
    let learned: LearnedReport | null = null;
    if (deps.resolverSocket !== undefined && isIP(options.host.replace(/%.*$/, '')) !== 0) {
      learned = await learnedFrom(options.host, deps.resolverSocket, (name) => {
        const judged = explainPolicy(loaded.policy, { ...query, host: name }, facts, { lockdown: options.lockdown });
        return 'error' in judged ? undefined : { verdict: judged.verdict, ruleId: judged.ruleId };
      });
    }
    const answer = explainPolicy(loaded.policy, learned?.chains.length ? { ...query, learnedChains: learned.chains.map((c) => c.names) } : query, facts, {
      lockdown: options.lockdown,
    });
    if ('error' in answer) {
      deps.err(`egressctl explain: ${answer.error}`);
      return Exit.BadInput;
    }
    const where = answer.at ? `${options.dir.replace(/\/+$/, '')}/${answer.at.file}:${answer.at.line}` : '(built in)';
    // The id the kernel's log prefix and counters carry for this rule; loopback has none.
    const shortId = shortIdOf(ruleIdTable(loaded.policy, { lockdown: options.lockdown }), answer) ?? null;
    if (options.json) {
      const gone = expired.map((e) => ({ app: e.app, ruleId: e.rule.id, until: new Date(e.until).toISOString(), at: e.rule.at }));
      deps.out(
        JSON.stringify(
          {
            ...answer,
            shortId,
            at: answer.at ? { ...answer.at, path: where } : null,
            ...(learned && { learnedFrom: learned }),
            ...(gone.length > 0 && { expired: gone }),
          },
          null,
          2,
        ),
      );
    } else {
      deps.err(`${answer.verdict === 'allow' ? 'ALLOWED' : 'DENIED'} by ${answer.ruleId}${shortId ? ` [${shortId}]` : ''} (${answer.level}) at ${where}`);
      if (answer.why) deps.err(`  why: ${answer.why}`);
      for (const step of answer.steps) deps.err(`  - ${step}`);
      for (const note of answer.notes) deps.err(`  note: ${note}`);
      for (const issue of expiredIssues(expired)) deps.err(`  note: ${issue.message} (${options.dir.replace(/\/+$/, '')}/${issue.at.file}:${issue.at.line})`);
      if (learned) for (const line of describeLearned(options.host, learned)) deps.err(line);
    }
    return answer.verdict === 'allow' ? Exit.Ok : Exit.Answer;
  },
};

function parseMark(text: string): number | 'resolver' {
  if (text === 'resolver') return 'resolver';
  const mark = /^(0x[0-9a-f]{1,8}|\d{1,10})$/i.test(text) ? Number(text) : NaN;
  if (!(mark >= 0 && mark <= 0xffffffff)) throw new EgressError(ErrorCode.Usage, `egressctl explain: --mark "${text}" is not a 32-bit mark or "resolver"`);
  return mark;
}

export function parseWho(text: string): Who {
  const [kind, ...rest] = text.split(':');
  const value = rest.join(':');
  const usage = (message: string) =>
    new EgressError(ErrorCode.Usage, `egressctl explain: --app ${text}: ${message}`, { details: ['see: egressctl explain --help'] });
  if (rest.length === 0) {
    if (!/^[a-z][a-z0-9_-]{0,31}$/.test(text)) throw usage('not an app or identity name');
    return { kind: 'name', name: text };
  }
  switch (kind) {
    case 'user':
    case 'group':
      if (!value) throw usage(`${kind}: needs a name`);
      return kind === 'user' ? { kind: 'user', user: value } : { kind: 'group', group: value };
    case 'uid':
    case 'gid': {
      if (!/^\d+$/.test(value)) throw usage(`${kind}: needs a number`);
      return kind === 'uid' ? { kind: 'user', user: Number(value) } : { kind: 'group', group: Number(value) };
    }
    case 'unit': {
      if (!/\.(service|scope)$/.test(value)) throw usage('unit: needs NAME.service or NAME.scope');
      const problem = unitNameProblem(value);
      if (problem) throw usage(`unit: ${problem.message} (${problem.hint})`);
      return { kind: 'cgroup', path: unitCgroup(value) };
    }
    case 'cgroup':
      if (!value) throw usage('cgroup: needs a path');
      return { kind: 'cgroup', path: value };
    default:
      throw usage(`unknown kind "${kind}"; use user:, uid:, group:, gid:, unit: or cgroup:`);
  }
}

/** A unit or cgroup asked with the socket's user and group (`--as`). */
function withIds(who: Who, ids: readonly string[]): Who {
  if (ids.length === 0) return who;
  const usage = (message: string) => new EgressError(ErrorCode.Usage, `egressctl explain: --as: ${message}`, { details: ['see: egressctl explain --help'] });
  if (who.kind !== 'cgroup') throw usage('only with --app unit:NAME or cgroup:PATH');
  let asked: Who = who;
  for (const text of ids) {
    const id = parseWho(text);
    if (id.kind === 'user' && asked.user === undefined) asked = { ...asked, user: id.user };
    else if (id.kind === 'group' && asked.group === undefined) asked = { ...asked, group: id.group };
    else throw usage(`${text}: give one user:, uid:, group: or gid: of each`);
  }
  return asked;
}

export function parseDestinationFlag(text: string): { host: string; port: number | undefined; proto: Protocol | undefined } {
  const usage = (message: string) =>
    new EgressError(ErrorCode.Usage, `egressctl explain: --to ${text}: ${message}`, {
      details: ['e.g. example.org:443/tcp, [2001:db8::1]:53/udp, 192.0.2.1/icmp'],
    });
  let rest = text.trim();
  let proto: Protocol | undefined;
  const slash = rest.lastIndexOf('/');
  if (slash >= 0) {
    const p = rest.slice(slash + 1).toLowerCase();
    if (p !== 'tcp' && p !== 'udp' && p !== 'icmp') throw usage(`unknown protocol "${p}"; use tcp, udp or icmp`);
    proto = p;
    rest = rest.slice(0, slash);
  }
  let host = rest;
  let portText: string | undefined;
  const bracketed = /^\[([^\]]+)\](?::(\d+))?$/.exec(rest);
  if (bracketed) {
    host = bracketed[1]!;
    portText = bracketed[2];
  } else if ((rest.match(/:/g) ?? []).length === 1) {
    [host, portText] = rest.split(':') as [string, string];
  }
  if (!host) throw usage('no host');
  let port: number | undefined;
  if (portText !== undefined) {
    port = Number(portText);
    if (!/^\d{1,5}$/.test(portText) || port < 1 || port > 65535) throw usage(`port "${portText}" is not 1–65535`);
    if (proto === 'icmp') throw usage('icmp has no ports');
  }
  return { host, port, proto };
}
