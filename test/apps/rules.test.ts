import { describe, expect, it } from 'vitest';
import { cgroupMapsInForce, cgroupRules, liveVerdict } from '../../src/apps/rules.js';
import { withGeneration } from '../../src/enforce/swap.js';
import { compileYaml } from '../support/compile-text.js';

/** What the tracker does with a path, worked out from the compiler's bindings as compile claims cgroups. */
const POLICY = `
defaults: {egress: deny}
apps:
  browser: {identity: {cgroup: "apps/browser-*"}, rules: [{allow: [198.51.100.1]}]}
  any: {identity: {cgroup: "apps/*"}, default: allow}
  flatpak: {identity: {flatpak: org.example.Viewer}, default: deny}
  cups: {identity: {unit: cups.service}, default: deny}
systemDomains:
  offline: {members: [{cgroup: "apps/browser-vault"}]}
`;

describe('the tracker claims cgroups as compile does', () => {
  const compiled = compileYaml(POLICY);
  const rules = cgroupRules(compiled.cgroupBindings);

  it('per map, the first selector that matches keeps the path; another dispatch (a system domain) has its own map', () => {
    expect(rules.claimsFor('apps/browser-1').map((c) => [c.map, c.owner])).toEqual([['app_cg_l2', 'app browser']]);
    expect(rules.claimsFor('apps/other').map((c) => c.owner)).toEqual(['app any']);
    expect(rules.claimsFor('apps/browser-vault').map((c) => [c.map, c.owner])).toEqual([
      ['sd_cg_l2', 'system domain offline'],
      ['app_cg_l2', 'app browser'],
    ]);
    // Compile agrees: with the cgroups there at compile, the same owners win.
    const withThem = compileYaml(POLICY, { facts: { users: new Map(), groups: new Map(), cgroups: ['apps', 'apps/browser-1', 'apps/other'] } });
    const map = withThem.ruleset.sets.find((s) => s.name === 'app_cg_l2')!;
    expect(map.elements).toEqual(['apps/browser-1', 'apps/other']);
    expect(map.verdicts).toEqual([{ goto: { target: 'app_browser' } }, { goto: { target: 'app_any' } }]);
  });

  it('a glob names one depth: shallower and deeper paths are not claimed', () => {
    expect(rules.claimsFor('apps')).toEqual([]);
    expect(rules.claimsFor('apps/browser-1/child')).toEqual([]);
    expect(rules.claimsFor('system.slice/cups.service').map((c) => c.owner)).toEqual(['app cups']);
    expect(rules.claimsFor('system.slice/cups.service2')).toEqual([]);
  });

  it("a template's instance is claimed in its template's slice, where systemd runs it, and that slice is watched on the way", () => {
    const agent = cgroupRules(compileYaml('systemDomains: {offline: {members: [{unit: vault-agent@alice.service}]}}\n').cgroupBindings);
    const instance = 'system.slice/system-vault\\x2dagent.slice/vault-agent@alice.service';
    expect(agent.claimsFor(instance).map((c) => [c.map, c.owner])).toEqual([['sd_cg_l3', 'system domain offline']]);
    expect(agent.claimsFor('system.slice/vault-agent@alice.service')).toEqual([]);
    expect(agent.leadsToMatch('system.slice/system-vault\\x2dagent.slice')).toBe(true);
    expect(agent.leadsToMatch('system.slice/system-getty.slice')).toBe(false);
  });

  it("Flatpak ids: the scope's number is digits only, so another app's id is not taken", () => {
    const path = 'user.slice/user-1000.slice/user@1000.service/app.slice/app-flatpak-org.example.Viewer-4242.scope';
    expect(rules.claimsFor(path).map((c) => c.owner)).toEqual(['app flatpak']);
    expect(rules.claimsFor(path.replace('Viewer-4242', 'Viewer-beta-4242'))).toEqual([]);
    expect(rules.maxLevel).toBe(5);
  });

  it('only directories on the way to a selector are watched', () => {
    expect(rules.leadsToMatch('')).toBe(true);
    expect(rules.leadsToMatch('apps')).toBe(true);
    expect(rules.leadsToMatch('system.slice')).toBe(true);
    expect(rules.leadsToMatch('user.slice/user-1000.slice/user@1000.service/app.slice')).toBe(true);
    expect(rules.leadsToMatch('user.slice/user-1000.slice/session-3.scope')).toBe(false);
    expect(rules.leadsToMatch('init.scope')).toBe(false);
    // At a selector's level nothing below matters.
    expect(rules.leadsToMatch('apps/browser-1')).toBe(false);
  });

  it("finds the live maps by the names the apply gave them, in either generation, and never another policy's", () => {
    for (const generation of ['a', 'b'] as const) {
      const live = withGeneration(compiled.ruleset, generation);
      const names = new Set(live.sets.map((s) => s.name));
      const found = cgroupMapsInForce(compiled, names);
      expect([...found.keys()].sort()).toEqual(['app_cg_l2', 'app_cg_l5', 'sd_cg_l2']);
      for (const maps of found.values()) expect(maps.map((m) => m.generation)).toEqual([generation]);
      // The verdict goes to the chain of the generation its map belongs to.
      expect(liveVerdict({ goto: { target: 'app_browser' } }, generation, new Set(['app_browser']))).toEqual({
        kind: 'goto',
        chain: `app_browser.${generation}`,
      });
    }
    // The same base names from another policy are not these maps.
    const other = compileYaml(POLICY.replace('browser-*', 'viewer-*'));
    const names = new Set(withGeneration(other.ruleset, 'a').sets.map((s) => s.name));
    expect(cgroupMapsInForce(compiled, names).get('app_cg_l2')).toBeUndefined();
  });

  it('an empty cgroup map is new in each generation: what the tracker adds must not outlive its chains', () => {
    const a = withGeneration(compiled.ruleset, 'a').sets.find((s) => s.name.startsWith('app_cg_l2.'))!;
    const b = withGeneration(compiled.ruleset, 'b').sets.find((s) => s.name.startsWith('app_cg_l2.'))!;
    expect(a.elements).toEqual([]);
    expect(a.name).not.toBe(b.name);
  });
});
