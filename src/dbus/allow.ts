/**
 * Allow from a denial: one `allowed` entry in the policy drop-in
 * 80-allowed.yaml — this app may reach this name (or address), on this port
 * and protocol, until a time or always — checked with the whole policy
 * before the file is replaced, then applied by a reload. The kernel keeps
 * denying until that apply is in force: nothing is let through while a
 * person decides, and a failed check or apply changes nothing (the old
 * drop-in stays, on disk and in the kernel).
 *
 * Expiry: the policy language says when an entry ends (`until`); loading
 * never reads the clock, apply does: an entry whose time is up is left out of
 * every apply (policy/expiry.ts), and the daemon applies again at the next
 * `until`, whether or not this service runs. Removing expired entries from
 * the file (`prune`, on the D-Bus part's timer) is only tidying.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { parse as parseYaml } from 'yaml';
import type { ReloadOutcome } from '../daemon/part.js';
import { EgressError, ErrorCode } from '../errors.js';
import { formatIssue, sortIssues } from '../policy/issues.js';
import { loadPolicyDir } from '../policy/load.js';
import { removeFileDurably, writeFileAtomic } from '../state/files.js';
import type { PolkitDetails } from './access.js';
import type { StoredDenial } from './contracts.js';

export const DROP_IN = '80-allowed.yaml';

export type AllowProto = 'tcp' | 'udp' | 'icmp';

/** One entry of `allowed:` as egressd writes it. */
export interface Allowance {
  readonly app: string;
  readonly allow: readonly string[];
  readonly ports?: readonly number[];
  readonly proto?: AllowProto;
  /** ISO 8601, UTC; absent: always. */
  readonly until?: string;
  /** Who allowed what, when, from which record: written as the entry's comment and its `why` (explain shows it). */
  readonly why: string;
}

/** How long an allow lasts: "always", or N followed by m, h, d or w (at most a year). */
export type Scope = { readonly always: true } | { readonly ms: number; readonly text: string };

const UNIT_MS = { m: 60_000, h: 3_600_000, d: 86_400_000, w: 604_800_000 } as const;
const MAX_SCOPE_MS = 366 * UNIT_MS.d;

export function parseScope(text: string): Scope {
  if (text === 'always') return { always: true };
  const match = /^([1-9]\d{0,5})([mhdw])$/.exec(text);
  const ms = match ? Number(match[1]) * UNIT_MS[match[2] as keyof typeof UNIT_MS] : NaN;
  if (!match || ms > MAX_SCOPE_MS) {
    throw new EgressError(ErrorCode.InvalidArgument, `scope: "${text.slice(0, 40)}" is not a duration (30m, 1h, 1d, 2w; at most a year) or "always"`);
  }
  return { ms, text };
}

/** Who asked, as the bus (or the terminal) says. */
export interface Allower {
  readonly uid: number;
  readonly name: string | undefined;
}

function describeAllower(who: Allower): string {
  return who.name === undefined ? `uid ${who.uid}` : `${who.name} (uid ${who.uid})`;
}

function untilOf(scope: Scope, now: number): string | undefined {
  return 'always' in scope ? undefined : new Date(now + scope.ms).toISOString().replace(/\.\d{3}Z$/, 'Z');
}

/** Kinds of rule an app's allow outranks; the others hold whatever an app says (the precedence is fixed). */
export const ALLOWABLE: ReadonlySet<string> = new Set(['app-rule', 'app-default', 'global-deny', 'default']);

/**
 * The allow that undoes this denial for its app: its name when the sender's
 * uid itself looked it up, else its address. A name only other users looked
 * up is theirs to point anywhere (a set is filled for a rule, whoever asks):
 * allowing it would let them choose where this app may go.
 */
