import { randomBytes } from 'node:crypto';
import { closeSync, fchmodSync, fchownSync, fsyncSync, mkdirSync, openSync, readdirSync, renameSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';

/**
 * Every file in the state directory (/var/lib/egressd) is written here, and
 * only here: whole or not at all, and durable once this returns.
 *
 * The content goes to a temporary file in the same directory (a rename is
 * atomic only within one file system), which is fsynced before it is renamed
 * over the old file — else a crash soon after could leave the new name
 * pointing at an empty or partial file — and the directory is fsynced after,
 * so that the rename itself survives a power loss. A crash at any point
 * leaves the old file whole or the new one whole. Readers never open the
 * temporary names; a temporary file a killed writer left behind is removed
 * by the next write of the same file.
 */

/** Test seams: where a crash is simulated. Nothing in the product passes them. */
export interface AtomicWriteHooks {
  /** Called with the temporary file's path once it is written and synced, before the rename. */
  readonly beforeRename?: (tempPath: string) => void;
}

const TEMP = /^\.(.+)\.tmp-(\d+)-[0-9a-f]+$/;

export function tempName(name: string): string {
  return `.${name}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
}

/**
 * `owner`: the file gets exactly this owner and `mode` (not `mode` less the
 * umask) before it replaces the old one — for files outside the state
 * directory that must come back as they were (src/system/resolv-conf.ts).
 */
export function writeFileAtomic(
  dir: string,
  name: string,
  content: string | Uint8Array,
  mode = 0o640,
  hooks: AtomicWriteHooks = {},
  owner?: { readonly uid: number; readonly gid: number },
): void {
  const staged = stageFileAtomic(dir, name, content, mode, owner);
  try {
    hooks.beforeRename?.(staged.tempPath);
  } catch (error) {
    staged.discard();
    throw error;
  }
  staged.commit();
}

/** A file written and synced under its temporary name, not in place yet. */
export interface StagedFile {
  readonly tempPath: string;
  /** Renames it over the old file and syncs the directory: from then on it is the file, whole and durable. */
  commit(): void;
  /** Removes the temporary file; the old file stays as it was. */
  discard(): void;
}

/**
 * writeFileAtomic's first half: the content written and fsynced under a
 * temporary name. An apply stages its two big rulesets (2 MB each with a
 * 100,000-address list) while nft works on its thread, and commits them once
 * the switch succeeded, so the write and fsync leave the path a fresh
 * `egressctl apply` waits on; what a crash leaves is unchanged (the old file
 * or the new one whole, and stale temporary files go with the next write).
 */
export function stageFileAtomic(
  dir: string,
  name: string,
  content: string | Uint8Array,
  mode = 0o640,
  owner?: { readonly uid: number; readonly gid: number },
): StagedFile {
  if (name.includes('/') || name.startsWith('.')) throw new Error(`internal: ${JSON.stringify(name)} is not a state file name`);
  mkdirSync(dir, { recursive: true, mode: 0o750 });
  removeStaleTemps(dir, name);
  const temp = join(dir, tempName(name));
  try {
    const fd = openSync(temp, 'wx', mode);
    try {
      if (owner) {
        fchownSync(fd, owner.uid, owner.gid);
        fchmodSync(fd, mode);
      }
      const bytes = typeof content === 'string' ? Buffer.from(content, 'utf8') : content;
      for (let done = 0; done < bytes.length;) done += writeSync(fd, bytes, done, bytes.length - done);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
  } catch (error) {
    rmSync(temp, { force: true });
    throw error;
  }
  let settled = false;
  return {
    tempPath: temp,
    commit() {
      if (settled) throw new Error(`internal: the staged ${name} was already committed or discarded`);
      settled = true;
      try {
        renameSync(temp, join(dir, name));
      } catch (error) {
        rmSync(temp, { force: true });
        throw error;
      }
      syncDirectory(dir);
    },
    discard() {
      if (settled) return;
      settled = true;
      rmSync(temp, { force: true });
    },
  };
}

/** Removes a state file durably (a removal is a change of the directory, as a rename is). */
export function removeFileDurably(dir: string, name: string): void {
  rmSync(join(dir, name), { force: true });
  try {
    syncDirectory(dir);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error;
  }
}

/** fsync(2) of a directory: a rename or unlink in it is on disk once this returns. */
export function syncDirectory(dir: string): void {
  const fd = openSync(dir, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/**
 * Temporary files of `name` whose writer is gone. One whose writer still
 * runs is another write in progress (they are serialised by the enforcement
 * lock, but a write without it must not lose its file under it).
 */
function removeStaleTemps(dir: string, name: string): void {
  for (const entry of readdirSync(dir)) {
    const match = TEMP.exec(entry);
    if (!match || match[1] !== name) continue;
    const pid = Number(match[2]);
    if (pid !== process.pid && isRunning(pid)) continue;
    rmSync(join(dir, entry), { force: true });
  }
}

function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}
