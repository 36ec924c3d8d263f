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
import { isApplyMarker, parseLiveName } from '../enforce/swap.js';

import type { Nft } from '../nft/client.js';
import { setWriteRefusal } from '../errors.js';
import { createBatchingWriter, openSetElementWriter, type BatchingWriter } from '../nft/set-elements.js';
import type { Policy } from '../policy/model.js';
import { startControlServer, type ControlServer } from './control.js';
import { buildDecider, type Decider } from './decide.js';
import { SetFiller, type FillView } from './fill.js';
import { AddressMemory } from './memory.js';
import { startResolver, type AnswerRecord, type Question, type Resolver } from './server.js';
import { discoverUpstreams } from './upstreams.js';
import { openWhoAsks, type Who, type WhoAsks } from './who.js';

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
}

export interface ResolverRuntime {
  readonly resolver: Resolver;
  readonly upstreams: readonly string[];
  /** The policy now in force (after an apply). Upstreams and listen addresses are read at start only. */
  update(inForce: InForce): Promise<void>;
  /** The table's set names changed under us (an apply by someone else): read them again. */
  refreshLiveNames(): Promise<void>;
  counters(): Record<string, number>;
  close(): Promise<void>;
}

/** Compiled set name → every live set of that name (two while an apply is between its switch and its clean-up), and the apply marker in force. */
export async function readLiveNames(nft: Nft): Promise<{ names: Map<string, string[]>; marker: string | undefined }> {
  const listed = await nft.listNames(TABLE.family, TABLE.name);
  const names = new Map<string, string[]>();
  for (const set of listed?.sets ?? []) {
    const { base } = parseLiveName(set.name);
    const known = names.get(base);
    if (known) known.push(set.name);
    else names.set(base, [set.name]);
  }
  return { names, marker: listed?.chains.map((c) => c.name).find(isApplyMarker) };
}

interface State {
  readonly decider: Decider;
  readonly view: FillView;
}

export async function startResolverRuntime(first: InForce, options: ResolverRuntimeOptions): Promise<ResolverRuntime> {
  const { nft, log } = options;
  const dns = first.policy.dns;
  const upstreams = dns.upstreams ?? discovered(options, dns.listen, log);
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
      const liveNames = inForce.liveNames ?? (await readLiveNames(nft)).names;
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
      return { decider, view };
    };
    let state = await build(first);
    const filler = new SetFiller(state.view, writer, memory);
    const identify = who.identify.bind(who);
    const learn = async (question: Question, records: readonly AnswerRecord[]): Promise<void> => {
      memory.rememberAnswer(question.name, records);
      try {
        await filler.learn(question, records);
      } catch (error) {
        // A set that is gone was replaced by an apply (its names changed): read the names again and try once more.
        if (setWriteRefusal(error) !== 'missing-set') throw error;
        await runtime.refreshLiveNames();
        await filler.learn(question, records);
      }
    };
    resolver = await startResolver<Who>({
      listen: dns.listen,
      ...(options.port === undefined ? {} : { port: options.port }),
      upstreams,
      mark: dns.mark,
      hooks: {
        identify,
        admit: (asker, question) => state.decider.admit(asker, question),
        learn,
        shape: (asker, question, chain) => state.decider.shape(asker, question, chain),
      },
      onError: (error) => log.error({ event: 'resolver-error', error: String(error) }, 'resolver: unexpected error; answering goes on'),
    });
    const counters = (): Record<string, number> => ({ ...resolver!.stats(), ...filler.counters, ...prefixed('memory', memory.counters()) });
    if (options.controlSocket !== false) {
      control = await startControlServer({ memory, counters, ...(options.controlSocket === undefined ? {} : { path: options.controlSocket }) });
    }
    const runtime: ResolverRuntime = {
      resolver,
      upstreams,
      async update(inForce) {
        state = await build(inForce);
        filler.update(state.view);
        const relearned = await filler.relearn(memory.chains());
        if (relearned > 0) log.info({ event: 'resolver-relearned', elements: relearned }, 'resolver: remembered addresses put into the new sets');
      },
      async refreshLiveNames() {
        const { names } = await readLiveNames(nft);
        state = { ...state, view: { ...state.view, liveNames: names } };
        filler.update(state.view);
      },
      counters,
      async close() {
        await control?.close();
        await resolver?.close();
        writer?.close();
        who?.close();
      },
    };
    log.info({ event: 'resolver-ready', listen: resolver.addresses, upstreams }, `resolver: answering on ${dns.listen.join(', ')}`);
    return runtime;
  } catch (error) {
    await control?.close().catch(() => undefined);
    await resolver?.close().catch(() => undefined);
    writer?.close();
    who?.close();
    throw error;
  }
}

function discovered(options: ResolverRuntimeOptions, listen: readonly string[], log: Logger): readonly string[] {
  const found = discoverUpstreams({ root: options.root ?? '/', stateDir: options.stateDir, listen });
  for (const note of found.notes) log.warn({ event: 'resolver-upstream-note', source: found.source, note }, `resolver upstreams: ${note}`);
  return found.upstreams;
}

function prefixed(prefix: string, values: object): Record<string, number> {
  return Object.fromEntries(Object.entries(values).map(([key, value]) => [`${prefix}${key[0]!.toUpperCase()}${key.slice(1)}`, Number(value)]));
}
