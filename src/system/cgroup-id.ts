/**
 * A cgroup v2 id (what sock_diag's INET_DIAG_CGROUP_ID and `socket cgroupv2`
 * carry: the kernfs node id, which is also the inode number of the cgroup's
 * directory) back to its path under the cgroup2 mount, relative to it:
 * "system.slice/cups.service", '' for the root.
 *
 * Two ways, both bounded:
 * - `handle` (the default): open_by_handle_at(2) on the mount with a kernfs
 *   file handle made of the id, then the path of the opened directory from
 *   /proc/self/fd — what systemd's cg_path_from_cgroupid does. One system
 *   call pair per id, whatever the number of cgroups; it needs
 *   CAP_DAC_READ_SEARCH, which root has. Without it (EPERM), lookups go on
 *   by `walk`.
 * - `walk`: reads the whole tree and keeps every directory's inode number.
 *   A miss costs a walk of every cgroup (bounded by `walkLimit`
 *   directories, and by at most one walk per `walkIntervalMs`: a user who
 *   makes cgroups as fast as it queries cannot make every query walk).
 * Both keep what they found: cgroup v2 has no rename, and ids are 64-bit and
 * never reused, so an id names one path for as long as the cache holds it.
 * The cache is bounded (`cacheSize`); when full it starts again empty.
 * Measured here (Linux 6.18, 2 cores): a miss costs ≈ 5 µs by handle, and a
 * walk of 500 cgroups ≈ 4 ms; a hit ≈ 0.05 µs either way.
 */
import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import { EgressError, ErrorCode } from '../errors.js';

/** CGROUP2_SUPER_MAGIC (statfs f_type of a cgroup2 mount). */
const CGROUP2_SUPER_MAGIC = 0x63677270;
/** FILEID_KERNFS: a file handle holding a kernfs node id (include/linux/exportfs.h). */
const FILEID_KERNFS = 0xfe;
const O_RDONLY = 0;
const O_DIRECTORY = 0o200000;
const O_CLOEXEC = 0o2000000;

export interface CgroupPaths {
  /** The cgroup's path relative to the cgroup2 root ('' for the root), or undefined when no cgroup has this id (any more). */
  pathOf(id: bigint): string | undefined;
  close(): void;
}

export interface CgroupPathsOptions {
  /** Where cgroup2 is mounted; default /sys/fs/cgroup, where nft looks too. */
  readonly root?: string;
  readonly method?: 'handle' | 'walk';
  /** Ids kept; default 8192. */
  readonly cacheSize?: number;
  /** `walk`: directories read per walk at most; default 100,000. */
  readonly walkLimit?: number;
  /** `walk`: the shortest time between two walks; default 100 ms. */
  readonly walkIntervalMs?: number;
  /** For tests: the clock walks are spaced by. */
  readonly now?: () => number;
}

/** Whether `root` is a cgroup2 mount: only there do sock_diag's cgroup ids name directories. */
export function isCgroup2(root = '/sys/fs/cgroup'): boolean {
  try {
    return fs.statfsSync(root).type === CGROUP2_SUPER_MAGIC;
  } catch {
    return false;
  }
}

/**
 * Cgroup ids to paths under `root`; undefined when `root` is not a cgroup2
 * mount (a machine with cgroup v1 there: every socket then reports the v2
 * root, which says nothing).
 */
export function openCgroupPaths(options: CgroupPathsOptions = {}): CgroupPaths | undefined {
  const root = (options.root ?? '/sys/fs/cgroup').replace(/\/+$/, '');
  if (!isCgroup2(root)) return undefined;
  const cacheSize = options.cacheSize ?? 8192;
  const cache = new Map<bigint, string>();
  const remember = (id: bigint, path: string): void => {
    if (cache.size >= cacheSize) cache.clear();
    cache.set(id, path);
  };
  let find = options.method === 'walk' ? walker(root, remember, options) : handleOpener(root, remember);
  return {
    pathOf(id) {
      const known = cache.get(id);
      if (known !== undefined) return known;
      try {
        return find.pathOf(id);
      } catch (error) {
        if (!(error instanceof NotPermitted)) throw error;
        find.close();
        find = walker(root, remember, options);
        return find.pathOf(id);
      }
    },
    close() {
      cache.clear();
      find.close();
    },
  };
}

