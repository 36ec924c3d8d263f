import { compile, factsNeeded, refuseCompileErrors, TABLE, type Compiled, type Facts, type FactsNeeded } from '../compile/compile.js';
import { renderText, type Ruleset } from '../compile/ruleset.js';
import { EgressError, ErrorCode, isEgressError, nftRefusal } from '../errors.js';
import type { Nft } from '../nft/client.js';
import { loadPolicyOrThrow } from '../policy/load.js';
import type { NftTableNames } from '../nft/types.js';
import type { Policy } from '../policy/model.js';
import { policyAt, type ExpiredAllow } from '../policy/expiry.js';
import { resolvePolicy } from '../policy/resolve.js';
import { defaultLockPath, withEnforcementLock } from './lock.js';
import { BOOT_FORM_FILE, bootFormText, timeLimitedRules } from './boot-form.js';
import { planChanges, type Plan } from './plan.js';
import { liveSets, summarizeCompiled, summarizeLive, summarizeSet, type SetSummary, type TableSummary } from './summary.js';
import { forgetRecord, readRecord, RECORD_FILE, recordText, type AppliedRecord } from './record.js';
import { stageFileAtomic, writeFileAtomic } from '../state/files.js';
import { RULES_FILE, ruleTableText } from '../state/rule-table.js';
import { nextSwitches, readSwitches, writeSwitches } from '../state/switches.js';
import { openSocketAccess } from '../system/sockets.js';
import { sweepSockets, type SocketAccess, type SweepOutcome } from './sweep.js';
import {
  isApplyMarker,
  liveGeneration,
  nameList,
  namesAfterSwap,
  newApplyMarker,
  parseLiveName,
  reachable,
  removalTransaction,
  swapTransactions,
  withGeneration,
  type Generation,
} from './swap.js';

/** What enforcement needs from the system, passed in. */
export interface EnforcerDeps {
  readonly nft: Nft;
  /** The ids of the user and group names given (through NSS), and the cgroups that deep. */
  readonly facts: (needed: FactsNeeded) => Facts;
  /** Where the last good ruleset is kept (/var/lib/egressd). */
  readonly stateDir: string;
  /** The system log: every change of enforcement is recorded there. */
  readonly audit: (event: string, fields: Readonly<Record<string, string | number | boolean>>) => void;
  /** Told what the holder of the enforcement lock (lock.ts) noted of itself, when a change has to wait for it. */
  readonly waiting?: (holder: string) => void;
  /** Told when a change runs without the lock (no koffi, /run not writable). */
  readonly unserialised?: (reason: string) => void;
  /** The lock's file (default: this network namespace's) and how long a change waits for it. */
  readonly lock?: { readonly path?: string; readonly timeoutMs?: number };
  /**
   * This network namespace's TCP sockets, opened by each apply to cut the
   * connections it denies (sweep.ts). Default: the system's (sock_diag) —
   * never "none": an apply that cuts nothing would leave orphans sending.
   */
  readonly sockets?: () => SocketAccess;
  /** The clock: an `allowed:` entry whose `until` is at or before it is left out of what is applied (policy/expiry.ts). Default Date.now. */
  readonly now?: () => number;
}

/** Runs a change of enforcement holding the table's lock (lock.ts). Never nested: it would wait for itself. */
function locked<T>(deps: EnforcerDeps, what: string, change: () => Promise<T>): Promise<T> {
  return withEnforcementLock(deps.lock?.path ?? defaultLockPath(), what, change, {
    ...(deps.waiting && { onWait: deps.waiting }),
    ...(deps.lock?.timeoutMs !== undefined && { timeoutMs: deps.lock.timeoutMs }),
    onUnavailable: (reason) => {
      deps.audit('no enforcement lock', { reason });
      deps.unserialised?.(reason);
    },
  });
}

export interface Applied {
  /** The policy in force: the one given, without the allowed entries that had expired when it was applied. */
  readonly policy: Policy;
  /** What the policy's identities resolved to on this machine when it was compiled. */
  readonly facts: Facts;
  readonly compiled: Compiled;
  readonly digest: string;
  readonly lockdown: boolean;
  readonly plan: Plan;
  /** How the table before the apply was known: from the last apply's record, by reading it whole, or there was none. */
  readonly liveFrom: 'record' | 'listing' | 'none';
  /** Each compiled set's and map's name in the kernel (with its digest): where the resolver and app tracker add elements. */
  readonly liveNames: ReadonlyMap<string, string>;
  /** The connections of denied identities that were cut (sweep.ts). */
  readonly sweep: SweepOutcome;
  /** Allowed entries left out because their `until` had passed. */
  readonly expired: readonly ExpiredAllow[];
  /** The earliest `until` still ahead: the table should be applied again then (the daemon does). */
  readonly nextExpiry: number | undefined;
}

