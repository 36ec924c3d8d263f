import { setTimeout as sleep } from 'node:timers/promises';
import { EgressError, ErrorCode, isEgressError } from '../../errors.js';
import {
  DEFAULTS,
  denialStorePath,
  filterSql,
  openDenialReader,
  SUMMARY_TOP,
  type DenialFilter,
  type DenialSummary,
  type StoredDenial,
} from '../../denials/store.js';
import { DEFAULT_STATE_DIR, Exit, parseFlags, type Command, type Deps } from '../deps.js';

export interface DenialsOptions {
  readonly filter: DenialFilter;
  readonly summary: boolean;
  readonly format: 'table' | 'json' | 'csv';
  readonly follow: boolean;
  /** How often --follow looks for new rows. */
  readonly pollMs: number;
  /** --follow stops after this long (tests); undefined: until interrupted. */
  readonly followForMs: number | undefined;
}

const usage = (message: string) => new EgressError(ErrorCode.Usage, `egressctl denials: ${message}`, { details: ['see: egressctl denials --help'] });

const UNITS: Readonly<Record<string, number>> = { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000, w: 7 * 86_400_000 };

/** "1h", "30m", "7d" before now, or a date ("2026-12-04", "2026-12-04T10:00Z", "2026-12-04 10:00:00"). */
export function parseWhen(flag: string, text: string, now: number): number {
  const ago = /^(\d{1,9})([smhdw])$/.exec(text);
  if (ago) return now - Number(ago[1]) * UNITS[ago[2]!]!;
  if (/^\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?)?$/.test(text)) {
    const time = Date.parse(text.replace(' ', 'T'));
    if (Number.isFinite(time)) return time;
  }
  throw usage(`--${flag} "${text}": not a time before now (30s, 15m, 1h, 7d, 2w) nor a date (2026-12-04, 2026-12-04T10:00Z; without a zone, local time)`);
}

