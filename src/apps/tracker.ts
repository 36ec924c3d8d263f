/**
 * Keeps the table's identity maps (`socket cgroupv2 level N` verdict maps)
 * in step with cgroupfs while egressd runs: a cgroup that a selector of the
 * policy in force matches is written into its maps by id as soon as it is
 * seen, and taken out when it goes.
 *
 * Seen by inotify (Node's fs.watch, one watch per directory on the way to
 * a selector's level, and only those: what is deeper or elsewhere costs
 * nothing), by systemd's signals (systemd.ts, as `notice`), and by a full
 * look every `reconcileMs` and after every apply (`setPolicy`). The truth
 * is always cgroupfs: every path, however it was heard of, is looked at
 * with one lstat, which gives its id (the directory's inode number, what
 * `socket cgroupv2` yields) and its owner (a non-root owner is a delegated
 * cgroup, with the verdict compile gives those). Its name is matched as
 * compile matches it (bytes that are not UTF-8 read as U+FFFD) and written
 * by id, so a name nft could not carry is written all the same.
 *
 * fs.watch, not inotify through koffi: cgroupfs reports mkdir and rmdir to
 * inotify as any directory does, and fs.watch takes them off the event loop
 * with no thread of its own. What it cannot do is say that the kernel's
 * inotify queue overflowed (libuv drops IN_Q_OVERFLOW): the periodic look
 * and systemd's signals are what covers that.
 *
 * Paths heard of within one turn of the event loop are looked at together
 * and written in one transaction (a burst of thousands of cgroups costs one
 * lstat each and a few transactions). Bounded: at most `maxTracked`
 * cgroups held and `maxWatches` directories watched; past either, a cgroup
 * is not written and is counted (`dropped`) — its packets meet the table's
 * default, never another identity's verdict.
 *
 * A cgroup whose name nft cannot carry (not UTF-8, a quote, a control
 * character: its user names the cgroups of its own subtree with any
 * bytes) is never written by id — nft 1.0.6 aborts listing a map element
 * whose path it cannot print — and is decided as compile decides it, with
 * no compile: for an identity that lets out (an app whose default allows)
 * it is left out, its packets meeting what follows; for one that denies,
 * its nearest ancestor nft can name is cut off instead, at that level's map
 * of the same dispatch, with the identity's closed verdict (`Claim.cutOff`)
 * — written by the ancestor's id, which lists. However many such cgroups a
 * user makes, they cost one lstat each and no re-apply.
 *
 * The chains a new member may be sent to — its app's chain for delegated
 * members, its identity's closed chain — are in every table whose policy
 * can need them (Compiler.keepForTracker), so a user's app started again
 * joins its map at once. One thing only a compile can make, the tracker
 * asks for (`recompile`): the map of the level a cut-off ancestor sits at,
 * when no selector uses that level. Asked per such need (a key the
 * policy's selectors give, never a cgroup's id or name): at most one ask
 * per `recompileIntervalMs`, and a need asked for again waits twice as long
 * each time, up to `maxRecompileBackoffMs` — also when the compile met it,
 * since a compile makes that map only while such a cgroup is there — and a
 * need not asked for in `recompileQuietMs` is forgotten. Needs are keyed by
 * the user the cgroup's subtree is delegated to (principalOf). So a user
 * making and removing cgroups nft cannot name, in a loop, forces a number
 * of re-applies that grows with the log of the time it keeps at it, up to
 * one per need and `maxRecompileBackoffMs`; and such a cgroup of its own
 * made while its need waits meets what follows it (its user's identities,
 * the default) for at most that long — as any process of that user may
 * anyway, by leaving the cgroups the user's identity is chosen by.
 *
 * A removed cgroup's id stays in its maps while a closed socket may still
 * be sending for it: a socket keeps its cgroup after its program closed it
 * and after the cgroup was removed, and the kernel goes on sending what it
 * left queued. Taken out at once, the id would let that meet what follows
 * instead of its identity — for a system domain's member, a unit that
 * wrote, closed and exited, the default. Every `lingerCheckMs`, the cgroup
 * ids the TCP sockets that may still send carry (`carried`, sock_diag) are
 * read: a kept id goes once no socket carries it, nor any cgroup that no
 * longer exists (`cgroupAlive`) — sock_diag gives a socket's own cgroup,
 * and the map matches its ancestor at the member's level, so a removed
 * member's removed child (a slice's units, a delegated unit's own cgroups)
 * keeps it too; whose removed cgroup it was cannot be read, so any keeps
 * every kept id. Kept ids are written into each new generation's maps
 * with what the policy in force claims for their path, and go when it
 * claims nothing. Only cgroups only root could remove are kept (units,
 * slices, the root of a unit's delegated subtree): a user leaves its own
 * cgroups at will, and must not fill the bound with ids. A socket a user
 * keeps in a cgroup it removed keeps every kept id while it lives (whose
 * it is cannot be told); past the bound (`maxTracked`, with those held),
 * removed ids go at once, said as `apps-full`.
 * Cgroup ids are 64-bit and never reused: one kept too long matches no
 * new cgroup.
 *
 * A cgroup born while an apply runs may be missing from the new
 * generation's maps (the apply listed cgroups before it was born) and its
 * write may land in the generation being removed: the daemon calls
 * `setPolicy` after every apply, which reads the new maps' names and looks
 * at every cgroup again, so it is written there; until then its packets
 * meet the default. A write refused because its map is gone reads the live
 * names again and is redone.
 */
