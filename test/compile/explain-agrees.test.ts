import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { compile } from '../../src/compile/compile.js';
import { explain, ROUTING_HEADER_NOTE, type Level } from '../../src/compile/explain.js';
import { appsWithOwnGlobalDeny, shortIdOf } from '../../src/compile/rule-ids.js';
import type { RuleDecl, Ruleset } from '../../src/compile/ruleset.js';
import { policyFrom } from '../support/compile-text.js';
import { arbConnection, packetFor } from '../support/connection.js';
import { arbDelegatedPolicy, arbPolicy, GEN_FACTS, type GeneratedPolicy } from '../support/policy-gen.js';
import { evaluate, type Outcome } from '../support/ruleset-interpreter.js';

/**
 * `explain` reads the policy; the kernel runs the compiled table. For random
 * policies and new connections given as `explain --app WHO --to ADDR:PORT/PROTO`
 * takes them, the two must give the same verdict.
 */

/**
 * The precedence level of the rule that decided, from the table's shape (the
 * chain, and where in it the rule stands), not from its comment: the level
 * explain names must be the one the kernel decided at.
 */
function levelOf(ruleset: Ruleset, outcome: Outcome, lockdown: boolean): Level {
  if (outcome.chain === 'uc_root_ids') {
    // A delegated cgroup's app let the packet out and no app by uid or gid had a say: it decided where it went on from.
    const from = outcome.via[outcome.path.indexOf('uc_root_ids') - 1]!;
    return levelAt(ruleset, from.chain, from.rule, lockdown);
  }
  return levelAt(ruleset, outcome.chain, outcome.rule, lockdown);
}

function levelAt(ruleset: Ruleset, chain: string, rule: RuleDecl | undefined, lockdown: boolean): Level {
  if (chain === 'loopback' || chain === 'loopback_dns') return 'loopback';
  if (chain.startsWith('sd_')) return 'system-domain';
  if (chain === 'dns_egress') return 'dns';
  if (chain === 'lockdown') return 'lockdown';
  if (chain === 'tor_updaters' || chain === 'uc_tor_updaters') return 'tor';
  if (chain === 'global_deny' || chain.startsWith('global_deny_app_') || chain.startsWith('log_g') || chain.startsWith('drop_g')) return 'global-deny';
  if (chain.startsWith('log_a_')) return 'app';
  if (rule === undefined) return 'default';
  const rules = ruleset.chains.find((c) => c.name === chain)!.rules;
  // Everything after the jump to the global deny list is the default's tail.
  const globalDenyAt = rules.findIndex((r) => r.expr.some((s) => 'jump' in s && s.jump.target.startsWith('global_deny')));
  if (rules.indexOf(rule) > globalDenyAt) return 'default';
  if (chain.startsWith('app_') || chain.startsWith('uc_app_')) return 'app';
  if (chain !== 'output') throw new Error(`no level for chain ${chain}`);
  const text = JSON.stringify(rule.expr);
  if (text.includes('"oif"')) return 'loopback';
  // The resolver's marked DNS packets, where dns.exclusive is off and they pass in the base chain.
  if (text.includes('{"meta":{"key":"mark"}}')) return 'dns';
  // Tor's own user: the exception in lockdown, or its own rule.
  if (text.includes('"skuid"')) return lockdown ? 'lockdown' : 'tor';
  throw new Error(`no level for ${text} in output`);
}

/**
 * Checks explain against the table for `runs` random policies from `policies`;
 * returns how often the table decided where (verdict and kind of chain).
 */