export function allowanceFor(record: StoredDenial, who: Allower, now: number, scope: Scope): Allowance {
  if (record.kind !== undefined && !ALLOWABLE.has(record.kind)) {
    throw new EgressError(
      ErrorCode.NotAllowable,
      `record ${record.id} was denied by ${record.ruleId ?? record.shortId} (${record.kind}), which no app rule can open: system domains, lockdown, Tor's confinement and the resolver's DNS rules come first`,
    );
  }
  if (record.app === undefined) {
    throw new EgressError(
      ErrorCode.NotAllowable,
      `record ${record.id}: the sender is in no app of the policy (rule ${record.ruleId ?? record.shortId}), and an allow is added to an app`,
      { details: ['define an app for it in the policy, then: egressctl allow --app NAME --to DEST'] },
    );
  }
  const proto: AllowProto | undefined =
    record.protocol === 'tcp' || record.protocol === 'udp' ? record.protocol : record.protocol.startsWith('icmp') ? 'icmp' : undefined;
  const to = record.name !== undefined && record.nameAskedBy === 'sender' ? record.name : record.address;
  const rule = `${record.shortId}${record.ruleId ? ` ${record.ruleId}` : ''}${record.file ? ` at ${record.file}:${record.line ?? '?'}` : ''}`;
  const until = untilOf(scope, now);
  return {
    app: record.app,
    allow: [to],
    ...(record.port !== undefined && proto !== 'icmp' ? { ports: [record.port] } : {}),
    ...(proto ? { proto } : {}),
    ...(until ? { until } : {}),
    why: `allowed by ${describeAllower(who)} at ${new Date(now).toISOString()} from denial record ${record.id} (rule ${rule}), ${until ? `until ${until}` : 'always'}`,
  };
}

/** An allow typed at a terminal (`egressctl allow --app NAME --to DEST`): the policy check says whether the app and destination exist. */
export function manualAllowance(
  app: string,
  to: readonly string[],
  options: { ports?: readonly number[]; proto?: AllowProto },
  who: Allower,
  now: number,
  scope: Scope,
): Allowance {
  const until = untilOf(scope, now);
  return {
    app,
    allow: [...to],
    ...(options.ports?.length ? { ports: [...options.ports] } : {}),
    ...(options.proto ? { proto: options.proto } : {}),
    ...(until ? { until } : {}),
    why: `allowed by ${describeAllower(who)} at ${new Date(now).toISOString()} with egressctl allow, ${until ? `until ${until}` : 'always'}`,
  };
}

/** The most of the destinations a dialog shows: Allow takes up to 64 of up to 255 characters each. */
const MAX_SHOWN_DESTINATIONS = 300;

