import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import type { Facts, FactsNeeded, IdLookup } from '../compile/compile.js';
import { nssLookup, type NameLookup } from './nss.js';

/** The cgroup2 root nft resolves `socket cgroupv2` paths against. */
export const CGROUP2_ROOT = '/sys/fs/cgroup';

/**
 * Lists cgroup paths (relative to the cgroup2 root) down to `maxDepth`. Only
 * a cgroup2 hierarchy counts: on a v1 machine nothing can be matched by
 * `socket cgroupv2`, and the list is empty.
 */
export function listCgroups(root: string, maxDepth: number): string[] {
  if (maxDepth < 1 || !existsSync(join(root, 'cgroup.controllers'))) return [];
  const found: string[] = [];
  const walk = (relative: string, depth: number): void => {
    let entries;
    try {
      entries = readdirSync(join(root, relative), { withFileTypes: true });
    } catch {
      return; // a cgroup that vanished while we walked
    }
    for (const entry of entries) {
      if (!entry.isDirectory()) continue;
      const path = relative ? `${relative}/${entry.name}` : entry.name;
      found.push(path);
      if (depth < maxDepth) walk(path, depth + 1);
    }
  };
  walk('', 1);
  return found.sort();
}

/**
 * Gathers the machine facts the compiler needs; the only I/O on the compile
 * path. Users and groups are looked up through NSS, only the names `needed`.
 */
export function gatherFacts(needed: FactsNeeded, lookup?: NameLookup, root = CGROUP2_ROOT): Facts {
  // Bound on first use: a policy without user or group names loads no FFI.
  let look = lookup;
  const resolve = (kind: 'user' | 'group', names: readonly string[]): Map<string, IdLookup> => {
    const ids = new Map<string, IdLookup>();
    for (const name of names) {
      look ??= nssLookup();
      const found = look(kind, name);
      if (found !== undefined) ids.set(name, found);
    }
    return ids;
  };
  return {
    users: resolve('user', needed.users),
    groups: resolve('group', needed.groups),
    cgroups: listCgroups(root, needed.cgroupDepth),
  };
}
