/**
 * The pieces of a test net that the resolver's kernel tests share: a real
 * authoritative DNS server in the "internet", and egressd's resolver on the
 * host's loopback over a policy egressctl applied.
 */
import type { ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import type { TestNet } from '../harness/index.js';
import { dnsmasqOnly } from './dnsmasq.js';
import { printed } from './wait.js';

const ROOT = join(import.meta.dirname, '..', '..');
export const CLI = join(ROOT, 'src/cli/main.ts');
const DAEMON = join(ROOT, 'src/daemon/main.ts');

/** Debian's dnsmasq answering for the test names on `address` port 53 in `net`'s internet namespace; `records`: its options that say what (--host-record=…, --addn-hosts=…). Logs every query to its stdout. */
export function startAuthority(net: TestNet, address: string, records: readonly string[]): ChildProcess {
  return net.inet.spawn('dnsmasq', [...dnsmasqOnly(address), '--log-facility=-', '--log-queries', '--user=root', ...records]);
}

/** Applies the policy in `dir` with egressctl, then starts `egressd resolver` on it (from the source tree); resolves once it answers. */
export async function applyAndStartResolver(net: TestNet, dir: string, env: NodeJS.ProcessEnv): Promise<ChildProcess> {
  const applied = await net.host.node(CLI, ['apply', dir], { env });
  if (applied.code !== 0) throw new Error(`apply failed: ${applied.stderr}`);
  const resolver = net.host.spawn(process.execPath, ['--import', 'tsx', DAEMON, 'resolver', '--policy', dir], { env });
  await printed(resolver, 'stdout', '"event":"resolver-ready"', 30_000);
  return resolver;
}
