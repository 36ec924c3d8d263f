import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { compile } from '../../src/compile/compile.js';
import type { Ruleset, Verdict } from '../../src/compile/ruleset.js';
import { policyFrom } from '../support/compile-text.js';
import { arbConnection, packetFor } from '../support/connection.js';
import { arbDelegatedPolicy, arbPolicy, GEN_FACTS, type GeneratedPolicy } from '../support/policy-gen.js';
import { evaluate, type Packet, type TcpFlag } from '../support/ruleset-interpreter.js';

/**
 * A packet without an owner on an app's connection (sent after close()) is
 * replayed through that app's own rules where the global deny list would
 * drop it (compile.ts, ownerlessReplay). For random policies, destinations
 * and TCP flags, the table must decide such a packet exactly as: a TCP
 * packet without SYN that the app's own chain, asked with an owner, accepts
 * at one of its rules before the list — accepted; anything else as the
 * table without the replay decides (the list's drop, or as before).
 */

/** What a closed socket sends, and what it must not get past the list with: SYN, and a SYN-ACK sent with SYN cookies. */
const arbSent = fc.record({
  tcpFlags: fc.constantFrom<readonly TcpFlag[]>(['ack'], ['fin', 'ack'], ['rst'], ['psh', 'ack'], ['syn'], ['syn', 'ack']),
  ctDirection: fc.constantFrom('original' as const, 'reply' as const),
});

/** The table as it was before the replay: no rule asks the map. */
function withoutReplay(ruleset: Ruleset): Ruleset {
  return { ...ruleset, chains: ruleset.chains.map((c) => ({ ...c, rules: c.rules.filter((r) => !JSON.stringify(r.expr).includes('@ownerless_tags')) })) };
}

/** Addresses of the sets the rules of `chain` look destinations up in: where its rules, replayed, have something to say. */
function addressesLookedUp(ruleset: Ruleset, chain: string): string[] {
  const sets = new Map(ruleset.sets.map((set) => [set.name, set]));
  const rules = ruleset.chains.find((c) => c.name === chain)!.rules;
  return rules.flatMap((r) =>
    r.expr.flatMap((s) => {
      if (!('match' in s) || typeof s.match.right !== 'string' || !s.match.right.startsWith('@') || !JSON.stringify(s.match.left).includes('"daddr"'))
        return [];
      return (sets.get(s.match.right.slice(1))?.elements ?? []).flatMap((e) =>
        typeof e === 'string' ? [e] : typeof e === 'object' && 'prefix' in e ? [e.prefix.addr] : [],
      );
    }),
  );
}

/** The table entered at `chain`, as a packet dispatched to it would be. */
function enteredAt(ruleset: Ruleset, chain: string): Ruleset {
  return { ...ruleset, chains: ruleset.chains.map((c) => (c.hook ? { ...c, rules: [{ expr: [{ goto: { target: chain } }] }] } : c)) };
}

function check(arb: fc.Arbitrary<GeneratedPolicy>): { compared: number; replayed: number } {
  let compared = 0;
  let replayed = 0;
  fc.assert(
    fc.property(arb, fc.array(fc.tuple(arbConnection, arbSent), { minLength: 1, maxLength: 8 }), (generated, connections) => {
      // Lockdown drops everything before any app is asked: nothing to replay.
      const { ruleset } = compile(policyFrom(generated.yaml), GEN_FACTS, { lockdown: false });
      const map = ruleset.sets.find((s) => s.name === 'ownerless_tags');
      if (!map) return;
      const before = withoutReplay(ruleset);
      map.elements.forEach((bits, i) => {
        const target = (map.verdicts![i] as Extract<Verdict, { jump: unknown }>).jump.target;
        const app = target.replace(/^ownerless_app_/, '');
        const chain = ruleset.chains.find((c) => c.name === `app_${app}`)!.rules;
        const listAt = chain.findIndex((r) => r.expr.some((s) => 'jump' in s && s.jump.target.startsWith('global_deny')));
        // Random destinations, and those the app's own rules name (random ones seldom meet both its allow and the list).
        const named = addressesLookedUp(ruleset, target).slice(0, 4);
        const asked = connections.flatMap(([connection, sent]) => {
          const { skuid: _uid, skgid: _gid, ...rest } = packetFor(connection);
          const tcp = { ...rest, l4proto: 'tcp' as const, dport: rest.dport ?? 443 };
          return [rest, ...named.map((daddr) => ({ ...tcp, daddr, family: daddr.includes(':') ? (6 as const) : (4 as const) }))].map(
            (packet) => [packet, sent] as const,
          );
        });
        for (const [rest, sent] of asked) {
          const ownerless: Packet = { ...rest, ...sent, cgroup: '', ct: 'established', ctMark: bits as number };
          const replayable = ownerless.l4proto === 'tcp' && !sent.tcpFlags.includes('syn');
          const owned = evaluate(enteredAt(ruleset, `app_${app}`), { ...ownerless, skuid: 4242, skgid: 4242 });
          const ownRuleAccepts = owned.verdict === 'accept' && owned.chain === `app_${app}` && chain.indexOf(owned.rule!) < listAt;
          const old = evaluate(before, ownerless);
          const listDrops = old.verdict === 'drop' && /^(log_g|drop_g)\d+$/.test(old.chain);
          const actual = evaluate(ruleset, ownerless);
          const context = `${generated.yaml}\napp ${app}, ${JSON.stringify(ownerless)}: old ${old.verdict} at ${old.chain}, owned ${owned.verdict} at ${owned.chain}`;
          expect(actual.verdict, context).toBe(listDrops && ownRuleAccepts && replayable ? 'accept' : old.verdict);
          compared++;
          if (actual.chain === target) replayed++;
        }
      });
    }),
    { numRuns: 600 },
  );
  return { compared, replayed };
}

describe("a closed socket's packets on an app's connection meet its own rules where the global deny list would drop them", () => {
  it('for random policies and destinations, the table decides as the app with an owner would before the list, and as before elsewhere', () => {
    const counts = check(arbPolicy);
    // The property was asked, and replay decided some of them: a generator that never reached it would pass for nothing.
    expect(counts.compared).toBeGreaterThan(200);
    expect(counts.replayed).toBeGreaterThan(10);
  });

  it('also for policies with delegated cgroups', () => {
    const counts = check(arbDelegatedPolicy);
    expect(counts.compared).toBeGreaterThan(50);
    expect(counts.replayed).toBeGreaterThan(10);
  });
});
