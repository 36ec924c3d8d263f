import { describe, expect, it } from 'vitest';
import { compile } from '../../src/compile/compile.js';
import { buildNameIndex } from '../../src/compile/names.js';
import { FACTS, policyFrom } from '../support/compile-text.js';

describe('the name index', () => {
  const policy = policyFrom(
    `
lists:
  file: {file: l.txt, format: plain}
  inline: {names: ["inline.test", "*.wild-inline.test"]}
deny:
  - to: ["@file", "exact.test"]
  - to: ["*.shared.test", "@inline"]
apps:
  a:
    identity: {user: alice}
    rules:
      - allow: ["@file"]
        ports: [443]
`,
    { 'l.txt': 'listed.test\n*.under.test\nshared.test\n*.shared.test\n' },
  );
  const compiled = compile(policy, FACTS, {});
  const index = buildNameIndex(policy, compiled.dnsBindings);
  const rule = (id: string) => compiled.dnsBindings.findIndex((b) => b.ruleId === id);
  const [deny0, deny1, app] = [rule('deny/f.yaml/0'), rule('deny/f.yaml/1'), rule('app/a/0')];

  it("finds a list's names and suffixes for every rule using the list, and the rules' own", () => {
    expect([deny0, deny1, app].every((i) => i >= 0)).toBe(true);
    expect(index.lookup('listed.test')).toEqual([deny0, app].sort());
    expect(index.lookup('under.test')).toEqual([deny0, app].sort());
    expect(index.lookup('a.b.under.test')).toEqual([deny0, app].sort());
    expect(index.lookup('exact.test')).toEqual([deny0]);
    expect(index.lookup('x.exact.test')).toEqual([]);
    expect(index.lookup('inline.test')).toEqual([deny1]);
    expect(index.lookup('deep.wild-inline.test')).toEqual([deny1]);
    expect(index.lookup('other.test')).toEqual([]);
    expect(index.lookup('test')).toEqual([]);
  });

  it('merges a name covered several ways into one sorted list, whatever its case or trailing dot', () => {
    // shared.test: a name of @file (deny0, app), under *.shared.test of deny1 and of @file.
    expect(index.lookup('shared.test')).toEqual([deny0, deny1, app].sort((a, b) => a - b));
    expect(index.lookup('WWW.Shared.Test.')).toEqual([deny0, deny1, app].sort((a, b) => a - b));
    expect(index.lookup('listedxtest')).toEqual([]);
  });

  it("says which names the policy spells out: rules' and lists' exact names and suffixes' apexes, not the names below them", () => {
    for (const name of ['exact.test', 'shared.test', 'listed.test', 'under.test', 'inline.test', 'wild-inline.test', 'Under.Test.'])
      expect(index.spelledOut(name), name).toBe(true);
    for (const name of ['x.under.test', 'www.shared.test', 'deep.wild-inline.test', 'x.exact.test', 'test', 'other.test'])
      expect(index.spelledOut(name), name).toBe(false);
  });

  it('counts what it indexes', () => {
    expect(index.size).toEqual({ names: 1 + 2 + 1, suffixes: 1 + 2 + 1 });
  });
});
