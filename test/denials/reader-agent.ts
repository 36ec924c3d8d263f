/**
 * The denial reader in a test's host namespace (run with `net.host.spawn`):
 * binds the log group given, attributes through rules.json in
 * EGRESSD_STATE_DIR, prints each record as one JSON line
 * ({"record": …}), and the counters ({"counters": …}) for every "counters"
 * line on stdin. Names come from the JSON map in argv[3] (address → name), in
 * place of the resolver's memory. With EGRESSD_POLICY_DIR, the policy there
 * is the one in force (the apps a global rule's sender is named by, as in the
 * daemon); without, a policy of no apps.
 */
import { createInterface } from 'node:readline';
import pino from 'pino';
import { factsNeeded } from '../../src/compile/compile.js';
import type { InForce } from '../../src/resolver/runtime.js';
import { startDenialReader } from '../../src/denials/reader.js';
import { loadPolicyDir } from '../../src/policy/load.js';
import { gatherFacts } from '../../src/system/facts.js';

const group = Number(process.argv[2]);
const names = new Map(Object.entries(JSON.parse(process.argv[3] ?? '{}') as Record<string, string>));
const windowMs = Number(process.argv[4] ?? 2000);
const maxOpen = Number(process.argv[5] ?? 10_000);
const receiveBufferBytes = Number(process.argv[6] ?? 8 * 1024 * 1024);
const stateDir = process.env['EGRESSD_STATE_DIR'] ?? '/nonexistent';
// The reader takes the group from the policy, rules from rules.json, and the apps to name a global rule's sender by; nothing else of InForce is read.
const policyDir = process.env['EGRESSD_POLICY_DIR'];
const loaded = policyDir === undefined ? undefined : loadPolicyDir(policyDir);
if (loaded && !loaded.ok) throw new Error(`the policy in ${policyDir}: ${JSON.stringify(loaded.errors)}`);
const policy = loaded ? { ...loaded.policy, defaults: { ...loaded.policy.defaults, log: { ...loaded.policy.defaults.log, group } } } : undefined;
const inForce = (policy
  ? { policy, facts: gatherFacts(factsNeeded(policy)), compiled: { ruleIds: [] } }
  : { policy: { defaults: { log: { group } }, apps: [], globalDeny: [] }, compiled: { ruleIds: [] } }) as unknown as InForce;
const log = pino({ level: 'warn' }, pino.destination(2));
const reader = await startDenialReader(
  inForce,
  { log, stateDir, learnedNames: (address) => (names.has(address) ? [{ name: names.get(address)!, asked: true }] : []) },
  { windowMs, maxOpen, receiveBufferBytes },
);
reader.subscribe((record) => process.stdout.write(`${JSON.stringify({ record })}\n`));
process.stdout.write(`${JSON.stringify({ ready: group })}\n`);
const lines = createInterface({ input: process.stdin });
lines.on('line', (line) => {
  if (line === 'counters') process.stdout.write(`${JSON.stringify({ counters: reader.counters(), open: reader.open, rss: process.memoryUsage().rss })}\n`);
  if (line === 'close') void reader.close().then(() => process.stdout.write(`${JSON.stringify({ closed: reader.counters() })}\n`));
});
lines.on('close', () => void reader.close().then(() => process.exit(0)));
