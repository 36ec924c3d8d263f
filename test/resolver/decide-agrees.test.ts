import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { compile } from '../../src/compile/compile.js';
import { explain, type Explanation } from '../../src/compile/explain.js';
import type { Protocol, Rule } from '../../src/policy/model.js';
import { buildDecider, CANARY, explainWho } from '../../src/resolver/decide.js';
import type { Who } from '../../src/resolver/who.js';
import { policyFrom } from '../support/compile-text.js';
import { GEN_CGROUPS, GEN_FACTS, policyDocument, selectors } from '../support/policy-gen.js';

/**
 * The resolver's decisions and `explain --app WHO --to NAME` read the same
 * policy: for random policies written with names, askers and CNAME chains,
 * they must agree, where they legitimately differ in one known way each:
 *
 * - explain answers for a connection; the resolver for a name, whatever port
 *   the program then connects to. An app rule that allows the name on some
 *   ports or protocols only is skipped by explain asked without a port, but
 *   gives the resolver's true answer: the identity may reach the name there.
 *   So "denied by name" is: explain, asked without a port, denies by a rule
 *   naming the name, at the app or global-deny level, and explain asked
 *   with any port and protocol denies it too.
 * - A deny of every destination (`deny: any`) or a default deny is not a
 *   denial by name: the table drops the connection, the answer is true.
 * - The global deny list here never holds `deny: any`: explain names the
 *   first matching global rule only, while a name any global rule names is
 *   denied by name whatever comes before it.
 *
 * admit answers a name denied by name at once, not asking upstream, unless
 * a rule of the policy spells the name out (itself, or as a suffix's apex):
 * only then are its labels not the asker's to choose.
 */

const NAMES = ['example.org', 'api.example.org', 'www.example.org', 'tracker.test', 'ads.test', 'x.ads.test', 'other.test'] as const;
const destination = fc.constantFrom(
  'example.org',
  '*.example.org',
  'api.example.org',
  'tracker.test',
  '*.ads.test',
  'x.ads.test',
  '192.0.2.0/24',
  '2001:db8::/48',
);
const limits = fc.record({
  ports: fc.constantFrom(undefined, [443], [53, '8000-8100']),
  proto: fc.constantFrom<undefined | string | string[]>(undefined, undefined, 'tcp', 'udp', 'icmp', ['tcp', 'udp']),
});
const limited = (l: { ports: unknown; proto: unknown }) =>
  l.ports && (l.proto === 'icmp' || (Array.isArray(l.proto) && l.proto.includes('icmp'))) ? { ...l, ports: undefined } : l;
const appRule = fc
  .tuple(
    fc.constantFrom('allow', 'deny'),
    fc.oneof({ weight: 1, arbitrary: fc.constant('any') }, { weight: 4, arbitrary: fc.uniqueArray(destination, { minLength: 1, maxLength: 3 }) }),
    limits,
  )
  .map(([verdict, to, l]) => defined({ [verdict]: to, ...limited(l) }));
const denyRule = fc.tuple(fc.uniqueArray(destination, { minLength: 1, maxLength: 3 }), limits).map(([to, l]) => ({ to, ...limited(l), log: undefined }));

const arbNamePolicy = fc
  .record({
    egress: fc.constantFrom('allow', 'deny'),
    apps: fc.array(fc.record({ identity: selectors, default: fc.constantFrom(undefined, 'allow', 'deny'), rules: fc.array(appRule, { maxLength: 4 }) }), {
      maxLength: 3,
    }),
    deny: fc.array(denyRule, { maxLength: 3 }),
    // Members of either are refused whatever they ask: a quarter of the policies have them, so that the rest reach the names.
    domains: fc.oneof({ weight: 3, arbitrary: fc.constant([]) }, { weight: 1, arbitrary: fc.array(selectors, { minLength: 1, maxLength: 1 }) }),
    tor: fc.oneof(
      { weight: 3, arbitrary: fc.constant(undefined) },
      {
        weight: 1,
        arbitrary: fc.record({ socks: fc.constantFrom(undefined, '192.0.2.50:9050'), updaters: selectors, user: fc.constantFrom(undefined, 4242) }),
      },
    ),
    dns: fc.constant(undefined),
    lockdown: fc.constant(false),
  })
  .map(policyDocument);

const arbWho: fc.Arbitrary<Who> = fc
  .record({
    uid: fc.constantFrom(1000, 4242, 990, 110, 42, 5555, 100005, 165200, 200999, 65534),
    cgroup: fc.constantFrom(
      undefined,
      '',
      ...GEN_CGROUPS,
      'system.slice/a.service/worker',
      'user.slice/user-1000.slice/user@1000.service/app.slice/app-firefox-1.scope/sub',
    ),
    gid: fc.constantFrom(undefined, 10, 77),
  })
  .map(({ uid, cgroup, gid }) => ({ uid, ...(cgroup !== undefined ? { cgroup } : {}), ...(cgroup && gid !== undefined ? { gid } : {}) }));

