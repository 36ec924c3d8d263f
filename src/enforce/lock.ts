/**
 * One change of enforcement at a time, across processes.
 *
 * apply (and lockdown, which is an apply) reads the live table, compiles
 * against what it read, and switches the base chain in a later transaction.
 * Two changes that overlap are caught when both write the same generation,
 * but not always: an apply that read the table before two others ran in
 * full writes its stale view back, and the lockdown one of them switched on
 * is gone while its command said it was on. So every change holds an
 * exclusive flock(2) on STATE_DIR/lock for its whole run. The kernel drops
 * the lock when its holder exits or is killed, so a crashed apply never
 * leaves it behind; the file itself stays, naming its last holder.
 */
import { closeSync, ftruncateSync, mkdirSync, openSync, readFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { EgressError, ErrorCode } from '../errors.js';

export const LOCK_FILE = 'lock';
const LOCK_EX = 2;
const LOCK_NB = 4;
const POLL_MS = 50;
/** An apply of 100,000 CIDRs takes about a second here; a minute is a stuck holder. */
const DEFAULT_TIMEOUT_MS = 60_000;

type Flock = (fd: number, operation: number) => 'locked' | 'busy' | 'interrupted' | { errno: number };
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
        return errno === EWOULDBLOCK ? 'busy' : errno === EINTR ? 'interrupted' : { errno };
      };
    } catch (error) {
      return error instanceof Error ? error : new Error(String(error));
    }
  })();
  return binding;
}

export interface LockOptions {
  /** Called once, with who holds the lock, when this change has to wait for it. */
  readonly onWait?: (holder: string) => void;
  /** Called when the lock cannot be taken at all (no koffi, no lock file): the change then runs unserialised. */
  readonly onUnavailable?: (reason: string) => void;
  readonly timeoutMs?: number;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

function holderOf(path: string): string {
  try {
    return readFileSync(path, 'utf8').trim() || 'a process that has not said who it is yet';
  } catch {
    return 'unknown';
  }
}

/**
 * Runs `change` holding the enforcement lock of `stateDir`. `what` says what
 * the change is ("apply /etc/egressd"); a process waiting for the lock is
 * shown it, with this process's pid.
 */
export async function withEnforcementLock<T>(stateDir: string, what: string, change: () => Promise<T>, options: LockOptions = {}): Promise<T> {
  const lock = await flock();
  if (lock instanceof Error) {
    options.onUnavailable?.(`cannot take the enforcement lock (koffi: ${lock.message}); this change is not serialised with others`);
    return change();
  }
  const path = join(stateDir, LOCK_FILE);
  let fd: number;
  try {
    mkdirSync(stateDir, { recursive: true, mode: 0o750 });
    // Not truncated on open: until this process holds the lock, the file names the holder.
    fd = openSync(path, 'a+', 0o640);
  } catch (error) {
    // A read-only or broken state directory must not stop a change (lockdown above all);
    // saving the state afterwards says what failed.
    options.onUnavailable?.(`cannot open the enforcement lock ${path} (${(error as Error).message}); this change is not serialised with others`);
    return change();
  }
  try {
    const deadline = Date.now() + (options.timeoutMs ?? DEFAULT_TIMEOUT_MS);
    let told = false;
    for (;;) {
      const outcome = lock(fd, LOCK_EX | LOCK_NB);
      if (outcome === 'locked') break;
      if (outcome === 'interrupted') continue;
      if (outcome !== 'busy') throw new EgressError(ErrorCode.Io, `cannot take the enforcement lock ${path}: flock failed with errno ${outcome.errno}; nothing was changed`);
      if (!told) {
        options.onWait?.(holderOf(path));
        told = true;
      }
      if (Date.now() >= deadline) {
        throw new EgressError(ErrorCode.Busy, `another change of enforcement still holds ${path} (${holderOf(path)}) after ${Math.round((options.timeoutMs ?? DEFAULT_TIMEOUT_MS) / 1000)} s; nothing was changed`);
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