export const denials: Command<DenialsOptions> = {
  name: 'denials',
  summary: 'what egressd denied: when, which app, where to, which rule (root and egressd-audit)',
  help: `Usage: egressctl denials [--since 1h|DATE] [--until 1h|DATE] [--app NAME]
                        [--dest NAME|*.SUFFIX|ADDR|CIDR] [--rule ID] [--uid N]
                        [--limit N] [--summary] [--json|--csv] [--follow]

Prints the denial records egressd keeps, newest first: time (of the last
packet, UTC), app, destination name and address, port, rule with its
file:line, and how many packets. --summary shows the top ${SUMMARY_TOP} apps,
destinations and rules over the period instead.

  --since, --until  a time before now (30s, 15m, 1h, 7d, 2w) or a date
                    (2026-12-04, 2026-12-04T10:00Z; without a zone, local
                    time), compared with a record's last packet
  --app NAME        an app or system domain of the policy
  --dest D          a name (telemetry.example.org), *.example.org (which
                    also covers example.org), an address or a CIDR (v4, v6)
  --rule ID         a short id (r1a2b3c4d, as status and explain show) or
                    the policy's rule id (app/firefox/2)
  --uid N           only records of sockets owned by uid N
  --limit N         at most N records (default 1000)
  --json, --csv     records (or the summary) on stdout for programs
  --follow          then print new records as egressd writes them (polls
                    the database once a second; egressd must be running)

What a record holds — exactly these fields, nothing more (never a payload,
URL or file name):
  id          the record's number (allow from it: egressctl allow)
  firstSeen   first packet, lastSeen last packet (ms since the epoch)
  count       packets of this app, destination and rule in the window
  shortId     the rule's short id; ruleId, kind, file, line: the rule,
              from rules.json of the policy in force when it was logged
  app, domain the app or system domain the rule belongs to
  uid, gid    the sending socket's owner (absent for orphaned sockets)
  protocol, family, address, port   where the packet was going
  name        the name the address was learned from (egressd's resolver)
  nameAskedBy sender: the sending uid looked the name up itself; others:
              only other users did (shown "(another user's lookup)"; the
              user's alert leaves it out and Allow uses the address)

Where it is kept: $EGRESSD_STATE_DIR/denials/denials.sqlite (default
${denialStorePath(DEFAULT_STATE_DIR)}), on this machine only, and in the
journal (journalctl MESSAGE_ID=76287487ef8842cc99649526ae37f308, fields
EGRESSD_*). For how long: ${DEFAULTS.retentionDays} days after a record's last packet, and once the
database passes ${DEFAULTS.maxBytes / 1024 / 1024} MiB the oldest of the user holding the most go
first (a user's subordinate uids count as its own); the journal keeps
its own entries as journald is configured to. Who can read it: root and
members of group egressd-audit (the files are 0640 root:egressd-audit); a
user's desktop agent gets only that user's own records over D-Bus.

Exit status: 0 ok, 2 bad input (the flag is named), 3 the store cannot be
read (not root nor in egressd-audit, or damaged).`,

  parse(argv) {
    const { values } = parseFlags(
      'denials',
      argv,
      {
        since: { type: 'string' },
        until: { type: 'string' },
        app: { type: 'string' },
        dest: { type: 'string' },
        rule: { type: 'string' },
        uid: { type: 'string' },
        limit: { type: 'string' },
        summary: { type: 'boolean' },
        json: { type: 'boolean' },
        csv: { type: 'boolean' },
        follow: { type: 'boolean' },
      },
      0,
    );
    if (values.json && values.csv) throw usage('--json and --csv: choose one');
    if (values.summary && values.follow) throw usage('--summary and --follow: choose one');
    const now = Date.now();
    const whole = (flag: string, text: string | undefined, max: number): number | undefined => {
      if (text === undefined) return undefined;
      if (!/^\d{1,10}$/.test(text) || Number(text) > max) throw usage(`--${flag} "${text}": not a whole number up to ${max}`);
      return Number(text);
    };
    const filter: DenialFilter = {
      ...(values.since === undefined ? {} : { since: parseWhen('since', values.since, now) }),
      ...(values.until === undefined ? {} : { until: parseWhen('until', values.until, now) }),
      ...(values.app === undefined ? {} : { app: values.app }),
      ...(values.dest === undefined ? {} : { dest: values.dest }),
      ...(values.rule === undefined ? {} : { rule: values.rule }),
      ...(values.uid === undefined ? {} : { uid: whole('uid', values.uid, 0xffffffff)! }),
      ...(values.limit === undefined ? {} : { limit: whole('limit', values.limit, 1_000_000)! }),
    };
    if (filter.since !== undefined && filter.until !== undefined && filter.since > filter.until) throw usage('--since is after --until');
    try {
      filterSql(filter);
    } catch (error) {
      // The store names the field; the person typed the flag.
      if (isEgressError(error) && error.code === ErrorCode.DenialFilter) throw usage(`--${error.message}`);
      throw error;
    }
    return {
      filter,
      summary: values.summary === true,
      format: values.json ? 'json' : values.csv ? 'csv' : 'table',
      follow: values.follow === true,
      pollMs: 1000,
      followForMs: undefined,
    };
  },

  async run(options, deps) {
    const path = denialStorePath(deps.stateDir);
    let reader: ReturnType<typeof openDenialReader>;
    try {
      reader = openDenialReader(path);
    } catch (error) {
      const code = (error as { code?: string }).code;
      if (code === 'ENOENT') {
        deps.err(`egressctl denials: no denials recorded here (${path} does not exist)`);
        if (options.format === 'json') deps.out(options.summary ? JSON.stringify(emptySummary()) : '[]');
        return Exit.Ok;
      }
      if (code === 'EACCES' || code === 'EPERM' || code === 'SQLITE_CANTOPEN' || code?.startsWith('SQLITE_READONLY') || code === 'SQLITE_PERM') {
        throw new EgressError(ErrorCode.NotPermitted, `egressctl denials: cannot read ${path}: permission denied`, {
          details: ['denial records are readable by root and members of group egressd-audit only'],
        });
      }
      if (isEgressError(error)) throw error;
      throw new EgressError(ErrorCode.DenialStore, `egressctl denials: cannot read ${path}: ${(error as Error).message}`, { cause: error });
    }
    try {
      if (options.summary) {
        printSummary(reader.summary(options.filter), options.format, deps);
        return Exit.Ok;
      }
      const rows = reader.query(options.filter);
      let last = options.follow ? reader.maxId() : 0;
      // Oldest first on the screen when following, so new rows come out underneath.
      printRows(options.follow ? rows.reverse() : rows, options.format, deps, true);
      if (!options.follow) return Exit.Ok;
      const stopAt = options.followForMs === undefined ? Infinity : Date.now() + options.followForMs;
      while (Date.now() < stopAt) {
        await sleep(options.pollMs);
        const fresh = reader.newer(last, options.filter);
        if (fresh.length === 0) continue;
        last = fresh[fresh.length - 1]!.id;
        printRows(fresh, options.format, deps, false);
      }
      return Exit.Ok;
    } finally {
      reader.close();
    }
  },
};

