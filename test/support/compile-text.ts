import { compile, type Compiled, type Facts } from '../../src/compile/compile.js';
import { resolvePolicy } from '../../src/policy/resolve.js';
import type { Policy } from '../../src/policy/model.js';

const encoder = new TextEncoder();

export const FACTS: Facts = {
  users: new Map([
    ['alice', 1000],
    ['vault', 990],
    ['_apt', 42],
    ['debian-tor', 110],
  ]),
  groups: new Map([['wheel', 10]]),
  cgroups: ['system.slice', 'system.slice/a.service', 'system.slice/b.service', 'system.slice/gpg.service'],
};

/** A policy from YAML text held in the test (one file, f.yaml; list files from `lists`). */
export function policyFrom(yaml: string, lists: Record<string, string> = {}): Policy {
  const result = resolvePolicy([{ file: 'f.yaml', bytes: encoder.encode(yaml) }], (path) =>
    path in lists ? { bytes: encoder.encode(lists[path]) } : { error: 'ENOENT' },
  );
  if (!result.ok) throw new Error(result.errors.map((e) => `${e.at.line}:${e.at.col} ${e.message}`).join('\n'));
  return result.policy;
}

export function compileYaml(yaml: string, options: { lockdown?: boolean; facts?: Facts } = {}): Compiled {
  return compile(policyFrom(yaml), options.facts ?? FACTS, { lockdown: options.lockdown ?? false });
}