/** A cgroup that vanished between listing and applying makes nft refuse the element; the apply is retried with fresh facts. */
const CGROUP_RACE_RETRIES = 3;

/**
 * Throws nft's refusal as EGD_CONCURRENT_CHANGE when its reason is one of
 * `racing` (where, at that step, only another writer can have caused it),
 * else as it was. Each step is one transaction refused whole, and the switch
 * is the only one that changes the policy in force: a refused step leaves it
 * as it was.
 */
function raced(error: unknown, racing: readonly string[]): never {
  const reason = nftRefusal(error);
  if (reason === undefined || !racing.includes(reason)) throw error;
  throw new EgressError(
    ErrorCode.ConcurrentChange,
    `another writer changed table ${TABLE.family} ${TABLE.name} at the same time, without egressd's lock (nft by hand, or an egressd that could not take the lock); this run changed nothing in force — run it again`,
    { cause: error, details: (error as EgressError).details },
  );
}

/** Whether the live sets the prepare reuses are all still there. */
async function keptSetsStand(nft: Nft, live: LiveTable): Promise<boolean> {
  const names = await nft.listNames(TABLE.family, TABLE.name);
  const now = new Set([...(names?.sets ?? []), ...(names?.maps ?? [])].map((x) => x.name));
  return [...live.sets].every((name) => now.has(name));
}

/** The live table with its set elements (static sets are compared by content), or null. */
export async function liveSummary(nft: Nft): Promise<TableSummary | null> {
  const listing = await nft.listTable(TABLE.family, TABLE.name);
  return listing && summarizeLive(listing);
}

/**
 * Switches table inet egressd to the compiled policy with no window, by the
 * generation swap of swap.ts. Invalid policy: throws before nft is touched. Lockdown, when not given,
 * stays as the live table has it, so the kill switch survives re-applies.
 */
export async function applyPolicy(dir: string, deps: EnforcerDeps, options: { lockdown?: boolean; reread?: boolean } = {}): Promise<Applied> {
  const { policy } = loadPolicyOrThrow(dir);
  return applyLoadedPolicy(policy, deps, { ...options, source: dir });
}

/** The live table as apply needs it. */
interface LiveTable {
  readonly names: NftTableNames;
  /** The generation the base chain uses; undefined when it uses none (a first apply interrupted before its switch). */
  readonly generation: Generation | undefined;
  /** The chains and the sets and maps the base chain reaches: the policy in force. Anything else is a leftover. */
  readonly chains: ReadonlySet<string>;
  readonly sets: ReadonlySet<string>;
  readonly summary: TableSummary;
  /** The live sets in force by live name, when the table was read whole (their elements known). */
  readonly setContents?: ReadonlyMap<string, SetSummary>;
  /** "record": the table is as the last apply left it (applied.json), so it was not read whole. */
  readonly from: 'record' | 'listing';
}

async function readLive(deps: EnforcerDeps, reread: boolean): Promise<LiveTable | null> {
  const names = await deps.nft.listNames(TABLE.family, TABLE.name);
  if (!names) return null;
  const record = reread ? undefined : readRecord(deps.stateDir);
  if (record && record.names.join('\n') === nameList(names).join('\n')) {
    // The record's names are exactly one applied generation: all of it is in force. Its
    // generation and lockdown are read off those names (the marker, the lockdown chain).
    const chains = new Set(names.chains.map((c) => c.name));
    const sets = new Set([...names.sets, ...names.maps].map((x) => x.name));
    const marker = [...chains].find(isApplyMarker);
    const generation = marker === undefined ? undefined : parseLiveName(marker).generation;
    const summary = { ...record.summary, lockdown: liveLockdown(deps, chains, generation) };
    return { names, generation, chains, sets, summary, from: 'record' };
  }
  const listing = await deps.nft.listTable(TABLE.family, TABLE.name);
  if (!listing) return null;
  const inForce = reachable(listing);
  const setContents = liveSets(listing, inForce.sets);
  return {
    names: listing,
    generation: liveGeneration(listing),
    ...inForce,
    summary: summarizeLive(listing, inForce, setContents),
    setContents,
    from: 'listing',
  };
}

