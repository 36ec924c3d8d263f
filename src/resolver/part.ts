/**
 * The resolver as one of egressd's parts (src/daemon/part.ts): started once a
 * table is enforced, handed every later policy, closed when egressd stops.
 * It answers `PartContext.learnedNames` from its address memory, so the
 * denial log and the D-Bus service name an address by the names it was
 * learned from.
 *
 * Its sockets are its own: when it cannot start (the port is taken, no
 * upstream) or an update leaves it not listening, the daemon restarts it
 * with back-off, and every rule with an address, and every set element
 * learned so far, holds meanwhile.
 */
import type { Part, PartSpec } from '../daemon/part.js';
import { startResolverRuntime, type ResolverRuntimeOptions } from './runtime.js';

export const RESOLVER_PART = 'resolver';

/** `options`: what the runtime takes beyond the context's nft, log and state dir (tests: another port, no control socket). */
export function resolverPart(options: Partial<Omit<ResolverRuntimeOptions, 'nft' | 'log' | 'stateDir'>> = {}): PartSpec {
  return {
    name: RESOLVER_PART,
    async start(inForce, context): Promise<Part> {
      const runtime = await startResolverRuntime(inForce, { ...options, nft: context.nft, log: context.log, stateDir: context.stateDir });
      return {
        update: (next) => runtime.update(next),
        close: () => runtime.close(),
        // The runtime has no life apart from its sockets, whose errors it logs and answers through; it ends only when closed.
        stopped: new Promise<never>(() => undefined),
        describe: () => `resolver on ${[...new Set(runtime.resolver.addresses.map((a) => a.address))].join(', ')}`,
        learnedNames: (address, uid) => runtime.learnedNames(address, uid),
      };
    },
  };
}
