/**
 * The app tracker as a part of egressd (src/daemon/part.ts): started once
 * the table is enforced, told of every later apply, stopped with egressd.
 * The kernel keeps every element it wrote whether or not it runs; while it
 * is down, new cgroups meet the table's default until it is back (its first
 * look finds them).
 *
 *   import { appsPart } from '../apps/part.js';
 *   parts.push(appsPart());                       // the system bus, /sys/fs/cgroup
 *   parts.push(appsPart({ systemd: false }));     // inotify and the periodic look alone
 */
import { lstatSync } from 'node:fs';
import { join } from 'node:path';
import { TABLE } from '../compile/compile.js';
import type { Part, PartContext, PartSpec } from '../daemon/part.js';
import { openCgroupMapWriter, type CgroupMapWriter } from '../nft/set-elements.js';
import type { InForce } from '../resolver/runtime.js';
import { followSystemd, type SystemdFollow } from './systemd.js';
import { SWEPT_STATES } from '../enforce/sweep.js';
import { openCgroupPaths, type CgroupPaths } from '../system/cgroup-id.js';
import { CGROUP2_ROOT } from '../system/facts.js';
import { openSockDiag, type SockDiag } from '../system/sock-diag.js';
import { CgroupTracker, type TrackerChange } from './tracker.js';

export interface AppsPartOptions {
  /** Where cgroup2 is mounted; default /sys/fs/cgroup. */
  readonly root?: string;
  /**
   * systemd's signals: default the system bus, and without one (a container,
   * no systemd) the tracker runs on inotify alone and says so; `busAddress`
   * names a bus that must answer (the part fails to start otherwise); false:
   * not followed.
   */
  readonly systemd?: false | { readonly busAddress?: string };
  /** Watch cgroupfs with inotify (default true). */
  readonly watch?: boolean;
  /** The full look at every matching cgroup (what inotify's overflow may have lost); default 30,000 ms. */
  readonly reconcileMs?: number;
  readonly maxTracked?: number;
  readonly maxWatches?: number;
  /** The shortest time between two re-applies the tracker asks for (a cgroup nft cannot name, whose ancestor's level has no map to cut it off in); default 10,000 ms. A need asked for in vain waits twice as long each time. */
  readonly recompileIntervalMs?: number;
  /** The longest such a wait grows; default the tracker's, 300,000 ms. */
  readonly maxRecompileBackoffMs?: number;
  /** Default: a netlink socket of this network namespace (openCgroupMapWriter). */
  readonly writer?: () => CgroupMapWriter;
  /** Tests and the bench: every write, when acknowledged. */
  readonly onChange?: (change: TrackerChange) => void;
  /** How often removed cgroups' ids kept for the sockets that carry them are looked at again; default the tracker's, 2,000 ms. */
  readonly lingerCheckMs?: number;
}

export const APPS_PART_NAME = 'apps';

export function appsPart(options: AppsPartOptions = {}): PartSpec {
  return { name: APPS_PART_NAME, start: (inForce, context) => startApps(inForce, context, options) };
}

