/**
 * Each denial record in the journal, with stable structured fields (the
 * fleet interface: journal-remote, Loki, Elastic and OpenTelemetry
 * collectors read them as they are; README's "What a denial record holds"
 * names each). Without a journal socket (run by hand, a container without
 * journald) the record is one JSON line on stdout through the daemon's
 * logger instead, `event: 'denied'`, with the record's own field names.
 *
 * A journal that fails is reported once; records go on to the store.
 */
import type { Logger } from 'pino';
import { journalAvailable, loadSdJournal, JOURNAL_SOCKET, type JournalFields, type SendJournal } from '../system/journal.js';
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
  put('EGRESSD_COUNT', r.count);
  put('EGRESSD_FIRST_SEEN_USEC', Math.trunc(r.firstSeen * 1000));
  put('EGRESSD_LAST_SEEN_USEC', Math.trunc(r.lastSeen * 1000));
  return fields;
}

/** One line for people: "firefox → telemetry.mozilla.org (192.0.2.7) port 443/tcp denied by app/firefox/2 [r1a2b3c4d] at 20-apps.yaml:12, 3 packets". */
export function denialMessage(r: DenialRecord): string {
  const who = r.app ?? (r.domain === undefined ? (r.uid === undefined ? 'an unknown sender' : `uid ${r.uid}`) : `system domain ${r.domain}`);
  const where = r.name === undefined ? r.address : `${r.name} (${r.address})`;
  const port = r.port === undefined ? r.protocol : `port ${r.port}/${r.protocol}`;
  const rule = `${r.ruleId ?? 'rule'} [${r.shortId}]${r.file === undefined ? '' : ` at ${r.file}${r.line === undefined ? '' : `:${r.line}`}`}`;
  return `${who} → ${where} ${port} denied by ${rule}, ${r.count} ${r.count === 1 ? 'packet' : 'packets'}`;
}

export interface DenialJournal {
  /** Where records go: the journal's socket, or stdout. */
  readonly via: 'journal' | 'stdout';
  write(record: DenialRecord): void;
}

export interface DenialJournalOptions {
  readonly log: Logger;
  /** Default /run/systemd/journal/socket. */
  readonly socket?: string;
  /** The transport (default libsystemd's sd_journal_sendv). */
  readonly load?: () => SendJournal;
}

export function openDenialJournal(options: DenialJournalOptions): DenialJournal {
  const { log } = options;
  const toStdout = (record: DenialRecord) => log.info({ event: 'denied', ...record }, denialMessage(record));
  if (!journalAvailable(options.socket ?? JOURNAL_SOCKET)) return { via: 'stdout', write: toStdout };
  let send: SendJournal | undefined;
  let broken = false;
  return {
    via: 'journal',
    write(record) {
      if (broken) {
        toStdout(record);
        return;
      }
      try {
        send ??= (options.load ?? loadSdJournal)();
        const sent = send(denialJournalFields(record));
        if (sent < 0) throw new Error(`sd_journal_sendv: errno ${-sent}`);
      } catch (error) {
        // Once broken, every later record takes the stdout line: none is dropped, and the failure is said once.
        broken = true;
        log.warn({ event: 'journal-failed', error: (error as Error).message }, 'denials cannot be written to the journal; they go to stdout');
        toStdout(record);
      }
    },
  };
}
