import { statSync, watch, type FSWatcher } from 'node:fs';
import { basename, dirname } from 'node:path';

/**
 * Tells when any of some files may have changed, one call per burst.
 *
 * The directories are watched, not the files: the tools that edit account
 * files and resolv.conf write a new file and rename it over the old one
 * (useradd's /etc/passwd+, shadow's lock files, systemd-resolved's atomic
 * writes), and a watch on the old file's inode would see it unlinked and
 * nothing after. A directory's watch sees every name that comes, goes or is
 * written in it, so a file that disappears and comes back is still followed;
 * only the names asked for count (passwd.lock, passwd- and passwd+ do not).
 *
 * A directory that is not there (yet), or whose watch fails (it was removed
 * and made again: inotify follows the old inode, so an event naming the
 * directory itself makes it look again), is tried again every `retryMs`, and its files count as
 * changed when the watch comes back: what happened meanwhile was not seen.
 *
 * A change is reported `debounceMs` after the last event of a burst (useradd
 * touches passwd, group, shadow, gshadow, subuid and subgid in turn): the
 * caller reads the files once, after the tool is done.
 */
export interface FileWatch {
  close(): void;
}

export interface WatchFilesOptions {
  /** Quiet time after the last event before `onChange` (default 300 ms). */
  readonly debounceMs?: number;
  /** How often a directory that cannot be watched is tried again (default 2000 ms). */
  readonly retryMs?: number;
  /** A directory's watch could not be set or failed (it is retried). */
  readonly onWatchError?: (dir: string, error: unknown) => void;
}

export const WATCH_DEBOUNCE_MS = 300;
const RETRY_MS = 2000;

export function watchFiles(files: readonly string[], onChange: (changed: readonly string[]) => void, options: WatchFilesOptions = {}): FileWatch {
  const debounceMs = options.debounceMs ?? WATCH_DEBOUNCE_MS;
  const retryMs = options.retryMs ?? RETRY_MS;
  const byDir = new Map<string, Map<string, string>>();
  for (const file of files) {
    const names = byDir.get(dirname(file)) ?? new Map<string, string>();
    names.set(basename(file), file);
    byDir.set(dirname(file), names);
  }
  const pending = new Set<string>();
  let timer: NodeJS.Timeout | undefined;
  let closed = false;
  const changed = (file: string): void => {
    if (closed) return;
    pending.add(file);
    if (timer) clearTimeout(timer);
    timer = setTimeout(() => {
      timer = undefined;
      const now = [...pending].sort();
      pending.clear();
      onChange(now);
    }, debounceMs);
  };

  const watchers = new Map<string, FSWatcher>();
  const retries = new Map<string, NodeJS.Timeout>();
  const open = (dir: string, names: Map<string, string>, again: boolean): void => {
    if (closed) return;
    try {
      if (!statSync(dir).isDirectory()) throw new Error(`${dir} is not a directory`);
      // persistent: the watch is what a daemon waits on; the caller closes it when it stops.
      const watcher = watch(dir, { persistent: true }, (_event, name) => {
        // No name (rare, a dropped inotify queue): any of the files may have changed.
        if (name === null) for (const file of names.values()) changed(file);
        // The directory itself was removed or moved (a file of the same name in it is taken for that too: looking again costs little).
        else if (name === basename(dir)) lost(new Error(`${dir} was removed or moved`), true);
        else {
          const file = names.get(name);
          if (file !== undefined) changed(file);
        }
      });
      const lost = (error: unknown, now = false): void => {
        watcher.close();
        watchers.delete(dir);
        options.onWatchError?.(dir, error);
        // Removed and made again at once (rm -r, mkdir) is common: look now, then every retryMs.
        if (now) open(dir, names, true);
        else retry(dir, names);
      };
      watcher.on('error', (error) => lost(error));
      watchers.set(dir, watcher);
      if (again) for (const file of names.values()) changed(file);
    } catch (error) {
      options.onWatchError?.(dir, error);
      retry(dir, names);
    }
  };
  const retry = (dir: string, names: Map<string, string>): void => {
    if (closed || retries.has(dir)) return;
    const handle = setTimeout(() => {
      retries.delete(dir);
      open(dir, names, true);
    }, retryMs);
    // A missing directory alone does not keep a process alive.
    handle.unref();
    retries.set(dir, handle);
  };
  for (const [dir, names] of byDir) open(dir, names, false);

  return {
    close() {
      closed = true;
      if (timer) clearTimeout(timer);
      for (const handle of retries.values()) clearTimeout(handle);
      for (const watcher of watchers.values()) watcher.close();
      retries.clear();
      watchers.clear();
    },
  };
}
