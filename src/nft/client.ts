/**
 * The typed nftables client. One instance wraps one backend (libnftables
 * in-process, or the `nft` binary) chosen by `openNft` (./open.ts); the
 * interface is the same either way.
 *
 * Every method is one nft transaction, which succeeds or fails whole. Every
 * change is a list of the model's commands (src/compile/ruleset.ts) that one
 * guard (./guard.ts) checks touch only the client's own table before
 * anything is sent. A refused transaction throws NftRefusedError
 * (EGD_NFT_APPLY) with a typed `reason` (conflict, missing, refused),
 * nft's own error text in the message and its lines in `details`; nothing is
 * ever swallowed. Listing something that does not exist is not an error: the
 * list methods return `null` for a missing table, set or map.
 *
 * With the libnftables backend, short commands run on the calling thread and
 * long ones (text transactions, listings with every element) on a worker
 * thread (see ./libnftables.ts); calls never overlap, and the two backends
 * are interchangeable.
 */
import {
  commandJson,
  describeCommand,
  EGRESSD_TABLE,
  isJsonCommand,
  renderCommandsText,
  command,
  type Command,
  type ObjectRef,
  type TableRef,
} from '../compile/ruleset.js';
import { EgressError, ErrorCode, NftRefusedError, type NftRefusal } from '../errors.js';
import type { NftBackend, NftBackendKind, NftOutcome } from './backend.js';
import { CGROUP_KEY_TYPE, openCgroupElementReader, type CgroupElementReader } from './cgroup-elements.js';
import { batchDocument, list, toEntries, type NftElementInput } from './commands.js';
import { checkName, guardTransaction } from './guard.js';
import type {
  NftChainInfo,
  NftFamily,
  NftJson,
  NftJsonObject,
  NftListCommand,
  NftListingJson,
  NftMetainfo,
  NftRuleInfo,
  NftSetInfo,
  NftTableInfo,
  NftTableListing,
  NftTableNames,
} from './types.js';

/**
 * One transaction's input: the model's commands (every change — checked by
 * the guard, rendered in one place), or JSON reads.
 */
export type NftInput = { readonly commands: readonly Command[] } | { readonly json: readonly NftListCommand[] };

export interface NftRunOptions {
  /** Dry run (`nft -c`): nft checks the transaction against the kernel; nothing changes. */
  readonly check?: boolean;
  /** Leave set elements out of listings (`nft -t`). */
  readonly terse?: boolean;
  /** Expected to take long (a listing with every element): run off the event loop where the backend can. */
  readonly long?: boolean;
}

export interface NftRunResult {
  /** nft's output, verbatim (JSON for JSON input, text for text input). */
  readonly output: string;
  /** The parsed output, when the input was JSON and nft printed something. */
  readonly json?: NftListingJson;
  /** Non-fatal messages nft printed while succeeding. */
  readonly warnings: readonly string[];
}

export interface NftElementsOptions {
  /** Default timeout in whole seconds for elements that do not carry their own. */
  readonly timeout?: number;
  readonly check?: boolean;
}

export interface NftClientInfo {
  /** Why the preferred backend was not used, when it was not. */
  readonly fallbackReason?: string;
  /** The nft version, when the factory already learnt it. */
  readonly version?: string;
  /** The only table this client changes; default `table inet egressd`. Tests and benchmarks name throwaway ones. */
  readonly table?: TableRef;
  /** Where `listTable` reads cgroup maps' elements (ids, not paths); default a netlink socket of this namespace. */
  readonly cgroupElements?: (table: string) => CgroupElementReader;
}

function lines(text: string): string[] {
  return text
    .split('\n')
    .map((line) => line.trimEnd())
    .filter((line) => line.length > 0);
}