function agreeOver(policies: fc.Arbitrary<GeneratedPolicy>, runs: number): Map<string, number> {
  const decidedIn = new Map<string, number>();
  const count = (where: string) => decidedIn.set(where, (decidedIn.get(where) ?? 0) + 1);
  fc.assert(
    fc.property(policies, fc.array(arbConnection, { minLength: 1, maxLength: 8 }), (generated, connections) => {
      const policy = policyFrom(generated.yaml);
      const { ruleset, ruleIds } = compile(policy, GEN_FACTS, { lockdown: generated.lockdown });
      // Each asker also tries Tor's SOCKS port, which few random connections would hit.
      const { socks } = policy.tor;
      const toSocks = policy.tor.enabled ? connections.map((c) => ({ ...c, address: socks.address, port: socks.port, proto: 'tcp' as const })) : [];
      for (const c of [...connections, ...toSocks]) {
        const query = {
          who: c.who,
          host: c.address,
          ...(c.port !== undefined ? { port: c.port } : {}),
          proto: c.proto,
          ...(c.mark !== undefined ? { mark: c.mark } : {}),
        };
        const answer = explain(policy, query, GEN_FACTS, { lockdown: generated.lockdown });
        if ('error' in answer) throw new Error(answer.error);
        const packet = packetFor(c);
        const kernel = evaluate(ruleset, packet);
        // A routing header is dropped before anything else decides; explain answers for a packet without one, and says so for IPv6.
        const routed = evaluate(ruleset, { ...packet, routingHeader: 4 });
        if (packet.family === 6) expect(routed, JSON.stringify(c)).toMatchObject({ verdict: 'drop', chain: 'routing_header' });
        else expect(routed).toEqual(kernel);
        expect(answer.notes.includes(ROUTING_HEADER_NOTE), JSON.stringify(c)).toBe(answer.verdict === 'allow' && packet.family === 6);
        count(`${kernel.verdict} ${kernel.chain.replace(/_.*/, '')}`);
        // A delegated cgroup's app let it out, and its user's or group's app decided.
        if (kernel.path.includes('uc_root_ids') && kernel.chain !== 'uc_root_ids') count(`${kernel.verdict} past uc_root_ids`);
        const said = answer.verdict === 'allow' ? 'accept' : 'drop';
        expect(
          `${said} ${answer.level}`,
          `${JSON.stringify(c)}: explain says ${answer.ruleId} (${answer.steps.join('; ')}); the table ${kernel.verdict}s at ${kernel.chain}: ${kernel.rule?.comment ?? 'chain policy'} (via ${kernel.path.join(' → ')})`,
        ).toBe(`${kernel.verdict} ${levelOf(ruleset, kernel, generated.lockdown)}`);
        // A global rule's drop carries the short id explain names: in the chain of an app chosen by cgroup, its copy's, whose row names the app.
        if (answer.level === 'global-deny') {
          const carried = kernel.rule?.comment?.split(' ')[0];
          expect(carried, JSON.stringify(c)).toBe(shortIdOf(ruleIds, answer));
          expect(ruleIds.find((entry) => entry.id === carried)?.app, JSON.stringify(c)).toBe(
            answer.app !== undefined && appsWithOwnGlobalDeny(policy).some((app) => app.name === answer.app) ? answer.app : undefined,
          );
        }
      }
    }),
    { numRuns: runs },
  );
  return decidedIn;
}

describe('explain agrees with the compiled table', () => {
  // Where the table decided, by kind of chain: the runs must reach every level, or agreement proves little.
  it('for random policies and new connections, explain and the ruleset give the same verdict, decided at the same level of precedence', () => {
    const decidedIn = agreeOver(arbPolicy, 400);
    const reached = [...decidedIn.keys()].sort();
    for (const where of [
      'accept output',
      'drop output',
      'accept app',
      'drop app',
      'drop log',
      'drop global',
      'drop sd',
      'drop lockdown',
      'accept tor',
      'drop tor',
      'accept dns',
      'drop dns',
    ])
      expect(reached, JSON.stringify(Object.fromEntries(decidedIn))).toContain(where);
  });

  it("where a delegated cgroup's app and its user's or group's app meet, they agree too: deny wins", () => {
    const decidedIn = agreeOver(arbDelegatedPolicy, 300);
    const reached = [...decidedIn.keys()].sort();
    for (const where of ['accept uc', 'drop uc', 'accept past uc_root_ids', 'drop past uc_root_ids', 'accept tor', 'drop tor'])
      expect(reached, JSON.stringify(Object.fromEntries(decidedIn))).toContain(where);
  });
});
