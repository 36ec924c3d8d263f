/**
 * Attribution: an aggregate's short rule id → the rule (rules.json: id,
 * file:line, kind, app or domain), its address → the name it was learned
 * from. Rules of earlier applies stay known while this process runs, so a
 * packet logged just before an apply and read just after still finds its rule.
 */
import { placeAsker, type ExplainFacts } from '../compile/explain.js';
import { appsWithOwnGlobalDeny, type RuleIdEntry } from '../compile/rule-ids.js';
import type { Policy } from '../policy/model.js';
import type { NameFor } from '../resolver/memory.js';
import type { Aggregate } from './aggregate.js';
import type { DenialRecord } from './record.js';

export class RuleLookup {
  private rules = new Map<string, RuleIdEntry>();
  /** The app a uid's packets go to (appOfUid), for rules of no app; none until the policy in force is given. */
  senderApp: (uid: number) => string | undefined = () => undefined;

  /** The table now in force; entries of earlier tables stay unless the same short id is now another rule. */
  replace(entries: readonly RuleIdEntry[]): void {
    const next = new Map(this.rules);
    for (const entry of entries) next.set(entry.id, entry);
    this.rules = next;
  }

  get(shortId: string): RuleIdEntry | undefined {
    return this.rules.get(shortId);
  }

  get size(): number {
    return this.rules.size;
  }
}

/** Uids whose app is remembered at most (a flood of subordinate uids must not grow it without bound). */
const SENDER_CACHE = 4096;

/**
 * The app whose chain the kernel sends a uid's packets to, by the policy's
 * own dispatch (explain's placeAsker): so that a denial by the shared
 * global deny list still names the app that sent it, and can be allowed
 * from for that app. An app chosen by cgroup meets a copy of the list of
 * its own (appsWithOwnGlobalDeny), whose short ids name it, because NFLOG
 * does not carry the cgroup: a denial by the shared list came from a packet
 * no such app's chain took. So the uid is placed by the whole policy, as
 * the kernel's uid and gid maps place it, and if that is an app with a
 * copy of its own, the packet was not its (its socket's cgroup was no
 * app's) and no app is named.
 */
export function appOfUid(policy: Policy, facts: ExplainFacts): (uid: number) => string | undefined {
  const own = new Set(appsWithOwnGlobalDeny(policy).map((app) => app.name));
  if (policy.apps.every((app) => own.has(app.name))) return () => undefined;
  const known = new Map<number, string | undefined>();
  return (uid) => {
    if (known.has(uid)) return known.get(uid);
    const place = placeAsker(policy, { kind: 'user', user: uid }, facts);
    const found = 'error' in place || place.systemDomain || place.torUpdater ? undefined : place.app?.name;
    const app = found !== undefined && own.has(found) ? undefined : found;
    if (known.size >= SENDER_CACHE) known.clear();
    known.set(uid, app);
    return app;
  };
}

/** An address's names for a denial of `uid`'s, those `uid` looked up itself first (the resolver's memory, memory.ts namesFor). */
export type LearnedNames = (address: string, uid: number | undefined) => readonly NameFor[];

export function attribute(aggregate: Aggregate, rules: RuleLookup, learnedNames: LearnedNames): DenialRecord {
  const { event } = aggregate;
  const [learned] = learnedNames(event.address, event.uid);
  const rule = rules.get(event.shortId);
  // A rule of an app or system domain says who. The shared global deny list is met in the chain of an app chosen by
  // user or group, or of none: the uid says which. Every other rule of no app decides before any app is chosen
  // (DNS, lockdown, Tor, the routing header) or after all of them (the default), and an unknown one may be any:
  // naming the uid's app there would blame, and offer to allow for, an app the packet never went through.
  const app = rule?.app ?? (rule?.kind === 'global-deny' && event.uid !== undefined ? rules.senderApp(event.uid) : undefined);
  return {
    firstSeen: aggregate.firstSeen,
    lastSeen: aggregate.lastSeen,
    count: aggregate.count,
    shortId: event.shortId,
    ruleId: rule?.ruleId,
    kind: rule?.kind,
    file: rule?.file,
    line: rule?.line,
    app,
    domain: rule?.domain,
    uid: event.uid,
    gid: event.gid,
    protocol: event.protocol,
    family: event.family,
    address: event.address,
    port: event.port,
    name: learned?.name,
    nameAskedBy: learned === undefined ? undefined : learned.asked ? 'sender' : 'others',
  };
}