import { lstatSync, readdirSync, watch, type FSWatcher } from 'node:fs';
import { performance } from 'node:perf_hooks';
import type { Logger } from 'pino';
import { nftCanName, type Compiled } from '../compile/compile.js';
import { showBytes } from '../system/facts.js';
import { setWriteRefusal } from '../errors.js';
import { MAX_WRITES_PER_TRANSACTION, type CgroupElementRemoval, type CgroupElementWrite, type CgroupMapWriter, type MapVerdict } from '../nft/set-elements.js';
import type { Verdict } from '../compile/ruleset.js';
import { cgroupMapsInForce, cgroupRules, liveVerdict, verdictKey, type CgroupRules, type Claim, type LiveMap } from './rules.js';

export interface TrackerOptions {
  readonly writer: CgroupMapWriter;
  readonly log: Logger;
  /** The names of the table's sets and maps now (a cheap listing): for a policy given without live names, and after a write found its map gone. */
  readonly liveSets: () => Promise<ReadonlySet<string>>;
  /** Where cgroup2 is mounted; default /sys/fs/cgroup, where nft and the kernel's ids agree. */
  readonly root?: string;
  /** Watch cgroupfs (default true); false leaves systemd's signals and the periodic look (tests of the signals alone). */
  readonly watch?: boolean;
  /** Default 65,536 cgroups (and as many cut-offs). */
  readonly maxTracked?: number;
  /** Of `maxTracked`, kept for root-owned cgroups (systemd's units): default a quarter. */
  readonly rootReserve?: number;
  /** Cgroups (and cut-offs) one non-root uid may have held; default an eighth of `maxTracked`. */
  readonly maxTrackedPerUid?: number;
  /** Default 4096 directories. */
  readonly maxWatches?: number;
  /** Directories read per full look at most; default 100,000. */
  readonly walkLimit?: number;
  /**
   * A cgroup needs what only a new compile makes (a level's map to cut
   * off at): see the module's comment for how often it is asked.
   */
  readonly recompile?: (why: string) => void;
  /** The shortest time between two asks; default 10,000 ms. */
  readonly recompileIntervalMs?: number;
  /**
   * The longest a need waits before it is asked for again; default 300,000 ms: also how long a cgroup of that need may meet
   * the default meanwhile, so short — the cost is at most one re-apply per need and that time.
   */
  readonly maxRecompileBackoffMs?: number;
  /** A need not asked for this long is forgotten (its back-off starts afresh); default 1,800,000 ms. */
  readonly recompileQuietMs?: number;
  /** The clock for the above, in ms (tests); default performance.now. */
  readonly now?: () => number;
  /** Told of every cgroup written or taken out, when the kernel acknowledged it (tests, bench). */
  readonly onChange?: (change: TrackerChange) => void;
  /**
   * The cgroup ids that TCP sockets which may still send carry (sock_diag):
   * a removed cgroup's id stays in its maps while one does, or one of a
   * cgroup that no longer exists. Absent: ids go with their cgroup.
   */
  readonly carried?: () => ReadonlySet<bigint>;
  /** Whether a cgroup with this id exists now; absent, every id `carried` gives but the kept ones is taken as one that does. */
  readonly cgroupAlive?: (id: bigint) => boolean;
  /** How often ids kept for sockets are looked at again; default 2,000 ms. */
  readonly lingerCheckMs?: number;
}

export interface TrackerChange {
  readonly path: string;
  readonly id: bigint;
  readonly added: boolean;
  /** The live maps written. */
  readonly maps: readonly string[];
  /** performance.timeOrigin + performance.now() at the acknowledgement. */
  readonly at: number;
}

export interface TrackerCounters {
  readonly tracked: number;
  readonly watches: number;
  readonly added: number;
  readonly removed: number;
  readonly failed: number;
  readonly dropped: number;
  readonly looks: number;
  readonly recompiles: number;
  /** Asks not made: within the interval, or the need's back-off. */
  readonly recompilesHeld: number;
  /** Cgroups nft cannot name whose ancestor is cut off in their stead. */
  readonly cut: number;
  /** Cgroups nft cannot name, left out (an identity that lets out, or no ancestor nft can name). */
  readonly leftOut: number;
  /** Removed cgroups whose ids stay in their maps for the sockets that carry them. */
  readonly lingering: number;
}

/** The policy in force as the tracker uses it. */
export interface TrackedPolicy {
  readonly compiled: Compiled;
  readonly liveNames?: ReadonlyMap<string, readonly string[]>;
}

interface View {
  readonly compiled: Compiled;
  readonly rules: CgroupRules;
  readonly chains: ReadonlySet<string>;
  readonly maps: ReadonlyMap<string, readonly LiveMap[]>;
  readonly live: ReadonlySet<string>;
}

/** A cgroup nft cannot name, whose nearest nameable ancestor is cut off in its stead: per dispatch, that level's map and the closed verdict. */
interface Cut {
  readonly bytes: Buffer;
  readonly uid: number;
  readonly ancestor: Buffer;
  readonly ancestorKey: string;
  readonly marks: readonly { readonly map: string; readonly verdict: Verdict }[];
}

/**
 * What the cuts below one ancestor ask of it, per compiled map: each
 * verdict with how many cuts ask for it, in the order first asked (the
 * first decides, as compile's first does). Kept as cuts come and go, so a
 * look at the ancestor costs the maps, never the cuts under it.
 */
type CutsOn = Map<string, Map<string, { readonly verdict: Verdict; count: number }>>;

interface Need {
  readonly misses: number;
  readonly notBefore: number;
  /** When last asked for, granted or held: a need quiet for `recompileQuietMs` is forgotten. */
  readonly lastAsked: number;
}

