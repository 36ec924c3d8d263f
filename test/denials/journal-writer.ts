/** Writes the records given as JSON (argv[2]) through openDenialJournal; says on stdout where they went. */
import { pino } from 'pino';
import { openDenialJournal } from '../../src/denials/journal.js';
import type { DenialRecord } from '../../src/denials/record.js';

const log = pino({ base: { service: 'egressd' } }, pino.destination(1));
const journal = openDenialJournal({ log, ...(process.argv[3] ? { socket: process.argv[3] } : {}) });
for (const record of JSON.parse(process.argv[2]!) as DenialRecord[]) journal.write(record);
process.stderr.write(`via ${journal.via}\n`);
