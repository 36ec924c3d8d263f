import { existsSync, lstatSync, readdirSync, readFileSync, type Dirent } from 'node:fs';
import { join } from 'node:path';
import { nftCanName, type Facts, type FactsNeeded, type IdLookup, type IdRange, type SubordinateIds, type UnnamedCgroup } from '../compile/compile.js';
import type { PolicyIssue } from '../policy/issues.js';
import { nssAccounts, nssLookup, type Accounts, type NameLookup } from './nss.js';
import { linesOf, parseSubordinate, type SubordinateFile } from './subordinate.js';

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

/** Where the facts about users and groups are read from besides NSS; tests point them elsewhere. */
export interface AccountFiles {
  readonly subuid: string;
  readonly subgid: string;
  readonly nsswitch: string;
}

export const ACCOUNT_FILES: AccountFiles = { subuid: '/etc/subuid', subgid: '/etc/subgid', nsswitch: '/etc/nsswitch.conf' };

/**
 * The files whose change changes what a compiled table holds for users and
 * groups: a user or group added, a member added, a subordinate range given,
 * a name service switched. The table holds ids, not names, so whoever keeps
 * it current (the daemon) compiles and applies again when one changes. A
 * name service that is not files (LDAP, sssd) changes without any of them.
 */
export function accountFilesToWatch(files: AccountFiles = ACCOUNT_FILES): string[] {
  return ['/etc/passwd', '/etc/group', files.subuid, files.subgid, files.nsswitch];
}

/** What `gatherFacts` reads through; each defaults to the machine's own. */
export interface FactSources {
  readonly lookup?: NameLookup;
  readonly accounts?: Accounts;
  readonly files?: AccountFiles;
  readonly cgroupRoot?: string;
  readonly syncookiesFile?: string;
}

/**
 * Gathers the machine facts the compiler needs; the only I/O on the compile
 * path. Users and groups are looked up through NSS, only the names `needed`;
 * then the members of those groups, and the subordinate ranges of those
 * users and of those members.
 */
export function gatherFacts(needed: FactsNeeded, sources: FactSources = {}): Facts {
  // Bound on first use: a policy without user or group names loads no FFI.
  let accounts = sources.accounts;
  const account = (): Accounts => (accounts ??= nssAccounts());
  // Names looked up through the same binding the members and ranges are read with: libc is bound once.
  let look = sources.lookup;
  const lookup: NameLookup = (kind, name) => (look ??= nssLookup(account()))(kind, name);
  const resolve = (kind: 'user' | 'group', names: readonly string[]): Map<string, IdLookup> => {
    const ids = new Map<string, IdLookup>();
    for (const name of names) {
      const found = lookup(kind, name);
      if (found !== undefined) ids.set(name, found);
    }
    return ids;
  };
  const cgroups = listCgroups(sources.cgroupRoot ?? CGROUP2_ROOT, needed.cgroupDepth);
  const users = resolve('user', needed.users);
  const groups = resolve('group', needed.groups);
  const files = sources.files ?? ACCOUNT_FILES;
  const warnings: PolicyIssue[] = [];
  const uids = idsOf(users, needed.userIds);
  const gids = idsOf(groups, needed.groupIds);
  const facts: Facts = {
    users,
    groups,
    cgroups: cgroups.named,
    unnamedCgroups: cgroups.unnamed,
    cgroupOwners: cgroups.owners,
    ...(needed.tcpSyncookies ? definedSyncookies(sources.syncookiesFile ?? SYNCOOKIES_FILE) : {}),
  };
  if (uids.length === 0 && gids.length === 0) return facts;
  const members = groupMembers(groups, gids, account, lookup);
  // A member's rootless container sends with the member's subordinate ids: the group holds them too.
  const memberUids = [...members.values()].flatMap((found) => ('error' in found ? [] : found));
  return {
    ...facts,
    subordinate: subordinateIds([...new Set([...uids, ...memberUids])], files, lookup, warnings),
    members,
    ...(gids.length > 0 ? definedIncomplete(readNsswitch(files.nsswitch)) : {}),
    warnings,
  };
}

/** The network namespace's own: /proc/sys/net is the reading process's namespace, which is where the table is applied. */
const SYNCOOKIES_FILE = '/proc/sys/net/ipv4/tcp_syncookies';

/** `net.ipv4.tcp_syncookies`, for a warning only: a kernel without the file (no IPv4) leaves it out. */
function definedSyncookies(file: string): { tcpSyncookies?: number } {
  try {
    const value = Number(readFileSync(file, 'utf8').trim());
    return Number.isInteger(value) ? { tcpSyncookies: value } : {};
  } catch {
    return {};
  }
}

/** The ids found for names, and those named by number, once each. */
function idsOf(found: ReadonlyMap<string, IdLookup>, numbers: readonly number[] = []): number[] {
  const ids = new Set<number>(numbers);
  for (const id of found.values()) if (typeof id === 'number') ids.add(id);
  return [...ids].sort((a, b) => a - b);
}

/**
 * Each user's ranges from /etc/subuid and /etc/subgid. A file that is not
 * there gives none; one that cannot be read makes every user's ranges
 * unknown (an error where they are used: a range left out would be let out).
 */