interface Entry {
  readonly bytes: Buffer;
  readonly text: string;
  readonly id: bigint;
  /** Its owner when first held: what it is counted against (`maxTrackedPerUid`). */
  readonly uid: number;
  /** Live map → the verdict written there (verdictKey). */
  readonly written: Map<string, string>;
}

const SLASH = Buffer.from('/');

export class CgroupTracker {
  private readonly root: Buffer;
  private view: View | undefined;
  private readonly tracked = new Map<string, Entry>();
  private readonly watches = new Map<string, FSWatcher>();
  private readonly pending = new Map<string, Buffer>();
  private scheduled = false;
  private closed = false;
  private stale = false;
  private readonly count = { added: 0, removed: 0, failed: 0, dropped: 0, looks: 0, recompiles: 0, recompilesHeld: 0, leftOut: 0 };
  private warnedFull = false;
  private refreshing = false;
  private lastRefresh = -Infinity;
  /** By the unnameable cgroup's key. */
  private readonly cuts = new Map<string, Cut>();
  /** Ancestor key → what the cuts below it ask of it. */
  private readonly cutOn = new Map<string, CutsOn>();
  /** Non-root uid → cgroups held and cuts made of its cgroups. */
  private readonly perUid = new Map<number, number>();
  /** By need (recompileKey): how often asked in vain, and when it may be asked again. */
  private readonly needs = new Map<string, Need>();
  private lastAsk = -Infinity;
  /** What was said about cgroups left out, once per map and owner. */
  private readonly told = new Set<string>();
  /** Removed cgroups whose ids stay in their maps while a socket carries them, by id. */
  private readonly lingering = new Map<bigint, Entry>();
  private lingerTimer: NodeJS.Timeout | undefined;
  /** The view the kept ids were last written for: a new one (an apply) writes them again. */
  private lingerView: View | undefined;
  /** A write the kernel refused was said (apps-write-failed) and none has succeeded since. */
  private writesFailing = false;
  private warnedCarried = false;

  constructor(private readonly options: TrackerOptions) {
    this.root = Buffer.from((options.root ?? '/sys/fs/cgroup').replace(/\/+$/, ''));
  }

  /** A policy is in force (the first, or after an apply): its maps' live names, then a look at every cgroup. */
  async setPolicy(policy: TrackedPolicy): Promise<void> {
    const given = policy.liveNames;
    const liveSets = given ? undefined : await this.options.liveSets();
    const maps = cgroupMapsInForce(policy.compiled, liveSets, given);
    const missing = [...new Set(policy.compiled.cgroupBindings.map((b) => b.map))].filter((map) => !maps.has(map)).length;
    if (missing > 0)
      this.options.log.warn({ event: 'apps-maps-missing', maps: missing }, 'app tracker: some identity maps of the policy are not in the table in force');
    this.install(policy.compiled, maps);
    this.lookEverywhere();
    this.holdCompiledCuts();
  }

  /**
   * The ancestors compile itself cut off (an unnameable member it saw) are
   * held as written, so that one whose member went while the apply ran is
   * freed: the tracker never saw that member. After the look, which cut
   * again those whose member is still there, and a turn before their own
   * look, which keeps what a cut still asks for and takes out the rest.
   */
  private holdCompiledCuts(): void {
    const view = this.view;
    if (this.closed || !view) return;
    const cutVerdicts = new Set(view.compiled.cgroupBindings.flatMap((b) => (b.cutOff ? [JSON.stringify(b.cutOff)] : [])));
    if (cutVerdicts.size === 0) return;
    for (const set of view.compiled.ruleset.sets) {
      const lives = view.maps.get(set.name);
      if (lives === undefined || set.verdicts === undefined) continue;
      set.elements.forEach((element, i) => {
        const verdict = set.verdicts![i]!;
        if (typeof element !== 'string' || !cutVerdicts.has(JSON.stringify(verdict))) return;
        const relative = Buffer.from(element);
        const key = relative.toString('latin1');
        let entry = this.tracked.get(key);
        if (entry === undefined) {
          let stat;
          try {
            stat = lstatSync(this.absolute(relative), { bigint: true });
          } catch {
            return; // gone: its id went out of the map with it
          }
          const uid = this.principalOf(relative, Number(stat.uid));
          if (!this.admit(uid, this.tracked.size)) return;
          entry = { bytes: relative, text: element, id: stat.ino, uid, written: new Map() };
          this.tracked.set(key, entry);
          this.countUid(uid, 1);
        }
        for (const live of lives)
          if (!entry.written.has(live.live)) entry.written.set(live.live, verdictKey(liveVerdict(verdict, live.generation, view.chains)));
        this.queue(relative);
      });
    }
  }

  /** A cgroup path someone told of (systemd): it and its ancestors are looked at. */
  notice(path: string): void {
    if (this.closed || !this.view) return;
    const segments = path.split('/').filter((s) => s !== '');
    // Told, not read: a ".." would look outside cgroupfs, at an inode that is no cgroup's.
    if (segments.some((s) => s === '.' || s === '..')) return;
    for (let depth = 1; depth <= Math.min(segments.length, this.view.rules.maxLevel); depth++) this.queue(Buffer.from(segments.slice(0, depth).join('/')));
  }

