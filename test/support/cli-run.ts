import { main } from '../../src/cli/egressctl.js';
import type { Deps } from '../../src/cli/deps.js';
import { FACTS } from './compile-text.js';

/**
 * Runs egressctl in-process with output captured; only the I/O is faked,
 * the commands run for real. These commands never reach the kernel (the
 * enforcement commands are tested in network namespaces); `extra` adds or
 * replaces a dependency, e.g. a capability probe.
 */
export async function runEgressctl(argv: readonly string[], extra: Partial<Deps> = {}): Promise<{ code: number; out: string; err: string }> {
  const out: string[] = [];
  const err: string[] = [];
  const deps: Deps = {
    out: (t) => out.push(t),
    err: (t) => err.push(t),
    facts: () => FACTS,
    nft: () => Promise.reject(new Error('no nft in this test')),
    stateDir: '/nonexistent',
    audit: () => undefined,
    ...extra,
  };
  const code = await main([...argv], deps);
  return { code, out: out.join('\n'), err: err.join('\n') };
}
