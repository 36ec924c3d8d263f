import { rmSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import type { ExplainFacts } from '../../src/compile/explain.js';
import { compile } from '../../src/compile/compile.js';
import type { RuleIdEntry } from '../../src/compile/rule-ids.js';
import { appOfUid, attribute, RuleLookup } from '../../src/denials/attribute.js';
import type { DenialEvent } from '../../src/denials/parse.js';
import { loadPolicyDir } from '../../src/policy/load.js';
import { AddressMemory } from '../../src/resolver/memory.js';
import { policyDir } from '../support/policy-dir.js';

/**
 * Which app a record names. A rule of an app names its app; the shared
 * global deny list names the sender's app when its uid says it by the
 * policy's dispatch: without that, a denial by the global list — "firefox
 * tried to reach telemetry…" — could never be allowed from
 * (AllowFromDenial needs the app), and the notification named a uid. No
 * other rule of no app names one: it decided where no app's chain was.
 */
const facts: ExplainFacts = { users: new Map(), groups: new Map() };
const RULES: RuleIdEntry[] = [
  { id: 'r00000001', ruleId: 'deny/00.yaml/0', kind: 'global-deny', verdict: 'deny', file: '00.yaml', line: 3 },
  { id: 'r00000002', ruleId: 'app/mail/default', kind: 'app-default', verdict: 'deny', file: '00.yaml', line: 6, app: 'mail' },
  { id: 'r00000003', ruleId: 'sd/offline', kind: 'system-domain', verdict: 'deny', file: '00.yaml', line: 9, domain: 'offline' },
  { id: 'r00000004', ruleId: 'dns/exclusive', kind: 'dns-exclusive', verdict: 'deny' },
  { id: 'r00000005', ruleId: 'default', kind: 'default', verdict: 'deny', file: '00.yaml', line: 1 },
  { id: 'r00000006', ruleId: 'lockdown', kind: 'lockdown', verdict: 'deny' },
];

function lookupFor(text: string): RuleLookup {
  const dir = policyDir({ '00.yaml': text });
  try {
    const loaded = loadPolicyDir(dir);
    if (!loaded.ok) throw new Error(JSON.stringify(loaded.errors));
    const rules = new RuleLookup();
    rules.replace(RULES);
    rules.senderApp = appOfUid(loaded.policy, facts);
    return rules;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const event = (shortId: string, uid: number | undefined): DenialEvent => ({
  shortId,
  uid,
  gid: uid,
  family: 4,
  protocol: 'tcp',
  address: '203.0.113.1',
  port: 443,
  seq: undefined,
});
const appOf = (rules: RuleLookup, shortId: string, uid: number | undefined) =>
  attribute({ event: event(shortId, uid), firstSeen: 1, lastSeen: 1, count: 1 }, rules, () => []).app;

const byUid = (moreApps = '') => `defaults: {egress: allow}
deny:
  - to: [203.0.113.1]
systemDomains:
  offline: {members: [{user: 1236}]}
apps:
  firefox: {identity: {user: 1234}}
  mail: {identity: {user: 1235}, default: deny}
${moreApps}`;

describe('which app a denial record names', () => {
  it("a global rule's record names the sender's app by its uid; a rule of an app its app; a uid in no app, or no uid, none", () => {
    const rules = lookupFor(byUid());
    expect(appOf(rules, 'r00000001', 1234)).toBe('firefox');
    expect(appOf(rules, 'r00000001', 1235)).toBe('mail');
    expect(appOf(rules, 'r00000001', 4321)).toBeUndefined();
    expect(appOf(rules, 'r00000001', undefined)).toBeUndefined();
    expect(appOf(rules, 'r00000002', 1234)).toBe('mail');
    // A system domain's record names the domain, never an app.
    const sd = attribute({ event: event('r00000003', 1236), firstSeen: 1, lastSeen: 1, count: 1 }, rules, () => []);
    expect(sd).toMatchObject({ app: undefined, domain: 'offline' });
    // Rules that decide before any app is chosen, or after all of them, name none: firefox's uid may be another app's process
    // (one chosen by cgroup), and an Allow for firefox would open nothing of what was denied.
    for (const id of ['r00000004', 'r00000005', 'r00000006']) expect(appOf(rules, id, 1234), id).toBeUndefined();
    // Nor does an unknown short id (a table applied since the reader last read rules.json): it may be any of those.
    expect(appOf(rules, 'r0000000f', 1234)).toBeUndefined();
  });

  it("an app chosen by cgroup meets the global list in a copy of its own, whose rows name it; the shared list's rows still go by uid, among the apps that share it", () => {
    const text = byUid(`  browser: {identity: {cgroup: "user.slice/*/app.slice/browser-*.scope"}}
  both: {identity: [{user: 1237}, {cgroup: "system.slice/both.service"}]}
  staff: {identity: {group: 50}}
`);
    const dir = policyDir({ '00.yaml': text });
    let rules: RuleLookup;
    let table: readonly RuleIdEntry[];
    try {
      const loaded = loadPolicyDir(dir);
      if (!loaded.ok) throw new Error(JSON.stringify(loaded.errors));
      // 1237 is a member of group 50: the kernel's uid map still sends it to "both", which claims the uid itself.
      const withStaff = { ...facts, members: new Map([[50, [1237, 1238]]]) };
      const compiled = compile(loaded.policy, { users: new Map(), groups: new Map(), cgroups: [], members: withStaff.members });
      expect(compiled.ruleset.sets.find((set) => set.name === 'app_uid')).toMatchObject({ elements: [1234, 1235, 1237, 1238] });
      rules = new RuleLookup();
      rules.replace(compiled.ruleIds);
      table = compiled.ruleIds;
      rules.senderApp = appOfUid(loaded.policy, withStaff);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
    const global = table.filter((entry) => entry.ruleId === 'deny/00.yaml/0');
    expect(global.map((entry) => entry.app ?? null).sort()).toEqual(['both', 'browser', null]);
    const idFor = (app: string | null) => global.find((entry) => (entry.app ?? null) === app)!.id;
    // The copy says which app, whatever the uid: any user's browser, and "both" by its cgroup or its user alike.
    expect(appOf(rules, idFor('browser'), 1234)).toBe('browser');
    expect(appOf(rules, idFor('browser'), 4321)).toBe('browser');
    expect(appOf(rules, idFor('both'), 1237)).toBe('both');
    // The shared list was reached from a uid's app, or from no app at all.
    expect(appOf(rules, idFor(null), 1234)).toBe('firefox');
    expect(appOf(rules, idFor(null), 1235)).toBe('mail');
    expect(appOf(rules, idFor(null), 4321)).toBeUndefined();
    // "both" meets its own copy even by its user: a shared-list record of uid 1237 is not its — nor staff's, which the kernel never sends 1237 to.
    expect(appOf(rules, idFor(null), 1237)).toBeUndefined();
    expect(appOf(rules, idFor(null), 1238)).toBe('staff');
  });
});

describe('which name a denial record gives', () => {
  const ALICE = 1234;
  const MALLORY = 4321;
  const record = (memory: AddressMemory, uid: number | undefined) =>
    attribute({ event: event('r00000001', uid), firstSeen: 1, lastSeen: 1, count: 1 }, lookupFor(byUid()), (address, asker) => memory.namesFor(address, asker));

  it("the sender's own lookup, though another user pointed a longer-lived name of theirs at the same address", () => {
    const memory = new AddressMemory();
    memory.rememberAnswer('api.alice.example', [{ name: 'api.alice.example', type: 'A', ttl: 60, data: '203.0.113.1' }], undefined, ALICE);
    memory.rememberAnswer('cdn.mallory.example', [{ name: 'cdn.mallory.example', type: 'A', ttl: 86_400, data: '203.0.113.1' }], undefined, MALLORY);
    expect(record(memory, ALICE)).toMatchObject({ app: 'firefox', name: 'api.alice.example', nameAskedBy: 'sender' });
  });

  it("only another user's lookup: the name is kept for the audit view, marked as others'", () => {
    const memory = new AddressMemory();
    memory.rememberAnswer('cdn.mallory.example', [{ name: 'cdn.mallory.example', type: 'A', ttl: 86_400, data: '203.0.113.1' }], undefined, MALLORY);
    expect(record(memory, ALICE)).toMatchObject({ name: 'cdn.mallory.example', nameAskedBy: 'others' });
    // An orphaned socket has no uid that could have asked.
    expect(record(memory, undefined)).toMatchObject({ name: 'cdn.mallory.example', nameAskedBy: 'others' });
    expect(record(new AddressMemory(), ALICE)).toMatchObject({ name: undefined, nameAskedBy: undefined });
  });
});
