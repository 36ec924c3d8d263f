// Runs readTorStatus (or getTorInfo) where the test says — in the host's namespace, as a given user — and prints the answer as JSON.
//   read-status.ts '{"host":"127.0.0.1","port":9051,"cookieFile":"…"}'
import { readTorStatus } from '../../../src/tor/control.js';

const address = JSON.parse(process.argv[2] ?? '{}') as Parameters<typeof readTorStatus>[0];
process.stdout.write(`${JSON.stringify(await readTorStatus(address, { timeoutMs: 5000 }))}\n`);
