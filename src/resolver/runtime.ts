/**
 * The resolver as egressd runs it: the DNS core (server.ts) with the
 * policy's hooks — who asks (who.ts), what they get (decide.ts), what the
 * table learns before they get it (fill.ts) — and the address → name
 * memory that `explain --to` and `status` ask through the control socket.
 *
 * A re-apply hands it the policy now in force (`update`): new names take
 * effect with the next query, and what it remembers goes into any set the
 * re-apply made anew, so no address learned before waits for its next
 * lookup (sets whose names did not change keep their elements anyway).
 */
import type { Logger } from 'pino';
import { TABLE, type Compiled, type Facts } from '../compile/compile.js';
import { isApplyMarker, liveSetNames } from '../enforce/swap.js';

import type { Nft } from '../nft/client.js';
import { setWriteRefusal } from '../errors.js';
import { createBatchingWriter, openSetElementWriter, type BatchingWriter } from '../nft/set-elements.js';
import type { DnsSettings, Policy } from '../policy/model.js';
import { startControlServer, type ControlServer } from './control.js';
import { buildDecider, type Decider } from './decide.js';
import { SetFiller, type FillView } from './fill.js';
import { AddressMemory, type NameFor } from './memory.js';
import { startResolver, type AnswerRecord, type Question, type Resolver } from './server.js';
import { followUpstreams, rediscover } from './follow-upstreams.js';
import { discoverUpstreams, type Discovered } from './upstreams.js';
import type { FileWatch, WatchFilesOptions } from '../system/watch-files.js';
import { openWhoAsks, type Who, type WhoAsks } from './who.js';
import { ownerKeys } from './owner.js';
import { allowUnitUpstreams, type UnitAllowOutcome } from '../system/unit-address-allow.js';
import { ResolverStartError } from '../errors.js';

/** The policy in force and what it was compiled against. */
export interface InForce {
  readonly policy: Policy;
  readonly facts: Facts;
  readonly compiled: Compiled;
  /** Compiled set name → live names; read from the table when not given. */
  readonly liveNames?: ReadonlyMap<string, readonly string[]>;
}

export interface ResolverRuntimeOptions {
  readonly nft: Nft;
  readonly log: Logger;
  readonly stateDir: string;
  /** "/" on the machine itself. */
  readonly root?: string;
  /** The control socket's path; false: none (a second resolver in tests). */
  readonly controlSocket?: string | false;
  /** Default 53. */
  readonly port?: number;
  /** Follow the machine's upstreams (when the policy names none) as their files change; false: only at start and update. */
  readonly followUpstreams?: false | WatchFilesOptions;
  /**
   * Lets the process reach these upstreams before the resolver asks them,
   * every time they change; default: egressd's unit's IPAddressAllow
   * (src/system/unit-address-allow.ts), which does nothing outside a unit.
   */
  readonly allowUpstreams?: (upstreams: readonly string[]) => Promise<UnitAllowOutcome>;
}

export interface ResolverRuntime {
  readonly resolver: Resolver;
  readonly upstreams: readonly string[];
  /** The policy now in force (after an apply); new listen addresses, upstreams or mark restart the server. */
  update(inForce: InForce): Promise<void>;
  /**
   * Where the policy names no upstreams: finds the machine's again and, if
   * they changed, restarts the server with them. True when it restarted.
   */
  rediscover(): Promise<boolean>;
  /** The table's set names changed under us (an apply by someone else): read them again. */
  refreshLiveNames(): Promise<void>;
  counters(): Record<string, number>;
  /** Names `address` was learned from that have not expired, for a denial of `uid`'s: those it asked for first (the address memory's namesFor). */
  learnedNames(address: string, uid: number | undefined): NameFor[];
  close(): Promise<void>;
}

/** The sets in the live table and the apply marker in force, by name only (milliseconds: no element is read). */
export async function readLiveTable(nft: Nft): Promise<{ sets: ReadonlySet<string>; marker: string | undefined }> {
  const listed = await nft.listNames(TABLE.family, TABLE.name);
  return { sets: new Set(listed?.sets.map((set) => set.name)), marker: listed?.chains.map((c) => c.name).find(isApplyMarker) };
}

