import { isIP } from 'node:net';
import { asciiName, checkDnsName, INVALID_IDN, parseNetwork } from './destination.js';
import type { Network } from './model.js';
import { NameTableBuilder, type NameTable } from './name-table.js';

export type ListFormat = 'auto' | 'plain' | 'hosts';

export interface ParsedList {
  readonly names: NameTable;
  readonly suffixes: NameTable;
  /** Addresses and CIDRs listed one per line (plain format), e.g. an IP blocklist. */
  readonly networks: Network[];
  /** Lines that are not names, with their 1-based line numbers; they are skipped, never guessed at. */
  readonly rejected: { line: number; col: number; text: string; reason: string }[];
}

/** Names hosts files map for the machine itself; they are not destinations to deny. */
const HOSTS_SELF_NAMES = new Set([
  'localhost',
  'localhost.localdomain',
  'local',
  'broadcasthost',
  'ip6-localhost',
  'ip6-loopback',
  'ip6-localnet',
  'ip6-mcastprefix',
  'ip6-allnodes',
  'ip6-allrouters',
  'ip6-allhosts',
  '0.0.0.0',
]);

const SPACE = /\s/;

/**
 * Parses a name list in plain format (one name per line) or hosts format
 * ("0.0.0.0 name [name…]"); `#` starts a comment in both. A line `*.example.org`
 * is a suffix, a line holding an address or CIDR is a network, and every
 * other entry is an exact name. Names with non-ASCII characters are kept in
 * their IDNA ASCII form, the one resolvers are asked for. Duplicates are dropped.
 * Names go straight into name tables, so no line outlives its parsing.
 */
export function parseNameList(text: string, format: ListFormat): ParsedList {
  const names = new NameTableBuilder();
  const suffixes = new NameTableBuilder();
  const networks: Network[] = [];
  const rejected: ParsedList['rejected'] = [];
  let lineNumber = 0;
  let start = 0;
  while (start <= text.length) {
    let end = text.indexOf('\n', start);
    if (end < 0) end = text.length;
    lineNumber++;
    const raw = text.slice(start, end);
    start = end + 1;

    const hash = raw.indexOf('#');
    const content = (hash >= 0 ? raw.slice(0, hash) : raw).trim();
    if (content.length === 0) continue;
    // Most lines of a big list are one token: no split for them.
    const tokens = SPACE.test(content) ? content.split(/\s+/) : [content];
    const first = tokens[0]!;
    const isHostsLine = format === 'hosts' || (format === 'auto' && tokens.length > 1 && isIP(first) !== 0);
    if (format === 'hosts' && isIP(first) === 0) {
      rejected.push({ line: lineNumber, col: raw.indexOf(first) + 1, text: first, reason: 'a hosts line starts with an address' });
      continue;
    }
    if (!isHostsLine && tokens.length === 1 && /^[0-9a-fA-F:.]+(\/\d+)?$/.test(first) && (first.includes(':') || /^[0-9./]+$/.test(first))) {
      const net = parseNetwork(first);
      if (net.ok) networks.push({ family: net.value.family, address: net.value.address, prefix: net.value.prefix });
      else rejected.push({ line: lineNumber, col: raw.indexOf(first) + 1, text: first, reason: `${net.message}${net.hint ? ` (${net.hint})` : ''}` });
      continue;
    }
    if (!isHostsLine && tokens.length > 1) {
      rejected.push({ line: lineNumber, col: raw.indexOf(tokens[1]!) + 1, text: content, reason: 'a plain list has one name per line' });
      continue;
    }
    for (const token of isHostsLine ? tokens.slice(1) : tokens) {
      const lower = token.toLowerCase();
      const name = lower.endsWith('.') ? lower.slice(0, -1) : lower;
      if (isHostsLine && HOSTS_SELF_NAMES.has(name)) continue;
      const isSuffix = name.startsWith('*.');
      let bare = isSuffix ? name.slice(2) : name;
      let problem = checkDnsName(bare);
      if (problem) {
        // Only a name the ASCII check refused can be an IDN: the plain lines of a big list never get here.
        const ascii = asciiName(bare);
        if (ascii === undefined) problem = INVALID_IDN;
        else if (ascii !== bare) {
          bare = ascii.endsWith('.') ? ascii.slice(0, -1) : ascii;
          problem = checkDnsName(bare);
        }
      }
      if (problem) {
        rejected.push({ line: lineNumber, col: raw.indexOf(token) + 1, text: token, reason: problem });
        continue;
      }
      (isSuffix ? suffixes : names).addNew(bare);
    }
  }
  return { names: names.build(), suffixes: suffixes.build(), networks, rejected };
}
