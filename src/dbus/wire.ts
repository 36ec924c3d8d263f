/**
 * egressd's records and filters in D-Bus form, and back. A record is an
 * a{sv} holding only the fields it has (an absent field is absent, not an
 * empty string), so a client tells "unknown" from "empty". A filter is read
 * strictly: an unknown key or a value of the wrong type is an error naming
 * the key, never a field silently ignored — a misspelt "uid" must not widen
 * a query.
 */
import dbus from 'dbus-next';
import type { DenialRecord } from '../denials/record.js';
import { EgressError, ErrorCode } from '../errors.js';
import type { DenialFilter, StoredDenial } from './contracts.js';

const { Variant } = dbus;
type Variant = InstanceType<typeof Variant>;

/** Each record field's D-Bus type. 64-bit times; counts as t since one aggregate can exceed 2^32 packets only in theory, but cheaply. */
const RECORD_TYPES: { readonly [K in keyof DenialRecord]-?: string } = {
  firstSeen: 'x',
  lastSeen: 'x',
  count: 't',
  shortId: 's',
  ruleId: 's',
  kind: 's',
  file: 's',
  line: 'u',
  app: 's',
  domain: 's',
  uid: 'u',
  gid: 'u',
  protocol: 's',
  family: 'y',
  address: 's',
  port: 'q',
  name: 's',
  nameAskedBy: 's',
};

export function recordToDbus(record: DenialRecord | StoredDenial): Record<string, Variant> {
  const out: Record<string, Variant> = {};
  for (const [key, type] of Object.entries(RECORD_TYPES)) {
    const value = (record as unknown as Record<string, unknown>)[key];
    if (value !== undefined) out[key] = new Variant(type, value);
  }
  if ('id' in record) out['id'] = new Variant('t', record.id);
  return out;
}

/** What a client reads back: numbers as numbers (64-bit values arrive as BigInt). */
export function recordFromDbus(dict: Record<string, Variant>): DenialRecord & { id?: number } {
  const out: Record<string, unknown> = {};
  for (const [key, variant] of Object.entries(dict)) out[key] = typeof variant.value === 'bigint' ? Number(variant.value) : variant.value;
  for (const key of Object.keys(RECORD_TYPES)) if (!(key in out)) out[key] = undefined;
  return out as unknown as DenialRecord & { id?: number };
}

const INTEGER_TYPES = new Set(['y', 'n', 'q', 'i', 'u', 'x', 't']);

function invalid(message: string): EgressError {
  return new EgressError(ErrorCode.InvalidArgument, message);
}

/** An a{sv} value that must be a whole number within [min, max]. */
export function integerArg(key: string, value: unknown, min: number, max: number): number {
  const v = value as Variant | undefined;
  if (!v || !INTEGER_TYPES.has(v.signature)) throw invalid(`${key}: expected an integer, got type "${v?.signature ?? '?'}"`);
  const n = Number(v.value);
  if (!Number.isSafeInteger(n) || n < min || n > max) throw invalid(`${key}: ${String(v.value)} is out of range (${min}–${max})`);
  return n;
}

export function stringArg(key: string, value: unknown, maxLength = 255): string {
  const v = value as Variant | undefined;
  if (!v || v.signature !== 's') throw invalid(`${key}: expected a string, got type "${v?.signature ?? '?'}"`);
  const s = v.value as string;
  if (s.length === 0 || s.length > maxLength) throw invalid(`${key}: must be 1–${maxLength} characters`);
  return s;
}

export function booleanArg(key: string, value: unknown): boolean {
  const v = value as Variant | undefined;
  if (!v || v.signature !== 'b') throw invalid(`${key}: expected a boolean, got type "${v?.signature ?? '?'}"`);
  return v.value as boolean;
}

const FILTER_KEYS = ['since', 'until', 'app', 'dest', 'rule', 'uid', 'limit'] as const;
/** A query returns at most this many records (the store's default is 1000). */
export const MAX_QUERY_LIMIT = 10000;

export function filterFromDbus(dict: Record<string, unknown>): DenialFilter {
  const filter: { -readonly [K in keyof DenialFilter]: DenialFilter[K] } = {};
  for (const [key, value] of Object.entries(dict)) {
    switch (key as (typeof FILTER_KEYS)[number]) {
      case 'since':
      case 'until':
        filter[key as 'since' | 'until'] = integerArg(key, value, 0, Number.MAX_SAFE_INTEGER);
        break;
      case 'app':
      case 'dest':
      case 'rule':
        filter[key as 'app' | 'dest' | 'rule'] = stringArg(key, value);
        break;
      case 'uid':
        filter.uid = integerArg(key, value, 0, 4294967294);
        break;
      case 'limit':
        filter.limit = integerArg(key, value, 1, MAX_QUERY_LIMIT);
        break;
      default:
        throw invalid(`unknown filter key "${key.slice(0, 64)}" (known: ${FILTER_KEYS.join(', ')})`);
    }
  }
  if (filter.since !== undefined && filter.until !== undefined && filter.since > filter.until) throw invalid('since: is after until');
  return filter;
}

export function filterToDbus(filter: DenialFilter): Record<string, Variant> {
  const out: Record<string, Variant> = {};
  if (filter.since !== undefined) out['since'] = new Variant('x', filter.since);
  if (filter.until !== undefined) out['until'] = new Variant('x', filter.until);
  if (filter.app !== undefined) out['app'] = new Variant('s', filter.app);
  if (filter.dest !== undefined) out['dest'] = new Variant('s', filter.dest);
  if (filter.rule !== undefined) out['rule'] = new Variant('s', filter.rule);
  if (filter.uid !== undefined) out['uid'] = new Variant('u', filter.uid);
  if (filter.limit !== undefined) out['limit'] = new Variant('u', filter.limit);
  return out;
}