function subordinateIds(
  uids: readonly number[],
  files: AccountFiles,
  lookup: NameLookup,
  warnings: PolicyIssue[],
): Map<number, SubordinateIds | { error: string }> {
  // A refused line that names a policy user is an error for it (linesOf); the others stay warnings.
  const lineWarnings: PolicyIssue[] = [];
  const errorLines = new Set<string>();
  const read = (file: string): SubordinateFile | { error: string } => {
    let text: string;
    try {
      text = readFileSync(file, 'utf8');
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return { file, lines: [], refused: [] };
      return { error: `${file}: ${(error as NodeJS.ErrnoException).code ?? String(error)}` };
    }
    const parsed = parseSubordinate(text, file);
    lineWarnings.push(...parsed.warnings);
    return { file, lines: parsed.lines, refused: parsed.refused };
  };
  const uidLines = read(files.subuid);
  const gidLines = read(files.subgid);
  // Another name of the same uid counts, as for newuidmap: each owner name is looked up once.
  // A lookup that fails is kept: that line may be any user's, so their ranges are unknown.
  const owners = new Map<string, IdLookup | undefined>();
  const uidOf = (name: string): IdLookup | undefined => {
    if (!owners.has(name)) owners.set(name, lookup('user', name));
    return owners.get(name);
  };
  const result = new Map<number, SubordinateIds | { error: string }>();
  for (const uid of uids) {
    if ('error' in uidLines || 'error' in gidLines) {
      result.set(uid, { error: 'error' in uidLines ? uidLines.error : (gidLines as { error: string }).error });
      continue;
    }
    const ranges = (parsed: SubordinateFile): IdRange[] | { error: string } => {
      const own = linesOf(parsed, { name: undefined, uid }, uidOf);
      if ('error' in own) {
        if (own.refused) errorLines.add(`${parsed.file}:${own.refused.line}`);
        return { error: own.error };
      }
      return own.map(({ from, to }) => ({ from, to }));
    };
    const uidRanges = ranges(uidLines);
    const gidRanges = ranges(gidLines);
    if ('error' in uidRanges || 'error' in gidRanges) {
      result.set(uid, 'error' in uidRanges ? uidRanges : (gidRanges as { error: string }));
      continue;
    }
    if (uidRanges.length + gidRanges.length > 0) result.set(uid, { uids: uidRanges, gids: gidRanges });
  }
  warnings.push(...lineWarnings.filter((w) => !errorLines.has(`${w.at.file}:${w.at.line}`)));
  return result;
}

/**
 * Each group's members as uids: the users its entry lists (supplementary
 * members) and the users whose primary group it is, found by listing every
 * user (getpwent). A listing or lookup that fails makes the group's members
 * unknown (an error where they are used).
 */
function groupMembers(
  named: ReadonlyMap<string, IdLookup>,
  gids: readonly number[],
  account: () => Accounts,
  lookup: NameLookup,
): Map<number, readonly number[] | { error: string }> {
  const result = new Map<number, readonly number[] | { error: string }>();
  if (gids.length === 0) return result;
  const everyone = account().everyUser();
  const uidByName = new Map('error' in everyone ? [] : everyone.map((user) => [user.name, user.uid] as const));
  for (const gid of gids) {
    if ('error' in everyone) {
      result.set(gid, { error: `listing users: ${everyone.error}` });
      continue;
    }
    const uids = new Set(everyone.filter((user) => user.gid === gid).map((user) => user.uid));
    // Each name of the group (two names may share a gid), and the gid itself.
    const keys: (string | number)[] = [...[...named].filter(([, id]) => id === gid).map(([name]) => name), gid];
    let failed: string | undefined;
    for (const key of keys) {
      const entry = account().group(key);
      if (entry === undefined) continue;
      if ('error' in entry) {
        failed = entry.error;
        break;
      }
      for (const member of entry.members) {
        const uid = uidByName.get(member) ?? lookup('user', member);
        // A member list may name a user that is gone: it matches nobody.
        if (typeof uid === 'number') uids.add(uid);
        else if (uid !== undefined) failed = uid.error;
      }
    }
    result.set(gid, failed !== undefined ? { error: failed } : [...uids].sort((a, b) => a - b));
  }
  return result;
}

/** Name services that list every user they know (getpwent). */
const ENUMERATING = new Set(['files', 'compat', 'systemd', 'extrausers', 'db']);

/**
 * Why the users listed may not be every user: the `passwd:` sources of
 * nsswitch.conf that may not enumerate (sssd does not unless `enumerate =
 * true`; winbind not unless `winbind enum users`). Undefined when all do.
 */
function readNsswitch(file: string): string | undefined {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch {
    return undefined; // glibc's default without the file is files only
  }
  const line = text.split('\n').find((l) => /^\s*passwd\s*:/.test(l));
  if (line === undefined) return undefined;
  const sources = line
    .replace(/#.*/, '')
    .replace(/^\s*passwd\s*:/, '')
    .replace(/\[[^\]]*\]/g, ' ')
    .split(/\s+/)
    .filter((source) => source !== '' && !ENUMERATING.has(source));
  return sources.length === 0 ? undefined : `users are also looked up through ${sources.join(', ')} (${file}), which may not list its users`;
}

function definedIncomplete(reason: string | undefined): { membersIncomplete?: string } {
  return reason === undefined ? {} : { membersIncomplete: reason };
}