  /** Looks at every cgroup a selector can match, and at every one held: what inotify missed is found here. */
  lookEverywhere(): void {
    if (this.closed || !this.view) return;
    this.count.looks++;
    const { rules } = this.view;
    const limit = this.options.walkLimit ?? 100_000;
    let read = 0;
    const walk = (relative: Buffer, depth: number): void => {
      if (read++ >= limit) return;
      this.watchDir(relative);
      let names: Buffer[];
      try {
        names = readdirSync(this.absolute(relative), { withFileTypes: true, encoding: 'buffer' })
          .filter((e) => e.isDirectory())
          .map((e) => e.name);
      } catch {
        return;
      }
      for (const name of names) {
        const child = relative.length === 0 ? name : Buffer.concat([relative, SLASH, name]);
        this.queue(child);
        if (depth + 1 < rules.maxLevel && rules.leadsToMatch(child.toString('utf8'))) walk(child, depth + 1);
      }
    };
    if (rules.maxLevel > 0) walk(Buffer.alloc(0), 0);
    for (const entry of this.tracked.values()) this.queue(entry.bytes);
    for (const cut of this.cuts.values()) this.queue(cut.bytes);
    this.flush();
  }

  counters(): TrackerCounters {
    return { tracked: this.tracked.size, watches: this.watches.size, cut: this.cuts.size, lingering: this.lingering.size, ...this.count };
  }

  close(): void {
    this.closed = true;
    clearTimeout(this.lingerTimer);
    for (const watcher of this.watches.values()) watcher.close();
    this.watches.clear();
    this.pending.clear();
  }

  private install(compiled: Compiled, maps: ReadonlyMap<string, readonly LiveMap[]>): void {
    const live = new Set([...maps.values()].flatMap((list) => list.map((m) => m.live)));
    const chains = new Set(compiled.ruleset.chains.filter((c) => !c.hook).map((c) => c.name));
    this.view = { compiled, rules: cgroupRules(compiled.cgroupBindings), chains, maps, live };
    this.stale = false;
    // What went with the previous generation is no longer ours to remove; what stays (a kept map) is compared anew.
    for (const entry of [...this.tracked.values(), ...this.lingering.values()])
      for (const map of [...entry.written.keys()]) if (!live.has(map)) entry.written.delete(map);
    for (const [key, watcher] of this.watches) {
      if (!this.view.rules.leadsToMatch(Buffer.from(key, 'latin1').toString('utf8'))) {
        watcher.close();
        this.watches.delete(key);
      }
    }
  }

  private absolute(relative: Buffer): Buffer {
    return relative.length === 0 ? this.root : Buffer.concat([this.root, SLASH, relative]);
  }

  private queue(relative: Buffer): void {
    this.pending.set(relative.toString('latin1'), relative);
    if (this.scheduled) return;
    this.scheduled = true;
    setImmediate(() => this.flush());
  }

  private watchDir(relative: Buffer): void {
    const key = relative.toString('latin1');
    if (this.options.watch === false || this.watches.has(key) || this.closed) return;
    if (this.watches.size >= (this.options.maxWatches ?? 4096)) {
      this.full('watches');
      return;
    }
    let watcher: FSWatcher;
    try {
      watcher = watch(this.absolute(relative), { encoding: 'buffer', persistent: false }, (_event, name) => {
        // No name: something changed that inotify could not name; the directory is read again.
        if (name === null) this.relist(relative);
        else this.queue(relative.length === 0 ? name : Buffer.concat([relative, SLASH, name]));
      });
    } catch {
      return; // gone already: its parent's watch tells
    }
    watcher.on('error', () => {
      watcher.close();
      this.watches.delete(key);
      this.queue(relative);
    });
    this.watches.set(key, watcher);
  }

  /** A directory just watched, or whose watch could not name what changed: every child is looked at (what came before the watch). */
  private relist(relative: Buffer): void {
    try {
      for (const entry of readdirSync(this.absolute(relative), { withFileTypes: true, encoding: 'buffer' }))
        if (entry.isDirectory()) this.queue(relative.length === 0 ? entry.name : Buffer.concat([relative, SLASH, entry.name]));
    } catch {
      // gone: its own removal is heard of
    }
  }

  private full(what: 'watches' | 'cgroups'): void {
    this.count.dropped++;
    if (this.warnedFull) return;
    this.warnedFull = true;
    this.options.log.warn({ event: 'apps-full', what }, `app tracker: too many ${what}; cgroups past the bound are not written and meet the table's default`);
  }

  /** Looks at every path heard of, then writes what changed in as few transactions as the batch limit allows. */
  private flush(): void {
    this.scheduled = false;
    const view = this.view;
    if (this.closed || !view) return;
    const adds: { entry: Entry; map: string; verdict: MapVerdict }[] = [];
    const removals: { entry: Entry; map: string; id: bigint }[] = [];
    const gone: Entry[] = [];
    // A snapshot: a path queued while these are looked at (an ancestor a cut names) is looked at in the next turn, once these are written.
    const batch = [...this.pending];
    this.pending.clear();
    for (const [key, relative] of batch) this.look(view, key, relative, adds, removals, gone);
    this.linger(gone, removals);
    if (this.lingerView !== view) this.keepLingering(view, adds, removals);
    this.write(adds, removals);
    if (this.stale) void this.refresh();
  }

