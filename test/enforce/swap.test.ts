import { describe, expect, it } from 'vitest';
import { renderText } from '../../src/compile/nft.js';
import { baseName, swapTexts, withGeneration } from '../../src/enforce/swap.js';
import { compileYaml } from '../support/compile-text.js';

const compiled = compileYaml('defaults: {egress: deny}\napps: {a: {identity: {user: alice}, rules: [{deny: [192.0.2.0/24]}]}}\ndeny: [{to: [203.0.113.0/24]}]\n');

describe('generation swap', () => {
  it('renames every set, map and non-base chain, and every reference to them', () => {
    const text = renderText(withGeneration(compiled.ruleset, 'b'));
    expect(text).toContain('meta skuid vmap @app_uid.b');
    expect(text).toContain('1000 : goto app_a.b');
    expect(text).toContain('jump global_deny.b');
    expect(text).toContain('ip daddr @a_a_0_net4.b counter goto log_a_a_0.b');
    expect(text).toContain('chain output {');
    // Every name used is a name defined.
    const defined = new Set([...text.matchAll(/^\t(?:set|map|chain) (\S+) \{/gm)].map((m) => m[1]));
    for (const used of text.matchAll(/(?:@|jump |goto )([A-Za-z0-9_.-]+)/g)) expect(defined, used[1]).toContain(used[1]);
    expect(baseName('global_deny.b')).toBe('global_deny');
    expect(baseName('app_foo-a')).toBe('app_foo-a');
  });

  it('prepares the new objects unused, then switches the base chain alone', () => {
    const { prepare, switch: switchText } = swapTexts(withGeneration(compiled.ruleset, 'a'));
    expect(prepare).not.toMatch(/flush/);
    expect(prepare.match(/chain output \{/g)).toHaveLength(1);
    expect(prepare).toMatch(/chain output \{\n\t\ttype filter hook output priority 0; policy drop;\n\t\}/);
    expect(switchText.split('\n')[0]).toBe('flush chain inet egressd output');
    expect(switchText).not.toMatch(/\bset |\bmap /);
    expect(switchText).toContain('jump global_deny.a');
  });
});
