/**
 * What the binding builds besides the model's commands: the JSON reads it
 * sends (`list …`), the batch document around them, and element inputs
 * turned into the model's entries.
 */
import type { Element, ElementEntry } from '../compile/ruleset.js';
import type { NftFamily, NftListCommand } from './types.js';

/** The first object of every JSON batch egressd sends. */
const METAINFO = { metainfo: { json_schema_version: 1 } } as const;

/**
 * An element as callers give it to `addElements`/`deleteElements`: a bare
 * key, or the model's entry (map data, per-element options).
 */
export type NftElementInput = Element | ElementEntry;

function isEntry(input: NftElementInput): input is ElementEntry {
  return typeof input === 'object' && 'key' in input;
}

/** Caller elements as model entries; `timeout` (seconds) goes to those without their own. */
export function toEntries(inputs: readonly NftElementInput[], timeout?: number): ElementEntry[] {
  return inputs.map((input) => {
    const entry = isEntry(input) ? input : { key: input };
    return timeout === undefined || entry.timeout !== undefined ? entry : { ...entry, timeout };
  });
}

export const list = {
  tables: (): NftListCommand => ({ list: { tables: null } }),
  table: (family: NftFamily, name: string): NftListCommand => ({ list: { table: { family, name } } }),
  set: (family: NftFamily, table: string, name: string): NftListCommand => ({ list: { set: { family, table, name } } }),
  map: (family: NftFamily, table: string, name: string): NftListCommand => ({ list: { map: { family, table, name } } }),
  chain: (family: NftFamily, table: string, name: string): NftListCommand => ({ list: { chain: { family, table, name } } }),
  chains: (family: NftFamily): NftListCommand => ({ list: { chains: { family } } }),
  sets: (family: NftFamily): NftListCommand => ({ list: { sets: { family } } }),
  maps: (family: NftFamily): NftListCommand => ({ list: { maps: { family } } }),
} as const;

/** The JSON document for a batch: metainfo first, then the commands. */
export function batchDocument(commands: readonly object[]): string {
  return JSON.stringify({ nftables: [METAINFO, ...commands] });
}
