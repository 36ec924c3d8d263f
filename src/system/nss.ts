/**
 * User and group names to ids through NSS, as every other program on the
 * machine sees them: /etc/passwd, but also systemd's DynamicUser and homed,
 * LDAP, extrausers — whatever nsswitch.conf lists. NSS cannot list every user
 * cheaply, so names are looked up one by one, only those a policy mentions.
 *
 * Three answers, kept apart: an id, "no such name" (undefined), and a lookup
 * that failed (`{error}`): a failure cannot tell a user that is missing from
 * one that exists, so the compiler treats it as an error wherever it is used.
 */
import { spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import type { IdLookup } from '../compile/compile.js';

/** Looks one name up: its id, undefined when no such user or group exists, or why the lookup failed. */
export type NameLookup = (kind: 'user' | 'group', name: string) => IdLookup | undefined;

/** getpwnam_r's buffer starts at glibc's usual size and grows on ERANGE (a group with many members) up to this. */
const FIRST_BUFFER = 16 * 1024;
const MAX_BUFFER = 16 * 1024 * 1024;

/** Names to ids off whole entries: by default in-process through koffi when it loads, else the getent binary (`nssAccounts`). */
export function nssLookup(accounts: Accounts = nssAccounts()): NameLookup {
  return idsFrom(accounts);
}

/** getpwnam_r / getgrnam_r from libc through koffi (`libcAccounts`), synchronously: the compile path is synchronous. An Error when koffi or libc cannot be loaded. */
export function libcLookup(options: { firstBuffer?: number } = {}): NameLookup | Error {
  const accounts = libcAccounts(options);
  return accounts instanceof Error ? accounts : idsFrom(accounts);
}

/**
 * `getent passwd NAME` / `getent group NAME` (`getentAccounts`): exit 0 with
 * the entry, 2 when there is no such name. getent says 2 for some failures
 * of a module too (it cannot tell them apart); anything else is a failed lookup.
 */
export function getentLookup(binary = 'getent'): NameLookup {
  return idsFrom(getentAccounts(binary));
}

/** A name's id from whole entries: the one way both routes look names up. */
function idsFrom(accounts: Accounts): NameLookup {
  return (kind, name) => {
    const found = kind === 'user' ? accounts.user(name) : accounts.group(name);
    if (found === undefined || 'error' in found) return found;
    return 'uid' in found ? found.uid : found.gid;
  };
}

/** One user as the name service lists it. */
export interface PasswdRow {
  readonly name: string;
  readonly uid: number;
  readonly gid: number;
}

/** One group as the name service lists it, with its member list (gr_mem: supplementary members by name). */
export interface GroupRow {
  readonly name: string;
  readonly gid: number;
  readonly members: readonly string[];
}

/** An entry, undefined when there is none, or why the lookup failed. */
export type Found<T> = T | undefined | { readonly error: string };

/**
 * What facts need beyond ids: whole entries by name or id, and every user
 * (getpwent) to find those whose primary group a group is — NSS keeps
 * primary members apart from the group's member list. A module that does
 * not enumerate (sssd with `enumerate = false`, the default; winbind
 * without `winbind enum users`) lists none of its own users here.
 */
export interface Accounts {
  user(key: string | number): Found<PasswdRow>;
  group(key: string | number): Found<GroupRow>;
  everyUser(): readonly PasswdRow[] | { readonly error: string };
  /** A user's groups as login gives them (initgroups): `gid`, its primary group, and every group listing `name` as a member. */
  groupsOf(name: string, gid: number): readonly number[] | { readonly error: string };
}

/** In-process through koffi when it loads; else the getent binary. */
export function nssAccounts(): Accounts {
  const inProcess = libcAccounts();
  return inProcess instanceof Error ? getentAccounts() : inProcess;
}

/**
 * getpwnam_r, getpwuid_r, getgrnam_r, getgrgid_r, getpwent_r and
 * getgrouplist through koffi. glibc returns errno as it finds it when a
 * module is unavailable, so errno is preset (EPROTO) before each call; ENOENT
 * and ESRCH mean "not found"; ERANGE grows the buffer. An Error when koffi
 * or libc cannot be loaded.
 */
export function libcAccounts(options: { firstBuffer?: number } = {}): Accounts | Error {
  let koffi: typeof import('koffi');
  type Call = (...args: unknown[]) => number;
  let calls: { pwnam: Call; pwuid: Call; grnam: Call; grgid: Call; pwent: Call; grouplist: Call; setpwent: () => void; endpwent: () => void };
  try {
    koffi = createRequire(import.meta.url)('koffi') as typeof import('koffi');
    const libc = koffi.load('libc.so.6');
    // Names are read as C strings; gr_mem is walked by hand (a NULL-terminated char **).
    const passwd = koffi.struct({
      pw_name: 'const char *',
      pw_passwd: 'void *',
      pw_uid: 'uint32_t',
      pw_gid: 'uint32_t',
      pw_gecos: 'void *',
      pw_dir: 'void *',
      pw_shell: 'void *',
    });
    const group = koffi.struct({ gr_name: 'const char *', gr_passwd: 'void *', gr_gid: 'uint32_t', gr_mem: 'void *' });
    const result = koffi.out(koffi.pointer('void *'));
    const pwOut = koffi.out(koffi.pointer(passwd));
    const grOut = koffi.out(koffi.pointer(group));
    calls = {
      pwnam: libc.func('getpwnam_r', 'int', ['const char *', pwOut, 'void *', 'size_t', result]) as Call,
      pwuid: libc.func('getpwuid_r', 'int', ['uint32_t', pwOut, 'void *', 'size_t', result]) as Call,
      grnam: libc.func('getgrnam_r', 'int', ['const char *', grOut, 'void *', 'size_t', result]) as Call,
      grgid: libc.func('getgrgid_r', 'int', ['uint32_t', grOut, 'void *', 'size_t', result]) as Call,
      pwent: libc.func('getpwent_r', 'int', [pwOut, 'void *', 'size_t', result]) as Call,
      grouplist: libc.func('getgrouplist', 'int', ['const char *', 'uint32_t', 'void *', koffi.inout(koffi.pointer('int'))]) as Call,
      setpwent: libc.func('setpwent', 'void', []) as () => void,
      endpwent: libc.func('endpwent', 'void', []) as () => void,
    };
  } catch (error) {
    return error instanceof Error ? error : new Error(String(error));
  }
  const errnoNames = new Map(Object.entries(koffi.os.errno).map(([name, value]) => [value, name]));
  const { ERANGE, EINTR, ENOENT, ESRCH, EPROTO } = koffi.os.errno;
  if (EPROTO === undefined) return new Error('koffi does not know EPROTO on this platform');
  const failure = (fn: string, status: number): { error: string } =>
    status === EPROTO
      ? { error: `${fn}: a name service module in nsswitch.conf is unavailable` }
      : { error: `${fn} failed: ${errnoNames.get(status) ?? `errno ${status}`}` };
  /** One reentrant call, its buffer grown on ERANGE: the entry, undefined at "none", or the failure. */
  const call = <T>(
    fn: string,
    invoke: (entry: Record<string, unknown>, buffer: Buffer, size: number, result: unknown[]) => number,
    read: (entry: Record<string, unknown>) => T,
  ): Found<T> => {
    for (let size = options.firstBuffer ?? FIRST_BUFFER; ;) {
      const entry: Record<string, unknown> = {};
      const result: unknown[] = [null];
      const buffer = Buffer.alloc(size);
      koffi.errno(EPROTO);
      const status = invoke(entry, buffer, size, result);
      // Read before the buffer can go: the strings live in it.
      if (status === 0) return result[0] === null ? undefined : read(entry);
      if (status === ENOENT || status === ESRCH) return undefined;
      if (status === EINTR) continue;
      if (status === ERANGE && size < MAX_BUFFER) {
        size *= 4;
        continue;
      }
      return failure(fn, status);
    }
  };
  const passwdRow = (entry: Record<string, unknown>): PasswdRow => ({
    name: String(entry['pw_name']),
    uid: Number(entry['pw_uid']),
    gid: Number(entry['pw_gid']),
  });
  const groupRow = (entry: Record<string, unknown>): GroupRow => {
    const members: string[] = [];
    const list = entry['gr_mem'];
    for (let i = 0; list !== null && list !== undefined; i++) {
      const member = koffi.decode(list, i * koffi.sizeof('void *'), 'char *') as string | null;
      if (member === null) break;
      members.push(member);
    }
    return { name: String(entry['gr_name']), gid: Number(entry['gr_gid']), members };
  };
  return {
    user: (key) =>
      typeof key === 'number'
        ? call('getpwuid_r', (e, b, s, r) => calls.pwuid(key, e, b, s, r), passwdRow)
        : call('getpwnam_r', (e, b, s, r) => calls.pwnam(key, e, b, s, r), passwdRow),
    group: (key) =>
      typeof key === 'number'
        ? call('getgrgid_r', (e, b, s, r) => calls.grgid(key, e, b, s, r), groupRow)
        : call('getgrnam_r', (e, b, s, r) => calls.grnam(key, e, b, s, r), groupRow),
    everyUser: () => {
      const users: PasswdRow[] = [];
      calls.setpwent();
      try {
        for (;;) {
          // getpwent_r says ENOENT at the end of the list.
          const row = call('getpwent_r', (e, b, s, r) => calls.pwent(e, b, s, r), passwdRow);
          if (row === undefined) return users;
          if ('error' in row) return row;
          users.push(row);
        }
      } finally {
        calls.endpwent();
      }
    },
    groupsOf: (name, gid) => {
      // -1 when the array is too small, with the count it needs written back.
      for (let size = 64; ;) {
        const count = [size];
        const buffer = Buffer.alloc(size * 4);
        if (calls.grouplist(name, gid, buffer, count) !== -1 || count[0]! <= size) {
          const found = Math.min(count[0]!, size);
          return [...new Uint32Array(buffer.buffer, buffer.byteOffset, found)];
        }
        size = count[0]!;
      }
    },
  };
}

/** The same through `getent passwd|group [KEY]` (exit 2: no such entry; `getent passwd` alone enumerates). */
export function getentAccounts(binary = 'getent'): Accounts {
  const run = (database: 'passwd' | 'group' | 'initgroups', key?: string | number): string | undefined | { error: string } => {
    const args = key === undefined ? [database] : [database, '--', String(key)];
    const done = spawnSync(binary, args, { encoding: 'utf8', timeout: 60_000, maxBuffer: 256 * 1024 * 1024 });
    if (done.error) return { error: `getent ${database}: ${done.error.message}` };
    if (done.status === 2) return undefined;
    if (done.status !== 0)
      return { error: `getent ${args.join(' ')}: ${done.status === null ? `killed by ${done.signal}` : `exit ${done.status}`} ${done.stderr.trim()}`.trim() };
    return done.stdout;
  };
  const passwdRows = (text: string): PasswdRow[] =>
    text.split('\n').flatMap((line) => {
      const [name, , uid, gid] = line.split(':');
      return name && /^\d+$/.test(uid ?? '') && /^\d+$/.test(gid ?? '') ? [{ name, uid: Number(uid), gid: Number(gid) }] : [];
    });
  const first = <T>(out: string | undefined | { error: string }, parse: (text: string) => T[], what: string): Found<T> => {
    if (out === undefined || typeof out !== 'string') return out;
    return parse(out)[0] ?? { error: `getent ${what}: an entry it could not read` };
  };
  return {
    user: (key) => first(run('passwd', key), passwdRows, `passwd ${key}`),
    group: (key) =>
      first(
        run('group', key),
        (text) =>
          text.split('\n').flatMap((line) => {
            const [name, , gid, members = ''] = line.split(':');
            return name && /^\d+$/.test(gid ?? '') ? [{ name, gid: Number(gid), members: members.split(',').filter(Boolean) }] : [];
          }),
        `group ${key}`,
      ),
    everyUser: () => {
      const out = run('passwd');
      if (out === undefined) return [];
      return typeof out === 'string' ? passwdRows(out) : out;
    },
    groupsOf: (name, gid) => {
      // "NAME gid gid…": the groups listing it, without its primary group.
      const out = run('initgroups', name);
      if (out !== undefined && typeof out !== 'string') return out;
      const listed = (out ?? '').trim().split(/\s+/).slice(1);
      if (!listed.every((g) => /^\d+$/.test(g))) return { error: `getent initgroups ${name}: an answer it could not read` };
      return [...new Set([gid, ...listed.map(Number)])];
    },
  };
}
