/**
 * Attribution: an aggregate's short rule id → the rule (rules.json: id,
 * file:line, kind, app or domain), its address → the name it was learned
 * from. Rules of earlier applies stay known while this process runs, so a
 * packet logged just before an apply and read just after still finds its rule.
 */
import type { RuleIdEntry } from '../compile/rule-ids.js';
import type { Aggregate } from './aggregate.js';
import type { DenialRecord } from './record.js';

export class RuleLookup {
  private rules = new Map<string, RuleIdEntry>();

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

export function attribute(aggregate: Aggregate, rules: RuleLookup, learnedNames: (address: string) => readonly string[]): DenialRecord {
  const { event } = aggregate;
  const rule = rules.get(event.shortId);
  return {
    firstSeen: aggregate.firstSeen,
    lastSeen: aggregate.lastSeen,
    count: aggregate.count,
    shortId: event.shortId,
    ruleId: rule?.ruleId,
    kind: rule?.kind,
    file: rule?.file,
    line: rule?.line,
    app: rule?.app,
    domain: rule?.domain,
    uid: event.uid,
    gid: event.gid,
    protocol: event.protocol,
    family: event.family,
    address: event.address,
    port: event.port,
    name: learnedNames(event.address)[0],
  };
}
