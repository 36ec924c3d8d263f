import { isIPv4, isIPv6 } from 'node:net';
import { domainToASCII } from 'node:url';
import { clip } from './issues.js';

/**
 * A destination written in a policy, parsed once at load. The compiler and
 * `explain` work only on this form, never on the original strings.
 */
export type Destination =
  | { kind: 'name'; name: string }
  | { kind: 'suffix'; suffix: string }
  | { kind: 'list'; list: string }
  | { kind: 'catalogue'; selector: string }
  | { kind: 'net'; family: 4 | 6; address: string; prefix: number };

export type ParseResult<T> = { ok: true; value: T } | { ok: false; message: string; hint?: string };

const LABEL = /^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$/;
const LIST_REF = /^@([a-z][a-z0-9_-]{0,47})$/;
const CATALOGUE_REF = /^catalogue:([a-z][a-z0-9-]{0,47})$/;

/** Checks a DNS name in presentation form (lower case, no trailing dot). */
export function checkDnsName(name: string): string | undefined {
  if (isPlainDnsName(name)) return undefined;
  if (name.length === 0) return 'empty name';
  if (name.length > 253) return `name is ${name.length} characters long; DNS allows 253`;
  const labels = name.split('.');
  for (const label of labels) {
    if (label.length === 0) return 'empty label (two dots in a row, or a leading dot)';
    if (label.length > 63) return `label "${label.slice(0, 20)}…" is longer than 63 characters`;
    if (!LABEL.test(label)) return `label "${clip(label)}" has characters a DNS name cannot have`;
  }
  if (NUMERIC_LABEL.test(labels[labels.length - 1]!)) {
    // libc's inet_aton and URL parsers read such a name as an address, so a rule for it would silently mean one.
    const address = inetAton(name);
    if (address !== undefined) return `it is an IPv4 address in a form nft and resolvers read differently; write ${address}`;
    return 'its last label is a number, which resolvers and URL parsers read as part of an IPv4 address; no DNS name ends in one';
  }
  return undefined;
}

/** A last label that makes resolvers and URL parsers (WHATWG "ends in a number") take a name for an IPv4 address. */
const NUMERIC_LABEL = /^(?:[0-9]+|0x[0-9a-f]*)$/;

/**
 * The dotted-decimal form of what glibc's and musl's inet_aton accept as an
 * IPv4 address — one to four parts, each decimal, octal (leading 0) or hex
 * (0x), the last filling the bytes left — or undefined. getaddrinfo takes
 * these as addresses, never as names, so `0x0a.0.0.1`, `012.0.0.1`, `10.1`
 * and `167772161` all connect to 10.0.0.1.
 */
export function inetAton(text: string): string | undefined {
  const parts = text.toLowerCase().split('.');
  if (parts.length > 4) return undefined;
  const values: number[] = [];
  for (const part of parts) {
    let value: number;
    if (/^0x[0-9a-f]+$/.test(part)) value = parseInt(part.slice(2), 16);
    else if (/^0[0-7]*$/.test(part)) value = parseInt(part, 8);
    else if (/^[1-9][0-9]*$/.test(part)) value = Number(part);
    else return undefined;
    values.push(value);
  }
  const last = values.pop()!;
  if (values.some((value) => value > 255) || last >= 2 ** (8 * (4 - values.length))) return undefined;
  const bytes = [...values, ...Array.from({ length: 4 - values.length }, (_, i) => Math.floor(last / 2 ** (8 * (3 - values.length - i))) % 256)];
  return bytes.join('.');
}

/**
 * A name as resolvers are asked for it: a name with non-ASCII characters
 * becomes its IDNA (UTS-46) ASCII form, `münchen.example` →
 * `xn--mnchen-3ya.example`; an ASCII name is returned as it is, without
 * looking at it again. Undefined when the name is not a valid IDN.
 */
export function asciiName(name: string): string | undefined {
  if (!NON_ASCII.test(name)) return name;
  const ascii = domainToASCII(name);
  return ascii === '' ? undefined : ascii;
}

const NON_ASCII = /[^\p{ASCII}]/u;

const HYPHEN = 45;
const FULL_STOP = 46;
const UNDERSCORE = 95;

/**
 * The same verdict as checkDnsName's labels and lengths for a valid name, in
 * one pass over its characters and without a split or a regular expression
 * per label: a 143,876-name list is mostly valid names. Anything it refuses
 * goes through checkDnsName's own checks, which say why
 * (test/policy/destination.test.ts holds the two to the same answer).
 */