/**
 * Each DNS set of `compiled` → the live sets that are exactly it: named by
 * its contents, which include the names that fill it and the rule's
 * verdict. Never by its base name alone, which is only its rule's place: if
 * the table was applied from another policy (another directory, an edit not
 * applied yet), `a_app_3_dns4` may be another rule's — an allow where this
 * policy has a deny — and an answer must not go there.
 */
export function dnsSetsInForce(compiled: DnsSetsOf, liveSets: ReadonlySet<string>): Map<string, string[]> {
  const wanted = new Set(compiled.dnsBindings.flatMap((b) => [b.set4, b.set6]));
  const names = new Map<string, string[]>();
  for (const set of compiled.ruleset.sets) {
    if (!wanted.has(set.name)) continue;
    const live = liveSetNames(set).filter((name) => liveSets.has(name));
    if (live.length > 0) names.set(set.name, live);
  }
  return names;
}

/** What of a compiled policy names its DNS sets. */
export type DnsSetsOf = Pick<Compiled, 'dnsBindings'> & { readonly ruleset: Pick<Compiled['ruleset'], 'sets'> };

/** Only the DNS sets of a compiled policy: the rest of the ruleset (a big CIDR list's elements) is not kept after the apply. */
function dnsSetsOnly(compiled: Compiled): DnsSetsOf {
  const wanted = new Set(compiled.dnsBindings.flatMap((b) => [b.set4, b.set6]));
  return { dnsBindings: compiled.dnsBindings, ruleset: { sets: compiled.ruleset.sets.filter((set) => wanted.has(set.name)) } };
}

interface State {
  readonly compiled: DnsSetsOf;
  readonly decider: Decider;
  readonly view: FillView;
}

/** The newest resolver runtime of this process: only it may take the upstreams off the unit's list. */
let newestGeneration = 0;

