import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { compile } from '../../src/compile/compile.js';
import { explain } from '../../src/compile/explain.js';
import { policyFrom } from '../support/compile-text.js';
import { arbConnection, packetFor } from '../support/connection.js';
import { arbPolicy, GEN_FACTS } from '../support/policy-gen.js';
import { evaluate } from '../support/ruleset-interpreter.js';

/**
 * `explain` reads the policy; the kernel runs the compiled table. For random
 * policies and new connections given as `explain --app WHO --to ADDR:PORT/PROTO`
 * takes them, the two must give the same verdict.
 */

describe('explain agrees with the compiled table', () => {
  it('for random policies and new connections, explain and the ruleset give the same verdict', () => {
    // Where the table decided, by kind of chain: the runs must reach every level, or agreement proves little.
    const decidedIn = new Map<string, number>();
    fc.assert(
      fc.property(arbPolicy, fc.array(arbConnection, { minLength: 1, maxLength: 8 }), (generated, connections) => {
        const policy = policyFrom(generated.yaml);
        const { ruleset } = compile(policy, GEN_FACTS, { lockdown: generated.lockdown });
        // Each asker also tries Tor's SOCKS port, which few random connections would hit.
        const { socks } = policy.tor;
        const toSocks = policy.tor.enabled ? connections.map((c) => ({ ...c, address: socks.address, port: socks.port, proto: 'tcp' as const })) : [];
        for (const c of [...connections, ...toSocks]) {
          const answer = explain(policy, { who: c.who, host: c.address, ...(c.port !== undefined ? { port: c.port } : {}), proto: c.proto }, GEN_FACTS, { lockdown: generated.lockdown });
          if ('error' in answer) throw new Error(answer.error);
          const kernel = evaluate(ruleset, packetFor(c));
          const where = `${kernel.verdict} ${kernel.chain.replace(/_.*/, '')}`;
          decidedIn.set(where, (decidedIn.get(where) ?? 0) + 1);
          const said = answer.verdict === 'allow' ? 'accept' : 'drop';
          expect(said, `${JSON.stringify(c)}: explain says ${answer.ruleId} (${answer.steps.join('; ')}); the table ${kernel.verdict}s at ${kernel.chain}: ${kernel.rule?.comment ?? 'chain policy'} (via ${kernel.path.join(' → ')})`).toBe(kernel.verdict);
        }
      }),
      { numRuns: 400 },
    );
    const reached = [...decidedIn.keys()].sort();
    for (const where of ['accept output', 'drop output', 'accept app', 'drop app', 'drop log', 'drop global', 'drop sd', 'drop lockdown', 'accept tor', 'drop tor']) expect(reached, JSON.stringify(Object.fromEntries(decidedIn))).toContain(where);
  });
});
