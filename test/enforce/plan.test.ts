import { describe, expect, it } from 'vitest';
import { planChanges } from '../../src/enforce/plan.js';
import { summarizeCompiled } from '../../src/enforce/summary.js';
import { compileYaml } from '../support/compile-text.js';

const base =
  'defaults: {egress: deny}\napps: {a: {identity: {unit: a.service}, rules: [{allow: [192.0.2.0/24, x.example.org]}]}}\ndeny: [{to: [203.0.113.0/24]}]\n';

describe('plan', () => {
  it('against no table: everything is added', () => {
    const compiled = summarizeCompiled(compileYaml(base).ruleset);
    const plan = planChanges(compiled, null);
    expect(plan.changes).toBe(true);
    expect(plan.tablePresent).toBe(false);
    expect(plan.removed).toEqual([]);
    expect(plan.added.length).toBe([...compiled.chains.values()].flat().length);
  });

  it('against itself: nothing changes, and run-time set contents do not count', () => {
    const compiled = summarizeCompiled(compileYaml(base).ruleset);
    const live = {
      ...compiled,
      sets: new Map([...compiled.sets].map(([name, set]) => [name, set.dynamic ? { ...set, size: 7, elements: ['192.0.2.9'] } : set])),
    };
    expect(planChanges(compiled, live).changes).toBe(false);
  });

  it('a changed port changes the rule fingerprint: one rule removed, one added, named by file:line and id', () => {
    const before = summarizeCompiled(compileYaml(base).ruleset);
    const after = summarizeCompiled(compileYaml(base.replace('[203.0.113.0/24]}', '[203.0.113.0/24], ports: [25]}')).ruleset);
    const plan = planChanges(after, before);
    expect(plan.changes).toBe(true);
    expect(plan.added.filter((r) => r.chain === 'global_deny').map((r) => r.id)).toEqual(['deny/f.yaml/0']);
    expect(plan.removed.filter((r) => r.chain === 'global_deny').map((r) => r.id)).toEqual(['deny/f.yaml/0']);
    expect(plan.added.find((r) => r.chain === 'global_deny')!.comment).toMatch(/^r[0-9a-f]{8} f\.yaml:3 deny\/f\.yaml\/0 #[0-9a-f]{8}$/);
    // Another port is another rule: the removed one's short id is not reused for it.
    const added = plan.added.find((r) => r.chain === 'global_deny')!;
    const removed = plan.removed.find((r) => r.chain === 'global_deny')!;
    expect(added.comment.slice(0, 10)).not.toBe(removed.comment.slice(0, 10));
  });

  it('a changed CIDR shows as a changed static set with both sizes', () => {
    const before = summarizeCompiled(compileYaml(base).ruleset);
    const after = summarizeCompiled(compileYaml(base.replace('[203.0.113.0/24]', '[203.0.113.0/24, 198.51.100.0/24]')).ruleset);
    const plan = planChanges(after, before);
    expect(plan.sets.find((s) => s.name === 'g0_net4')).toEqual({ name: 'g0_net4', change: 'changed', compiled: 2, live: 1, dynamic: false });
  });

  it('lockdown is a change of its own', () => {
    const off = summarizeCompiled(compileYaml(base).ruleset);
    const on = summarizeCompiled(compileYaml(base, { lockdown: true }).ruleset);
    expect(on.lockdown).toBe(true);
    expect(planChanges(on, off)).toMatchObject({ changes: true, lockdown: { compiled: true, live: false } });
  });
});
