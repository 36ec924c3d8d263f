/**
 * Where a process the policy confines still holds CAP_NET_RAW or
 * CAP_NET_ADMIN. The table sees what passes netfilter's output hook, and
 * these capabilities step around it: frames sent on an AF_PACKET socket
 * (CAP_NET_RAW) never meet that hook, and CAP_NET_ADMIN can change or remove
 * the table itself. So a system domain member, or an updater over Tor, that
 * holds either is not confined by the table, whatever it says; `check` and
 * `status` warn where one does.
 *
 * Pure: the machine is read through a `CapabilityProbe` (capability-probe.ts),
 * so the decision is tested without root. What is checked:
 * - running processes (each thread: capabilities are per thread) that are
 *   members by cgroup, user or group as the table holds them (a user's
 *   subordinate ids, a group's members by uid), holding either capability
 *   in their effective or permitted set;
 * - units named by `unit:`, as systemd would start them: running as root
 *   with either capability in CapabilityBoundingSet, or with it in
 *   AmbientCapabilities.
 * Not checked: what a process could gain later (file capabilities, setuid
 * binaries, a bounding or inheritable set it has not used) — those are the
 * unit's or the file system's to bound, and the hint says how.
 */
import type { Facts } from '../compile/compile.js';
import { selectorHoldsIds } from '../compile/explain.js';
import { cgroupAncestorMatching } from '../compile/glob.js';
import { clip, type PolicyIssue } from '../policy/issues.js';
import type { Origin, Policy, Selector } from '../policy/model.js';

/** The capabilities that step around the table, with their bit in a capability mask (linux/capability.h). */
export const NET_CAPABILITIES = [
  { name: 'CAP_NET_ADMIN', bit: 12n },
  { name: 'CAP_NET_RAW', bit: 13n },
] as const;

export type NetCapability = (typeof NET_CAPABILITIES)[number]['name'];

/** The net capabilities a mask holds, in NET_CAPABILITIES order. */
export function netCapabilities(mask: bigint): NetCapability[] {
  return NET_CAPABILITIES.filter((c) => (mask >> c.bit) & 1n).map((c) => c.name);
}

/** What a thread's /proc/PID/task/TID/status says of who it is and what it may do. */
export interface TaskStatus {
  readonly name: string;
  /** Real, effective, saved and filesystem ids. */
  readonly uids: readonly number[];
  readonly gids: readonly number[];
  readonly groups: readonly number[];
  readonly effective: bigint;
  readonly permitted: bigint;
  /** A kernel thread: it sends on nobody's behalf, and no unit or user confines it. */
  readonly kernel: boolean;
}

/** Parses /proc status text; what is missing or malformed is a problem named, never a throw. */
export function parseProcStatus(text: string): { ok: true; status: TaskStatus } | { ok: false; problem: string } {
  const fields = new Map<string, string>();
  for (const line of text.split('\n')) {
    const colon = line.indexOf(':');
    if (colon > 0) fields.set(line.slice(0, colon), line.slice(colon + 1).replace(/^\s+/, ''));
  }
  const ids = (key: string, count?: number): number[] | string => {
    const value = fields.get(key);
    if (value === undefined) return `no ${key} line`;
    const parts = value.trim() === '' ? [] : value.trim().split(/\s+/);
    if ((count !== undefined && parts.length !== count) || !parts.every((p) => /^\d{1,10}$/.test(p)))
      return `a malformed ${key} line: ${JSON.stringify(clip(value, 60))}`;
    return parts.map(Number);
  };
  const mask = (key: string): bigint | string => {
    const value = fields.get(key)?.trim();
    if (value === undefined) return `no ${key} line`;
    // The kernel prints 16 hex digits; fewer or more is not its status file.
    if (!/^[0-9a-f]{1,16}$/i.test(value)) return `a malformed ${key} line: ${JSON.stringify(clip(value, 60))}`;
    return BigInt(`0x${value}`);
  };
  const uids = ids('Uid', 4);
  const gids = ids('Gid', 4);
  const groups = ids('Groups');
  const effective = mask('CapEff');
  const permitted = mask('CapPrm');
  for (const value of [uids, gids, groups, effective, permitted]) if (typeof value === 'string') return { ok: false, problem: value };
  return {
    ok: true,
    status: {
      name: fields.get('Name') ?? '',
      uids: uids as number[],
      gids: gids as number[],
      groups: groups as number[],
      effective: effective as bigint,
      permitted: permitted as bigint,
      // "Kthread:" is printed since Linux 6.x; before it, kernel threads are kthreadd (2) and its children.
      kernel: fields.has('Kthread') ? fields.get('Kthread')?.trim() === '1' : fields.get('Pid')?.trim() === '2' || fields.get('PPid')?.trim() === '2',
    },
  };
}