function isObject(value: unknown): value is NftJsonObject {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/**
 * Parses nft's JSON output; anything else is an nft we do not understand.
 * A batch of several list commands prints one document per command, a line
 * each: their items are joined into one listing.
 */
export function parseListing(output: string): NftListingJson {
  const parse = (document: string): unknown => {
    try {
      return JSON.parse(document);
    } catch (cause) {
      throw new EgressError(ErrorCode.NftState, 'nft printed output that is not JSON', { cause, details: [output.slice(0, 200)] });
    }
  };
  let documents: unknown[];
  try {
    documents = [JSON.parse(output)];
  } catch {
    documents = output
      .split('\n')
      .filter((line) => line.trim().length > 0)
      .map(parse);
  }
  const items: NftJsonObject[] = [];
  for (const parsed of documents) {
    if (!isObject(parsed) || !Array.isArray(parsed['nftables']) || !parsed['nftables'].every(isObject)) {
      throw new EgressError(ErrorCode.NftState, 'nft printed JSON that is not a libnftables listing', { details: [output.slice(0, 200)] });
    }
    // One metainfo is enough: every document of one run carries the same.
    items.push(...(items.length > 0 ? parsed['nftables'].filter((item) => !('metainfo' in item)) : parsed['nftables']));
  }
  return { nftables: items };
}

/** The object under `kind` in each item of a listing that has one. */
function itemsOf(listing: NftListingJson, kind: string): NftJsonObject[] {
  const found: NftJsonObject[] = [];
  for (const item of listing.nftables) {
    const value: NftJson | undefined = item[kind];
    if (isObject(value)) found.push(value);
  }
  return found;
}

// The casts below trust nft for the shape of its own listings; isObject()
// above has already checked they are objects under the expected key.
const asTable = (o: NftJsonObject) => o as unknown as NftTableInfo;
const asSet = (o: NftJsonObject) => o as unknown as NftSetInfo;
const asChain = (o: NftJsonObject) => o as unknown as NftChainInfo;
const asRule = (o: NftJsonObject) => o as unknown as NftRuleInfo;

const KNOWN_KINDS = new Set(['metainfo', 'table', 'set', 'map', 'chain', 'rule']);

function tableListing(raw: NftListingJson): NftTableListing {
  const metainfo = itemsOf(raw, 'metainfo')[0];
  const table = itemsOf(raw, 'table')[0];
  if (metainfo === undefined || table === undefined) {
    throw new EgressError(ErrorCode.NftState, 'nft listed a table without metainfo or table object');
  }
  return {
    metainfo: metainfo as unknown as NftMetainfo,
    table: asTable(table),
    sets: itemsOf(raw, 'set').map(asSet),
    maps: itemsOf(raw, 'map').map(asSet),
    chains: itemsOf(raw, 'chain').map(asChain),
    rules: itemsOf(raw, 'rule').map(asRule),
    other: raw.nftables.filter((item) => !Object.keys(item).some((key) => KNOWN_KINDS.has(key))),
    raw,
  };
}

const FAMILIES: readonly string[] = ['ip', 'ip6', 'inet', 'arp', 'bridge', 'netdev'];

/** Reads name their table too: the same identifier rule as for changes. */
function checkTable(family: string, name: string): void {
  if (!FAMILIES.includes(family)) {
    throw new EgressError(ErrorCode.NftApply, `unknown nftables family ${JSON.stringify(family)} (nothing was sent to nft)`);
  }
  checkName('table', name);
}

/**
 * The reason in nft's answer, read once here: the errno text the kernel's
 * refusal carries, which nft prints as strerror at the end of its
 * "Error:" line, else a plain refusal. Only those lines count: nft also
 * echoes the input line it refused, and that may hold a cgroup path a
 * non-root user named "x File exists" to make a missing cgroup pass for a
 * concurrent writer (which lockdown does not fall back from).
 */
export function classifyRefusal(errorLines: readonly string[]): NftRefusal {
  const diagnostics = errorLines.filter((line) => /\bError: /.test(line));
  if (diagnostics.some((line) => /: File exists$/.test(line))) return 'conflict';
  if (diagnostics.some((line) => /: No such file or directory$/.test(line))) return 'missing';
  return 'refused';
}

export class Nft {
  /** Which backend this client drives. */
  readonly backend: NftBackendKind;
  /** Why the preferred backend was not used, when it was not. */
  readonly fallbackReason: string | undefined;
  /** The only table this client changes. */
  readonly table: TableRef;
  /** Where `listTable` reads cgroup maps' elements. Not private: tests wrap a client with Object.create, which private members do not follow. */
  readonly cgroupElements: (table: string) => CgroupElementReader;
  readonly #impl: NftBackend;
  #version: Promise<string> | undefined;
  #previous: Promise<unknown> = Promise.resolve();

  constructor(impl: NftBackend, info: NftClientInfo = {}) {
    this.#impl = impl;
    this.backend = impl.kind;
    this.fallbackReason = info.fallbackReason;
    this.table = info.table ?? EGRESSD_TABLE;
    this.cgroupElements = info.cgroupElements ?? openCgroupElementReader;
    this.#version = info.version === undefined ? undefined : Promise.resolve(info.version);
  }

  /**
   * Runs one transaction: the model's commands (a change), or JSON reads.
   * Throws NftRefusedError (EGD_NFT_APPLY) with nft's error text if nft
   * refuses it (and then nothing was changed).
   */
  run(input: NftInput, options: NftRunOptions = {}): Promise<NftRunResult> {
    // Checked before queueing: a transaction for another table never reaches nft.
    try {
      if ('commands' in input) guardTransaction(input.commands, this.table);
    } catch (error) {
      return Promise.reject(error instanceof Error ? error : new Error(String(error)));
    }
    // One transaction at a time, in the order asked: a listing asked for during
    // a write sees the write, and libnftables is never driven from two threads.
    const result = this.#previous.then(() => this.#runNow(input, options));
    this.#previous = result.catch(() => undefined);
    return result;
  }

  async #runNow(input: NftInput, options: NftRunOptions): Promise<NftRunResult> {
    // Element and table changes go as JSON (cheap, on the calling thread); anything
    // with chains or sets as text, which nft 1.0.6 parses where its JSON cannot (socket cgroupv2).
    const commands = 'commands' in input ? input.commands : undefined;
    const isJson = commands === undefined || commands.every(isJsonCommand);
    const outcome = await this.#impl.exec({
      input:
        commands === undefined
          ? batchDocument((input as { json: readonly NftListCommand[] }).json)
          : isJson
            ? batchDocument(commands.map(commandJson))
            : renderCommandsText(commands),
      format: isJson ? 'json' : 'text',
      check: options.check ?? false,
      terse: options.terse ?? false,
      long: options.long ?? false,
    });
    if (!outcome.ok) throw this.#refused(outcome, commands, options.check ?? false);
    const warnings = lines(outcome.error);
    if (isJson && outcome.output.trim().length > 0) {
      return { output: outcome.output, json: parseListing(outcome.output), warnings };
    }
    return { output: outcome.output, warnings };
  }

  #refused(outcome: NftOutcome, commands: readonly Command[] | undefined, check: boolean): NftRefusedError {
    const errorLines = lines(outcome.error);
    const errorText = errorLines.length > 0 ? errorLines.join('\n') : '(nft printed no error text)';
    const what =
      commands === undefined
        ? 'listing'
        : commands.length <= 3
          ? commands.map(describeCommand).join('; ')
          : `${commands.map(describeCommand).slice(0, 3).join('; ')}; … (${commands.length} commands)`;
    const verb = check ? 'check' : 'transaction';
    return new NftRefusedError(
      classifyRefusal(errorLines),
      `nft (${this.backend}) refused the ${verb} [${what}], nothing was changed:\n${errorText}${hintFor(errorText)}`,
      { details: errorLines },
    );
  }

  /** Deletes this client's table; deleting a table that is not there is not an error. */
  async deleteTable(options: { readonly check?: boolean } = {}): Promise<void> {
    await this.run({ commands: [command.addTable(this.table), command.deleteTable(this.table)] }, { check: options.check ?? false });
  }

  /** Every table in this network namespace (names only). */
  async listTables(): Promise<NftTableInfo[]> {
    const result = await this.run({ json: [list.tables()] });
    return result.json === undefined ? [] : itemsOf(result.json, 'table').map(asTable);
  }

  async tableExists(family: NftFamily, name: string): Promise<boolean> {
    return (await this.listTables()).some((t) => t.family === family && t.name === name);
  }

  /**
   * Lists table F N, or returns `null` if there is no such table. `terse`
   * leaves set elements out of the output, but nft still fetches them all
   * (~1 s at 100,000 interval elements); `listNames` is the cheap listing.
   *
   * The elements of `socket cgroupv2` maps are listed as ids, read from the
   * kernel (./cgroup-elements.ts), never as the paths nft prints: nft finds
   * each element's path by walking all of cgroupfs (seconds per hundred
   * elements on a busy machine) and aborts on a path that is not UTF-8.
   * Then the listing is made of two reads, nft's and the kernel's, not one
   * snapshot: an element written between them may be missing, as from a
   * listing made a moment earlier.
   */
  async listTable(family: NftFamily, name: string, options: { readonly terse?: boolean } = {}): Promise<NftTableListing | null> {
    checkTable(family, name);
    if (options.terse !== true && family === 'inet') {
      const names = await this.listNames(family, name);
      let before = names;
      // Several reads: a generation swapped between them gives a mixed listing, which the names before and after tell; a few more tries, then nft's own listing (one snapshot).
      for (let attempt = 0; attempt < LISTING_ATTEMPTS && before?.maps.some((m) => m.type === CGROUP_KEY_TYPE); attempt++) {
        try {
          const listing = await listWithCgroupIds(this, family, name, before);
          const after = await this.listNames(family, name);
          if (namesKey(after) === namesKey(before)) return listing;
          before = after;
        } catch (err) {
          // Changed between the reads (an apply swapped generations): the whole listing once more, as nft prints it.
          if (!(err instanceof EgressError && err.code === ErrorCode.NftApply)) throw err;
          break;
        }
      }
    }
    try {
      const result = await this.run({ json: [list.table(family, name)] }, { terse: options.terse ?? false, long: true });
      if (result.json === undefined) throw new EgressError(ErrorCode.NftState, 'nft listed nothing for a table');
      return tableListing(result.json);
    } catch (err) {
      if (err instanceof EgressError && err.code === ErrorCode.NftApply && !(await this.tableExists(family, name))) {
        return null;
      }
      throw err;
    }
  }

  /**
   * The names of table F N's chains, sets and maps, or `null` if there is no
   * such table (or it has no chain, so enforces nothing). One transaction, terse: nft fetches no rule and no element,
   * so it costs milliseconds where `listTable` costs a second at 100,000
   * interval elements (nft fills its cache with every element even for a
   * terse table listing).
   */
  async listNames(family: NftFamily, name: string): Promise<NftTableNames | null> {
    checkTable(family, name);
    // Not `list tables`: it fills nft's whole cache, elements included (0.6 s at 100,000).
    const result = await this.run({ json: [list.chains(family), list.sets(family), list.maps(family)] }, { terse: true });
    if (result.json === undefined) throw new EgressError(ErrorCode.NftState, 'nft listed nothing for chains and sets');
    const mine = <T extends { readonly family: NftFamily; readonly table: string }>(items: T[]) =>
      items.filter((item) => item.family === family && item.table === name);
    const chains = mine(itemsOf(result.json, 'chain').map(asChain));
    // A table without chains holds no rule: it enforces nothing, and counts as no table.
    if (chains.length === 0) return null;
    return {
      chains,
      sets: mine(itemsOf(result.json, 'set').map(asSet)),
      maps: mine(itemsOf(result.json, 'map').map(asSet)),
    };
  }

  /** Lists a set with its elements, or `null` if the table or set is missing. */
  listSet(ref: ObjectRef): Promise<NftSetInfo | null> {
    return this.#listSetOrMap(ref, 'set');
  }

  /** Lists a map with its elements, or `null` if the table or map is missing. */
  listMap(ref: ObjectRef): Promise<NftSetInfo | null> {
    return this.#listSetOrMap(ref, 'map');
  }

  async #listSetOrMap(ref: ObjectRef, kind: 'set' | 'map'): Promise<NftSetInfo | null> {
    const { family, name: table } = ref.table;
    checkTable(family, table);
    checkName(kind, ref.name);
    try {
      const result = await this.run({ json: [list[kind](family, table, ref.name)] });
      const found = result.json === undefined ? undefined : itemsOf(result.json, kind)[0];
      if (found === undefined) throw new EgressError(ErrorCode.NftState, `nft listed no ${kind} for ${kind} ${ref.name}`);
      return asSet(found);
    } catch (err) {
      if (err instanceof EgressError && err.code === ErrorCode.NftApply) {
        const listed = await this.listTable(family, table, { terse: true });
        const present = listed !== null && (kind === 'set' ? listed.sets : listed.maps).some((s) => s.name === ref.name);
        if (!present) return null;
      }
      throw err;
    }
  }

  /**
   * Adds elements to a set or map of this client's table in ONE transaction.
   * Elements are the model's keys (addresses, prefixes, numbers, cgroup
   * paths, …) or entries `{key, data, timeout}` for map entries and
   * per-element timeouts; `options.timeout` (seconds) applies to elements
   * without their own. An empty list does nothing.
   */
  async addElements(ref: ObjectRef, elements: readonly NftElementInput[], options: NftElementsOptions = {}): Promise<void> {
    if (elements.length === 0) return;
    await this.run({ commands: [command.addElements(ref, toEntries(elements, options.timeout))] }, { check: options.check ?? false });
  }

  /**
   * Deletes elements (by key) from a set or map in ONE transaction. nft
   * 1.0.6 refuses the whole transaction if any element is absent (an element
   * may have just expired): reason `missing`. An empty list does nothing.
   */
  async deleteElements(ref: ObjectRef, elements: readonly NftElementInput[], options: { readonly check?: boolean } = {}): Promise<void> {
    if (elements.length === 0) return;
    await this.run({ commands: [command.deleteElements(ref, toEntries(elements))] }, { check: options.check ?? false });
  }

  /**
   * The nft version ("1.0.6"), asked once and remembered: from `nft
   * --version` when the factory ran it, else from a listing's metainfo.
   */
  version(): Promise<string> {
    this.#version ??= this.run({ json: [list.tables()] }).then((result) => {
      const meta = result.json === undefined ? undefined : itemsOf(result.json, 'metainfo')[0];
      const version = meta?.['version'];
      if (typeof version !== 'string') throw new EgressError(ErrorCode.NftState, 'nft listed no version in metainfo');
      return version;
    });
    const pending = this.#version;
    // A failed probe is not remembered: the next call asks again.
    pending.catch(() => {
      if (this.#version === pending) this.#version = undefined;
    });
    return pending;
  }
}

