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

/** In-process through koffi when it loads; else the getent binary. */
export function nssLookup(): NameLookup {
  const inProcess = libcLookup();
  return inProcess instanceof Error ? getentLookup() : inProcess;
}

/**
 * getpwnam_r / getgrnam_r from libc through koffi (the FFI egressd uses for
 * libnftables), synchronously: the compile path is synchronous. An Error
 * when koffi or libc cannot be loaded.
 */
export function libcLookup(options: { firstBuffer?: number } = {}): NameLookup | Error {
  let koffi: typeof import('koffi');
  let getpwnam: (name: string, out: object, buffer: Buffer, size: number, result: unknown[]) => number;
  let getgrnam: typeof getpwnam;
  try {
    // Loaded here, not imported at the top: a koffi without a build for this platform means "use getent".
    koffi = createRequire(import.meta.url)('koffi') as typeof import('koffi');
    const libc = koffi.load('libc.so.6');
    // Only the ids are read; the strings stay in the buffer, unread. Anonymous types: a name can be registered once per process.
    const passwd = koffi.struct({
      pw_name: 'void *',
      pw_passwd: 'void *',
      pw_uid: 'uint32_t',
      pw_gid: 'uint32_t',
      pw_gecos: 'void *',
      pw_dir: 'void *',
      pw_shell: 'void *',
    });
    const group = koffi.struct({ gr_name: 'void *', gr_passwd: 'void *', gr_gid: 'uint32_t', gr_mem: 'void *' });
    const result = koffi.out(koffi.pointer('void *'));
    getpwnam = libc.func('getpwnam_r', 'int', ['const char *', koffi.out(koffi.pointer(passwd)), 'void *', 'size_t', result]);
    getgrnam = libc.func('getgrnam_r', 'int', ['const char *', koffi.out(koffi.pointer(group)), 'void *', 'size_t', result]);
  } catch (error) {
    return error instanceof Error ? error : new Error(String(error));
  }
  const errnoNames = new Map(Object.entries(koffi.os.errno).map(([name, value]) => [value, name]));
  const { ERANGE, EINTR, ENOENT, ESRCH, EPROTO } = koffi.os.errno;
  if (EPROTO === undefined) return new Error('koffi does not know EPROTO on this platform');
  return (kind, name) => {
    const call = kind === 'user' ? getpwnam : getgrnam;
    for (let size = options.firstBuffer ?? FIRST_BUFFER; ;) {
      const entry: { pw_uid?: number; gr_gid?: number } = {};
      const result: unknown[] = [null];
      // glibc returns errno as it finds it when a module is unavailable, and
      // a module need not set it: preset, so that never reads as success.
      const buffer = Buffer.alloc(size);
      // Right before the call: nothing in between may touch errno.
      koffi.errno(EPROTO);
      const status = call(name, entry, buffer, size, result);
      if (status === 0) return result[0] === null ? undefined : kind === 'user' ? entry.pw_uid : entry.gr_gid;
      // getpwnam_r(3): ENOENT and ESRCH also mean "not found" (libnss-extrausers says ENOENT when its file is absent).
      if (status === ENOENT || status === ESRCH) return undefined;
      if (status === EINTR) continue;
      if (status === ERANGE && size < MAX_BUFFER) {
        size *= 4;
        continue;
      }
      const fn = kind === 'user' ? 'getpwnam_r' : 'getgrnam_r';
      if (status === EPROTO) return { error: `${fn}: a name service module in nsswitch.conf is unavailable` };
      return { error: `${fn} failed: ${errnoNames.get(status) ?? `errno ${status}`}` };
    }
  };
}

/**
 * `getent passwd NAME` / `getent group NAME`: exit 0 with the entry, 2 when
 * there is no such name. getent says 2 for some failures of a module too
 * (it cannot tell them apart); anything else is a failed lookup.
 */
export function getentLookup(binary = 'getent'): NameLookup {
  return (kind, name) => {
    const database = kind === 'user' ? 'passwd' : 'group';
    // "--" and the name check in the schema keep a name from being read as an option.
    const run = spawnSync(binary, [database, '--', name], { encoding: 'utf8', timeout: 10_000 });
    if (run.error) return { error: `getent ${database}: ${run.error.message}` };
    if (run.status === 2) return undefined;
    const id = run.status === 0 ? /^[^:\n]*:[^:\n]*:(\d+):/.exec(run.stdout)?.[1] : undefined;
    if (id === undefined)
      return { error: `getent ${database} ${name}: ${run.status === null ? `killed by ${run.signal}` : `exit ${run.status}`} ${run.stderr.trim()}`.trim() };
    return Number(id);
  };
}