/**
 * Lockdown in a table known by its names: the lockdown chain of the
 * generation in force. The table is what is enforced, so it decides; the
 * switch record its apply wrote (switches.json, naming that apply's marker)
 * should say the same, and a disagreement — a record changed by hand, or
 * a state directory another egressd wrote — goes to the system log.
 */
function liveLockdown(deps: EnforcerDeps, chains: ReadonlySet<string>, generation: Generation | undefined): boolean {
  const inTable = chains.has(`lockdown.${generation}`);
  const recorded = readSwitches(deps.stateDir);
  if (recorded.state === 'ok' && chains.has(recorded.value.apply) && recorded.value.lockdown.on !== inTable) {
    deps.audit('the switch record disagrees with the live table; the table decides', { lockdown: inTable, recorded: recorded.value.lockdown.on });
  }
  return inTable;
}

/**
 * Applies an already loaded policy: egressctl apply, lockdown and egressd
 * come here, and so does bench/apply.ts, which times this path.
 */
export function applyLoadedPolicy(policy: Policy, deps: EnforcerDeps, options: { lockdown?: boolean; reread?: boolean; source: string }): Promise<Applied> {
  const what = `apply ${options.source}${options.lockdown === undefined ? '' : ` with lockdown ${options.lockdown ? 'on' : 'off'}`}`;
  return locked(deps, what, () => applyHoldingLock(policy, deps, options));
}

async function applyHoldingLock(written: Policy, deps: EnforcerDeps, options: { lockdown?: boolean; reread?: boolean; source: string }): Promise<Applied> {
  const { nft } = deps;
  // Read holding the lock: an apply that waited for it still drops what expired meanwhile.
  const { policy, expired, nextExpiry } = policyAt(written, (deps.now ?? Date.now)());
  const live = await readLive(deps, options.reread ?? false);
  const lockdown = options.lockdown ?? live?.summary.lockdown ?? false;
  const next: Generation = live?.generation === 'a' ? 'b' : 'a';
  // Leftovers of an interrupted apply, unreachable from the base chain: their chains would
  // collide with the generation about to be written, and their sets would stay for ever.
  const leftovers = live && removalTransaction(live.names, { chain: (name) => !live.chains.has(name), set: (name) => !live.sets.has(name) });
  // Listed a moment ago: one that is gone or back already was removed or written by someone else.
  if (leftovers) await nft.run({ commands: leftovers }).catch((error: unknown) => raced(error, ['conflict', 'missing']));
  const marker = `${newApplyMarker()}.${next}`;

  for (let attempt = 1; ; attempt++) {
    const facts = deps.facts(factsNeeded(policy));
    const compiled = compile(policy, facts, { lockdown });
    refuseCompileErrors(compiled, options.source);
    let generation = withGeneration(compiled.ruleset, next);
    const altered = live ? alteredSets(generation, live) : new Set<string>();
    if (altered.size > 0) generation = withGeneration(compiled.ruleset, next, altered);
    // A chain of the next generation that the live policy still reaches was put there by hand
    // (a jump into the previous generation): creating it would fail, and removing it would change the policy in force.
    const held = live ? generation.chains.filter((c) => !c.hook && live.chains.has(c.name)).map((c) => c.name) : [];
    if (held.length > 0) {
      throw new EgressError(
        ErrorCode.NftState,
        `table ${TABLE.family} ${TABLE.name} is not as egressd leaves it: the policy in force still reaches ${held.join(', ')}, which this apply must write anew (a rule added by hand?). Remove what jumps there, then apply again; the policy in force was not changed`,
      );
    }
    const swap = swapTransactions(generation, marker, live?.sets, { firstSwitch: live?.generation === undefined });
    const prepared = nft.run({ commands: swap.prepare });
    // Awaited below; until then a refusal must not count as unhandled if the work in between throws.
    prepared.catch(() => undefined);
    // Worked out while nft takes the new generation on its worker thread.
    const summary = summarizeCompiled(compiled.ruleset);
    const plan = planChanges(summary, live?.summary ?? null);
    const staged = stageApplied(deps.stateDir, compiled, timeLimitedRules(policy, compiled.ruleIds), {
      digest: policy.digest,
      lockdown,
      source: options.source,
    });
    try {
      await prepared;
    } catch (error) {
      staged.discard();
      // Retried only when the cgroup tree really changed under us; any other refusal is final
      // (and changed nothing, so the marker can be used again).
      const reason = nftRefusal(error);
      if (reason === 'missing' && attempt < CGROUP_RACE_RETRIES && deps.facts(factsNeeded(policy)).cgroups.join('\n') !== facts.cgroups.join('\n')) continue;
      // A chain of generation "next" created meanwhile, or a kept set removed meanwhile: another writer's.
      if (reason === 'conflict' || (reason === 'missing' && live && !(await keptSetsStand(deps.nft, live)))) raced(error, [reason]);
      throw error;
    }
    // Its objects were prepared a moment ago: one that is gone was removed by someone else.
    await nft.run({ commands: swap.switch }).catch((error: unknown) => {
      staged.discard();
      raced(error, ['conflict', 'missing']);
    });
    // Right after the switch, before anything else: until then a program of a denied identity can still close a socket and leave it sending.
    const sweep = sweepOrError(policy, facts, lockdown, deps.sockets ?? openSocketAccess);
    const cleanedUp = await removePreviousGeneration(deps, live, generation);
    const record = cleanedUp ? { generation: next, names: namesAfterSwap(generation, marker), summary } : undefined;
    saveState(deps.stateDir, staged, record, { lockdown, torUpdates: policy.tor.enabled, apply: marker });
    deps.audit(lockdown ? 'applied (lockdown on)' : 'applied', {
      digest: policy.digest.slice(0, 32),
      lockdown,
      source: options.source,
      rules: compiled.ruleset.chains.reduce((n, c) => n + c.rules.length, 0),
      backend: nft.backend,
      ...('examined' in sweep && { connectionsCut: sweep.cut.length }),
    });
    if (sweep instanceof Error || sweep.failed.length > 0) notCutThrows(deps, sweep);
    const liveNames = new Map(compiled.ruleset.sets.map((set, i) => [set.name, generation.sets[i]!.name]));
    return { policy, facts, compiled, digest: policy.digest, lockdown, plan, liveFrom: live?.from ?? 'none', liveNames, sweep, expired, nextExpiry };
  }
}