/** open_by_handle_at needs CAP_DAC_READ_SEARCH, which this process lacks. */
class NotPermitted extends Error {}

function handleOpener(root: string, remember: (id: bigint, path: string) => void): CgroupPaths {
  let koffi: typeof import('koffi');
  try {
    koffi = createRequire(import.meta.url)('koffi') as typeof import('koffi');
  } catch (cause) {
    throw new EgressError(ErrorCode.Io, `cgroup ids: koffi cannot be loaded: ${(cause as Error).message}`, { cause });
  }
  const libc = koffi.load('libc.so.6');
  const openByHandleAt = libc.func('open_by_handle_at', 'int', ['int', 'void *', 'int']) as (mountFd: number, handle: Buffer, flags: number) => number;
  const mountFd = fs.openSync(root, fs.constants.O_RDONLY | O_DIRECTORY);
  // struct file_handle: handle_bytes, handle_type, then the 8-byte id.
  const handle = Buffer.alloc(16);
  handle.writeUInt32LE(8, 0);
  handle.writeInt32LE(FILEID_KERNFS, 4);
  const { ESTALE, ENOENT, EPERM } = koffi.os.errno;
  let open = true;
  return {
    pathOf(id) {
      if (!open) throw new EgressError(ErrorCode.Io, 'cgroup ids: closed');
      handle.writeBigUInt64LE(id, 8);
      const fd = openByHandleAt(mountFd, handle, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
      if (fd < 0) {
        const errno = koffi.errno();
        // ESTALE: no such kernfs node (the cgroup is gone, or never was).
        if (errno === ESTALE || errno === ENOENT) return undefined;
        if (errno === EPERM) throw new NotPermitted();
        throw new EgressError(ErrorCode.Io, `cgroup ids: open_by_handle_at(${root}, cgroup ${id}) failed: errno ${errno}`);
      }
      let target: string;
      try {
        target = fs.readlinkSync(`/proc/self/fd/${fd}`);
      } finally {
        fs.closeSync(fd);
      }
      const path = relativeTo(root, target);
      if (path !== undefined) remember(id, path);
      return path;
    },
    close() {
      if (open) fs.closeSync(mountFd);
      open = false;
    },
  };
}

/** `target` (an opened directory's path) relative to `root`; undefined when it is elsewhere or deleted meanwhile. */
function relativeTo(root: string, target: string): string | undefined {
  if (target.endsWith(' (deleted)')) return undefined;
  if (target === root) return '';
  return target.startsWith(`${root}/`) ? target.slice(root.length + 1) : undefined;
}

function walker(root: string, remember: (id: bigint, path: string) => void, options: CgroupPathsOptions): CgroupPaths {
  const limit = options.walkLimit ?? 100_000;
  const interval = options.walkIntervalMs ?? 100;
  const now = options.now ?? Date.now;
  let lastWalk = -Infinity;
  let found = new Map<bigint, string>();
  return {
    pathOf(id) {
      const known = found.get(id);
      if (known !== undefined || now() - lastWalk < interval) return known;
      lastWalk = now();
      found = walk(root, limit);
      const path = found.get(id);
      if (path !== undefined) remember(id, path);
      return path;
    },
    close() {
      found = new Map();
    },
  };
}

/** Every cgroup directory under `root` by inode number, breadth first, at most `limit` of them. */
function walk(root: string, limit: number): Map<bigint, string> {
  const found = new Map<bigint, string>();
  const queue: string[] = [''];
  while (queue.length > 0 && found.size < limit) {
    const relative = queue.shift()!;
    const dir = relative === '' ? root : `${root}/${relative}`;
    let ino: bigint;
    let entries: fs.Dirent[];
    try {
      ino = fs.statSync(dir, { bigint: true }).ino;
      entries = fs.readdirSync(dir, { withFileTypes: true });
    } catch {
      continue; // removed while walking
    }
    found.set(ino, relative);
    for (const entry of entries) if (entry.isDirectory()) queue.push(relative === '' ? entry.name : `${relative}/${entry.name}`);
  }
  return found;
}