/** The cgroup2 path in /proc/PID/cgroup ("0::/system.slice/x.service"), relative to the root; undefined without one (cgroup v1 only). */
export function parseProcCgroup(text: string): string | undefined {
  const line = text.split('\n').find((l) => l.startsWith('0::'));
  return line === undefined ? undefined : line.slice(3).replace(/^\/+|\/+$/g, '');
}

/** One thread as the probe read it: its process, its cgroup2 path, its status text. */
export interface TaskReading {
  readonly pid: number;
  readonly tid: number;
  readonly cgroup: string | undefined;
  readonly status: string;
  /**
   * Its user namespace (the /proc/PID/ns/user link), where it could be read.
   * Capabilities count in their own user namespace only: root of a rootless
   * container holds them over its own namespaces, not over the network
   * namespace the table guards (owned by the one egressctl runs in).
   */
  readonly userNs?: string;
}

/** What the probe read of the processes; `userNs` is the user namespace the check runs in. */
export interface TasksRead {
  readonly tasks: readonly TaskReading[];
  readonly problems: readonly string[];
  readonly userNs?: string;
}

/** A service unit's configuration as systemd reports it (org.freedesktop.systemd1.Service). */
export interface UnitConfig {
  /** org.freedesktop.systemd1.Unit LoadState: "loaded", "not-found", … */
  readonly loadState: string;
  readonly user: string;
  readonly dynamicUser: boolean;
  readonly boundingSet: bigint;
  readonly ambient: bigint;
  readonly privateNetwork: boolean;
}

/** The units asked for, or why none could be read (no system bus, no systemd on it): a note, not a problem. */
export type UnitsRead =
  | { readonly available: true; readonly units: ReadonlyMap<string, UnitConfig | { readonly problem: string }> }
  | { readonly available: false; readonly why: string };

/** The thin I/O the check needs; capability-probe.ts reads the machine, tests fake it. */
export interface CapabilityProbe {
  /** Every thread of every process, with the problems met reading them (a process that exits meanwhile is none). */
  tasks(): TasksRead;
  /** The configuration of these service units, from systemd over the system bus. */
  units(names: readonly string[]): UnitsRead;
}

/** A member of an identity that must not step around the table. */
export interface ConfinedMember {
  /** "system domain offline", "updater apt (over Tor)". */
  readonly owner: string;
  readonly selector: Selector;
  readonly at: Origin;
}

/** System domain members, and the updaters while updates go over Tor (they must not bypass it). */
export function confinedMembers(policy: Policy): ConfinedMember[] {
  const members: ConfinedMember[] = [];
  for (const domain of policy.systemDomains)
    for (const identity of domain.members)
      for (const selector of identity.selectors) members.push({ owner: `system domain ${domain.name}`, selector, at: identity.at });
  if (policy.tor.enabled)
    for (const identity of policy.tor.updaters)
      for (const selector of identity.selectors) members.push({ owner: `updater ${identity.name} (over Tor)`, selector, at: identity.at });
  return members;
}

/** What the check found: warnings at the member's file:line, and lines for people that belong to no line of the policy. */
export interface CapabilityCheck {
  readonly warnings: readonly PolicyIssue[];
  /** Problems met reading the machine (a status file that is not one, a D-Bus error): the check is incomplete there. */
  readonly problems: readonly string[];
  /** What was not checked and why (no system bus): said once, not a problem. */
  readonly notes: readonly string[];
}

/** The most processes one member's warning names, and problems listed; the rest are counted. */
const MAX_NAMED = 5;
const MAX_PROBLEMS = 5;