/** A connection in every piece the generated rules' limits cut the ports and protocols into (443, 53, 8000-8100, others; tcp, udp, icmp). */
const CONNECTIONS: readonly { port?: number; proto: Protocol }[] = [
  ...(['tcp', 'udp'] as const).flatMap((proto) => [443, 53, 8000, 9].map((port) => ({ port, proto }))),
  { proto: 'icmp' },
];

describe('the resolver decides as explain explains', () => {
  it('for random policies with names, askers and CNAME chains: REFUSED, the canary, and names denied by name agree with explain', () => {
    const seen = new Map<string, number>();
    const count = (what: string) => seen.set(what, (seen.get(what) ?? 0) + 1);
    fc.assert(
      fc.property(
        arbNamePolicy,
        fc.array(fc.tuple(arbWho, fc.array(fc.constantFrom(...NAMES), { minLength: 1, maxLength: 3 })), { minLength: 4, maxLength: 10 }),
        (generated, asks) => {
          const policy = policyFrom(generated.yaml);
          const { dnsBindings } = compile(policy, GEN_FACTS, {});
          const decide = buildDecider(policy, dnsBindings, GEN_FACTS, { deniedAnswer: 'nxdomain' });
          const rules = new Map<string, Rule>([...policy.apps.flatMap((a) => a.rules), ...policy.globalDeny].map((r) => [r.id, r]));
          const spelledOut = new Set([...rules.values()].flatMap((r) => [...r.to.names, ...r.to.suffixes]));
          for (const [who, chain] of asks) {
            const asked = explainWho(who);
            const ask = (host: string, c: { port?: number; proto?: Protocol } = {}): Explanation => {
              const answer = explain(policy, { who: asked, host, ...c }, GEN_FACTS);
              if ('error' in answer) throw new Error(answer.error);
              return answer;
            };
            const context = `${JSON.stringify(who)} asks ${chain.join(' → ')}`;
            const first = ask(chain[0]!);
            const refused = first.level === 'system-domain' || first.ruleId === 'tor/updaters';
            expect(decide.admit(who, { name: CANARY, type: 'A' })).toBe(refused ? 'refused' : 'nxdomain');
            if (refused) {
              expect(decide.admit(who, { name: chain[0]!, type: 'A' }), `${context}: explain ${first.ruleId} (${first.steps.join('; ')})`).toBe('refused');
              count('refused');
              continue;
            }
            const denied = chain.map((name) => {
              const e = ask(name);
              const rule = rules.get(e.ruleId);
              const byName = e.verdict === 'deny' && (e.level === 'app' || e.level === 'global-deny') && rule !== undefined && !rule.to.any;
              const allowedSomewhere = CONNECTIONS.some((c) => ask(name, c).verdict === 'allow');
              const why = `${context}: ${name}: explain ${e.verdict} ${e.level} ${e.ruleId} (${e.steps.join('; ')}); allowed on some port: ${allowedSomewhere}`;
              const mine = decide.shape(who, { name, type: 'A' }, [name]);
              expect(mine, why).toBe(byName && !allowedSomewhere ? 'nxdomain' : 'answer');
              const spelled = spelledOut.has(name);
              expect(decide.admit(who, { name, type: 'A' }), `${why}; spelled out: ${spelled}`).toBe(mine === 'nxdomain' && !spelled ? 'nxdomain' : 'go');
              count(mine === 'nxdomain' ? `nxdomain ${e.level}` : byName ? 'answer: allowed on some port' : `answer ${e.verdict} ${e.level}`);
              if (mine === 'nxdomain') count(spelled ? 'asked: spelled out' : 'answered at admit');
              return mine === 'nxdomain';
            });
            // A chain is denied when any of its names is.
            expect(decide.shape(who, { name: chain[0]!, type: 'A' }, chain), context).toBe(denied.some(Boolean) ? 'nxdomain' : 'answer');
          }
        },
      ),
      { numRuns: 300 },
    );
    // The runs must reach every kind of outcome, or agreement proves little.
    for (const what of [
      'refused',
      'nxdomain app',
      'nxdomain global-deny',
      'answer: allowed on some port',
      'answer allow app',
      'answer deny default',
      'answer allow tor',
      'answered at admit',
      'asked: spelled out',
    ])
      expect([...seen.keys()], JSON.stringify(Object.fromEntries(seen))).toContain(what);
  });
});

function defined(record: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(Object.entries(record).filter(([, value]) => value !== undefined));
}