function emptySummary(): DenialSummary {
  return { records: 0, packets: 0, apps: [], destinations: [], rules: [] };
}

const FIELDS = [
  'id',
  'firstSeen',
  'lastSeen',
  'count',
  'shortId',
  'ruleId',
  'kind',
  'file',
  'line',
  'app',
  'domain',
  'uid',
  'gid',
  'protocol',
  'family',
  'address',
  'port',
  'name',
  'nameAskedBy',
] as const;

function csvCell(value: string | number | undefined): string {
  if (value === undefined) return '';
  const text = String(value);
  return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

function time(ms: number): string {
  return new Date(ms)
    .toISOString()
    .replace('T', ' ')
    .replace(/\.\d+Z$/, 'Z');
}

/** Control characters in a name or app would move the terminal's cursor: shown escaped. */
function safe(text: string): string {
  // eslint-disable-next-line no-control-regex
  return text.replace(/[\u0000-\u001f\u007f-\u009f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}

export function denialRow(r: StoredDenial): string[] {
  const who = r.app ?? (r.domain === undefined ? (r.uid === undefined ? '?' : `uid ${r.uid}`) : r.domain);
  const rule = `${r.ruleId ?? '?'} [${r.shortId}]${r.file === undefined ? '' : ` ${r.file}${r.line === undefined ? '' : `:${r.line}`}`}`;
  return [
    time(r.lastSeen),
    safe(who),
    r.name === undefined ? '-' : r.nameAskedBy === 'sender' ? safe(r.name) : `${safe(r.name)} (another user's lookup)`,
    r.address,
    r.port === undefined ? r.protocol : `${r.port}/${r.protocol}`,
    safe(rule),
    String(r.count),
  ];
}

function printRows(rows: readonly StoredDenial[], format: DenialsOptions['format'], deps: Deps, first: boolean): void {
  if (format === 'json') {
    // --follow --json: one record a line after the first array, so a program can read as they come.
    if (first) deps.out(JSON.stringify(rows));
    else for (const r of rows) deps.out(JSON.stringify(r));
    return;
  }
  if (format === 'csv') {
    if (first) deps.out(FIELDS.join(','));
    for (const r of rows) deps.out(FIELDS.map((f) => csvCell(r[f])).join(','));
    return;
  }
  const header = ['TIME', 'APP', 'NAME', 'ADDRESS', 'PORT', 'RULE', 'COUNT'];
  const table = rows.map(denialRow);
  if (first && table.length === 0) {
    deps.err('no denial records match');
    return;
  }
  const widths = header.map((h, i) => Math.max(h.length, ...table.map((row) => row[i]!.length)));
  const line = (cells: readonly string[]) =>
    cells
      .map((c, i) => (i === cells.length - 1 ? c.padStart(widths[i]!) : c.padEnd(widths[i]!)))
      .join('  ')
      .trimEnd();
  if (first) deps.err(line(header));
  for (const row of table) deps.err(line(row));
}

function printSummary(summary: DenialSummary, format: DenialsOptions['format'], deps: Deps): void {
  const sections = [
    ['app', 'top apps', summary.apps],
    ['destination', 'top destinations', summary.destinations],
    ['rule', 'top rules', summary.rules],
  ] as const;
  if (format === 'json') {
    deps.out(JSON.stringify(summary));
    return;
  }
  if (format === 'csv') {
    deps.out('section,key,packets');
    deps.out(`total,records,${summary.records}`);
    deps.out(`total,packets,${summary.packets}`);
    for (const [name, , ranked] of sections) for (const r of ranked) deps.out(`${name},${csvCell(r.key)},${r.count}`);
    return;
  }
  deps.err(`${summary.records} records, ${summary.packets} packets denied`);
  for (const [, title, ranked] of sections) {
    deps.err(`\n${title} (packets):`);
    if (ranked.length === 0) deps.err('  (none)');
    const width = Math.max(0, ...ranked.map((r) => String(r.count).length));
    for (const r of ranked) deps.err(`  ${String(r.count).padStart(width)}  ${safe(r.key)}`);
  }
}
