import { describe, expect, it } from 'vitest';
import { renderCommandsText, renderText } from '../../src/compile/ruleset.js';
import { baseName, isApplyMarker, newApplyMarker, parseLiveName, swapTransactions, withGeneration } from '../../src/enforce/swap.js';
import { compileYaml } from '../support/compile-text.js';

/** The swap's two transactions as the nft text the binding sends. */
function swapTexts(...args: Parameters<typeof swapTransactions>): { prepare: string; switch: string } {
  const swap = swapTransactions(...args);
  return { prepare: renderCommandsText(swap.prepare), switch: renderCommandsText(swap.switch) };
}

const compiled = compileYaml(
  'defaults: {egress: deny}\napps: {a: {identity: {user: alice}, rules: [{deny: [192.0.2.0/24]}]}}\ndeny: [{to: [203.0.113.0/24]}]\n',
);

describe('generation swap', () => {
  it('renames chains by generation, sets and maps by contents, and every reference to them', () => {
    const text = renderText(withGeneration(compiled.ruleset, 'b'));
    expect(text).toMatch(/meta skuid vmap @app_uid\.[0-9a-f]{16} /);
    expect(text).toContain('1000 : goto app_a.b');
    expect(text).toContain('jump global_deny.b');
    expect(text).toMatch(/ip daddr @a_a_0_net4\.[0-9a-f]{16} counter goto log_a_a_0\.b/);
    expect(text).toContain('chain output {');
    // Every name used is a name defined.
    const defined = new Set([...text.matchAll(/^\t(?:set|map|chain) (\S+) \{/gm)].map((m) => m[1]));
    for (const used of text.matchAll(/(?:@|jump |goto )([A-Za-z0-9_.-]+)/g)) expect(defined, used[1]).toContain(used[1]);
    expect(baseName('global_deny.b')).toBe('global_deny');
    expect(baseName('g0_net4.0123456789abcdef')).toBe('g0_net4');
    expect(baseName('app_foo-a')).toBe('app_foo-a');
  });

  it('names a set by what it holds: the same in both generations, new when its elements or its DNS names change', () => {
    // The rule's own sets, in order (the log meters, declared first, aside).
    const names = (yaml: string, generation: 'a' | 'b') =>
      withGeneration(compileYaml(yaml).ruleset, generation)
        .sets.map((set) => set.name)
        .filter((name) => !name.startsWith('lograte_'));
    const base = 'deny: [{to: [203.0.113.0/24, tracker.example]}]\n';
    const [net4, dns4] = names(base, 'a');
    expect(names(base, 'b')).toEqual(names(base, 'a'));
    expect(names(base.replace('203.0.113.0/24', '203.0.113.0/25'), 'a')[0]).not.toBe(net4);
    expect(names(base.replace('203.0.113.0/24', '203.0.113.0/25'), 'a')[1]).toBe(dns4);
    expect(names(base.replace('tracker.example', 'other.example'), 'a')[1]).not.toBe(dns4);
    // A map's verdicts name chains, which carry the generation.
    const app = 'apps: {a: {identity: {user: alice}, rules: [{deny: [192.0.2.0/24]}]}}\n';
    expect(names(app, 'a').find((n) => n.startsWith('app_uid.'))).not.toBe(names(app, 'b').find((n) => n.startsWith('app_uid.')));
  });

  it('leaves out of prepare the sets the table already holds', () => {
    const generation = withGeneration(compiled.ruleset, 'a');
    const kept = generation.sets.find((set) => set.name.startsWith('g0_net4.'))!.name;
    const { prepare } = swapTexts(generation, undefined, new Set([kept]));
    expect(prepare).not.toContain(`set ${kept} {`);
    expect(prepare).toContain(`@${kept}`);
  });

  it('prepares the new objects unused, then switches the base chain alone', () => {
    const { prepare, switch: switchText } = swapTexts(withGeneration(compiled.ruleset, 'a'));
    expect(prepare).not.toMatch(/flush/);
    expect(prepare.match(/chain output \{/g)).toHaveLength(1);
    expect(prepare).toMatch(/chain output \{\n\t\ttype filter hook output priority 0; policy drop;\n\t\}/);
    expect(switchText.split('\n')[0]).toBe('flush chain inet egressd output');
    // No set or map is declared in the switch (`ct mark set` in a rule is a statement, not a set).
    expect(switchText).not.toMatch(/^\s*(set|map) \S+ \{/m);
    expect(switchText).toContain('ct mark set');
    expect(switchText).toContain('jump global_deny.a');
  });

  it('before any generation is in force, prepare leaves the base chain accepting: the switch sets its policy with its rules', () => {
    const { prepare, switch: switchText } = swapTexts(withGeneration(compiled.ruleset, 'a'), undefined, new Set(), { firstSwitch: true });
    expect(prepare).toMatch(/chain output \{\n\t\ttype filter hook output priority 0; policy accept;\n\t\}/);
    expect(switchText).toMatch(/chain output \{\n\t\ttype filter hook output priority 0; policy drop;\n/);
  });

  it('reads a live name back into its base and its generation or digest', () => {
    expect(parseLiveName('global_deny.b')).toEqual({ base: 'global_deny', generation: 'b' });
    expect(parseLiveName('g0_net4.0123456789abcdef')).toEqual({ base: 'g0_net4', digest: '0123456789abcdef' });
    expect(parseLiveName('output')).toEqual({ base: 'output' });
    // Not a suffix of ours: the name stays whole.
    expect(parseLiveName('app_foo-a')).toEqual({ base: 'app_foo-a' });
    expect(parseLiveName('x.c')).toEqual({ base: 'x.c' });
    expect(parseLiveName('x.0123456789ABCDEF')).toEqual({ base: 'x.0123456789ABCDEF' });
    const marker = newApplyMarker();
    expect(isApplyMarker(marker)).toBe(true);
    expect(parseLiveName(`${marker}.a`)).toEqual({ base: marker, generation: 'a' });
    expect(isApplyMarker(`${marker}.b`)).toBe(true);
    expect(isApplyMarker(`${marker}.0123456789abcdef`)).toBe(false);
    expect(isApplyMarker('applied_x.a')).toBe(false);
    // Every name withGeneration makes reads back to the compiled one.
    const generation = withGeneration(compiled.ruleset, 'b');
    expect([...generation.chains, ...generation.sets].map((x) => parseLiveName(x.name).base)).toEqual(
      [...compiled.ruleset.chains, ...compiled.ruleset.sets].map((x) => x.name),
    );
  });
});