/** The sweep's outcome, or why it could not run: either way the table stays applied. */
function sweepOrError(policy: Policy, facts: Facts, lockdown: boolean, open: () => SocketAccess): SweepOutcome | EgressError {
  try {
    return sweepSockets(policy, facts, lockdown, open);
  } catch (error) {
    return isEgressError(error)
      ? error
      : new EgressError(ErrorCode.SocketsNotCut, `connections of denied identities could not be cut: ${String(error)}`, { cause: error });
  }
}

/**
 * A sweep that failed, whole or for some sockets, fails the apply
 * (EGD_SOCKETS_NOT_CUT) after the table is applied and saved: the new policy
 * is in force and stays (undoing it would also undo what it denies), but a
 * connection left uncut may still send what it queued once its program
 * closes it, and that must be said.
 */
function notCutThrows(deps: EnforcerDeps, sweep: SweepOutcome | EgressError): never {
  const reasons = sweep instanceof Error ? [sweep.message] : sweep.failed.map((f) => `${f.socket}: ${f.reason}`);
  deps.audit('applied, but connections of denied identities could not all be cut', {
    failed: sweep instanceof Error ? -1 : sweep.failed.length,
    reason: reasons[0] ?? '',
  });
  const what = sweep instanceof Error ? 'the connections of denied identities could not be cut' : `${sweep.failed.length} of them could not be cut`;
  throw new EgressError(
    ErrorCode.SocketsNotCut,
    `applied, and the table stays; but ${what}: data such a connection queued may still leave once its program closes it. Apply again, or end those programs`,
    { details: reasons, ...(sweep instanceof Error && { cause: sweep }) },
  );
}

/**
 * Live static sets that carry the name the new generation wants but not its
 * elements (changed by hand since): a set is otherwise not written again
 * when its name says it holds the right elements. Known only when the table
 * was read whole; the record vouches for names, not elements.
 */
