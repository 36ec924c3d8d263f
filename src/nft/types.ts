/**
 * Types for the parts of the libnftables JSON schema (libnftables-json(5),
 * json_schema_version 1, nftables 1.0.6) that egressd builds or reads.
 *
 * Output types (listings) are
 * loose on purpose: nft decides what a listing says, and this module returns
 * it as nft said it (for example a `typeof socket cgroupv2 level 1` set lists
 * as `"type": "cgroupsv2"` and its rule as `{"socket": {"key": "cgroupv2"}}`,
 * without the level). Nothing here tries to repair that.
 */

import type { Element, Verdict } from '../compile/ruleset.js';

/** Any JSON value, for the parts of a listing this module does not model. */
export type NftJson = null | boolean | number | string | NftJson[] | { [key: string]: NftJson };
export type NftJsonObject = { [key: string]: NftJson };

export type NftFamily = 'ip' | 'ip6' | 'inet' | 'arp' | 'bridge' | 'netdev';

// ---------------------------------------------------------------------------
// Elements as listings print them. What egressd writes — elements, verdicts,
// commands — is the model's (src/compile/ruleset.ts); listings hold the same
// elements and verdicts, wrapped with what nft adds.

/** A listed key: what egressd writes, or an address interval that is no prefix, which nft lists as a range of strings. */
export type NftListedKey = Element | { readonly range: readonly [string, string] };
/** A listed set element: the key, or the key wrapped with its options (`expires` only in listings). */
export type NftListedElem =
  NftListedKey | { readonly elem: { readonly val: NftListedKey; readonly timeout?: number; readonly expires?: number; readonly comment?: string } };
/** A listed map element: `[key, verdict]`. */
export type NftListedMapElem = readonly [NftListedElem, Verdict];
export type NftElemJson = NftListedElem | NftListedMapElem;

/** A read: the only JSON commands sent as such (changes are model commands). */
export type NftListCommand = {
  readonly list:
    | { readonly tables: null }
    | { readonly table: { readonly family: NftFamily; readonly name: string } }
    | { readonly set: { readonly family: NftFamily; readonly table: string; readonly name: string } }
    | { readonly map: { readonly family: NftFamily; readonly table: string; readonly name: string } }
    | { readonly chain: { readonly family: NftFamily; readonly table: string; readonly name: string } }
    | { readonly chains: { readonly family: NftFamily } }
    | { readonly sets: { readonly family: NftFamily } }
    | { readonly maps: { readonly family: NftFamily } };
};

// ---------------------------------------------------------------------------
// Listings (output).

export interface NftMetainfo {
  readonly version: string;
  readonly release_name: string;
  readonly json_schema_version: number;
}

export interface NftTableInfo {
  readonly family: NftFamily;
  readonly name: string;
  readonly handle?: number;
  readonly flags?: NftJson;
}

/** A set or map as nft lists it. Maps carry `map` (the data type). */
export interface NftSetInfo {
  readonly family: NftFamily;
  readonly table: string;
  readonly name: string;
  readonly type: string | readonly string[];
  readonly handle?: number;
  readonly map?: string | readonly string[];
  readonly flags?: readonly string[];
  readonly timeout?: number;
  readonly size?: number;
  readonly policy?: string;
  /** Absent when the set is empty or the listing was terse. */
  readonly elem?: readonly NftElemJson[];
}

export interface NftChainInfo {
  readonly family: NftFamily;
  readonly table: string;
  readonly name: string;
  readonly handle?: number;
  readonly type?: string;
  readonly hook?: string;
  readonly prio?: number;
  readonly policy?: string;
}

export interface NftRuleInfo {
  readonly family: NftFamily;
  readonly table: string;
  readonly chain: string;
  readonly handle?: number;
  readonly comment?: string;
  /** Statements and expressions, as nft lists them. */
  readonly expr: readonly NftJson[];
}

/** The raw document nft prints: `{"nftables": [{"metainfo": …}, {"table": …}, …]}`. */
export interface NftListingJson {
  readonly nftables: readonly NftJsonObject[];
}

/** A `list table` result, sorted by kind. `raw` is exactly what nft printed. */
export interface NftTableListing {
  readonly metainfo: NftMetainfo;
  readonly table: NftTableInfo;
  readonly sets: readonly NftSetInfo[];
  readonly maps: readonly NftSetInfo[];
  readonly chains: readonly NftChainInfo[];
  readonly rules: readonly NftRuleInfo[];
  /** Objects of other kinds (counters, quotas, flowtables, …), unmodelled. */
  readonly other: readonly NftJsonObject[];
  readonly raw: NftListingJson;
}

/**
 * A table's chains, sets and maps by name, without rules or elements: what
 * `nft list chains` and a terse `nft list sets` print, cheap even when a set
 * holds 100,000 intervals.
 */
export interface NftTableNames {
  readonly chains: readonly NftChainInfo[];
  readonly sets: readonly NftSetInfo[];
  readonly maps: readonly NftSetInfo[];
}

/** One element of a listed set or map, flattened. */
export interface NftElementInfo {
  readonly key: NftListedKey;
  /** Map data; absent for set elements. */
  readonly data?: Verdict;
  /** Seconds, as listed. */
  readonly timeout?: number;
  /** Seconds left, as listed (nft rounds down). */
  readonly expires?: number;
  readonly comment?: string;
}
