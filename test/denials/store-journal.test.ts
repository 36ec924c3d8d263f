import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { DENIAL_MESSAGE_ID, denialJournalFields } from '../../src/denials/journal.js';
import { denial } from './store-records.js';

/**
 * The journal for real: systemd-journald started by the test in a private
 * mount namespace (tmpfs over /run/systemd and /run/log, so neither the
 * machine's journal nor its socket is touched), the record written through
 * egressd's own non-blocking socket in journald's native protocol, read back with journalctl --directory.
 */
const ROOT = join(import.meta.dirname, '..', '..');
const JOURNALD = '/lib/systemd/systemd-journald';
const scratch = mkdtempSync(join(tmpdir(), 'egd-journal-'));
afterAll(() => rmSync(scratch, { recursive: true, force: true }));

const records = [
  denial({ name: 'telemetry.mozilla.org', count: 3 }),
  // Unknown fields left out; a name with a newline (names come from the network) stays one field.
  denial({
    ruleId: undefined,
    kind: undefined,
    file: undefined,
    line: undefined,
    app: undefined,
    domain: 'updates',
    uid: undefined,
    gid: undefined,
    name: 'evil\nEGRESSD_APP=forged',
    protocol: 'udp',
    family: 6,
    address: '2001:db8::53',
    port: 53,
  }),
];