function alteredSets(generation: Ruleset, live: LiveTable): Set<string> {
  const altered = new Set<string>();
  if (!live.setContents) return altered;
  for (const set of generation.sets) {
    const found = live.setContents.get(set.name);
    if (found && !found.dynamic && found.contents !== summarizeSet(set).contents) altered.add(set.name);
  }
  return altered;
}

/**
 * The last transaction: the previous generation's chains, and the sets and
 * maps only it used, are unreferenced now. Their names were read before the
 * swap. Not in the switch's transaction: deleting a verdict map deactivates
 * its elements for the next generation (nft_mapelem_deactivate), so a packet
 * still in the old rules when that transaction commits would miss the old
 * map and fall to the default: an allowed packet dropped under a default
 * deny. (Tried: one full test run in five then failed the e2e test of
 * applies under load, which counts lost allowed connections.) Failing here
 * leaves only unused objects, which the next apply removes; false then.
 */
async function removePreviousGeneration(deps: EnforcerDeps, before: LiveTable | null, current: Ruleset): Promise<boolean> {
  const keep = new Set(current.sets.map((set) => set.name));
  // Leftovers went before the prepare; what is left of `before` is the policy that was in force.
  const stale =
    before && removalTransaction(before.names, { chain: (name) => before.chains.has(name), set: (name) => before.sets.has(name) && !keep.has(name) });
  if (!stale) return true;
  try {
    await deps.nft.run({ commands: stale });
    return true;
  } catch (error) {
    deps.audit('applied, but the previous generation could not be removed yet', { reason: (error as Error).message });
    return false;
  }
}

/** Why `lockdown on` fell back to the bare lockdown: the policy could not be read, validated or compiled, a name it uses could not be looked up, or nftables refused what it compiles to. */
export type LockdownFallback = 'policy invalid' | 'nftables refused' | 'names not looked up';

export interface LockdownApplied extends Applied {
  readonly policyUsable: boolean;
  /** Present when the policy was left out (policyUsable false): which of its faults. */
  readonly fallback?: LockdownFallback;
}

/**
 * Lockdown on or off. On works whatever is wrong with the policy — it cannot
 * be read, or nftables refuses what it compiles to: then only loopback is
 * left, Tor gets no exception, and the result says which fault it was.
 * Anything else (another change holding the lock too long, another writer
 * changing the table at the same time, a table changed by hand, no
 * nftables, the state not saved) is not the policy's fault and fails as it
 * would for apply: a lockdown without Tor's exception must not stand in for it.
 */
export async function setLockdown(on: boolean, dir: string, deps: EnforcerDeps): Promise<LockdownApplied> {
  let policy: Policy;
  try {
    ({ policy } = loadPolicyOrThrow(dir));
  } catch (error) {
    if (!on) throw error;
    return lockdownWithoutPolicy(dir, deps, error, 'policy invalid');
  }
  try {
    return { ...(await applyLoadedPolicy(policy, deps, { lockdown: on, source: dir })), policyUsable: true };
  } catch (error) {
    const fallback = policysFault(error);
    if (!on || fallback === undefined) throw error;
    return lockdownWithoutPolicy(dir, deps, error, fallback);
  }
}

/** The policy's fault in a failed apply, if it was: nftables refused what it compiles to, or compiling it failed unexpectedly. */
function policysFault(error: unknown): LockdownFallback | undefined {
  if (!isEgressError(error) || error.code === ErrorCode.PolicyInvalid) return 'policy invalid';
  // Not the policy's text, but the policy cannot be built here now: the bare lockdown is stricter than anything it would give.
  if (error.code === ErrorCode.NameLookup) return 'names not looked up';
  return error.code === ErrorCode.NftApply ? 'nftables refused' : undefined;
}

/** Lockdown with an empty deny-all policy in place of one that cannot be used (`why`). */
async function lockdownWithoutPolicy(dir: string, deps: EnforcerDeps, why: unknown, fallback: LockdownFallback): Promise<LockdownApplied> {
  const bare = resolvePolicy([{ file: 'lockdown.yaml', bytes: new TextEncoder().encode('defaults: {egress: deny}\n') }], () => ({ error: 'no lists' }));
  if (!bare.ok) throw why;
  deps.audit('policy unusable; lockdown applied without it', { source: dir, fallback, reason: (why as Error).message });
  return { ...(await applyLoadedPolicy(bare.policy, deps, { lockdown: true, source: `${dir} (${fallback}; lockdown only)` })), policyUsable: false, fallback };
}