/** A caller's text as a dialog line: no control or format character (a newline, a bidi override) can rearrange the prompt around it. */
function shown(text: string): string {
  return text.replace(/[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/gu, '\uFFFD');
}

/**
 * What the allow would write, as polkit's details (access.ts): the
 * actions' messages in systemd/org.egressd.policy name each key, and a
 * polkit rule may look them up. From a record, also its id and uid.
 */
export function allowanceDetails(entry: Allowance, record?: Pick<StoredDenial, 'id' | 'uid'>): PolkitDetails {
  const destinations = shown(entry.allow.join(', '));
  return {
    app: shown(entry.app),
    destinations:
      destinations.length <= MAX_SHOWN_DESTINATIONS ? destinations : `${destinations.slice(0, MAX_SHOWN_DESTINATIONS)}… (${entry.allow.length} in all)`,
    ports: entry.ports?.join(', ') ?? 'any',
    proto: entry.proto ?? 'any',
    until: entry.until ?? 'always',
    ...(record ? { 'record.id': String(record.id), 'record.uid': record.uid === undefined ? 'unknown' : String(record.uid) } : {}),
  };
}

/** Strings as JSON: a JSON string is a YAML double-quoted scalar, so no name can break out of its line. */
const q = (s: string) => JSON.stringify(s);

export function renderDropIn(entries: readonly Allowance[]): string {
  const lines = [
    '# Written by egressd: allows from desktop alerts (AllowFromDenial) and `egressctl allow`.',
    '# Each entry says who allowed what, when and from which denial record. egressd removes',
    '# an entry once its `until` has passed (it is no longer applied then); delete an entry to take it back.',
  ];
  if (entries.length === 0) return `${lines.join('\n')}\nallowed: []\n`;
  lines.push('allowed:');
  for (const e of entries) {
    lines.push(`  # ${e.why.replace(/[\r\n]+/g, ' ')}`);
    lines.push(`  - app: ${q(e.app)}`);
    lines.push(`    allow: [${e.allow.map(q).join(', ')}]`);
    if (e.ports) lines.push(`    ports: [${e.ports.join(', ')}]`);
    if (e.proto) lines.push(`    proto: ${e.proto}`);
    if (e.until) lines.push(`    until: ${q(e.until)}`);
    lines.push(`    why: ${q(e.why.slice(0, 500))}`);
  }
  return `${lines.join('\n')}\n`;
}

/** The drop-in's entries as written; a file someone broke by hand is the policy check's to report, so it reads as undefined here. */
export function parseDropIn(text: string): Allowance[] | undefined {
  let data: unknown;
  try {
    data = parseYaml(text);
  } catch {
    return undefined;
  }
  const list = (data as { allowed?: unknown } | null)?.allowed;
  if (list === undefined || list === null) return [];
  if (!Array.isArray(list)) return undefined;
  const out: Allowance[] = [];
  for (const raw of list as (Record<string, unknown> | null)[]) {
    if (raw === null || typeof raw !== 'object' || typeof raw['app'] !== 'string' || !Array.isArray(raw['allow'])) return undefined;
    out.push({
      app: raw['app'],
      allow: (raw['allow'] as unknown[]).map(String),
      ...(Array.isArray(raw['ports']) ? { ports: (raw['ports'] as unknown[]).map(Number) } : {}),
      ...(typeof raw['proto'] === 'string' ? { proto: raw['proto'] as AllowProto } : {}),
      ...(typeof raw['until'] === 'string' ? { until: raw['until'] } : {}),
      why: typeof raw['why'] === 'string' ? raw['why'] : '',
    });
  }
  return out;
}

const sameRule = (a: Allowance, b: Allowance) =>
  a.app === b.app && a.allow.join() === b.allow.join() && (a.ports ?? []).join() === (b.ports ?? []).join() && a.proto === b.proto;

/** The drop-in of one policy directory; every change is one at a time (a queue), checked, written atomically, applied. */
export class DropIn {
  private queue: Promise<unknown> = Promise.resolve();

  constructor(
    readonly policyDir: string,
    private readonly reload: (why: string) => Promise<ReloadOutcome>,
  ) {}

  private read(): { text: string | undefined; entries: Allowance[] } {
    let text: string | undefined;
    try {
      text = readFileSync(join(this.policyDir, DROP_IN), 'utf8');
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw new EgressError(ErrorCode.Io, `cannot read ${DROP_IN}: ${(error as Error).message}`);
    }
    const entries = text === undefined ? [] : parseDropIn(text);
    if (!entries) throw new EgressError(ErrorCode.PolicyInvalid, `${join(this.policyDir, DROP_IN)} is not the list egressd writes; fix or remove it first`);
    return { text, entries };
  }

  private serial<T>(work: () => Promise<T>): Promise<T> {
    const next = this.queue.then(work, work);
    this.queue = next.catch(() => undefined);
    return next;
  }

  /** Adds (or renews: the same app, destinations, ports and protocol) one entry; resolves with the digest in force. */
  add(entry: Allowance): Promise<{ digest: string }> {
    return this.serial(async () => {
      const { text, entries } = this.read();
      const kept = entries.filter((e) => !sameRule(e, entry));
      return this.replace(text, [...kept, entry], `allow ${entry.app} → ${entry.allow.join(', ')}`);
    });
  }

  /** Removes entries whose `until` is at or before `now`; the number removed. A failed reload is thrown: the caller retries later. */
  prune(now: number): Promise<number> {
    return this.serial(async () => {
      const { text, entries } = this.read();
      const live = entries.filter((e) => e.until === undefined || !(Date.parse(e.until) <= now));
      if (live.length === entries.length) return 0;
      await this.replace(text, live, `${entries.length - live.length} allowed entries expired`);
      return entries.length - live.length;
    });
  }

  /** The earliest `until` still ahead, ms since the epoch. */
  nextExpiry(): number | undefined {
    const times = this.read()
      .entries.map((e) => (e.until === undefined ? NaN : Date.parse(e.until)))
      .filter((t) => !Number.isNaN(t));
    return times.length > 0 ? Math.min(...times) : undefined;
  }

  private async replace(old: string | undefined, entries: readonly Allowance[], why: string): Promise<{ digest: string }> {
    const text = renderDropIn(entries);
    const checked = loadPolicyDir(this.policyDir, new Map([[DROP_IN, Buffer.from(text)]]));
    if (!checked.ok) {
      const details = sortIssues(checked.errors).map((issue) => formatIssue(issue, this.policyDir));
      throw new EgressError(ErrorCode.PolicyInvalid, `the policy with this allow would not load; nothing was changed`, { details });
    }
    writeFileAtomic(this.policyDir, DROP_IN, text, 0o644);
    const outcome = await this.reload(why);
    if (outcome.applied) return { digest: outcome.digest };
    // The kernel still holds the policy before this change: the file goes back to match it.
    if (old === undefined) removeFileDurably(this.policyDir, DROP_IN);
    else writeFileAtomic(this.policyDir, DROP_IN, old, 0o644);
    throw new EgressError(ErrorCode.PolicyInvalid, `the policy with this allow could not be applied (${outcome.code}); the drop-in is as it was`, {
      details: outcome.errors,
    });
  }
}