export function isPlainDnsName(name: string): boolean {
  const length = name.length;
  if (length === 0 || length > 253) return false;
  let labelStart = 0;
  let lastStart = 0;
  for (let i = 0; i <= length; i++) {
    const code = i < length ? name.charCodeAt(i) : FULL_STOP;
    if (code === FULL_STOP) {
      const label = i - labelStart;
      if (label === 0 || label > 63 || name.charCodeAt(i - 1) === HYPHEN) return false;
      lastStart = labelStart;
      labelStart = i + 1;
    } else if (code === HYPHEN) {
      if (i === labelStart) return false;
    } else if (!((code >= 97 && code <= 122) || (code >= 48 && code <= 57) || code === UNDERSCORE)) return false;
  }
  // A last label starting with a letter (com, org, …) cannot be numeric; the rest is checkDnsName's.
  const first = name.charCodeAt(lastStart);
  return !(first >= 48 && first <= 57 && NUMERIC_LABEL.test(name.slice(lastStart)));
}

export function parseDestination(raw: string): ParseResult<Destination> {
  const text = raw.trim();
  if (text.length === 0) return { ok: false, message: 'empty destination' };
  const quoted = `"${clip(text)}"`;

  const list = LIST_REF.exec(text);
  if (list) return { ok: true, value: { kind: 'list', list: list[1]! } };
  if (text.startsWith('@')) {
    return { ok: false, message: `${quoted} is not a valid list reference`, hint: 'list names are lower case letters, digits, "-" and "_", e.g. @tracking' };
  }

  const catalogue = CATALOGUE_REF.exec(text);
  if (catalogue) return { ok: true, value: { kind: 'catalogue', selector: catalogue[1]! } };
  if (text.startsWith('catalogue:')) {
    return {
      ok: false,
      message: `${quoted} is not a valid catalogue reference`,
      hint: 'write catalogue:CATEGORY or catalogue:ENTRY-ID, e.g. catalogue:telemetry',
    };
  }

  if (/^[0-9a-fA-F:.]+(\/\d+)?$/.test(text) && (text.includes(':') || /^[0-9./]+$/.test(text))) {
    return parseNetwork(text);
  }

  const lower = text.toLowerCase().replace(/\.$/, '');
  if (lower.startsWith('*.')) {
    const suffix = toAscii(lower.slice(2));
    const problem = suffix === undefined ? INVALID_IDN : checkDnsName(suffix);
    if (problem || suffix === undefined) return { ok: false, message: `${quoted} is not a valid wildcard name: ${problem}` };
    return { ok: true, value: { kind: 'suffix', suffix } };
  }
  if (lower.includes('*')) {
    return {
      ok: false,
      message: `${quoted} has a wildcard that is not a leading "*."`,
      hint: 'only "*.example.org" is supported; it matches example.org and every name below it',
    };
  }
  if (lower.includes('/') || lower.includes(':')) {
    return { ok: false, message: `${quoted} is neither a DNS name nor an IP address or CIDR`, hint: 'write a bare name (example.org), not a URL' };
  }
  const name = toAscii(lower);
  const address = name === undefined ? undefined : inetAton(name);
  if (address !== undefined) return { ok: false, message: `${quoted} is an IPv4 address in a form nft and resolvers read differently; write ${address}` };
  const problem = name === undefined ? INVALID_IDN : checkDnsName(name);
  if (problem || name === undefined) return { ok: false, message: `${quoted} is not a valid DNS name: ${problem}` };
  return { ok: true, value: { kind: 'name', name } };
}

/** What a name that is not a valid IDN is refused with. */
export const INVALID_IDN = 'it has characters that are not a valid internationalised (IDNA) name';

/** asciiName, with a trailing full stop the mapping made ("。" is one) dropped as the ASCII one was. */
function toAscii(name: string): string | undefined {
  const ascii = asciiName(name);
  return ascii !== name && ascii?.endsWith('.') ? ascii.slice(0, -1) : ascii;
}