async function startApps(first: InForce, context: PartContext, options: AppsPartOptions): Promise<Part> {
  const { log } = context;
  const writer = (options.writer ?? (() => openCgroupMapWriter()))();
  // Opened when a cgroup first goes: which of the removed cgroups' ids sockets that may still send carry (CgroupTracker, `carried`).
  let diag: SockDiag | undefined;
  const root = options.root ?? CGROUP2_ROOT;
  const paths = cgroupPathsOrNone(root, log);
  let stop: (why: unknown) => void = () => undefined;
  const stopped = new Promise<unknown>((resolve) => (stop = resolve));
  const tracker = new CgroupTracker({
    writer,
    log,
    liveSets: async () => {
      const names = await context.nft.listNames(TABLE.family, TABLE.name);
      return new Set([...(names?.sets ?? []), ...(names?.maps ?? [])].map((x) => x.name));
    },
    ...(options.root === undefined ? {} : { root: options.root }),
    ...(options.watch === undefined ? {} : { watch: options.watch }),
    ...(options.maxTracked === undefined ? {} : { maxTracked: options.maxTracked }),
    ...(options.maxWatches === undefined ? {} : { maxWatches: options.maxWatches }),
    ...(options.onChange === undefined ? {} : { onChange: options.onChange }),
    ...(options.recompileIntervalMs === undefined ? {} : { recompileIntervalMs: options.recompileIntervalMs }),
    ...(options.maxRecompileBackoffMs === undefined ? {} : { maxRecompileBackoffMs: options.maxRecompileBackoffMs }),
    ...(options.lingerCheckMs === undefined ? {} : { lingerCheckMs: options.lingerCheckMs }),
    carried: () => (diag ??= openSockDiag()).tcpCgroupIds(SWEPT_STATES),
    ...(paths === undefined ? {} : { cgroupAlive: (id: bigint) => cgroupAlive(paths, root, id) }),
    // How often is the tracker's to bound (per need, with back-off): every ask it makes is a re-apply.
    recompile: (why) => {
      log.info({ event: 'apps-recompile', why }, `app tracker: re-applying: ${why}`);
      context
        .reload(`app tracker: ${why}`)
        .catch((error: unknown) => log.error({ event: 'apps-recompile-failed', error: String(error) }, 'app tracker: the re-apply failed'));
    },
  });
  let systemd: SystemdFollow | undefined;
  let timer: NodeJS.Timeout | undefined;
  let queue: Promise<unknown> = Promise.resolve();
  let down: Promise<void> | undefined;
  const shutDown = (): Promise<void> =>
    (down ??= (async () => {
      clearInterval(timer);
      systemd?.close();
      tracker.close();
      await queue;
      writer.close();
      diag?.close();
      paths?.close();
    })());
  try {
    await tracker.setPolicy(first);
    if (options.systemd !== false) {
      const busAddress = options.systemd?.busAddress;
      try {
        systemd = await followSystemd({
          ...(busAddress === undefined ? {} : { busAddress }),
          onCgroup: (path) => tracker.notice(path),
          onLost: (error) => {
            log.warn({ event: 'apps-systemd-lost', error: error.message }, "app tracker: systemd's bus went away");
            // Stopped whole, so that the part the daemon starts again is the only one watching and writing.
            void shutDown().then(() => stop(error));
          },
        });
      } catch (error) {
        // Named explicitly, the bus must answer; the machine's own may simply not be there.
        if (busAddress !== undefined) throw error;
        log.info({ event: 'apps-no-systemd', reason: (error as Error).message }, "app tracker: systemd's signals are not followed; cgroupfs alone tells");
      }
    }
    timer = setInterval(() => tracker.lookEverywhere(), options.reconcileMs ?? 30_000);
    timer.unref();
  } catch (error) {
    tracker.close();
    systemd?.close();
    writer.close();
    diag?.close();
    paths?.close();
    throw error;
  }
  log.info({ event: 'apps-ready', ...tracker.counters(), systemd: systemd !== undefined }, 'app tracker: following cgroups');
  return {
    update(inForce) {
      const run = queue.then(() => tracker.setPolicy(inForce));
      queue = run.catch(() => undefined);
      return run;
    },
    close: shutDown,
    stopped,
    describe() {
      const c = tracker.counters();
      return `apps: ${c.tracked} cgroups tracked, ${c.watches} directories watched, systemd signals ${systemd ? 'on' : 'off'}${c.dropped > 0 ? `, ${c.dropped} over the bound` : ''}${c.cut > 0 ? `, ${c.cut} unnameable cut off at an ancestor` : ''}${c.recompiles > 0 ? `, ${c.recompiles} re-applies asked` : ''}${c.lingering > 0 ? `, ${c.lingering} removed kept for their sockets` : ''}`;
    },
  };
}

/** Whether the cgroup `id` names exists now: found by its id, and its directory still that id (a cgroup made again at a path has a new one). A lookup that fails says no: its id is then kept. */
function cgroupAlive(paths: CgroupPaths, root: string, id: bigint): boolean {
  try {
    const path = paths.pathOf(id);
    return path !== undefined && lstatSync(path === '' ? root : join(root, path), { bigint: true }).ino === id;
  } catch {
    return false;
  }
}

/** Ids to paths for `cgroupAlive`; where they cannot be had (no cgroup2, no libc to bind), every id a socket carries counts as a live cgroup's. */
function cgroupPathsOrNone(root: string, log: PartContext['log']): CgroupPaths | undefined {
  try {
    return openCgroupPaths({ root });
  } catch (error) {
    log.error(
      { event: 'apps-sockets-unread', error: String(error) },
      "app tracker: cgroup ids cannot be looked up; a removed cgroup's id stays only while a socket carries it",
    );
    return undefined;
  }
}