describe.skipIf(!existsSync(JOURNALD) || process.getuid?.() !== 0)('denials in the journal', () => {
  it('every record is one entry with the documented EGRESSD_* fields, as journald stored them', () => {
    const script = join(scratch, 'run.sh');
    writeFileSync(
      script,
      `set -e
mount -t tmpfs tmpfs /run/systemd
mkdir -p /run/log && mount -t tmpfs tmpfs /run/log
[ -d /var/log/journal ] && mount -t tmpfs tmpfs /var/log/journal
mkdir -p /run/systemd/journal
${JOURNALD} >/dev/null 2>&1 &
JOURNALD=$!
trap 'kill $JOURNALD' EXIT
for i in $(seq 100); do [ -S /run/systemd/journal/socket ] && break; sleep 0.05; done
node --import tsx test/denials/journal-writer.ts "$1" >&2
for i in $(seq 100); do
  n=$(journalctl --directory /run/log/journal -o json MESSAGE_ID=${DENIAL_MESSAGE_ID} | wc -l)
  [ "$n" -ge 2 ] && break; sleep 0.05
done
journalctl --directory /run/log/journal -o json --output-fields=$(printf '%s,' MESSAGE MESSAGE_ID PRIORITY SYSLOG_IDENTIFIER EGRESSD_EVENT EGRESSD_RULE_SHORT_ID EGRESSD_RULE EGRESSD_RULE_KIND EGRESSD_RULE_FILE EGRESSD_RULE_LINE EGRESSD_APP EGRESSD_DOMAIN EGRESSD_UID EGRESSD_GID EGRESSD_PROTOCOL EGRESSD_FAMILY EGRESSD_DEST_ADDRESS EGRESSD_DEST_PORT EGRESSD_DEST_NAME EGRESSD_DEST_NAME_ASKED_BY EGRESSD_COUNT EGRESSD_FIRST_SEEN_USEC EGRESSD_LAST_SEEN_USEC)_TRANSPORT MESSAGE_ID=${DENIAL_MESSAGE_ID}
`,
    );
    const run = spawnSync('unshare', ['--mount', '--propagation', 'private', 'sh', script, JSON.stringify(records)], {
      cwd: ROOT,
      encoding: 'utf8',
      timeout: 30_000,
    });
    expect(run.status, run.stderr).toBe(0);
    expect(run.stderr).toContain('via journal');
    const entries = run.stdout
      .trim()
      .split('\n')
      .map((line) => JSON.parse(line) as Record<string, unknown>);
    expect(entries).toHaveLength(2);
    const strip = (e: Record<string, unknown>) => Object.fromEntries(Object.entries(e).filter(([k]) => !k.startsWith('_') || k === '_TRANSPORT'));
    expect(strip(entries[0]!)).toEqual({
      _TRANSPORT: 'journal',
      MESSAGE: 'firefox → telemetry.mozilla.org (192.0.2.7) port 443/tcp denied by app/firefox/2 [r1a2b3c4d] at 20-apps.yaml:12, 3 packets',
      MESSAGE_ID: DENIAL_MESSAGE_ID,
      PRIORITY: '5',
      SYSLOG_IDENTIFIER: 'egressd',
      EGRESSD_EVENT: 'denied',
      EGRESSD_RULE_SHORT_ID: 'r1a2b3c4d',
      EGRESSD_RULE: 'app/firefox/2',
      EGRESSD_RULE_KIND: 'app-rule',
      EGRESSD_RULE_FILE: '20-apps.yaml',
      EGRESSD_RULE_LINE: '12',
      EGRESSD_APP: 'firefox',
      EGRESSD_UID: '1000',
      EGRESSD_GID: '1000',
      EGRESSD_PROTOCOL: 'tcp',
      EGRESSD_FAMILY: '4',
      EGRESSD_DEST_ADDRESS: '192.0.2.7',
      EGRESSD_DEST_PORT: '443',
      EGRESSD_DEST_NAME: 'telemetry.mozilla.org',
      EGRESSD_DEST_NAME_ASKED_BY: 'sender',
      EGRESSD_COUNT: '3',
      EGRESSD_FIRST_SEEN_USEC: String(records[0]!.firstSeen * 1000),
      EGRESSD_LAST_SEEN_USEC: String(records[0]!.lastSeen * 1000),
    });
    const second = strip(entries[1]!);
    expect(second['EGRESSD_DOMAIN']).toBe('updates');
    expect(second['EGRESSD_APP']).toBeUndefined();
    expect(second['EGRESSD_UID']).toBeUndefined();
    expect(second['EGRESSD_RULE']).toBeUndefined();
    expect(second['EGRESSD_DEST_PORT']).toBe('53');
    // journalctl shows a value with a newline as an array of bytes; it is one field, not a forged EGRESSD_APP.
    expect(Buffer.from(second['EGRESSD_DEST_NAME'] as number[]).toString()).toBe('evil\nEGRESSD_APP=forged');
  });

  it('without a journal socket, each record is one JSON line on stdout (event "denied")', () => {
    const run = spawnSync(
      process.execPath,
      ['--import', 'tsx', 'test/denials/journal-writer.ts', JSON.stringify(records.slice(0, 1)), join(scratch, 'no-socket')],
      {
        cwd: ROOT,
        encoding: 'utf8',
      },
    );
    expect(run.stderr).toContain('via stdout');
    const line = JSON.parse(run.stdout.trim()) as Record<string, unknown>;
    expect(line).toMatchObject({
      event: 'denied',
      service: 'egressd',
      ...JSON.parse(JSON.stringify(records[0])),
      msg: expect.stringContaining('telemetry.mozilla.org'),
    });
  });
});

describe('journal fields', () => {
  it('name every record field (the README table lists the same)', () => {
    const names = denialJournalFields(denial({ domain: 'updates' })).map(([k]) => k);
    expect(names.filter((n) => n.startsWith('EGRESSD_'))).toEqual([
      'EGRESSD_EVENT',
      'EGRESSD_RULE_SHORT_ID',
      'EGRESSD_RULE',
      'EGRESSD_RULE_KIND',
      'EGRESSD_RULE_FILE',
      'EGRESSD_RULE_LINE',
      'EGRESSD_APP',
      'EGRESSD_DOMAIN',
      'EGRESSD_UID',
      'EGRESSD_GID',
      'EGRESSD_PROTOCOL',
      'EGRESSD_FAMILY',
      'EGRESSD_DEST_ADDRESS',
      'EGRESSD_DEST_PORT',
      'EGRESSD_DEST_NAME',
      'EGRESSD_DEST_NAME_ASKED_BY',
      'EGRESSD_COUNT',
      'EGRESSD_FIRST_SEEN_USEC',
      'EGRESSD_LAST_SEEN_USEC',
    ]);
  });
});
