import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Facts } from '../compile/compile.js';

/** The cgroup2 root nft resolves `socket cgroupv2` paths against. */
export const CGROUP2_ROOT = '/sys/fs/cgroup';

/** Reads "name:x:id:..." databases (/etc/passwd, /etc/group) into name → id. */
export function parseIdDatabase(text: string): Map<string, number> {
  const ids = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (line.startsWith('#') || line.trim() === '') continue;
    const [name, , id] = line.split(':');
    if (name && id !== undefined && /^\d+$/.test(id) && !ids.has(name)) ids.set(name, Number(id));
  }
  return ids;
}

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

/** Gathers the machine facts the compiler needs; the only I/O on the compile path. */
export function gatherFacts(maxCgroupDepth: number, root = CGROUP2_ROOT): Facts {
  const read = (path: string): string => {
    try {
      return readFileSync(path, 'utf8');
    } catch {
      return '';
    }
  };
  return {
    users: parseIdDatabase(read('/etc/passwd')),
    groups: parseIdDatabase(read('/etc/group')),
    cgroups: listCgroups(root, maxCgroupDepth),
  };
}
