/**
 * Each denial record in the journal, with stable structured fields (the
 * fleet interface: journal-remote, Loki, Elastic and OpenTelemetry
 * collectors read them as they are; README's "What a denial record holds"
 * names each). Without a journal socket (run by hand, a container without
 * journald) the record is one JSON line on stdout through the daemon's
 * logger instead, `event: 'denied'`, with the record's own field names.
 *
 * The journal is never waited on (src/system/journal.ts: a non-blocking
 * socket): when journald's queue is full the entry is dropped and counted
 * (`dropped`; the record itself is in the store), and the first drop after
 * entries went through again is logged, at most once a minute. A journal
 * that fails otherwise is reported once; records then go to stdout.
 */
import type { Logger } from 'pino';
import { journalAvailable, openJournalSender, JOURNAL_SOCKET, type JournalFields, type SendJournal } from '../system/journal.js';
import type { DenialRecord } from './record.js';

/** journalctl MESSAGE_ID=76287487ef8842cc99649526ae37f308 finds every denial. */
export const DENIAL_MESSAGE_ID = '76287487ef8842cc99649526ae37f308';

/** Journald's `NAME=value` fields for a record; a field whose value is unknown is left out. */
export function denialJournalFields(r: DenialRecord): JournalFields {
  const fields: [string, string][] = [
    ['MESSAGE', denialMessage(r)],
    ['MESSAGE_ID', DENIAL_MESSAGE_ID],
    ['PRIORITY', '5'],
    ['SYSLOG_IDENTIFIER', 'egressd'],
    ['EGRESSD_EVENT', 'denied'],
  ];
  const put = (name: string, value: string | number | undefined) => {
    if (value !== undefined) fields.push([name, String(value)]);
  };
  put('EGRESSD_RULE_SHORT_ID', r.shortId);
  put('EGRESSD_RULE', r.ruleId);
  put('EGRESSD_RULE_KIND', r.kind);
  put('EGRESSD_RULE_FILE', r.file);
  put('EGRESSD_RULE_LINE', r.line);
  put('EGRESSD_APP', r.app);
  put('EGRESSD_DOMAIN', r.domain);
  put('EGRESSD_UID', r.uid);
  put('EGRESSD_GID', r.gid);
  put('EGRESSD_PROTOCOL', r.protocol);
  put('EGRESSD_FAMILY', r.family);
  put('EGRESSD_DEST_ADDRESS', r.address);
  put('EGRESSD_DEST_PORT', r.port);
  put('EGRESSD_DEST_NAME', r.name);
  put('EGRESSD_DEST_NAME_ASKED_BY', r.nameAskedBy);
  put('EGRESSD_COUNT', r.count);
  put('EGRESSD_FIRST_SEEN_USEC', Math.trunc(r.firstSeen * 1000));
  put('EGRESSD_LAST_SEEN_USEC', Math.trunc(r.lastSeen * 1000));
  return fields;
}

/** One line for people: "firefox → telemetry.mozilla.org (192.0.2.7) port 443/tcp denied by app/firefox/2 [r1a2b3c4d] at 20-apps.yaml:12, 3 packets". */
export function denialMessage(r: DenialRecord): string {
  const who = r.app ?? (r.domain === undefined ? (r.uid === undefined ? 'an unknown sender' : `uid ${r.uid}`) : `system domain ${r.domain}`);
  const where =
    r.name === undefined ? r.address : r.nameAskedBy === 'others' ? `${r.address} (${r.name}, looked up by another user)` : `${r.name} (${r.address})`;
  const port = r.port === undefined ? r.protocol : `port ${r.port}/${r.protocol}`;
  const rule = `${r.ruleId ?? 'rule'} [${r.shortId}]${r.file === undefined ? '' : ` at ${r.file}${r.line === undefined ? '' : `:${r.line}`}`}`;
  return `${who} → ${where} ${port} denied by ${rule}, ${r.count} ${r.count === 1 ? 'packet' : 'packets'}`;
}

export interface DenialJournal {
  /** Where records go: the journal's socket, or stdout. */
  readonly via: 'journal' | 'stdout';
  /** Entries journald had no room for (its queue full): never waited on, counted here; their records are in the store. */
  readonly dropped: number;
  write(record: DenialRecord): void;
  /** Closes the socket (a keeper restarted makes a new one). */
  close(): void;
}

export interface DenialJournalOptions {
  readonly log: Logger;
  /** Default /run/systemd/journal/socket. */
  readonly socket?: string;
  /** The transport (default a non-blocking socket to `socket`, openJournalSender). */
  readonly load?: () => SendJournal & { close?(): void };
  readonly now?: () => number;
}

const EAGAIN = 11;
const ENOBUFS = 105;
/** The least time between two "journal behind" lines in the log. */
const BEHIND_LOG_MS = 60_000;

export function openDenialJournal(options: DenialJournalOptions): DenialJournal {
  const { log } = options;
  const now = options.now ?? Date.now;
  const socket = options.socket ?? JOURNAL_SOCKET;
  const toStdout = (record: DenialRecord) => log.info({ event: 'denied', ...record }, denialMessage(record));
  if (!journalAvailable(socket)) return { via: 'stdout', dropped: 0, write: toStdout, close: () => undefined };
  let send: (SendJournal & { close?(): void }) | undefined;
  let broken = false;
  let dropped = 0;
  let dropping = false;
  let saidAt = -Infinity;
  return {
    via: 'journal',
    get dropped() {
      return dropped;
    },
    write(record) {
      if (broken) {
        toStdout(record);
        return;
      }
      try {
        send ??= (options.load ?? (() => openJournalSender(socket)))();
        const sent = send(denialJournalFields(record));
        if (sent === -EAGAIN || sent === -ENOBUFS) {
          dropped++;
          if (!dropping && now() - saidAt >= BEHIND_LOG_MS) {
            saidAt = now();
            log.warn({ event: 'journal-behind', dropped }, 'journald is behind: denial entries are dropped from the journal (they are kept in the store)');
          }
          dropping = true;
          return;
        }
        if (sent < 0) throw new Error(`journal socket: errno ${-sent}`);
        dropping = false;
      } catch (error) {
        // Once broken, every later record takes the stdout line: none is dropped, and the failure is said once.
        broken = true;
        log.warn({ event: 'journal-failed', error: (error as Error).message }, 'denials cannot be written to the journal; they go to stdout');
        toStdout(record);
      }
    },
    close() {
      send?.close?.();
      send = undefined;
      broken = true;
    },
  };
}
