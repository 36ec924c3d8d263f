import { describe, expect, it } from 'vitest';
import { compile } from '../../src/compile/compile.js';
import { logPrefix, parseLogPrefix } from '../../src/compile/log-prefix.js';
import { renderText } from '../../src/compile/ruleset.js';
import { assignShortIds, ruleIdTable, type Candidate, type RuleIdEntry } from '../../src/compile/rule-ids.js';
import { resolvePolicy } from '../../src/policy/resolve.js';
import { compileYaml, FACTS, policyFrom } from '../support/compile-text.js';

const byRuleId = (entries: readonly RuleIdEntry[], ruleId: string): RuleIdEntry => {
  const entry = entries.find((e) => e.ruleId === ruleId);
  if (!entry) throw new Error(`no entry for ${ruleId} in ${entries.map((e) => e.ruleId).join(', ')}`);
  return entry;
};

const policyFiles = (files: Record<string, string>, lists: Record<string, string> = {}) => {
  const encoder = new TextEncoder();
  const result = resolvePolicy(
    Object.entries(files).map(([file, yaml]) => ({ file, bytes: encoder.encode(yaml) })),
    (path) => (path in lists ? { bytes: encoder.encode(lists[path]) } : { error: 'ENOENT' }),
  );
  if (!result.ok) throw new Error(result.errors.map((e) => e.message).join('\n'));
  return result.policy;
};

const APP = `
defaults: {egress: deny}
apps:
  web:
    identity: {user: alice}
    rules:
      - allow: [example.org, 192.0.2.0/24]
        ports: [443]
      - deny: any
deny:
  - to: [tracker.example.com]
`;

