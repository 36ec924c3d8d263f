/**
 * Whether a policy file is root's to say, as sshd's StrictModes asks of
 * authorized_keys: egressd runs what the policy says as root, so a file that
 * another user may write — it owns it, its group or everyone may write it,
 * or a directory on its path lets them replace it — is that user's policy.
 * The file, and every directory from it up to /, must be owned by a trusted
 * uid (root; also the user running egressctl, who may check a policy of its
 * own) and writable by no group or other. A sticky directory writable by
 * all (/tmp) is allowed on the path: no one but its owner can rename or
 * remove the trusted entry below it.
 *
 * A file is judged by the descriptor it is read from (fstat), and its path
 * by where that descriptor's file is (realpath, checked to be the same
 * inode): a link swapped between the check and the read, or a hard link to
 * it from a directory someone else controls, is not what gets trusted.
 */
import { closeSync, constants, fstatSync, lstatSync, openSync, readFileSync, realpathSync, statSync, type Stats } from 'node:fs';
import { dirname } from 'node:path';

/** The uids whose files are trusted: root, and the user running egressctl when that is not root. */
export function trustedOwners(euid: number = process.geteuid?.() ?? 0): readonly number[] {
  return euid === 0 ? [0] : [0, euid];
}

function modeText(st: Stats): string {
  return `mode ${(st.mode & 0o7777).toString(8).padStart(4, '0')}`;
}

function ownersText(owners: readonly number[]): string {
  return owners.length === 1 && owners[0] === 0 ? "root's" : `root's or uid ${owners.filter((u) => u !== 0).join(', ')}'s (who runs this)`;
}

/** What is wrong with a file or directory another user could change, or undefined. */
function untrusted(st: Stats, owners: readonly number[], onPath: boolean): string | undefined {
  if (!owners.includes(st.uid)) return `owned by uid ${st.uid}; must be ${ownersText(owners)}`;
  // On the path, a sticky directory protects the trusted entry below it (already checked) from others.
  if (onPath && st.isDirectory() && (st.mode & 0o1000) !== 0) return undefined;
  if ((st.mode & 0o002) !== 0) return `writable by others (${modeText(st)})`;
  if ((st.mode & 0o020) !== 0) return `writable by group ${st.gid} (${modeText(st)})`;
  return undefined;
}

/** Checks each directory above a real path (one with no links left) up to /, once per load. */
export class PathTrust {
  private readonly seen = new Map<string, string | undefined>();

  constructor(readonly owners: readonly number[] = trustedOwners()) {}

  /** What is wrong with the directories above `real`, or undefined. */
  ancestors(real: string): string | undefined {
    for (let dir = dirname(real); ; dir = dirname(dir)) {
      const problem = this.directory(dir);
      if (problem !== undefined) return problem;
      if (dir === dirname(dir)) return undefined;
    }
  }

  private directory(dir: string): string | undefined {
    if (!this.seen.has(dir)) {
      let problem: string | undefined;
      try {
        const st = lstatSync(dir);
        problem = st.isDirectory() ? untrusted(st, this.owners, true) : 'not a directory (it changed while it was read)';
      } catch (error) {
        problem = `cannot be checked: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`;
      }
      this.seen.set(dir, problem === undefined ? undefined : `on its path, ${dir} is ${problem}`);
    }
    return this.seen.get(dir);
  }

  /** What is wrong with the policy directory itself or the directories above it, or undefined. */
  checkDirectory(path: string): string | undefined {
    const real = realpathSync(path);
    const st = statSync(real);
    if (!st.isDirectory()) return 'not a directory';
    return untrusted(st, this.owners, false) ?? this.ancestors(real);
  }

  /**
   * Reads a file that must be trusted, through the descriptor that was checked.
   * `maxBytes`: a larger file is not read (`tooBig` is its size).
   */
  read(path: string, maxBytes: number): { bytes: Buffer } | { tooBig: number } | { error: string } {
    // Non-blocking: a FIFO put in the file's place must not hang the load (it is refused below as not a file).
    const fd = openSync(path, constants.O_RDONLY | constants.O_NONBLOCK | constants.O_NOCTTY);
    try {
      const st = fstatSync(fd);
      if (!st.isFile()) return { error: 'not a regular file' };
      const own = untrusted(st, this.owners, false);
      if (own !== undefined) return { error: own };
      const real = realpathSync(path);
      const there = statSync(real);
      if (there.ino !== st.ino || there.dev !== st.dev) return { error: 'it changed while it was read' };
      const above = this.ancestors(real);
      if (above !== undefined) return { error: above };
      if (st.size > maxBytes) return { tooBig: st.size };
      return { bytes: readFileSync(fd) };
    } finally {
      closeSync(fd);
    }
  }
}