/** Removes the table: the only way enforcement ends. */
export function release(deps: EnforcerDeps): Promise<boolean> {
  return locked(deps, 'release', async () => {
    const existed = await deps.nft.tableExists(TABLE.family, TABLE.name);
    if (existed) await deps.nft.deleteTable();
    deps.audit(existed ? 'released: table inet egressd removed, egress is no longer enforced' : 'release: there was no table to remove', { existed });
    return existed;
  });
}

/** The compiled policy against the live table, without changing anything. */
export async function planPolicy(
  dir: string,
  deps: Pick<EnforcerDeps, 'nft' | 'facts' | 'now'>,
): Promise<{ plan: Plan; compiled: Compiled; live: TableSummary | null; policy: Policy; expired: readonly ExpiredAllow[] }> {
  const { policy, expired } = policyAt(loadPolicyOrThrow(dir).policy, (deps.now ?? Date.now)());
  const live = await liveSummary(deps.nft);
  const compiled = compile(policy, deps.facts(factsNeeded(policy)), { lockdown: live?.lockdown ?? false });
  refuseCompileErrors(compiled, dir);
  return { plan: planChanges(summarizeCompiled(compiled.ruleset), live), compiled, live, policy, expired };
}

/** State files written and synced while nft takes the new generation; in place only once it is in force. */
interface StagedFiles {
  /** Puts them in place in the order staged, each durably before the next; throws as writeFileAtomic does. */
  commit(): void;
  discard(): void;
}

/**
 * Stages state files (state/files.ts). One that cannot be staged now (no
 * state directory yet, a full disk) is written whole at commit instead, so
 * that a failure to keep it is said after the apply, as it always was —
 * never taken for a refusal of the policy.
 */
function stageFiles(stateDir: string, files: readonly (readonly [name: string, text: string])[]): StagedFiles {
  const staged = files.map(([name, text]): Pick<StagedFiles, 'commit' | 'discard'> => {
    try {
      return stageFileAtomic(stateDir, name, text);
    } catch {
      return { commit: () => writeFileAtomic(stateDir, name, text), discard: () => undefined };
    }
  });
  return {
    commit: () => {
      for (const file of staged) file.commit();
    },
    discard: () => {
      for (const file of staged) file.discard();
    },
  };
}

/**
 * What saveState keeps that is known before the switch, staged then: the
 * last applied ruleset and its boot form (boot-form.ts: what egressd-early
 * loads at boot), what it was applied from (last-good.json), and its short
 * rule ids (rules.json).
 */
function stageApplied(
  stateDir: string,
  compiled: Compiled,
  timeLimited: ReadonlySet<string>,
  meta: { digest: string; lockdown: boolean; source: string },
): StagedFiles {
  return stageFiles(stateDir, [
    ['last-good.nft', renderText(compiled.ruleset)],
    [BOOT_FORM_FILE, bootFormText(compiled.ruleset, timeLimited)],
    ['last-good.json', `${JSON.stringify({ ...meta, table: `${TABLE.family} ${TABLE.name}` }, null, 2)}\n`],
    [RULES_FILE, ruleTableText({ digest: meta.digest, rules: compiled.ruleIds })],
  ]);
}

/**
 * Keeps the files stageApplied wrote ahead, then the switches the table
 * was applied with (switches.json) and the record the next apply compares
 * the live table with; each file is written whole or not at all, and
 * durably before the next (state/files.ts). The record goes last: it is
 * trusted only with the rest in place. Without a record (a clean-up that
 * failed), the next apply reads the table whole.
 */
function saveState(
  stateDir: string,
  staged: StagedFiles,
  record: AppliedRecord | undefined,
  applied: { lockdown: boolean; torUpdates: boolean; apply: string },
): void {
  try {
    if (!record) forgetRecord(stateDir);
    staged.commit();
    writeSwitches(stateDir, nextSwitches(readSwitches(stateDir), { lockdown: applied.lockdown, torUpdates: applied.torUpdates }, applied.apply, new Date()));
    if (record) writeFileAtomic(stateDir, RECORD_FILE, recordText(record));
  } catch (error) {
    staged.discard();
    // The table is applied; failing to keep a copy must not undo that, but it must be said.
    throw new EgressError(ErrorCode.Io, `applied, but could not save the last good ruleset in ${stateDir}: ${(error as Error).message}`, { cause: error });
  }
}
