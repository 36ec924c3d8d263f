import fc from 'fast-check';
import { stringify } from 'yaml';
import { describe, expect, it } from 'vitest';
import { compile } from '../../src/compile/compile.js';
import { renderJson, renderText } from '../../src/compile/ruleset.js';
import { resolvePolicy, type ListReader } from '../../src/policy/resolve.js';

const encoder = new TextEncoder();
const lists: ListReader = (path) =>
  path === 'l.txt' ? { bytes: encoder.encode('a.example.org\n0.0.0.0 b.example.org\n*.c.example\nbad line x\n') } : { error: 'ENOENT' };
const facts = { users: new Map([['alice', 1000]]), groups: new Map([['wheel', 10]]), cgroups: ['system.slice', 'system.slice/a.service'] };

/** Every outcome is a Policy that compiles, or errors that each name a place in a file. */
function checkOutcome(bytes: Uint8Array): void {
  const result = resolvePolicy([{ file: 'f.yaml', bytes }], lists);
  if (result.ok) {
    const compiled = compile(result.policy, facts);
    expect(renderText(compiled.ruleset)).toContain('table inet egressd');
    renderJson(compiled.ruleset);
  } else {
    expect(result.errors.length).toBeGreaterThan(0);
  }
  for (const issue of [...(result.ok ? [] : result.errors), ...result.warnings]) {
    expect(['f.yaml', 'l.txt', '.']).toContain(issue.at.file);
    expect(issue.at.line).toBeGreaterThanOrEqual(1);
    expect(issue.at.col).toBeGreaterThanOrEqual(1);
    expect(issue.message.length).toBeGreaterThan(0);
  }
}

// Values drawn from the policy vocabulary, so generated documents get past the parser and into the schema and resolver.
const word = fc.constantFrom(
  'defaults',
  'egress',
  'log',
  'lists',
  'identities',
  'apps',
  'deny',
  'systemDomains',
  'tor',
  'catalogue',
  'allow',
  'to',
  'ports',
  'proto',
  'identity',
  'rules',
  'default',
  'members',
  'enabled',
  'updaters',
  'user',
  'group',
  'unit',
  'cgroup',
  'flatpak',
  'slice',
  'file',
  'names',
  'x',
  'a1',
);
const leaf = fc.oneof(
  fc.constantFrom(
    'allow',
    'deny',
    'any',
    'tcp',
    'udp',
    'icmp',
    '@l',
    '@nope',
    'catalogue:telemetry',
    '*.example.org',
    'example.org',
    '192.0.2.0/24',
    '192.0.2.1/24',
    '2001:db8::/32',
    '::1',
    'l.txt',
    'a.service',
    'alice',
    'x',
    '8000-8100',
    '443',
    '127.0.0.1:9050',
    '10/second',
    '',
  ),
  fc.integer({ min: -2, max: 70000 }),
  fc.boolean(),
  fc.constant(null),
  fc.string({ maxLength: 12 }),
);
const doc = fc.letrec((tie) => ({
  node: fc.oneof({ maxDepth: 5 }, leaf, fc.array(tie('node'), { maxLength: 4 }), fc.dictionary(word, tie('node'), { maxKeys: 4 })),
})).node;