export function parseNetwork(text: string): ParseResult<Destination & { kind: 'net' }> {
  const slash = text.indexOf('/');
  const address = slash < 0 ? text : text.slice(0, slash);
  const prefixText = slash < 0 ? undefined : text.slice(slash + 1);
  const quoted = `"${clip(text)}"`;
  if (prefixText?.includes('/')) return { ok: false, message: `${quoted} has more than one "/"` };
  const quick = quickGroups(address);
  const family = quick ? (quick.length === 2 ? 4 : 6) : isIPv4(address) ? 4 : isIPv6(address) ? 6 : undefined;
  if (family === undefined) {
    const dotted = inetAton(address);
    if (dotted !== undefined) {
      const suffix = prefixText === undefined ? '' : `/${prefixText}`;
      return { ok: false, message: `${quoted} is an IPv4 address in a form nft and resolvers read differently; write ${dotted}${suffix}` };
    }
    return { ok: false, message: `${quoted} is not a valid IPv4 or IPv6 address` };
  }
  const bits = family === 4 ? 32 : 128;
  let prefix = bits;
  if (prefixText !== undefined) {
    if (!/^\d{1,3}$/.test(prefixText) || Number(prefixText) > bits) {
      return { ok: false, message: `${quoted} has prefix length /${clip(prefixText)}; IPv${family} allows /0 to /${bits}` };
    }
    prefix = Number(prefixText);
  }
  const groups = quick ?? addressGroups(family, address);
  if (family === 6 && groups[0] === 0 && groups[1] === 0 && groups[2] === 0 && groups[3] === 0 && groups[4] === 0 && groups[5] === 0xffff) {
    // A dual-stack socket sends these as IPv4 packets, which an ip6 rule never sees.
    return { ok: false, message: `${quoted} is an IPv4-mapped IPv6 address`, hint: 'write the IPv4 address or network instead' };
  }
  // A whole address (most lines of a blocklist) has no host bits to clear.
  const masked = prefix === bits ? groups : maskGroups(groups, prefix);
  // Dotted quads that quickGroups reads (no leading zeros) are written the canonical way already.
  const canonical = quick && family === 4 && masked === groups ? address : formatGroups(family, masked);
  if (masked !== groups && masked.some((group, i) => group !== groups[i])) {
    return { ok: false, message: `${quoted} has host bits set below the /${prefix} prefix`, hint: `did you mean ${canonical}/${prefix}?` };
  }
  return { ok: true, value: { kind: 'net', family, address: canonical, prefix } };
}

const DIGIT_0 = 48;
const DIGIT_9 = 57;
const COLON = 58;
const DOT = 46;

/** A hex digit's value, or -1. */
function hexValue(code: number): number {
  if (code >= DIGIT_0 && code <= DIGIT_9) return code - DIGIT_0;
  const lower = code | 0x20;
  return lower >= 97 && lower <= 102 ? lower - 87 : -1;
}

/**
 * The forms addresses are written in — dotted-quad IPv4, IPv6 as hex groups
 * with at most one "::" — read into groups in one pass over the characters;
 * undefined for anything else (an IPv4 tail in IPv6, a zone, any invalid
 * text), which then takes the general path through node:net and decides
 * there. Two groups are IPv4, eight IPv6. What it accepts node:net's
 * isIPv4/isIPv6 accept too, with the same groups (test/policy/destination.test.ts checks that on random text): a
 * 100,000-line list spent most of its load in splits and regular
 * expressions.
 */
export function quickGroups(text: string): number[] | undefined {
  const length = text.length;
  if (length === 0 || length > 39) return undefined;
  if (text.indexOf(':') < 0) {
    // IPv4: four decimal parts, 0-255, no leading zeros.
    let a = 0;
    let b = 0;
    let c = 0;
    let parts = 0;
    let value = 0;
    let digits = 0;
    for (let i = 0; i < length; i++) {
      const code = text.charCodeAt(i);
      if (code === DOT) {
        if (digits === 0) return undefined;
        if (parts === 0) a = value;
        else if (parts === 1) b = value;
        else if (parts === 2) c = value;
        else return undefined;
        parts++;
        value = 0;
        digits = 0;
      } else if (code >= DIGIT_0 && code <= DIGIT_9) {
        if (digits > 0 && value === 0) return undefined;
        value = value * 10 + code - DIGIT_0;
        if (++digits > 3 || value > 255) return undefined;
      } else return undefined;
    }
    if (parts !== 3 || digits === 0) return undefined;
    return [(a << 8) | b, (c << 8) | value];
  }
  // IPv6: groups of 1-4 hex digits; "::" once, for at least one zero group.
  const groups = [0, 0, 0, 0, 0, 0, 0, 0];
  let count = 0;
  let gapAt = -1;
  let i = 0;
  if (text.charCodeAt(0) === COLON) {
    if (text.charCodeAt(1) !== COLON) return undefined;
    gapAt = 0;
    i = 2;
    if (i === length) return groups;
  }
  for (;;) {
    let value = 0;
    let digits = 0;
    for (; i < length; i++) {
      const digit = hexValue(text.charCodeAt(i));
      if (digit < 0) break;
      value = (value << 4) | digit;
      if (++digits > 4) return undefined;
    }
    if (digits === 0 || count === 8) return undefined;
    groups[count++] = value;
    if (i === length) break;
    if (text.charCodeAt(i) !== COLON) return undefined;
    i++;
    if (text.charCodeAt(i) === COLON) {
      if (gapAt >= 0) return undefined;
      gapAt = count;
      i++;
      if (i === length) break;
    }
  }
  if (gapAt < 0) return count === 8 ? groups : undefined;
  if (count > 7) return undefined;
  // Move the groups after "::" to the end; the gap between is zeros.
  const zeros = 8 - count;
  for (let k = count - 1; k >= gapAt; k--) groups[k + zeros] = groups[k]!;
  for (let k = gapAt; k < gapAt + zeros; k++) groups[k] = 0;
  return groups;
}

