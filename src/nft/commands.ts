/**
 * Small typed constructors for libnftables JSON commands, so callers never
 * paste dict literals: `cmd.add.element(ref, [elem.timed('192.0.2.1', 60)])`.
 * All of them are pure and return fresh frozen-shape objects.
 */
import { EgressError, ErrorCode } from '../errors.js';
import type {
  NftCommand,
  NftElemJson,
  NftElemKey,
  NftElementInfo,
  NftFamily,
  NftMapData,
  NftSetElemJson,
  NftSetRef,
  NftVerdict,
} from './types.js';

/** The first object of every JSON batch egressd sends. */
export const METAINFO = { metainfo: { json_schema_version: 1 } } as const;

export const verdict = {
  accept: (): NftVerdict => ({ accept: null }),
  drop: (): NftVerdict => ({ drop: null }),
  continue: (): NftVerdict => ({ continue: null }),
  return: (): NftVerdict => ({ return: null }),
  jump: (target: string): NftVerdict => ({ jump: { target } }),
  goto: (target: string): NftVerdict => ({ goto: { target } }),
} as const;

/** Options of one element. `timeout` is in whole seconds (nft JSON's unit). */
export interface NftElementOptions {
  readonly timeout?: number;
  readonly comment?: string;
}

/**
 * An element as callers give it to `addElements`/`deleteElements`: a bare
 * key, or a key with map data and per-element options.
 */
export type NftElementInput =
  | NftElemKey
  | ({ readonly key: NftElemKey; readonly data?: NftMapData } & NftElementOptions);

export const elem = {
  prefix: (addr: string, len: number): NftElemKey => ({ prefix: { addr, len } }),
  range: (low: NftElemKey, high: NftElemKey): NftElemKey => ({ range: [low, high] }),
  concat: (...parts: NftElemKey[]): NftElemKey => ({ concat: parts }),
  /** A set element with options, as nft JSON writes it. */
  withOptions: (key: NftElemKey, options: NftElementOptions): NftSetElemJson => wrap(key, options),
  /** A map element `[key, data]`. */
  mapping: (key: NftElemKey, data: NftMapData, options: NftElementOptions = {}): NftElemJson => [
    wrap(key, options),
    data,
  ],
} as const;

function wrap(key: NftElemKey, options: NftElementOptions): NftSetElemJson {
  if (options.timeout === undefined && options.comment === undefined) return key;
  if (options.timeout !== undefined) checkTimeout(options.timeout);
  return {
    elem: {
      val: key,
      ...(options.timeout === undefined ? {} : { timeout: options.timeout }),
      ...(options.comment === undefined ? {} : { comment: options.comment }),
    },
  };
}

/** nft JSON takes whole seconds; 0 would mean "no timeout", which a caller never means. */
export function checkTimeout(seconds: number): void {
  if (!Number.isSafeInteger(seconds) || seconds < 1) {
    throw new EgressError(
      ErrorCode.NftApply,
      `element timeout must be a whole number of seconds >= 1, got ${String(seconds)} (nothing was sent to nft)`,
    );
  }
}

function isKeyedInput(
  input: NftElementInput,
): input is { readonly key: NftElemKey; readonly data?: NftMapData } & NftElementOptions {
  return typeof input === 'object' && input !== null && 'key' in input;
}

/**
 * Turns caller elements into nft JSON. For deletes only the key is sent
 * (nft finds map elements by key; options on a delete are meaningless).
 */
export function toElemJson(
  inputs: readonly NftElementInput[],
  mode: { readonly op: 'add'; readonly timeout?: number } | { readonly op: 'delete' },
): NftElemJson[] {
  const defaultTimeout = mode.op === 'add' ? mode.timeout : undefined;
  if (defaultTimeout !== undefined) checkTimeout(defaultTimeout);
  return inputs.map((input): NftElemJson => {
    if (!isKeyedInput(input)) {
      return mode.op === 'add' && defaultTimeout !== undefined ? wrap(input, { timeout: defaultTimeout }) : input;
    }
    if (mode.op === 'delete') return input.key;
    const timeout = input.timeout ?? defaultTimeout;
    const options: NftElementOptions = {
      ...(timeout === undefined ? {} : { timeout }),
      ...(input.comment === undefined ? {} : { comment: input.comment }),
    };
    return input.data === undefined ? wrap(input.key, options) : [wrap(input.key, options), input.data];
  });
}