  private look(
    view: View,
    key: string,
    relative: Buffer,
    adds: { entry: Entry; map: string; verdict: MapVerdict }[],
    removals: { entry: Entry; map: string; id: bigint }[],
    removed: Entry[],
  ): void {
    const text = relative.toString('utf8');
    const depth = text.split('/').length;
    const held = this.tracked.get(key);
    const cutsHere = this.cutOn.get(key);
    const cutting = this.cuts.get(key);
    if (depth > view.rules.maxLevel && held === undefined && cutting === undefined) return;
    const claims = [...view.rules.claimsFor(text)];
    const leads = depth < view.rules.maxLevel && view.rules.leadsToMatch(text);
    if (claims.length === 0 && !leads && held === undefined && cutsHere === undefined && cutting === undefined) return;
    let stat: { ino: bigint; uid: bigint; isDirectory(): boolean } | undefined;
    try {
      stat = lstatSync(this.absolute(relative), { bigint: true });
    } catch {
      stat = undefined;
    }
    const gone = stat === undefined || !stat.isDirectory();
    // Removed, or removed and made again under the same path (a new id): the old id goes, once no socket carries it (linger).
    if (held && (gone || held.id !== stat!.ino)) {
      this.untrack(key);
      removed.push(held);
    }
    if (gone) {
      this.uncut(key);
      this.watches.get(key)?.close();
      this.watches.delete(key);
      return;
    }
    if (leads && this.options.watch !== false && !this.watches.has(key)) {
      this.watchDir(relative);
      // What was made in it before the watch was set is not heard of: read it once.
      if (this.watches.has(key)) this.relist(relative);
    }
    const desired = new Map<string, MapVerdict>();
    const uid = Number(stat!.uid);
    // Whose room and back-off it counts against: the user the subtree was delegated to, whatever owner it gave the cgroup.
    // Walked up to only when asked (a cut, a need, a first hold): the periodic look of what is held already asks nothing.
    let walked: number | undefined;
    const principal = (): number => (walked ??= this.principalOf(relative, uid));
    if (claims.length > 0 && !nameable(relative)) {
      // Written by id the kernel would take it, but nft then aborts listing the map (nft 1.0.6,
      // json.c mapping_expr_json): compile's way instead — left out, or its ancestor cut off.
      this.cutOff(view, key, relative, principal(), claims);
      claims.length = 0;
    } else if (cutting !== undefined) this.uncut(key);
    /** The compiled maps whose say on this path is its own claim's: a cut-off from below does not override it. */
    const own = new Set<string>();
    for (const claim of claims) {
      const verdict = uid === 0 ? claim.verdict : claim.delegatedVerdict;
      own.add(claim.map);
      for (const live of view.maps.get(claim.map) ?? []) desired.set(live.live, liveVerdict(verdict, live.generation, view.chains));
    }
    for (const [map, verdicts] of cutsHere ?? []) {
      if (own.has(map)) continue;
      // The first cut-off of a map decides, as compile's first does.
      const first = verdicts.values().next().value;
      if (first === undefined) continue;
      for (const live of view.maps.get(map) ?? [])
        if (!desired.has(live.live)) desired.set(live.live, liveVerdict(first.verdict, live.generation, view.chains));
    }
    let entry = this.tracked.get(key);
    if (entry === undefined) {
      if (desired.size === 0) return;
      if (!this.admit(principal(), this.tracked.size)) {
        this.full('cgroups');
        return;
      }
      entry = { bytes: relative, text, id: stat!.ino, uid: principal(), written: new Map() };
      this.tracked.set(key, entry);
      this.countUid(principal(), 1);
    }
    for (const [map, written] of entry.written) {
      const want = desired.get(map);
      if (want === undefined || verdictKey(want) !== written) removals.push({ entry, map, id: entry.id });
    }
    for (const [map, verdict] of desired) if (entry.written.get(map) !== verdictKey(verdict)) adds.push({ entry, map, verdict });
    // Nothing of it is wanted any more (the policy changed): its removals are queued above, and it is not held.
    if (desired.size === 0) this.untrack(key);
  }

  /**
   * Removed cgroups: root's are kept, by id, until the next look at the
   * sockets says none may still send for them (`checkLingering`); a user's
   * go now, as do all when nothing says what sockets carry or the bound is
   * reached (kept and held together, `maxTracked`).
   */
  private linger(removed: readonly Entry[], removals: { entry: Entry; map: string; id: bigint }[]): void {
    const max = this.options.maxTracked ?? 65_536;
    for (const entry of removed) {
      if (this.options.carried !== undefined && this.removedByRoot(entry)) {
        if (this.tracked.size + this.lingering.size < max) {
          this.lingering.set(entry.id, entry);
          continue;
        }
        this.full('cgroups');
      }
      for (const map of entry.written.keys()) removals.push({ entry, map, id: entry.id });
    }
    this.scheduleLingerCheck();
  }

  /**
   * Whether only root could have removed the cgroup: root's own (a unit, a
   * slice), or the root of a subtree root delegated (a unit with
   * `Delegate=` and `User=`, chowned to that user, under a parent of
   * root's). Below that, a user removes what it made at will.
   */
  private removedByRoot(entry: Entry): boolean {
    if (entry.uid === 0) return true;
    const slash = entry.bytes.lastIndexOf(0x2f);
    try {
      return lstatSync(this.absolute(slash < 0 ? Buffer.alloc(0) : entry.bytes.subarray(0, slash))).uid === 0;
    } catch {
      return false; // its parent went too: a subtree its user could remove
    }
  }

  /** A new view (an apply): the kept ids into its maps, with what it claims for their paths; those it claims nothing for go. */
  private keepLingering(view: View, adds: { entry: Entry; map: string; verdict: MapVerdict }[], removals: { entry: Entry; map: string; id: bigint }[]): void {
    this.lingerView = view;
    for (const [id, entry] of this.lingering) {
      const desired = new Map<string, MapVerdict>();
      for (const claim of view.rules.claimsFor(entry.text))
        for (const live of view.maps.get(claim.map) ?? []) desired.set(live.live, liveVerdict(claim.verdict, live.generation, view.chains));
      for (const [map, written] of entry.written) {
        const want = desired.get(map);
        if (want === undefined || verdictKey(want) !== written) removals.push({ entry, map, id });
      }
      for (const [map, verdict] of desired) if (entry.written.get(map) !== verdictKey(verdict)) adds.push({ entry, map, verdict });
      if (desired.size === 0) this.lingering.delete(id);
    }
  }

