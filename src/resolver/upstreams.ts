import { lstatSync, readlinkSync } from 'node:fs';
import { join, posix } from 'node:path';
import { EgressError, ErrorCode, isEgressError } from '../errors.js';
import { canonicalAddress } from './memory.js';
import {
  parseResolvConf,
  readDnsRecord,
  readThrough,
  recordedContent,
  RESOLV_CONF,
  RESOLVED_STUBS,
  RESOLVED_UPSTREAMS,
  DNS_RECORD_FILE,
  type DnsRecord,
  type FileState,
} from '../system/resolv-conf.js';

/**
 * The upstream servers when the policy names none: the machine's own. Once
 * `egressctl dns enable` ran, resolv.conf names egressd itself, so the
 * servers come from what was there before (as enable recorded it, or live
 * where it was a link to a file someone keeps current, e.g.
 * NetworkManager's); else from resolv.conf as it is, without egressd's own
 * addresses. systemd-resolved's stub (127.0.0.53) is never an upstream: its
 * real servers are in /run/systemd/resolve/resolv.conf.
 */

export interface Discovered {
  /** "ADDR" or "ADDR#PORT" (scope ids kept), the form DnsSettings.upstreams takes. */
  readonly upstreams: readonly string[];
  /** The file they came from (under root), or the record of enable. */
  readonly source: string;
  /** What was skipped and why, for the log. */
  readonly notes: readonly string[];
  /** Every file read to find them (links on the way included) and the record of enable: a change to one may change them. */
  readonly watched: readonly string[];
}

export interface DiscoverOptions {
  /** "/" on the machine itself. */
  readonly root: string;
  readonly stateDir: string;
  /** egressd's own listen addresses: never its own upstream. */
  readonly listen: readonly string[];
}

interface Candidate {
  readonly source: string;
  readonly text: string | undefined;
}

export function discoverUpstreams(options: DiscoverOptions): Discovered {
  const notes: string[] = [];
  let record: DnsRecord | undefined;
  try {
    record = readDnsRecord(options.stateDir);
  } catch (error) {
    if (!isEgressError(error)) throw error;
    notes.push(`${error.message}: not used`);
  }
  const own = new Set(options.listen.map(canonicalAddress));
  const resolvedFile = (): Candidate => ({ source: join(options.root, RESOLVED_UPSTREAMS), text: read(options.root, RESOLVED_UPSTREAMS) });
  const candidates: Candidate[] = [];
  if (record?.manager === 'systemd-resolved') candidates.push(resolvedFile());
  else if (record) candidates.push(...fromRecorded(options.root, record.resolvConf.before));
  else candidates.push({ source: join(options.root, RESOLV_CONF), text: read(options.root, RESOLV_CONF) });

  const tried: string[] = [];
  for (let i = 0; i < candidates.length; i++) {
    const candidate = candidates[i]!;
    tried.push(`${candidate.source}${candidate.text === undefined ? ' (not there)' : ''}`);
    if (candidate.text === undefined) continue;
    const parsed = parseResolvConf(candidate.text);
    notes.push(...parsed.notes.map((note) => `${candidate.source}: ${note}`));
    const upstreams: string[] = [];
    let stub = false;
    for (const server of parsed.nameservers) {
      if (own.has(canonicalAddress(server.address))) {
        notes.push(`${candidate.source}: ${server.text} is egressd's own resolver: skipped`);
      } else if (server.address.includes('%')) {
        // A link-local server (a router's fe80::…%eth0): its socket would have to be bound to the link, which the resolver does not do.
        notes.push(`${candidate.source}: ${server.text} is a link-local server, which egressd's resolver cannot ask: skipped`);
      } else if (RESOLVED_STUBS.includes(server.address)) {
        stub = true;
        notes.push(`${candidate.source}: ${server.text} is systemd-resolved's stub: its upstreams are used instead`);
      } else if (!upstreams.includes(server.text)) {
        upstreams.push(server.text);
      }
    }
    if (upstreams.length > 0) return { upstreams, source: candidate.source, notes, watched: watchedFiles(options, candidates.slice(0, i + 1)) };
    const resolved = resolvedFile();
    if (stub && !candidates.some((c) => c.source === resolved.source)) candidates.push(resolved);
  }
  throw new EgressError(
    ErrorCode.NoUpstreams,
    "the resolver has no upstream server: the policy names none (dns.upstreams) and none of this machine's own could be found",
    {
      details: [`looked in: ${tried.join(', ')}`, ...notes, 'name them in the policy: dns: { upstreams: [ADDR, "ADDR#PORT"] }'],
    },
  );
}

/**
 * What resolv.conf said before enable: a link is followed now where its
 * target is still there (its owner keeps it current), else read as recorded.
 */
function fromRecorded(root: string, before: FileState): Candidate[] {
  if (before.kind === 'symlink') {
    const live = read(root, RESOLV_CONF, before.target);
    if (live !== undefined) return [{ source: join(root, resolveTarget(before.target)), text: live }];
  }
  return [{ source: `${RESOLV_CONF} as recorded by "egressctl dns enable"`, text: recordedContent(before) }];
}

function resolveTarget(target: string): string {
  return target.startsWith('/') ? target : join('/etc', target);
}

/** A file's text within root; `target`: the file a link at `path` led to, which enable has since replaced. */
function read(root: string, path: string, target?: string): string | undefined {
  return readThrough(root, target === undefined ? path : resolveTarget(target))?.toString('utf8');
}

/**
 * The files a discovery read, as the watch needs them: each candidate's path
 * and every link it went through (resolv.conf is often a link into /run,
 * whose target is what its owner rewrites), and the record of enable, whose
 * coming or going changes where the upstreams are read. Candidates that are
 * no file (enable's record of a file it replaced) have no path to watch.
 */
function watchedFiles(options: DiscoverOptions, candidates: readonly Candidate[]): string[] {
  const files = new Set<string>([join(options.stateDir, DNS_RECORD_FILE), join(options.root, RESOLV_CONF)]);
  for (const { source } of candidates) {
    if (!source.startsWith(options.root) || source.includes(' ')) continue;
    let at = posix.relative(options.root, source);
    for (let hops = 0; hops < 16; hops++) {
      const path = join(options.root, at);
      files.add(path);
      try {
        if (!lstatSync(path).isSymbolicLink()) break;
        at = posix.resolve('/', posix.dirname(`/${at}`), readlinkSync(path)).slice(1);
      } catch {
        break;
      }
    }
  }
  return [...files];
}