const tableSpec = (family: NftFamily, name: string) => ({ family, name });
const setSpec = (ref: NftSetRef) => ({ family: ref.family, table: ref.table, name: ref.name });
const elementSpec = (ref: NftSetRef, elems: readonly NftElemJson[]) => ({ ...setSpec(ref), elem: elems });

export const cmd = {
  add: {
    table: (family: NftFamily, name: string): NftCommand => ({ add: { table: tableSpec(family, name) } }),
    element: (ref: NftSetRef, elems: readonly NftElemJson[]): NftCommand => ({
      add: { element: elementSpec(ref, elems) },
    }),
  },
  delete: {
    table: (family: NftFamily, name: string): NftCommand => ({ delete: { table: tableSpec(family, name) } }),
    element: (ref: NftSetRef, elems: readonly NftElemJson[]): NftCommand => ({
      delete: { element: elementSpec(ref, elems) },
    }),
  },
  flush: {
    set: (ref: NftSetRef): NftCommand => ({ flush: { set: setSpec(ref) } }),
    map: (ref: NftSetRef): NftCommand => ({ flush: { map: setSpec(ref) } }),
  },
  list: {
    tables: (): NftCommand => ({ list: { tables: null } }),
    table: (family: NftFamily, name: string): NftCommand => ({ list: { table: tableSpec(family, name) } }),
    set: (ref: NftSetRef): NftCommand => ({ list: { set: setSpec(ref) } }),
    map: (ref: NftSetRef): NftCommand => ({ list: { map: setSpec(ref) } }),
    chains: (family: NftFamily): NftCommand => ({ list: { chains: { family } } }),
    sets: (family: NftFamily): NftCommand => ({ list: { sets: { family } } }),
    maps: (family: NftFamily): NftCommand => ({ list: { maps: { family } } }),
  },
} as const;

/** The JSON document for a batch: metainfo first, then the commands. */
export function batchDocument(commands: readonly NftCommand[]): string {
  return JSON.stringify({ nftables: [METAINFO, ...commands] });
}

/** A one-line human summary of a command, for error details ("add element inet egressd dns4 (3 elements)"). */
export function describeCommand(command: NftCommand): string {
  const [verb, object] = Object.entries(command)[0] ?? ['?', {}];
  const [kind, spec] = Object.entries(object as Record<string, unknown>)[0] ?? ['?', null];
  if (spec === null || typeof spec !== 'object') return `${verb} ${kind}`;
  const s = spec as { family?: string; table?: string; name?: string; elem?: readonly unknown[] };
  const where = [s.family, s.table, s.name].filter((part) => part !== undefined).join(' ');
  const count = s.elem === undefined ? '' : ` (${s.elem.length} element${s.elem.length === 1 ? '' : 's'})`;
  return `${verb} ${kind} ${where}${count}`;
}

/** Flattens the `elem` list of a listed set or map into key/data/timeout/expires. */
export function elementsOf(set: { readonly elem?: readonly NftElemJson[] }): NftElementInfo[] {
  return (set.elem ?? []).map((item): NftElementInfo => {
    if (Array.isArray(item)) {
      const [key, data] = item as readonly [NftSetElemJson, NftMapData];
      return { ...unwrap(key), data };
    }
    return unwrap(item as NftSetElemJson);
  });
}

function unwrap(item: NftSetElemJson): NftElementInfo {
  if (typeof item === 'object' && item !== null && 'elem' in item) {
    const e = item.elem;
    return {
      key: e.val,
      ...(e.timeout === undefined ? {} : { timeout: e.timeout }),
      ...(e.expires === undefined ? {} : { expires: e.expires }),
      ...(e.comment === undefined ? {} : { comment: e.comment }),
    };
  }
  return { key: item };
}