export async function startResolverRuntime(first: InForce, options: ResolverRuntimeOptions): Promise<ResolverRuntime> {
  const generation = ++newestGeneration;
  const { nft, log } = options;
  let dns = first.policy.dns;
  let found = dns.upstreams ? undefined : discovered(options, dns.listen, log);
  let upstreams = dns.upstreams ?? found!.upstreams;
  let following: FileWatch | undefined;
  const memory = new AddressMemory();
  let writer: BatchingWriter | undefined;
  let who: WhoAsks | undefined;
  let control: ControlServer | undefined;
  let resolver: Resolver | undefined;
  try {
    writer = createBatchingWriter(openSetElementWriter());
    who = openWhoAsks();
    const build = async (inForce: InForce): Promise<State> => {
      const started = performance.now();
      const decider = buildDecider(inForce.policy, inForce.compiled.dnsBindings, inForce.facts, inForce.policy.dns);
      const liveNames = inForce.liveNames ?? dnsSetsInForce(inForce.compiled, (await readLiveTable(nft)).sets);
      const missing = inForce.compiled.dnsBindings.length * 2 - liveNames.size;
      // A policy other than the table's: its rules with names teach the table nothing until it is applied.
      if (missing > 0) log.warn({ event: 'resolver-sets-missing', sets: missing }, 'resolver: some name sets of the policy are not in the table in force');
      const view: FillView = {
        bindings: inForce.compiled.dnsBindings,
        bindingsFor: (chain) => decider.bindingsFor(chain),
        liveNames,
        ttlFloor: inForce.policy.dns.ttlFloor,
        ttlCap: inForce.policy.dns.ttlCap,
      };
      log.info(
        { event: 'resolver-policy', rules: view.bindings.length, listLoadMs: Math.round(performance.now() - started) },
        'resolver: names of the policy in force indexed',
      );
      return { compiled: dnsSetsOnly(inForce.compiled), decider, view };
    };
    let state = await build(first);
    const filler = new SetFiller(state.view, writer, memory);
    const identify = who.identifyInBatch.bind(who);
    const identifyNow = who.identifyNow.bind(who);
    const ownerOf = ownerKeys();
    /** Records already in the memory: the resolver hands one array for every hit of a cache entry within a second, and remembering it again changes nothing but its recency. */
    const remembered = new WeakSet<readonly AnswerRecord[]>();
    /** Records each uid was already noted as given (a few uids per array; the array is the cache entry's for a second at most). */
    const noted = new WeakMap<readonly AnswerRecord[], number[]>();
    /** Who was given an answer: a denial of that uid's is then named by it, and no other user's lookup names one of its (memory.ts namesFor). */
    const answered = (asker: Who, question: Question, records: readonly AnswerRecord[]): void => {
      let uids = noted.get(records);
      if (uids?.includes(asker.uid)) return;
      memory.rememberAnswer(question.name, records, undefined, asker.uid);
      if (uids === undefined) noted.set(records, (uids = []));
      if (uids.length < 8) uids.push(asker.uid);
    };
    // Undefined when the table holds the answer already: the resolver then replies in the same call (pipeline.ts).
    const learn = (question: Question, records: readonly AnswerRecord[]): Promise<void> | undefined => {
      if (!remembered.has(records)) {
        memory.rememberAnswer(question.name, records);
        remembered.add(records);
      }
      return filler.learn(question, records)?.catch(async (error: unknown) => {
        // A set that is gone was replaced by an apply (its names changed): read the names again and try once more.
        if (setWriteRefusal(error) !== 'missing-set') throw error;
        await runtime.refreshLiveNames();
        await filler.learn(question, records);
      });
    };
    const allowUpstreams = options.allowUpstreams ?? ((servers: readonly string[]) => allowUnitUpstreams(servers));
    let allowedFor: string | undefined;
    const serve = async (settings: DnsSettings, servers: readonly string[]): Promise<Resolver> => {
      const key = servers.join(' ');
      if (allowedFor !== key) {
        const outcome = await allowUpstreams(servers).catch((error: unknown) => {
          throw new ResolverStartError('unit-allow', `the upstreams ${servers.join(', ')} could not be let through egressd's unit: ${String(error)}`, {
            cause: error,
          });
        });
        allowedFor = key;
        if (outcome.kind === 'set')
          log.info(
            { event: 'resolver-unit-allow', unit: outcome.unit, allowed: outcome.allowed },
            `resolver: ${outcome.unit} may reach ${outcome.allowed.join(', ')}`,
          );
      }
      return startResolver<Who>({
        listen: settings.listen,
        ...(options.port === undefined ? {} : { port: options.port }),
        upstreams: servers,
        mark: settings.mark,
        hooks: {
          identify,
          identifyNow,
          admit: (asker, question) => state.decider.admit(asker, question),
          learn,
          answered,
          shape: (asker, question, chain) => state.decider.shape(asker, question, chain),
          // Decisions are the state's, learning the filler's: both change only where forgetReplies is called (update, refreshLiveNames).
          learnQuietUntil: (question, records, expiresAt) => filler.quietUntil(question, records, expiresAt),
        },
        onError: (error) => log.error({ event: 'resolver-error', error: String(error) }, 'resolver: unexpected error; answering goes on'),
        // One local user cannot take every query slot (names whose servers never answer hold one for 2.5 s each) or TCP connection.
        askerKey: (asker) => ownerOf(asker.uid),
      });
    };
    resolver = await serve(dns, upstreams);
    let listening = true;
    const counters = (): Record<string, number> => ({ ...resolver!.stats(), ...filler.counters, ...prefixed('memory', memory.counters()) });
    if (options.controlSocket !== false) {
      control = await startControlServer({ memory, counters, ...(options.controlSocket === undefined ? {} : { path: options.controlSocket }) });
    }
    /** New listen addresses, upstreams or mark: the sockets' own, so new sockets and a moment without an answer. */
    const restart = async (next: DnsSettings, nextUpstreams: readonly string[]): Promise<void> => {
      if (listening && JSON.stringify([next.listen, nextUpstreams, next.mark]) === JSON.stringify([dns.listen, upstreams, dns.mark])) return;
      await resolver!.close();
      listening = false;
      try {
        resolver = await serve(next, nextUpstreams);
        listening = true;
        [dns, upstreams] = [next, nextUpstreams];
        log.info({ event: 'resolver-ready', listen: resolver.addresses, upstreams }, `resolver: answering on ${dns.listen.join(', ')}`);
      } catch (error) {
        // Back to what answered before; should that fail too, the next update tries again (`resolver` is closed, never half-open).
        resolver = await serve(dns, upstreams).then(
          (previous) => ((listening = true), previous),
          (again: unknown) => {
            log.error({ event: 'resolver-failed', error: String(again) }, 'resolver: could not listen again with the previous settings');
            return resolver!;
          },
        );
        throw error;
      }
    };
    // An update and a rediscovery each change the server: one at a time.
    let queue: Promise<unknown> = Promise.resolve();
    let refreshing: Promise<void> | undefined;
    const serial = <T>(change: () => Promise<T>): Promise<T> => {
      const run = queue.then(change);
      queue = run.catch(() => undefined);
      return run;
    };
    /** Watches the upstreams' files while the policy names none. */
    const follow = (): void => {
      if (dns.upstreams || options.followUpstreams === false) {
        following?.close();
        following = undefined;
        return;
      }
      following ??= followUpstreams({
        watched: () => found?.watched ?? [],
        rediscover: () => runtime.rediscover(),
        failed: (error) => log.error({ event: 'resolver-error', error: String(error) }, 'resolver: rediscovering the upstreams failed'),
        ...(options.followUpstreams === undefined ? {} : { watch: options.followUpstreams }),
      });
    };
    const runtime: ResolverRuntime = {
      get resolver() {
        return resolver!;
      },
      get upstreams() {
        return upstreams;
      },
      update(inForce) {
        return serial(async () => {
          state = await build(inForce);
          filler.update(state.view);
          resolver?.forgetReplies();
          const next = inForce.policy.dns;
          const nextFound = next.upstreams ? undefined : discovered(options, next.listen, log);
          await restart(next, next.upstreams ?? nextFound!.upstreams);
          found = nextFound;
          follow();
          const relearned = await filler.relearn(memory.chains());
          if (relearned > 0) log.info({ event: 'resolver-relearned', elements: relearned }, 'resolver: remembered addresses put into the new sets');
        });
      },
      rediscover() {
        return serial(async () => {
          if (dns.upstreams) return false;
          const again = rediscover(upstreams, () => discovered(options, dns.listen, log));
          if (again.kind === 'none') {
            log.warn({ event: 'resolver-upstreams-lost', error: again.error.message }, 'resolver: no upstream found now; asking the ones it had');
            return false;
          }
          found = again.found;
          if (again.kind === 'same') return false;
          log.info(
            { event: 'resolver-upstreams-changed', source: again.found.source, upstreams: again.found.upstreams, was: upstreams },
            "resolver: the machine's upstreams changed",
          );
          await restart(dns, again.found.upstreams);
          return true;
        });
      },
      refreshLiveNames() {
        // In turn with update(), whose state it must not overwrite with the names of the policy before; and once for every
        // answer that finds its set gone meanwhile (each would read the table and clear the filler's record again).
        refreshing ??= serial(async () => {
          const names = dnsSetsInForce(state.compiled, (await readLiveTable(nft)).sets);
          state = { ...state, view: { ...state.view, liveNames: names } };
          filler.update(state.view);
          resolver?.forgetReplies();
        }).finally(() => {
          refreshing = undefined;
        });
        return refreshing;
      },
      counters,
      learnedNames: (address, uid) => memory.namesFor(address, uid),
      async close() {
        following?.close();
        await control?.close();
        await resolver?.close();
        writer?.close();
        who?.close();
        // Its upstreams are let through only while it asks them (the unit lets through loopback alone again) — unless a
        // newer resolver of this process started meanwhile (a restart after a failure): the list is its now.
        if (allowedFor !== undefined && allowedFor !== '' && generation === newestGeneration)
          await allowUpstreams([]).catch((error: unknown) =>
            log.warn({ event: 'resolver-unit-allow-failed', error: String(error) }, "resolver: could not take its upstreams off the unit's list"),
          );
      },
    };
    log.info({ event: 'resolver-ready', listen: resolver.addresses, upstreams }, `resolver: answering on ${dns.listen.join(', ')}`);
    follow();
    return runtime;
  } catch (error) {
    await control?.close().catch(() => undefined);
    await resolver?.close().catch(() => undefined);
    writer?.close();
    who?.close();
    throw error;
  }
}

function discovered(options: ResolverRuntimeOptions, listen: readonly string[], log: Logger): Discovered {
  const found = discoverUpstreams({ root: options.root ?? '/', stateDir: options.stateDir, listen });
  for (const note of found.notes) log.warn({ event: 'resolver-upstream-note', source: found.source, note }, `resolver upstreams: ${note}`);
  return found;
}

function prefixed(prefix: string, values: object): Record<string, number> {
  return Object.fromEntries(Object.entries(values).map(([key, value]) => [`${prefix}${key[0]!.toUpperCase()}${key.slice(1)}`, Number(value)]));
}