  /** Every `lingerCheckMs` while ids are kept: one look at the sockets' cgroups, and the ids no socket may still send for go. */
  private scheduleLingerCheck(): void {
    if (this.lingerTimer !== undefined || this.lingering.size === 0 || this.closed) return;
    this.lingerTimer = setTimeout(() => {
      this.lingerTimer = undefined;
      if (this.closed) return;
      this.checkLingering();
      this.retryLingering();
      if (this.stale) void this.refresh();
      this.scheduleLingerCheck();
    }, this.options.lingerCheckMs ?? 2000);
    this.lingerTimer.unref();
  }

  private checkLingering(): void {
    const carried = this.carriedIds();
    // Unread, every id stays: one kept too long matches nothing new, one gone too soon lets a closed socket's packets past.
    if (carried === undefined) return;
    const alive = this.options.cgroupAlive;
    const held = new Set([...this.tracked.values()].map((entry) => entry.id));
    // A socket of a cgroup that no longer exists, not one of the kept: a kept member's removed child, as far as can be told.
    const orphanedElsewhere = [...carried].some((id) => !this.lingering.has(id) && !held.has(id) && alive !== undefined && !alive(id));
    if (orphanedElsewhere) return;
    const removals: { entry: Entry; map: string; id: bigint }[] = [];
    for (const [id, entry] of this.lingering) {
      if (carried.has(id)) continue;
      this.lingering.delete(id);
      for (const map of entry.written.keys()) removals.push({ entry, map, id });
    }
    this.write([], removals);
  }

  /**
   * A kept id's write into the view in force that the kernel refused (not for a map gone with its generation: that view is
   * replaced) is tried again here, not at the next apply: until it is written its closed sockets' packets meet the default.
   */
  private retryLingering(): void {
    const view = this.view;
    if (view === undefined || this.lingerView === view) return;
    const adds: { entry: Entry; map: string; verdict: MapVerdict }[] = [];
    const removals: { entry: Entry; map: string; id: bigint }[] = [];
    this.keepLingering(view, adds, removals);
    this.write(adds, removals);
  }

  private carriedIds(): ReadonlySet<bigint> | undefined {
    try {
      const ids = this.options.carried?.();
      this.warnedCarried = false;
      return ids;
    } catch (error) {
      if (!this.warnedCarried)
        this.options.log.error(
          { event: 'apps-sockets-unread', error: String(error) },
          "app tracker: the sockets' cgroups could not be read; removed cgroups' ids stay in their maps until they can",
        );
      this.warnedCarried = true;
      return undefined;
    }
  }

  /**
   * The user a cgroup counts against: the owner of the topmost cgroup on its
   * path that root does not own — the delegation's root (`user@UID.service`,
   * a `Delegate=` unit's cgroup), which systemd gave that user. Not the
   * cgroup's own owner: inside its subtree a user with subordinate uids
   * (rootless podman's /etc/subuid range) can chown each cgroup it makes to
   * another of them, and would get a share and a back-off of its own for
   * each. Root's cgroups are root's.
   */
  private principalOf(relative: Buffer, owner: number): number {
    if (owner === 0) return 0;
    let end = relative.indexOf(0x2f);
    for (;;) {
      const prefix = end < 0 ? relative : relative.subarray(0, end);
      try {
        const uid = lstatSync(this.absolute(prefix)).uid;
        if (uid !== 0) return uid;
      } catch {
        return owner; // gone meanwhile: the look that follows takes it out
      }
      if (end < 0) return owner;
      end = relative.indexOf(0x2f, end + 1);
    }
  }

  private untrack(key: string): void {
    const entry = this.tracked.get(key);
    if (entry === undefined) return;
    this.tracked.delete(key);
    this.countUid(entry.uid, -1);
  }

  /**
   * Whether one more cgroup (or cut) of `uid` may be held beside `size`:
   * below the bound, and for a non-root uid below its own share and short
   * of the room kept for root's — a user filling the bound never stops a
   * unit systemd makes (a restart's new id) from being written.
   */
  private admit(uid: number, size: number): boolean {
    const max = this.options.maxTracked ?? 65_536;
    if (size >= max) return false;
    if (uid === 0) return true;
    if (size >= max - (this.options.rootReserve ?? Math.floor(max / 4))) return false;
    return (this.perUid.get(uid) ?? 0) < (this.options.maxTrackedPerUid ?? Math.max(1, Math.floor(max / 8)));
  }

  private countUid(uid: number, by: number): void {
    if (uid === 0) return;
    const count = (this.perUid.get(uid) ?? 0) + by;
    if (count <= 0) this.perUid.delete(uid);
    else this.perUid.set(uid, count);
  }

