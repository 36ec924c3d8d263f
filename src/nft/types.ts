/**
 * Types for the parts of the libnftables JSON schema (libnftables-json(5),
 * json_schema_version 1, nftables 1.0.6) that egressd builds or reads.
 *
 * Input types (commands, elements) are exact. Output types (listings) are
 * loose on purpose: nft decides what a listing says, and this module returns
 * it as nft said it (for example a `typeof socket cgroupv2 level 1` set lists
 * as `"type": "cgroupsv2"` and its rule as `{"socket": {"key": "cgroupv2"}}`,
 * without the level). Nothing here tries to repair that.
 */

/** Any JSON value, for the parts of a listing this module does not model. */
export type NftJson = null | boolean | number | string | NftJson[] | { [key: string]: NftJson };
export type NftJsonObject = { [key: string]: NftJson };

export type NftFamily = 'ip' | 'ip6' | 'inet' | 'arp' | 'bridge' | 'netdev';

/** Names a set or a map. */
export interface NftSetRef {
  readonly family: NftFamily;
  readonly table: string;
  readonly name: string;
}

// ---------------------------------------------------------------------------
// Expressions used as set/map keys and data.

export interface NftPrefix {
  readonly prefix: { readonly addr: string; readonly len: number };
}
export interface NftRange {
  readonly range: readonly [NftElemKey, NftElemKey];
}
export interface NftConcat {
  readonly concat: readonly NftElemKey[];
}
/**
 * A set key: an address (`"192.0.2.1"`, `"2001:db8::1"`), a cgroup path for
 * `socket cgroupv2` sets (`"system.slice/foo.service"`; nft resolves it to the
 * cgroup's id when the element is added, so the cgroup must exist then), an
 * interface name, a number, a prefix, a range or a concatenation.
 */
export type NftElemKey = string | number | NftPrefix | NftRange | NftConcat;

export type NftVerdict =
  | { readonly accept: null }
  | { readonly drop: null }
  | { readonly continue: null }
  | { readonly return: null }
  | { readonly jump: { readonly target: string } }
  | { readonly goto: { readonly target: string } };

/** The data side of a map element: a verdict (vmap) or a value. */
export type NftMapData = NftVerdict | NftElemKey;

/** An element key wrapped with its per-element options (`timeout` in seconds). */
export interface NftElemWrapped {
  readonly elem: {
    readonly val: NftElemKey;
    readonly timeout?: number;
    /** Only in listings: seconds left before the element expires. */
    readonly expires?: number;
    readonly comment?: string;
  };
}
export type NftSetElemJson = NftElemKey | NftElemWrapped;
/** A map element as nft JSON writes it: `[key, data]`. */
export type NftMapElemJson = readonly [NftSetElemJson, NftMapData];
export type NftElemJson = NftSetElemJson | NftMapElemJson;

// ---------------------------------------------------------------------------
// Commands (input).

export interface NftTableSpec {
  readonly family: NftFamily;
  readonly name: string;
}
export interface NftElementSpec {
  readonly family: NftFamily;
  readonly table: string;
  readonly name: string;
  readonly elem: readonly NftElemJson[];
}
export interface NftSetSpec {
  readonly family: NftFamily;
  readonly table: string;
  readonly name: string;
}

export type NftAddObject = { readonly table: NftTableSpec } | { readonly element: NftElementSpec };
export type NftDeleteObject = { readonly table: NftTableSpec } | { readonly element: NftElementSpec };
export type NftFlushObject = { readonly set: NftSetSpec } | { readonly map: NftSetSpec };
export type NftListObject =
  | { readonly tables: null }
  | { readonly table: NftTableSpec }
  | { readonly set: NftSetSpec }
  | { readonly map: NftSetSpec }
  | { readonly chains: { readonly family: NftFamily } }
  | { readonly sets: { readonly family: NftFamily } }
  | { readonly maps: { readonly family: NftFamily } };

/** One libnftables JSON command. Build them with `cmd` from ./commands.ts. */
export type NftCommand =
  | { readonly add: NftAddObject }
  | { readonly delete: NftDeleteObject }
  | { readonly flush: NftFlushObject }
  | { readonly list: NftListObject };

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
  readonly key: NftElemKey;
  /** Map data; absent for set elements. */
  readonly data?: NftMapData;
  /** Seconds, as listed. */
  readonly timeout?: number;
  /** Seconds left, as listed (nft rounds down). */
  readonly expires?: number;
  readonly comment?: string;
}