/**
 * What to do about refusals whose cause lies outside the ruleset. nft looks
 * protocol names (`ipv6-icmp`) up in /etc/protocols, which minimal Debian
 * installs and container images leave out; its own message does not say so.
 */
function hintFor(errorText: string): string {
  if (/could not resolve protocol name/i.test(errorText)) {
    return '\nnft reads protocol names from /etc/protocols, which is missing or incomplete here: install it (Debian package netbase).';
  }
  return '';
}

/**
 * Every chain with its rules and every set and map but the cgroup maps,
 * from nft; those from the kernel. Several reads: nft 1.0.6 fetches its
 * cache for one named object per run (a batch of two `list set` or two
 * `list chain` finds only one), and a table's listing prints every map.
 */
const LISTING_ATTEMPTS = 3;

function namesKey(names: NftTableNames | null): string {
  if (names === null) return '';
  return JSON.stringify([names.chains.map((c) => c.name).sort(), names.sets.map((s) => s.name).sort(), names.maps.map((m) => m.name).sort()]);
}

async function listWithCgroupIds(nft: Nft, family: NftFamily, name: string, names: NftTableNames): Promise<NftTableListing> {
  const ours = (item: NftJsonObject): boolean => {
    const inner = Object.values(item)[0];
    return isObject(inner) && inner['family'] === family && ('table' in item ? inner['name'] === name : inner['table'] === name);
  };
  const declared = await nft.run({ json: [list.table(family, name)] }, { terse: true, long: true });
  if (declared.json === undefined) throw new EgressError(ErrorCode.NftState, 'nft listed nothing for a table');
  // Each of ours by name, never `list sets`: that lists every table's sets, and a foreign cgroupsv2 set would bring back nft's walk of cgroupfs (and its abort).
  const sets: NftJsonObject[] = [];
  for (const set of names.sets) {
    const listed = await nft.run({ json: [list.set(family, name, set.name)] }, { long: true });
    sets.push(...(listed.json?.nftables ?? []).filter((item) => 'set' in item && ours(item)));
  }
  // The maps as declared beside the rules listed: the names listed before may be a moment older.
  const declaredMaps = itemsOf(declared.json, 'map')
    .filter((map) => map['family'] === family && map['table'] === name)
    .map(asSet);
  const maps: NftJsonObject[] = [];
  for (const map of declaredMaps.filter((m) => m.type !== CGROUP_KEY_TYPE)) {
    const listed = await nft.run({ json: [list.map(family, name, map.name)] }, { long: true });
    maps.push(...(listed.json?.nftables ?? []).filter((item) => 'map' in item && ours(item)));
  }
  const reader = nft.cgroupElements(name);
  try {
    for (const map of declaredMaps.filter((m) => m.type === CGROUP_KEY_TYPE)) {
      const elem = reader.read(map.name);
      // Gone since it was listed: a generation swapped meanwhile.
      if (elem === null) continue;
      maps.push({ map: { ...map, ...(elem.length === 0 ? {} : { elem }) } } as unknown as NftJsonObject);
    }
  } finally {
    reader.close();
  }
  const rest = declared.json.nftables.filter((item) => !('set' in item) && !('map' in item) && ('metainfo' in item || ours(item)));
  return tableListing({ nftables: [...rest, ...sets, ...maps] });
}
