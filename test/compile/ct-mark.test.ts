import { describe, expect, it } from 'vitest';
import { appTags, CT_MARK_KEEP, CT_MARK_MASK, DEFAULT_TAG, markValue } from '../../src/compile/ct-mark.js';
import { compile } from '../../src/compile/compile.js';
import { renderText } from '../../src/compile/ruleset.js';
import { resolvePolicy } from '../../src/policy/resolve.js';
import { FACTS } from '../support/compile-text.js';

const names = Array.from({ length: 1000 }, (_, i) => `app${i}`);

/** The tags a compiled table writes and compares, by chain (not the mask, nor the unclaimed 0). */
function marksOf(files: Record<string, string>): Map<string, string[]> {
  const result = resolvePolicy(
    Object.entries(files).map(([file, text]) => ({ file, bytes: new TextEncoder().encode(text) })),
    () => ({ error: 'ENOENT' }),
  );
  if (!result.ok) throw new Error(result.errors.map((e) => e.message).join('\n'));
  const { ruleset } = compile(result.policy, FACTS);
  return new Map(
    ruleset.chains.map((c) => [
      c.name,
      [...renderText({ ...ruleset, sets: [], chains: [c] }).matchAll(/0x[0-9a-f]{4}0000\b/g)]
        .map((m) => m[0])
        .filter((m) => m !== CT_MARK_MASK && m !== '0x00000000'),
    ]),
  );
}

describe('conntrack tags', () => {
  it('egressd owns the high 16 bits of the ct mark and keeps the rest', () => {
    expect((Number(CT_MARK_MASK) | Number(CT_MARK_KEEP)) >>> 0).toBe(0xffffffff);
    expect(Number(CT_MARK_MASK) & Number(CT_MARK_KEEP)).toBe(0);
    expect(markValue(DEFAULT_TAG)).toBe('0x00010000');
    expect(markValue(0xffff)).toBe('0xffff0000');
  });

  it("an app's tag depends on the set of app names only, never on their order; tags are distinct and never the global default's or 0", () => {
    const tags = appTags(names);
    const reversed = appTags([...names].reverse());
    const shuffled = appTags([...names].sort(() => 0.5 - Math.random()));
    expect([...reversed.entries()].sort()).toEqual([...tags.entries()].sort());
    expect([...shuffled.entries()].sort()).toEqual([...tags.entries()].sort());
    const values = [...tags.values()];
    expect(new Set(values).size).toBe(names.length);
    for (const v of values) expect(v >= 2 && v <= 0xffff, String(v)).toBe(true);
  });

  it('adding or removing an app leaves the others their tags, but for a collision of digests, resolved by name', () => {
    const tags = appTags(names);
    // 1,000 names in 65,534 tags: a few collide; the name that sorts first keeps its preferred tag.
    const alone = new Map(names.map((n) => [n, appTags([n]).get(n)!]));
    const moved = names.filter((n) => tags.get(n) !== alone.get(n));
    expect(moved.length).toBeGreaterThan(0);
    expect(moved.length).toBeLessThan(30);
    for (const n of moved) {
      const holder = names.find((m) => m !== n && alone.get(m) === alone.get(n));
      expect(holder, n).toBeDefined();
    }
    const fewer = appTags(names.slice(0, 500));
    const kept = names.slice(0, 500).filter((n) => fewer.get(n) === tags.get(n));
    expect(kept.length).toBeGreaterThan(490);
  });

  it('the same app gets the same mark whatever file or position it is written in; apps and the global default get their own', () => {
    const a = 'apps:\n  web: {identity: {user: alice}, default: deny, rules: [{allow: [192.0.2.1]}]}\n';
    const b = 'apps:\n  mail: {identity: {user: 1001}, rules: [{allow: [192.0.2.2]}]}\n';
    const one = marksOf({ '10-a.yaml': `defaults: {egress: deny}\n${a}`, '20-b.yaml': b });
    const two = marksOf({ '10-b.yaml': `defaults: {egress: deny}\n${b}`, '20-a.yaml': a });
    const web = markValue(appTags(['web', 'mail']).get('web')!);
    expect(one.get('app_web')).toEqual([web, web, web]); // the allow rule, its own established, the claim
    expect(two.get('app_web')).toEqual(one.get('app_web'));
    expect(two.get('app_mail')).toEqual(one.get('app_mail'));
    expect(one.get('app_mail')![0]).not.toBe(web);
    expect(one.get('output')).toEqual([markValue(DEFAULT_TAG), markValue(DEFAULT_TAG)]);
    // A re-apply that drops web's allow keeps web's tag: what it opened stays its own.
    const without = marksOf({ '10-a.yaml': `defaults: {egress: deny}\n${a.replace('rules: [{allow: [192.0.2.1]}]', 'rules: []')}`, '20-b.yaml': b });
    expect(without.get('app_web')).toEqual([web, web]);
  });
});
