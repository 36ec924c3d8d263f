/**
 * One change of enforcement at a time, across processes.
 *
 * apply (and lockdown, which is an apply) reads the live table, compiles
 * against what it read, and switches the base chain in a later transaction.
 * Two changes that overlap are caught when both write the same generation,
 * but not always: an apply that read the table before two others ran in
 * full writes its stale view back, and the lockdown one of them switched on
 * is gone while its command said it was on. So every change holds an
 * exclusive flock(2) for its whole run. The kernel drops the lock when its
 * holder exits or is killed, so a crashed apply never leaves it behind; the
 * file itself stays, naming its last holder.
 *
 * The lock is the table's: one per network namespace, whatever state
 * directory each process was given, in /run (gone at reboot, like the table).
 */
import { closeSync, ftruncateSync, mkdirSync, openSync, readFileSync, statSync, writeSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { EgressError, ErrorCode } from '../errors.js';

export const LOCK_DIR = '/run/egressd';

/** The lock of the network namespace with this inode (`stat -L -c %i /proc/PID/ns/net`). */
export function lockPathFor(netnsInode: number | 'unknown'): string {
  return join(LOCK_DIR, `net-${netnsInode}.lock`);
}

/**
 * The inode of this process's network namespace, which names what is the
 * table's in /run/egressd (its lock, its resolver's socket). Without /proc,
 * 'unknown': every egressd process on the machine then shares one name —
 * one lock, still safe; one resolver socket, which a second resolver
 * refuses to take while the first answers.
 */
export function ownNetnsInode(): number | 'unknown' {
  try {
    return statSync('/proc/self/ns/net').ino;
  } catch {
    return 'unknown';
  }
}

/** The lock of this process's network namespace. */
export function defaultLockPath(): string {
  return lockPathFor(ownNetnsInode());
}

const LOCK_EX = 2;
const LOCK_NB = 4;
const POLL_MS = 50;
/** An apply of 100,000 CIDRs takes about a second here; a minute is a stuck holder. */
const DEFAULT_TIMEOUT_MS = 60_000;

type Flock = (fd: number, operation: number) => 'locked' | 'busy' | { errno: number };
let binding: Promise<Flock | Error> | undefined;

/** libc's flock through koffi, the FFI egressd already uses for libnftables; an Error when koffi cannot load. */
function flock(): Promise<Flock | Error> {
  binding ??= (async () => {
    try {
      const koffi = (await import('koffi')).default;
      const call = koffi.load('libc.so.6').func('int flock(int fd, int operation)');
      const { EWOULDBLOCK, EINTR } = koffi.os.errno;
      return (fd: number, operation: number) => {
        if (call(fd, operation) === 0) return 'locked';
        const errno = koffi.errno();
        // A signal (EINTR) is waited out like a holder: the loop sleeps and tries again.
        return errno === EWOULDBLOCK || errno === EINTR ? 'busy' : { errno };
      };
    } catch (error) {
      return error instanceof Error ? error : new Error(String(error));
    }
  })();
  return binding;
}

export interface LockOptions {
  /** Called once, with what the holder noted of itself, when this change has to wait for it. */
  readonly onWait?: (holder: string) => void;
  /** Called when the lock cannot be taken at all (no koffi, no lock file): the change then runs unserialised. */
  readonly onUnavailable?: (reason: string) => void;
  readonly timeoutMs?: number;
}

/** What the holder noted of itself (between taking the lock and noting, a waiter may read the previous holder's note). */
function holderOf(path: string): string {
  try {
    return readFileSync(path, 'utf8').trim() || 'a process that has not noted itself yet';
  } catch {
    return 'unknown';
  }
}

/**
 * Runs `change` holding the lock at `path` (defaultLockPath() for the
 * table). `what` says what the change is ("apply /etc/egressd"); a process
 * waiting for the lock is shown it, with this process's pid. A change must
 * not take the lock again inside `change`: it would wait for itself.
 */
export async function withEnforcementLock<T>(path: string, what: string, change: () => Promise<T>, options: LockOptions = {}): Promise<T> {
  const lock = await flock();
  if (lock instanceof Error) {
    options.onUnavailable?.(`cannot take the enforcement lock (koffi: ${lock.message}); this change is not serialised with others`);
    return change();
  }
  let fd: number;
  try {
    mkdirSync(dirname(path), { recursive: true, mode: 0o750 });
    // Not truncated on open: until this process holds the lock, the file names the holder.
    fd = openSync(path, 'a+', 0o640);
  } catch (error) {
    // A read-only /run must not stop a change (lockdown above all).
    options.onUnavailable?.(`cannot open the enforcement lock ${path} (${(error as Error).message}); this change is not serialised with others`);
    return change();
  }
  try {
    const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const deadline = Date.now() + timeoutMs;
    let told = false;
    for (;;) {
      const outcome = lock(fd, LOCK_EX | LOCK_NB);
      if (outcome === 'locked') break;
      if (outcome !== 'busy')
        throw new EgressError(ErrorCode.Io, `cannot take the enforcement lock ${path}: flock failed with errno ${outcome.errno}; nothing was changed`);
      if (!told) {
        options.onWait?.(holderOf(path));
        told = true;
      }
      if (Date.now() >= deadline) {
        throw new EgressError(
          ErrorCode.Busy,
          `another change of enforcement still holds ${path} (${holderOf(path)}) after ${timeoutMs < 10_000 ? (timeoutMs / 1000).toFixed(1) : Math.round(timeoutMs / 1000)} s; nothing was changed — end it (kill its pid) or wait, then run this again`,
        );
      }
      await sleep(POLL_MS);
    }
    try {
      ftruncateSync(fd, 0);
      writeSync(fd, `pid ${process.pid}: ${what}, since ${new Date().toISOString()}\n`, 0);
    } catch {
      // A full disk: the lock holds all the same; a waiter is only told less.
    }
    return await change();
  } finally {
    // Closing the only descriptor of the open file releases the lock.
    closeSync(fd);
  }
}