const PROCESS_HINT =
  'start it without them: CapabilityBoundingSet=~CAP_NET_RAW CAP_NET_ADMIN and RestrictAddressFamilies=~AF_PACKET in its unit, or as a user without them';

const WHY: Record<NetCapability, string> = {
  CAP_NET_RAW: 'AF_PACKET frames never meet the table',
  CAP_NET_ADMIN: 'it can change or remove the table',
};

const why = (caps: readonly NetCapability[]) => caps.map((c) => WHY[c]).join('; ');

/** A name a process gave itself, quoted with what is not printable (controls, direction marks) escaped, so it cannot forge the line it is shown in. */
function shownName(name: string): string {
  return JSON.stringify(clip(name, 32)).replace(
    /[\u007f-\u009f\u200e\u200f\u2028-\u202e\u2066-\u2069]/g,
    (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`,
  );
}

/** The facts that decide who is a member by user or group: ids, subordinate ranges, group members. */
export type MemberFacts = Pick<Facts, 'users' | 'groups' | 'subordinate' | 'members'>;

/**
 * The decision: which confined members hold either capability, from the
 * threads and units read. `ids` are the policy's users and groups as the
 * compiler was told them (`Facts`), so the check means what the table does.
 */
export function decideHeldCapabilities(members: readonly ConfinedMember[], ids: MemberFacts, read: TasksRead, units: UnitsRead | undefined): CapabilityCheck {
  const warnings: PolicyIssue[] = [];
  const problems = [...read.problems];
  const notes: string[] = [];
  // Each thread parsed once; one that cannot be parsed is named once, whatever it is a member of.
  const parsed: { reading: TaskReading; status: TaskStatus }[] = [];
  for (const reading of read.tasks) {
    const result = parseProcStatus(reading.status);
    if (result.ok) parsed.push({ reading, status: result.status });
    else
      problems.push(
        `capabilities of PID ${reading.pid}${reading.tid !== reading.pid ? ` (thread ${reading.tid})` : ''} not checked: its /proc status has ${result.problem}`,
      );
  }
  // A process is named by its main thread, which may hold nothing itself.
  const processName = new Map(parsed.filter(({ reading }) => reading.tid === reading.pid).map(({ reading, status }) => [reading.pid, status.name]));
  for (const member of members) {
    const matches = memberMatcher(member.selector, ids);
    if (!matches) continue;
    // By process: capabilities are per thread, so a process holds what any of its threads holds.
    const held = new Map<number, { name: string; caps: Set<NetCapability> }>();
    for (const { reading, status } of parsed) {
      if (status.kernel || !matches(reading, status)) continue;
      // Unknown on either side: counted, so that a link that cannot be read never hides a finding.
      if (read.userNs !== undefined && reading.userNs !== undefined && reading.userNs !== read.userNs) continue;
      const caps = netCapabilities(status.effective | status.permitted);
      if (caps.length === 0) continue;
      const entry = held.get(reading.pid) ?? { name: processName.get(reading.pid) ?? status.name, caps: new Set<NetCapability>() };
      for (const cap of caps) entry.caps.add(cap);
      held.set(reading.pid, entry);
    }
    if (held.size > 0) {
      const all = NET_CAPABILITIES.map((c) => c.name).filter((c) => [...held.values()].some((h) => h.caps.has(c)));
      const pids = [...held.entries()].sort(([a], [b]) => a - b);
      const named = pids.slice(0, MAX_NAMED).map(
        ([pid, h]) =>
          `PID ${pid} (${shownName(h.name)}) holds ${NET_CAPABILITIES.map((c) => c.name)
            .filter((c) => h.caps.has(c))
            .join(' and ')}`,
      );
      const more = pids.length > MAX_NAMED ? `, and ${pids.length - MAX_NAMED} more processes` : '';
      warnings.push({
        severity: 'warning',
        at: member.at,
        message: `${describe(member)} is not confined by the table: ${named.join(', ')}${more} (${why(all)})`,
        hint: PROCESS_HINT,
      });
    }
  }
  const unitMembers = members.filter((m) => m.selector.kind === 'cgroup' && m.selector.unit?.endsWith('.service'));
  if (unitMembers.length > 0 && units !== undefined) {
    if (!units.available) notes.push(`capabilities of units not read from systemd: ${units.why}; their running processes were checked`);
    else
      for (const member of unitMembers) {
        const name = (member.selector as { unit: string }).unit;
        const config = units.units.get(name);
        if (config === undefined) continue;
        if ('problem' in config) {
          problems.push(`capabilities of ${name} not read from systemd: ${config.problem}`);
          continue;
        }
        const finding = unitHolds(config);
        if (finding)
          warnings.push({
            severity: 'warning',
            at: member.at,
            message: `${describe(member)}: systemd starts ${name} with ${finding.caps.join(' and ')} (${finding.because}), so it is not confined by the table (${why(finding.caps)})`,
            hint: `add to it with "systemctl edit ${name}": CapabilityBoundingSet=~CAP_NET_RAW CAP_NET_ADMIN, AmbientCapabilities=, RestrictAddressFamilies=~AF_PACKET`,
          });
      }
  }
  // Bounded: a /proc that cannot be read at all must not print a line per process.
  const shown = problems.length > MAX_PROBLEMS ? [...problems.slice(0, MAX_PROBLEMS), `and ${problems.length - MAX_PROBLEMS} more such problems`] : problems;
  return { warnings, problems: shown, notes };
}

/** What systemd would give a service's processes; none when it is not installed or has a network namespace of its own. */
export function unitHolds(config: UnitConfig): { caps: NetCapability[]; because: string } | undefined {
  // A unit that is not there starts nothing; PrivateNetwork= gives it a namespace with loopback only, which AF_PACKET cannot leave.
  if (config.loadState === 'not-found' || config.privateNetwork) return undefined;
  const root = !config.dynamicUser && (config.user === '' || config.user === 'root' || config.user === '0');
  const ambient = netCapabilities(config.ambient & config.boundingSet);
  if (root) {
    const caps = netCapabilities(config.boundingSet);
    return caps.length > 0 ? { caps, because: `it runs as root and CapabilityBoundingSet keeps ${caps.join(' and ')}` } : undefined;
  }
  return ambient.length > 0 ? { caps: ambient, because: `AmbientCapabilities gives user ${config.user || '(dynamic)'} ${ambient.join(' and ')}` } : undefined;
}

function describe(member: ConfinedMember): string {
  const s = member.selector;
  const what = s.kind === 'cgroup' ? s.written : s.kind === 'user' ? `user ${s.user}` : `group ${s.group}`;
  return `${member.owner} member ${what}`;
}

/** Whether a thread belongs to the member, or undefined when the member matches nothing here (a name that does not exist). */
function memberMatcher(selector: Selector, ids: MemberFacts): ((reading: TaskReading, status: TaskStatus) => boolean) | undefined {
  if (selector.kind === 'cgroup') {
    // As `socket cgroupv2 level N`: the thread's cgroup or an ancestor of it, at the glob's depth.
    return (reading) => reading.cgroup !== undefined && reading.cgroup !== '' && cgroupAncestorMatching(reading.cgroup, selector) !== undefined;
  }
  const named = selector.kind === 'user' ? selector.user : selector.group;
  const id = typeof named === 'number' ? named : (selector.kind === 'user' ? ids.users : ids.groups).get(named);
  if (typeof id !== 'number') return undefined;
  // As the table holds them: a user with its subordinate ranges, a group with its members by uid
  // (one started with `setpriv --clear-groups` is held by uid) and their subordinate ranges. Any of real, effective, saved and
  // filesystem ids, and the supplementary groups: a process can switch among them (sg, setgid) and send with each.
  return (_, status) => selectorHoldsIds(selector, { uids: status.uids, gids: [...status.gids, ...status.groups] }, ids);
}

/** The check as `check` and `status` run it: nothing is read when no member is confined. */
export function checkCapabilities(policy: Policy, ids: MemberFacts, probe: CapabilityProbe): CapabilityCheck {
  const members = confinedMembers(policy);
  if (members.length === 0) return { warnings: [], problems: [], notes: [] };
  const services = [
    ...new Set(members.flatMap((m) => (m.selector.kind === 'cgroup' && m.selector.unit?.endsWith('.service') ? [m.selector.unit] : []))),
  ].sort();
  return decideHeldCapabilities(members, ids, probe.tasks(), services.length > 0 ? probe.units(services) : undefined);
}
