import { existsSync, lstatSync, readdirSync, type Dirent } from 'node:fs';
import { join } from 'node:path';
import { nftCanName, type Facts, type FactsNeeded, type IdLookup, type UnnamedCgroup } from '../compile/compile.js';
import { nssLookup, type NameLookup } from './nss.js';

/** The cgroup2 root nft resolves `socket cgroupv2` paths against. */
export const CGROUP2_ROOT = '/sys/fs/cgroup';

/** What the walk found: paths nft can name, and those it cannot, and who owns the named ones (`Facts`). */
export interface CgroupsFound {
  readonly named: string[];
  readonly unnamed: UnnamedCgroup[];
  /** The named paths whose directory a non-root uid owns, with that uid: delegated to it (`Facts.cgroupOwners`). */
  readonly owners: Map<string, number>;
}

/**
 * Lists cgroup paths (relative to the cgroup2 root) down to `maxDepth`. Only
 * a cgroup2 hierarchy counts: on a v1 machine nothing can be matched by
 * `socket cgroupv2`, and the list is empty.
 *
 * Names are read as bytes: a user names the cgroups of its own subtree, and
 * any byte but "/" and NUL is allowed. Read as strings, a name that is not
 * UTF-8 came back with U+FFFD in it, a path that does not exist, and nft
 * refused every apply for it. Such a path, and every path below it, is
 * returned apart with its nearest ancestor that nft can name, for the
 * compiler to leave out or cut off (see `Compiler.claim`).
 *
 * Each named cgroup's owner is read too (one lstat each): systemd hands a
 * subtree to a user (`user@UID.service`, a unit with `Delegate=yes` and
 * `User=`) by chowning its directories, and the user chowns nothing back:
 * what a user makes there is its own. Owner, not path shape: a path says
 * nothing of who made it. A cgroup that vanished before its lstat is left
 * out (nft could not resolve it either).
 *
 * What bounds the walk: its depth is the deepest level a selector of the
 * policy names (a glob matches at one depth only), so cgroups a user nests
 * deeper are never read; its breadth is what the kernel lets users create
 * (`cgroup.max.descendants`), each directory read once, its entries stat-free.
 */
export function listCgroups(root: string, maxDepth: number): CgroupsFound {
  const found: CgroupsFound = { named: [], unnamed: [], owners: new Map() };
  if (maxDepth < 1 || !existsSync(join(root, 'cgroup.controllers'))) return found;
  const rootBytes = Buffer.from(root);
  // `named` is the nearest ancestor nft can name ('' for none); `lost`, when set, is the first segment it cannot.
  const walk = (relative: Buffer, depth: number, named: string, lost: boolean): void => {
    let entries: Dirent<Buffer>[];
    try {
      entries = readdirSync(relative.length === 0 ? rootBytes : Buffer.concat([rootBytes, SLASH, relative]), { withFileTypes: true, encoding: 'buffer' });
    } catch {
      return; // a cgroup that vanished while we walked
    }
    for (const entry of entries) {
      if (!entry.isDirectory()) continue;
      const path = relative.length === 0 ? entry.name : Buffer.concat([relative, SLASH, entry.name]);
      const text = utf8(path);
      const nameable = !lost && text !== undefined && nftCanName(text);
      if (nameable) {
        const owner = ownerOf(Buffer.concat([rootBytes, SLASH, path]));
        if (owner === undefined) continue;
        found.named.push(text);
        if (owner !== 0) found.owners.set(text, owner);
      } else found.unnamed.push({ path: path.toString('utf8'), shown: showBytes(path), namedAncestor: named });
      if (depth < maxDepth) walk(path, depth + 1, nameable ? text : named, !nameable);
    }
  };
  walk(Buffer.alloc(0), 1, '', false);
  found.named.sort();
  found.unnamed.sort((a, b) => (a.shown < b.shown ? -1 : a.shown > b.shown ? 1 : 0));
  return found;
}

const SLASH = Buffer.from('/');

function ownerOf(path: Buffer): number | undefined {
  try {
    return lstatSync(path).uid;
  } catch {
    return undefined;
  }
}

/** The bytes as a string when they are UTF-8, else undefined. */
function utf8(bytes: Buffer): string | undefined {
  try {
    return new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(bytes);
  } catch {
    return undefined;
  }
}

/**
 * A path for people, quoted: what is UTF-8 and printable as itself, other
 * bytes (not UTF-8, control characters) as \xNN, so a warning names the
 * cgroup exactly and cannot be made to print something else.
 */
export function showBytes(bytes: Buffer): string {
  let shown = '';
  let i = 0;
  while (i < bytes.length) {
    const byte = bytes[i]!;
    const length = byte >= 0xf0 ? 4 : byte >= 0xe0 ? 3 : byte >= 0xc0 ? 2 : 1;
    const char = byte >= 0x80 ? utf8(bytes.subarray(i, i + length)) : String.fromCharCode(byte);
    // eslint-disable-next-line no-control-regex -- control characters are what is escaped
    if (char === undefined || /^[\u0000-\u001f\u007f-\u009f]$/.test(char)) {
      shown += `\\x${byte.toString(16).padStart(2, '0')}`;
      i += 1;
      continue;
    }
    shown += char === '"' || char === '\\' ? `\\${char}` : char;
    i += byte >= 0x80 ? length : 1;
  }
  return `"${shown}"`;
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
  const cgroups = listCgroups(root, needed.cgroupDepth);
  return {
    users: resolve('user', needed.users),
    groups: resolve('group', needed.groups),
    cgroups: cgroups.named,
    unnamedCgroups: cgroups.unnamed,
    cgroupOwners: cgroups.owners,
  };
}