  private write(adds: { entry: Entry; map: string; verdict: MapVerdict }[], removals: { entry: Entry; map: string; id: bigint }[]): void {
    const { writer } = this.options;
    const at = (): number => performance.timeOrigin + performance.now();
    for (let i = 0; i < removals.length; i += MAX_WRITES_PER_TRANSACTION) {
      const chunk = removals.slice(i, i + MAX_WRITES_PER_TRANSACTION);
      const request: CgroupElementRemoval[] = chunk.map((r) => ({ map: r.map, id: r.id }));
      const whole = this.tryWrite(() => writer.remove(request), chunk.length);
      // A map that is gone holds nothing: its generation went with it. One the kernel refused to change still holds the
      // element, and stays written: what wants it gone asks again (the periodic look, the next check of the sockets).
      const outcomes =
        whole === 'done' || chunk.length === 1 ? chunk.map(() => whole) : chunk.map((r) => this.tryWrite(() => writer.remove([{ map: r.map, id: r.id }]), 1));
      const refused = chunk.filter((_, i) => outcomes[i] === 'refused');
      const removed = chunk.filter((r) => !refused.includes(r));
      for (const r of removed) r.entry.written.delete(r.map);
      this.count.removed += removed.length;
      const when = at();
      for (const [entry, maps] of byEntry(removed)) this.options.onChange?.({ path: entry.text, id: entry.id, added: false, maps, at: when });
    }
    for (let i = 0; i < adds.length; i += MAX_WRITES_PER_TRANSACTION) {
      const chunk = adds.slice(i, i + MAX_WRITES_PER_TRANSACTION);
      const request: CgroupElementWrite[] = chunk.map((a) => ({ map: a.map, id: a.entry.id, verdict: a.verdict }));
      const whole = this.tryWrite(() => writer.add(request), chunk.length);
      const outcomes =
        whole === 'done' || chunk.length === 1
          ? chunk.map(() => whole)
          : chunk.map((a) => this.tryWrite(() => writer.add([{ map: a.map, id: a.entry.id, verdict: a.verdict }]), 1));
      const done = chunk.filter((_, i) => outcomes[i] === 'done');
      const refused = chunk.filter((_, i) => outcomes[i] === 'refused');
      for (const a of done) a.entry.written.set(a.map, verdictKey(a.verdict));
      // A kept id the kernel refused: the next check of the sockets writes it again (retryLingering). A held one is written
      // again by the periodic look; into a map gone with its generation, by the refresh that follows.
      if (refused.some((a) => this.lingering.get(a.entry.id) === a.entry)) this.lingerView = undefined;
      this.count.added += done.length;
      const when = at();
      for (const [entry, maps] of byEntry(done)) this.options.onChange?.({ path: entry.text, id: entry.id, added: true, maps, at: when });
    }
  }

  /**
   * One transaction: done, or nothing of it written — because a map is gone (an apply switched generations; the view is
   * marked stale) or because the kernel refused it.
   */
  private tryWrite(change: () => void, size: number): 'done' | 'gone' | 'refused' {
    try {
      change();
      this.writesFailing = false;
      return 'done';
    } catch (error) {
      const reason = setWriteRefusal(error);
      const gone = reason === 'missing-set' || reason === 'missing-table';
      if (gone) this.stale = true;
      if (size === 1) {
        this.count.failed++;
        // Said once until a write succeeds again: a refusal that lasts is tried every check of the sockets.
        if (!gone && !this.writesFailing)
          this.options.log.error({ event: 'apps-write-failed', error: String(error) }, 'app tracker: a cgroup element could not be written');
        if (!gone) this.writesFailing = true;
      }
      return gone ? 'gone' : 'refused';
    }
  }

  /** A write found its map gone (an apply switched generations): the live names are read again, and every cgroup looked at again. */
  private async refresh(): Promise<void> {
    const view = this.view;
    if (!view || this.closed || this.refreshing) return;
    // At most one listing a second, whatever keeps refusing writes.
    const wait = this.lastRefresh + 1000 - performance.now();
    if (wait > 0) {
      this.refreshing = true;
      setTimeout(() => {
        this.refreshing = false;
        void this.refresh();
      }, wait).unref();
      return;
    }
    this.lastRefresh = performance.now();
    this.stale = false;
    try {
      const maps = cgroupMapsInForce(view.compiled, await this.options.liveSets());
      // eslint-disable-next-line @typescript-eslint/no-unnecessary-condition -- closed meanwhile, while the table was listed
      if (this.view !== view || this.closed) return;
      this.install(view.compiled, maps);
      this.lookEverywhere();
    } catch (error) {
      this.options.log.error({ event: 'apps-refresh-failed', error: String(error) }, 'app tracker: the table could not be listed');
    }
  }

  /**
   * A cgroup nft cannot name matches `claims`: for each identity that
   * denies, its nearest ancestor nft can name is cut off in that
   * dispatch's map of the ancestor's level; identities that let out leave
   * it out. Compile's decision (Compiler.claim), made here without one.
   */
  private cutOff(view: View, key: string, relative: Buffer, uid: number, claims: readonly Claim[]): void {
    const ancestor = namedAncestor(relative);
    const level = ancestor.length === 0 ? 0 : ancestor.toString('utf8').split('/').length;
    const marks: { map: string; verdict: Verdict }[] = [];
    for (const claim of claims) {
      const map = claim.map.replace(/_cg_l\d+$/, `_cg_l${level}`);
      if (claim.cutOff === undefined || level === 0) {
        this.leftOut(claim, relative, claim.cutOff === undefined ? 'it is left out' : 'and no ancestor of it can be named; it is left out');
        continue;
      }
      const need = `cut ${map} ${claim.owner} uid ${uid}`;
      if (!view.maps.has(map)) {
        this.askRecompile(
          need,
          `cgroup ${showBytes(relative)} of ${claim.owner} has a name nftables cannot carry, and the table has no way yet to cut off its ancestor at level ${level}`,
        );
        continue;
      }
      if (!marks.some((m) => m.map === map)) marks.push({ map, verdict: claim.cutOff });
    }
    const was = this.cuts.get(key);
    const ancestorKey = ancestor.toString('latin1');
    if (marks.length === 0) {
      this.uncut(key);
      return;
    }
    if (was && was.ancestorKey === ancestorKey && JSON.stringify(was.marks) === JSON.stringify(marks)) return;
    this.uncut(key);
    if (!this.admit(uid, this.cuts.size)) {
      this.full('cgroups');
      return;
    }
    this.cuts.set(key, { bytes: relative, uid, ancestor, ancestorKey, marks });
    this.countUid(uid, 1);
    const on: CutsOn = this.cutOn.get(ancestorKey) ?? (new Map() as CutsOn);
    this.cutOn.set(ancestorKey, on);
    let decides = false;
    for (const mark of marks) {
      const verdicts = on.get(mark.map) ?? new Map<string, { verdict: Verdict; count: number }>();
      on.set(mark.map, verdicts);
      const verdictId = JSON.stringify(mark.verdict);
      const held = verdicts.get(verdictId);
      if (held) held.count++;
      else {
        verdicts.set(verdictId, { verdict: mark.verdict, count: 1 });
        if (verdicts.size === 1) decides = true;
      }
    }
    // Only a cut that changes what the ancestor is given looks at it again: thousands under one ancestor cost one look.
    if (decides) this.queue(ancestor);
  }