/**
 * An address as 16-bit groups (2 for IPv4, 8 for IPv6): masking, formatting
 * and ordering on small integers, which is what makes 100,000-line lists
 * load quickly.
 */
export function addressGroups(family: 4 | 6, address: string): number[] {
  const quick = quickGroups(address);
  if (quick && quick.length === (family === 4 ? 2 : 8)) return quick;
  if (family === 4) {
    const [a = 0, b = 0, c = 0, d = 0] = address.split('.').map(Number);
    return [(a << 8) | b, (c << 8) | d];
  }
  return expandIPv6(address);
}

/** Keeps the first `prefix` bits of the groups and zeroes the rest. */
export function maskGroups(groups: readonly number[], prefix: number, fill = false): number[] {
  return groups.map((group, i) => {
    const keep = Math.max(0, Math.min(16, prefix - 16 * i));
    const mask = keep === 0 ? 0 : (0xffff << (16 - keep)) & 0xffff;
    return fill ? (group & mask) | (~mask & 0xffff) : group & mask;
  });
}

/**
 * A fixed-width key, one UTF-16 code unit per group: string order is address
 * order within a family (strings compare by code unit), and it is cheap to
 * build for the 100,000 networks of a list.
 */
export function groupsKey(groups: readonly number[]): string {
  return String.fromCharCode(...groups);
}

/** An address's text from its 16-bit groups (two for IPv4, eight for IPv6), IPv6 as RFC 5952 writes it. */
export function formatGroups(family: 4 | 6, groups: readonly number[]): string {
  if (family === 4) return `${groups[0]! >> 8}.${groups[0]! & 255}.${groups[1]! >> 8}.${groups[1]! & 255}`;
  // RFC 5952: compress the longest run (length ≥ 2) of zero groups, the first one on ties.
  let bestStart = -1;
  let bestLength = 1;
  for (let i = 0; i < 8;) {
    if (groups[i] !== 0) {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === 0) j++;
    if (j - i > bestLength) {
      bestStart = i;
      bestLength = j - i;
    }
    i = j;
  }
  let text = '';
  for (let i = 0; i < 8; i++) {
    if (i === bestStart) {
      text += '::';
      i += bestLength - 1;
      continue;
    }
    if (i > 0 && i !== bestStart + bestLength) text += ':';
    text += groups[i]!.toString(16);
  }
  return text;
}

function expandIPv6(address: string): number[] {
  let text = address;
  // An embedded IPv4 tail (::ffff:192.0.2.1) becomes two hex groups.
  const v4 = /(\d+\.\d+\.\d+\.\d+)$/.exec(text);
  if (v4) {
    const [high = 0, low = 0] = addressGroups(4, v4[1]!);
    text = text.slice(0, v4.index) + `${high.toString(16)}:${low.toString(16)}`;
  }
  const [head = '', tail] = text.split('::');
  const headGroups = head === '' ? [] : head.split(':');
  const tailGroups = tail === undefined || tail === '' ? [] : tail.split(':');
  const zeros = tail === undefined ? [] : new Array<string>(8 - headGroups.length - tailGroups.length).fill('0');
  return [...headGroups, ...zeros, ...tailGroups].map((group) => parseInt(group, 16));
}

/** Address bytes as a bigint (tests and one-off comparisons; hot paths use groups). */
export function addressToBigInt(family: 4 | 6, address: string): bigint {
  return addressGroups(family, address).reduce((acc, group) => (acc << 16n) | BigInt(group), 0n);
}

export function bigIntToAddress(family: 4 | 6, value: bigint): string {
  const count = family === 4 ? 2 : 8;
  return formatGroups(
    family,
    Array.from({ length: count }, (_, i) => Number((value >> BigInt(16 * (count - 1 - i))) & 0xffffn)),
  );
}

/** True when `address` (a plain IP) lies inside the network. */
export function networkContains(net: { family: 4 | 6; address: string; prefix: number }, family: 4 | 6, address: string): boolean {
  if (net.family !== family) return false;
  const masked = maskGroups(addressGroups(family, address), net.prefix);
  return groupsKey(masked) === groupsKey(addressGroups(family, net.address));
}