describe('policy loader under arbitrary input (fast-check)', () => {
  it('random bytes: errors with locations, never a throw', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 2048 }), (bytes) => checkOutcome(bytes)),
      { numRuns: 400 },
    );
  });

  it('random text: errors with locations, never a throw', () => {
    fc.assert(
      fc.property(fc.string({ maxLength: 2048 }), (text) => checkOutcome(encoder.encode(text))),
      { numRuns: 400 },
    );
  });

  it('random documents in the policy vocabulary: a compiling Policy or located errors', () => {
    fc.assert(
      fc.property(fc.dictionary(word, doc, { maxKeys: 6 }), (value) => checkOutcome(encoder.encode(stringify(value)))),
      { numRuns: 600 },
    );
  });

  it('random well-formed policies compile, deterministically', () => {
    const dest = fc.constantFrom('example.org', '*.example.net', '@l', 'catalogue:telemetry', '192.0.2.0/24', '198.51.100.7', '2001:db8::/48', '2001:db8::5');
    const selector = fc.oneof(
      fc.record({ user: fc.constantFrom('alice', 'bob', 1001) }),
      fc.record({ group: fc.constantFrom('wheel', 20) }),
      fc.record({ unit: fc.constantFrom('a.service', 'b.service') }),
      fc.record({ cgroup: fc.constantFrom('system.slice/*.service', 'user.slice/user-*.slice') }),
      fc.record({ flatpak: fc.constantFrom('org.example.App', 'com.example.Other') }),
    );
    const rule = fc.record(
      {
        verdict: fc.constantFrom('allow', 'deny'),
        to: fc.oneof(fc.constant('any'), fc.uniqueArray(dest, { minLength: 1, maxLength: 4 })),
        ports: fc.option(fc.constantFrom([443], [80, '8000-8100'])),
        proto: fc.option(fc.constantFrom('tcp', 'udp', ['tcp', 'udp'])),
      },
      { requiredKeys: ['verdict', 'to'] },
    );
    const policy = fc.record({
      egress: fc.constantFrom('allow', 'deny'),
      apps: fc.uniqueArray(
        fc.record({
          name: fc.constantFrom('a', 'b', 'c', 'd'),
          identity: fc.array(selector, { minLength: 1, maxLength: 3 }),
          rules: fc.array(rule, { maxLength: 4 }),
          default: fc.constantFrom('allow', 'deny'),
        }),
        { selector: (a) => a.name, maxLength: 4 },
      ),
      deny: fc.array(fc.uniqueArray(dest, { minLength: 1, maxLength: 3 }), { maxLength: 3 }),
      domain: fc.option(fc.array(selector, { minLength: 1, maxLength: 2 })),
      tor: fc.boolean(),
    });
    const catalogue = { t: { software: 's', reports: 'r', category: 'telemetry', names: ['t.example.org'], source: 'https://example.org' } };
    let compiled = 0;
    fc.assert(
      fc.property(policy, (p) => {
        const value = {
          defaults: { egress: p.egress },
          lists: { l: { file: 'l.txt' } },
          catalogue,
          apps: Object.fromEntries(
            p.apps.map((a) => [
              a.name,
              {
                identity: a.identity,
                default: a.default,
                rules: a.rules.map((r) => ({ [r.verdict]: r.to, ...(r.ports ? { ports: r.ports } : {}), ...(r.proto ? { proto: r.proto } : {}) })),
              },
            ]),
          ),
          deny: p.deny.map((to) => ({ to })),
          ...(p.domain ? { systemDomains: { d: { members: p.domain } } } : {}),
          tor: { enabled: p.tor, updaters: [{ user: 'alice' }] },
        };
        const bytes = encoder.encode(stringify(value));
        const first = resolvePolicy([{ file: 'f.yaml', bytes }], lists);
        if (!first.ok) throw new Error(first.errors.map((e) => `${e.at.line}:${e.at.col} ${e.message}`).join('\n'));
        const second = resolvePolicy([{ file: 'f.yaml', bytes }], lists);
        const a = renderText(compile(first.policy, facts).ruleset);
        const b = second.ok ? renderText(compile(second.policy, facts).ruleset) : '';
        expect(a).toBe(b);
        compiled++;
      }),
      { numRuns: 300 },
    );
    expect(compiled).toBe(300);
  });

  it('pathological YAML (deep nesting, alias bombs) ends in errors, quickly', () => {
    const deep = `${'['.repeat(5000)}${']'.repeat(5000)}`;
    const bomb = [
      'a: &a ["x","x","x","x","x","x","x","x","x"]',
      ...Array.from(
        { length: 9 },
        (_, i) =>
          `${String.fromCharCode(98 + i)}: &${String.fromCharCode(98 + i)} [*${String.fromCharCode(97 + i)},*${String.fromCharCode(97 + i)},*${String.fromCharCode(97 + i)},*${String.fromCharCode(97 + i)},*${String.fromCharCode(97 + i)},*${String.fromCharCode(97 + i)},*${String.fromCharCode(97 + i)},*${String.fromCharCode(97 + i)},*${String.fromCharCode(97 + i)}]`,
      ),
    ].join('\n');
    for (const text of [deep, bomb]) {
      const started = performance.now();
      const result = resolvePolicy([{ file: 'f.yaml', bytes: encoder.encode(text) }], lists);
      expect(result.ok).toBe(false);
      expect(performance.now() - started).toBeLessThan(5_000);
    }
  });
});
