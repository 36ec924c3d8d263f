/**
 * Does replacing the table cost allowed packets? A TCP client in the host
 * namespace connects back to back (900 ms per attempt: a dropped SYN is resent
 * only after 1 s, so it shows as a timeout) while the table is replaced 300
 * times with `nft -f` (add + delete + define, one transaction each).
 *
 *   npx tsx bench/replace-drops.ts   (as root; builds and removes its own namespaces)
 *
 * It shows why egressd does not replace its table that way (src/enforce/swap.ts):
 * measured on this machine (bench/README.md), tables without set or map
 * lookups lose nothing, but a default-deny table with set lookups loses a SYN
 * now and then. egressctl apply swaps generations in three transactions
 * instead; the e2e tests check that nothing is lost or leaked then.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createTestNet } from '../test/harness/index.js';

const REPLACES = 300;
const CLI = join(import.meta.dirname, '..', 'src/cli/main.ts');
const net = await createTestNet();
const dir = mkdtempSync(join(tmpdir(), 'egd-replace-bench-'));
try {
  const server = await net.inet.listen({ proto: 'tcp', addr: '192.0.2.2', port: 7000 });
  const compileYaml = async (yaml: string) => {
    writeFileSync(join(dir, '00.yaml'), yaml);
    return (await net.host.node(CLI, ['compile', dir])).stdout;
  };
  const simple =
    'table inet egressd {\n\tchain output {\n\t\ttype filter hook output priority 0; policy accept;\n\t\tct state established,related accept\n\t\tmeta oif "lo" accept\n\t\tip daddr 192.0.2.2 tcp dport 7000 accept\n\t\tcounter drop\n\t}\n}\n';
  const cases: [string, string][] = [
    ['one chain, no set lookups, default drop', simple],
    ['egressd, default allow, a deny set', await compileYaml('defaults: {egress: allow}\ndeny: [{to: [203.0.113.0/24]}]\n')],
    [
      'egressd, default deny, app by uid',
      await compileYaml('defaults: {egress: deny}\napps: {web: {identity: {user: 4343}, rules: [{allow: [192.0.2.2], ports: [7000], proto: tcp}]}}\n'),
    ],
  ];
  console.log(`Allowed TCP connections while the table is replaced ${REPLACES} times\n`);
  console.log('| table | connections | timed out (SYN lost) | replaces/s |');
  console.log('|---|---|---|---|');
  for (const [name, text] of cases) {
    writeFileSync(
      join(dir, 'loop.sh'),
      `for i in $(seq ${REPLACES}); do nft -f - <<'X'\nadd table inet egressd; delete table inet egressd;\n${text}\nX\ndone\n`,
    );
    await net.host.run('sh', ['-c', `nft -f - <<'X'\nadd table inet egressd; delete table inet egressd;\n${text}\nX`]);
    await server.reset();
    const loop = net.host.sendLoop({
      proto: 'tcp',
      addr: '192.0.2.2',
      port: 7000,
      user: 4343,
      count: 1_000_000,
      intervalMs: 0,
      attemptTimeoutMs: 900,
      maxMs: 120_000,
    });
    const started = Date.now();
    await net.host.run('sh', [join(dir, 'loop.sh')], { timeoutMs: 200_000 });
    const seconds = (Date.now() - started) / 1000;
    const result = await loop.stop();
    console.log(`| ${name} | ${result.attempts} | ${result.errors['ETIMEDOUT'] ?? 0} | ${(REPLACES / seconds).toFixed(0)} |`);
  }
} finally {
  await net.destroy();
  rmSync(dir, { recursive: true, force: true });
}
