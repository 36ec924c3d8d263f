/**
 * The resolver follows the machine's upstreams when the policy names none:
 * DHCP gives a new server, NetworkManager or systemd-resolved rewrites its
 * file, `egressctl dns enable` records what was there. Without this the
 * resolver kept asking the servers it found at start until the next apply.
 */
import { isEgressError } from '../errors.js';
import { watchFiles, type FileWatch, type WatchFilesOptions } from '../system/watch-files.js';
import type { Discovered } from './upstreams.js';

export type Rediscovery =
  | { readonly kind: 'same'; readonly found: Discovered }
  | { readonly kind: 'changed'; readonly found: Discovered }
  /** None could be found now (a file mid-rewrite, a network going down): the servers in use are kept. */
  | { readonly kind: 'none'; readonly error: Error };

/** Discovers again and says whether the servers differ from those in use (in order: the first is asked first). */
export function rediscover(current: readonly string[], discover: () => Discovered): Rediscovery {
  let found: Discovered;
  try {
    found = discover();
  } catch (error) {
    if (isEgressError(error)) return { kind: 'none', error };
    throw error;
  }
  const same = found.upstreams.length === current.length && found.upstreams.every((server, i) => server === current[i]);
  return { kind: same ? 'same' : 'changed', found };
}

export interface FollowUpstreamsDeps {
  /** The files the last discovery read (`Discovered.watched`). */
  readonly watched: () => readonly string[];
  /** Discovers again and restarts the server where the servers changed; one at a time. */
  readonly rediscover: () => Promise<unknown>;
  /** A rediscovery threw. */
  readonly failed?: (error: unknown) => void;
  readonly watch?: WatchFilesOptions;
}

/** Watches the files the upstreams were read from, rediscovers on a change, and moves the watch when the files read changed. */
export function followUpstreams(deps: FollowUpstreamsDeps): FileWatch {
  let files = [...deps.watched()];
  let closed = false;
  let running: Promise<void> | undefined;
  let again = false;
  const onChange = (): void => {
    if (running) {
      again = true;
      return;
    }
    running = (async () => {
      do {
        again = false;
        try {
          await deps.rediscover();
        } catch (error) {
          deps.failed?.(error);
        }
        const now = [...deps.watched()];
        if (!closed && now.join('\n') !== files.join('\n')) {
          files = now;
          current.close();
          current = watchFiles(files, onChange, deps.watch);
          // A file the new watch covers may have changed after it was read and before it was watched: look once more.
          again = true;
        }
      } while (again && !closed);
      running = undefined;
    })();
  };
  let current = watchFiles(files, onChange, deps.watch);
  return {
    close() {
      closed = true;
      current.close();
    },
  };
}