describe('short rule ids', () => {
  it('are "r" and 8 hex digits, one per deciding rule, all different, with file:line, owner, kind and verdict', () => {
    const compiled = compileYaml(`${APP}systemDomains: {off: {members: [{user: vault}]}}\ntor: {enabled: true, updaters: [{user: _apt}]}\n`, {
      lockdown: true,
    });
    const ids = compiled.ruleIds;
    for (const entry of ids) expect(entry.id).toMatch(/^r[0-9a-f]{8}$/);
    expect(new Set(ids.map((e) => e.id)).size).toBe(ids.length);
    expect(ids.map((e) => e.ruleId)).toEqual([
      'routing-header',
      'sd/off',
      'syn-cookies',
      'tor/updaters',
      'tor/socks',
      'tor/socks-answer',
      'lockdown',
      'tor/own',
      'dns/resolver',
      'dns/exclusive',
      'app/web/0',
      'app/web/1',
      'app/web/default',
      'deny/f.yaml/0',
      'default',
    ]);
    expect(byRuleId(ids, 'app/web/0')).toEqual({
      id: expect.any(String),
      ruleId: 'app/web/0',
      kind: 'app-rule',
      verdict: 'allow',
      file: 'f.yaml',
      line: 7,
      app: 'web',
    });
    expect(byRuleId(ids, 'sd/off')).toMatchObject({ kind: 'system-domain', verdict: 'deny', domain: 'off' });
    // Built in, made by the first system domain with a member found by user or group: its file:line says which.
    expect(byRuleId(ids, 'syn-cookies')).toEqual({
      id: expect.any(String),
      ruleId: 'syn-cookies',
      kind: 'syn-cookies',
      verdict: 'deny',
      file: 'f.yaml',
      line: 12,
    });
    expect(compileYaml(`${APP}systemDomains: {off: {members: [{unit: gpg.service}]}}\n`).ruleIds.map((e) => e.ruleId)).not.toContain('syn-cookies');
    expect(byRuleId(ids, 'lockdown')).toEqual({ id: expect.any(String), ruleId: 'lockdown', kind: 'lockdown', verdict: 'deny' });
    expect(byRuleId(ids, 'routing-header')).toEqual({ id: expect.any(String), ruleId: 'routing-header', kind: 'routing-header', verdict: 'deny' });
    expect(byRuleId(ids, 'deny/f.yaml/0')).toMatchObject({ kind: 'global-deny', verdict: 'deny', file: 'f.yaml', line: 11 });
    expect(byRuleId(ids, 'default')).toMatchObject({ kind: 'default', verdict: 'deny' });
    expect(byRuleId(ids, 'dns/resolver')).toEqual({ id: expect.any(String), ruleId: 'dns/resolver', kind: 'dns-resolver', verdict: 'allow' });
    expect(byRuleId(ids, 'dns/exclusive')).toEqual({ id: expect.any(String), ruleId: 'dns/exclusive', kind: 'dns-exclusive', verdict: 'deny' });
    expect(byRuleId(ids, 'tor/socks-answer')).toMatchObject({ kind: 'tor-socks-answer', verdict: 'deny' });
    // A SOCKS gateway on another host is network, not a port a local user could hold: no rule guards it.
    const gateway = compileYaml(`${APP}tor: {enabled: true, socks: "192.0.2.50:9050", updaters: [{user: _apt}]}\n`).ruleIds.map((e) => e.ruleId);
    expect(gateway).toContain('tor/socks');
    expect(gateway).not.toContain('tor/socks-answer');
    // Without dns.exclusive nobody else's DNS is dropped, so no rule stands for it; the resolver's own still pass.
    const open = compileYaml(`${APP}dns: {exclusive: false}\n`).ruleIds.map((e) => e.ruleId);
    expect(open).toContain('dns/resolver');
    expect(open).not.toContain('dns/exclusive');
  });

  it('every log prefix of the compiled table parses back to a rule of its id table, and every comment that carries a short id names that rule', () => {
    const compiled = compileYaml(`${APP}systemDomains: {off: {members: [{user: vault}]}}\ntor: {enabled: true, updaters: [{user: _apt}]}\n`, {
      lockdown: true,
    });
    const table = new Map(compiled.ruleIds.map((e) => [e.id, e]));
    const text = renderText(compiled.ruleset);
    const prefixes = [...text.matchAll(/log prefix "([^"]*)"/g)].map((m) => m[1]!);
    // routing-header, sd/off, tor/updaters, tor/socks-answer, lockdown, dns/exclusive, app/web/1, app/web/default, deny/f.yaml/0,
    // default: each twice (its log limited per uid, and once for packets without an owner); syn-cookies, whose packets have
    // no owner, once.
    expect(new Set(prefixes).size).toBe(11);
    expect(prefixes.length).toBe(21);
    for (const prefix of prefixes) {
      expect(Buffer.byteLength(prefix)).toBe(14);
      expect(table.has(parseLogPrefix(prefix)!), prefix).toBe(true);
    }
    for (const chain of compiled.ruleset.chains) {
      for (const r of chain.rules) {
        const tagged = /^(r[0-9a-f]{8}) (?:\S+:\d+ )?(\S+?)(?::| #)/.exec(r.comment ?? '');
        if (tagged) expect(table.get(tagged[1]!)?.ruleId, r.comment).toBe(tagged[2]);
      }
    }
  });

  it('stay with their rule when a rule is written above it (its position id changes, its short id does not)', () => {
    const before = ruleIdTable(policyFrom(APP));
    const after = ruleIdTable(
      policyFrom(
        APP.replace('    rules:\n', '    rules:\n      - deny: [203.0.113.0/24]\n').replace('deny:\n  - to:', 'deny:\n  - to: [198.51.100.0/24]\n  - to:'),
      ),
    );
    expect(byRuleId(after, 'app/web/1').id).toBe(byRuleId(before, 'app/web/0').id);
    expect(byRuleId(after, 'app/web/2').id).toBe(byRuleId(before, 'app/web/1').id);
    expect(byRuleId(after, 'deny/f.yaml/1').id).toBe(byRuleId(before, 'deny/f.yaml/0').id);
    expect(byRuleId(after, 'app/web/default').id).toBe(byRuleId(before, 'app/web/default').id);
    // The new rules are new ids, not a shifted old one.
    const old = new Set(before.map((e) => e.id));
    expect(old.has(byRuleId(after, 'app/web/0').id)).toBe(false);
    expect(old.has(byRuleId(after, 'deny/f.yaml/0').id)).toBe(false);
    // Its line moved; the table says so.
    expect(byRuleId(after, 'app/web/1').line).toBe(byRuleId(before, 'app/web/0').line! + 1);
  });

  it('stay when a global deny rule moves to another file, or a destination is respelled; change when the rule means something else', () => {
    const id = (files: Record<string, string>, ruleId: string) => byRuleId(ruleIdTable(policyFiles(files)), ruleId).id;
    const base = id({ 'a.yaml': 'deny:\n  - to: [tracker.example.com, 192.0.2.0/24]\n' }, 'deny/a.yaml/0');
    expect(id({ 'a.yaml': 'apps: {}\n', 'b.yaml': 'deny:\n  - to: [tracker.example.com, 192.0.2.0/24]\n' }, 'deny/b.yaml/0')).toBe(base);
    expect(id({ 'a.yaml': 'deny:\n  - to: [192.0.2.0/24, Tracker.Example.com.]\n    why: moved and respelled\n    log: false\n' }, 'deny/a.yaml/0')).toBe(base);
    expect(id({ 'a.yaml': 'deny:\n  - to: [tracker.example.com, 192.0.2.0/25]\n' }, 'deny/a.yaml/0')).not.toBe(base);
    expect(id({ 'a.yaml': 'deny:\n  - to: [tracker.example.com, 192.0.2.0/24]\n    ports: [443]\n' }, 'deny/a.yaml/0')).not.toBe(base);
    expect(id({ 'a.yaml': 'deny:\n  - to: [tracker.example.com, 192.0.2.0/24]\n    proto: udp\n' }, 'deny/a.yaml/0')).not.toBe(base);
    // The same destinations under an app are another rule; allow and deny of them are two.
    const app = (verdict: string) =>
      id({ 'a.yaml': `apps: {w: {identity: {user: alice}, rules: [{${verdict}: [tracker.example.com, 192.0.2.0/24]}]}}\n` }, 'app/w/0');
    expect(app('deny')).not.toBe(base);
    expect(app('allow')).not.toBe(app('deny'));
    // A default that flips is another decision.
    expect(id({ 'a.yaml': 'defaults: {egress: deny}\n' }, 'default')).not.toBe(id({ 'a.yaml': 'defaults: {egress: allow}\n' }, 'default'));
  });

  it("a global rule's copy for each app chosen by cgroup has an id of its own, naming the app, which stays while the rule and the app stand", () => {
    const withBrowser = () => APP.replace('deny:\n  - to:', '  browser: {identity: {unit: browser.service}}\ndeny:\n  - to:');
    const before = ruleIdTable(policyFrom(withBrowser()));
    const global = before.filter((e) => e.ruleId === 'deny/f.yaml/0');
    // The shared list's row (web, chosen by user, meets it) and the browser's copy; no copy for web.
    expect(global.map((e) => e.app ?? null)).toEqual([null, 'browser']);
    expect(global.every((e) => e.kind === 'global-deny' && e.verdict === 'deny' && e.line === global[0]!.line)).toBe(true);
    expect(global[1]!.id).not.toBe(global[0]!.id);
    // Another app chosen by cgroup, written before it, changes neither id.
    const after = ruleIdTable(policyFrom(withBrowser().replace('  browser:', '  mail: {identity: {cgroup: "system.slice/mail.service"}}\n  browser:')));
    const copies = (table: readonly RuleIdEntry[]) => new Map(table.filter((e) => e.ruleId === 'deny/f.yaml/0').map((e) => [e.app ?? null, e.id]));
    expect(copies(after).get(null)).toBe(copies(before).get(null));
    expect(copies(after).get('browser')).toBe(copies(before).get('browser'));
    expect(copies(after).get('mail')).toMatch(/^r[0-9a-f]{8}$/);
    // Without a global rule there is nothing to copy.
    expect(ruleIdTable(policyFrom(withBrowser().replace('deny:\n  - to: [tracker.example.com]\n', ''))).some((e) => e.kind === 'global-deny')).toBe(false);
  });

  it('stay when the list file behind a rule changes: the rule names the list, it does not copy it', () => {
    const yaml = 'lists: {bad: {file: bad.txt}}\ndeny:\n  - to: ["@bad"]\n';
    const a = byRuleId(ruleIdTable(policyFrom(yaml, { 'bad.txt': 'a.example\n192.0.2.0/24\n' })), 'deny/f.yaml/0').id;
    const b = byRuleId(ruleIdTable(policyFrom(yaml, { 'bad.txt': 'b.example\n198.51.100.0/24\n2001:db8::/32\n' })), 'deny/f.yaml/0').id;
    expect(b).toBe(a);
  });

  it('tell alike rules of one owner apart by their order among themselves, the first keeping its id', () => {
    const one = ruleIdTable(policyFrom('deny:\n  - to: [192.0.2.0/24]\n'));
    const two = ruleIdTable(policyFrom('deny:\n  - to: [192.0.2.0/24]\n  - to: [192.0.2.0/24]\n'));
    expect(byRuleId(two, 'deny/f.yaml/0').id).toBe(byRuleId(one, 'deny/f.yaml/0').id);
    expect(byRuleId(two, 'deny/f.yaml/1').id).not.toBe(byRuleId(two, 'deny/f.yaml/0').id);
  });

  it('colliding digests are told apart deterministically, whatever order the rules come in', () => {
    const candidates = (names: string[]): Candidate[] => names.map((n) => ({ identity: n, entry: { ruleId: n, kind: 'default', verdict: 'deny' } }));
    // Every identity digests to the same first id; the next attempt is told apart by the identity's last letter.
    const colliding = (identity: string, attempt: number) => (attempt === 0 ? 'r00000000' : `r0000000${identity.at(-1)}`);
    const forward = assignShortIds(candidates(['x/a', 'x/b', 'x/c']), colliding);
    const backward = assignShortIds(candidates(['x/c', 'x/b', 'x/a']), colliding);
    const ids = (entries: RuleIdEntry[]) => Object.fromEntries(entries.map((e) => [e.ruleId, e.id]));
    expect(ids(forward)).toEqual({ 'x/a': 'r00000000', 'x/b': 'r0000000b', 'x/c': 'r0000000c' });
    expect(ids(backward)).toEqual(ids(forward));
    // A digest that never frees up is an internal error, not two rules under one id.
    expect(() => assignShortIds(candidates(['x/a', 'x/b']), () => 'r00000000')).toThrow(/internal: no free short id/);
    expect(() => assignShortIds(candidates(['x/a']), () => 'R0')).toThrow(/internal/);
  });

  it('the compiler takes them from the same table explain reads', () => {
    const policy = policyFrom(APP);
    expect(compile(policy, FACTS).ruleIds).toEqual(ruleIdTable(policy));
    expect(compile(policy, FACTS, { lockdown: true }).ruleIds).toEqual(ruleIdTable(policy, { lockdown: true }));
  });
});

describe('log prefixes', () => {
  it('round-trip a short id, with or without the trailing space and NUL the kernel may hand over', () => {
    expect(logPrefix('r1a2b3c4d')).toBe('egd r1a2b3c4d ');
    expect(parseLogPrefix('egd r1a2b3c4d ')).toBe('r1a2b3c4d');
    expect(parseLogPrefix('egd r1a2b3c4d')).toBe('r1a2b3c4d');
    expect(parseLogPrefix('egd r1a2b3c4d \0')).toBe('r1a2b3c4d');
  });

  it('reject what is not an egressd prefix with a short id', () => {
    for (const prefix of ['', 'egd ', 'egd deny/00.yaml/0 ', 'egd r1a2b3c4 ', 'egd r1a2b3c4d5 ', 'EGD r1a2b3c4d ', 'xegd r1a2b3c4d ', 'egd R1A2B3C4D ']) {
      expect(parseLogPrefix(prefix), JSON.stringify(prefix)).toBeUndefined();
    }
    expect(() => logPrefix('deny/00.yaml/0')).toThrow(/internal/);
  });
});