  /** The cgroup at `key` cuts off nothing any more (gone, or the policy changed): its ancestor is looked at again. */
  private uncut(key: string): void {
    const cut = this.cuts.get(key);
    if (cut === undefined) return;
    this.cuts.delete(key);
    this.countUid(cut.uid, -1);
    const on = this.cutOn.get(cut.ancestorKey);
    if (on === undefined) return;
    let decided = false;
    for (const mark of cut.marks) {
      const verdicts = on.get(mark.map);
      const verdictId = JSON.stringify(mark.verdict);
      const held = verdicts?.get(verdictId);
      if (verdicts === undefined || held === undefined) continue;
      if (--held.count > 0) continue;
      if (verdicts.keys().next().value === verdictId) decided = true;
      verdicts.delete(verdictId);
      if (verdicts.size === 0) on.delete(mark.map);
    }
    if (on.size === 0) this.cutOn.delete(cut.ancestorKey);
    if (decided) this.queue(cut.ancestor);
  }

  private leftOut(claim: Claim, relative: Buffer, what: string): void {
    this.count.leftOut++;
    const said = `${claim.map} ${claim.owner}`;
    if (this.told.has(said) || this.told.size >= 1024) return;
    this.told.add(said);
    this.options.log.warn(
      { event: 'apps-unnamed-left-out', owner: claim.owner, cgroup: showBytes(relative) },
      `app tracker: cgroup ${showBytes(relative)} matches ${claim.owner} and has a name nftables cannot carry; ${what} (said once per identity)`,
    );
  }

  /**
   * Per need, never per cgroup: one ask per interval at most, and a need
   * asked for again waits twice as long each time — also when the compile
   * it asked for met it: a compile makes a cut-off level's map only while
   * such a cgroup is there, so a user whose cgroups come and go would
   * otherwise be met, forgotten and asked for anew every interval. A need
   * not asked for (granted or held) for `recompileQuietMs` is forgotten.
   */
  private askRecompile(need: string, why: string): void {
    if (!this.options.recompile) return;
    const now = (this.options.now ?? (() => performance.now()))();
    const interval = this.options.recompileIntervalMs ?? 10_000;
    const held = this.needs.get(need);
    const was = held !== undefined && now - held.lastAsked < (this.options.recompileQuietMs ?? 1_800_000) ? held : undefined;
    // Re-set, not updated: the map's order is then oldest-asked first, which the bound below drops.
    this.needs.delete(need);
    if (now < this.lastAsk + interval || (was !== undefined && now < was.notBefore)) {
      this.count.recompilesHeld++;
      if (was !== undefined) this.needs.set(need, { ...was, lastAsked: now });
      return;
    }
    // Needs are named by the policy's maps, owners and uids; a bound for a long life of changing policies.
    if (this.needs.size >= 4096) this.needs.delete(this.needs.keys().next().value!);
    const misses = (was?.misses ?? 0) + 1;
    this.needs.set(need, { misses, lastAsked: now, notBefore: now + Math.min(interval * 2 ** (misses - 1), this.options.maxRecompileBackoffMs ?? 300_000) });
    this.lastAsk = now;
    this.count.recompiles++;
    this.options.recompile(why);
  }
}

/** What nft can carry in a string, as compile decides it (facts.ts, nftCanName): UTF-8 without quotes or control characters. */
function nameable(bytes: Buffer): boolean {
  try {
    return nftCanName(new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(bytes));
  } catch {
    return false;
  }
}

/** The path up to its first segment nft cannot name (compile's `namedAncestor`); empty when that is the first. */
function namedAncestor(bytes: Buffer): Buffer {
  let end = 0;
  for (let at = 0; at <= bytes.length; at++) {
    if (at < bytes.length && bytes[at] !== 0x2f) continue;
    const segment = bytes.subarray(end === 0 ? 0 : end + 1, at);
    if (!nameable(segment)) break;
    end = at;
  }
  return bytes.subarray(0, end);
}

function byEntry(items: readonly { readonly entry: Entry; readonly map: string }[]): Map<Entry, string[]> {
  const grouped = new Map<Entry, string[]>();
  for (const item of items) {
    const maps = grouped.get(item.entry);
    if (maps) maps.push(item.map);
    else grouped.set(item.entry, [item.map]);
  }
  return grouped;
}
