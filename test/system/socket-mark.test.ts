/**
 * The resolver's upstream sockets carry SO_MARK on every packet, SYN
 * included: checked where it matters, by nftables. In a network namespace
 * of its own, a table counts packets to the upstream's port by mark and
 * drops those without the resolver's mark (as the exclusive DNS rule will):
 * the resolver with the mark is answered over UDP and, for a truncated
 * answer, over TCP; the same resolver without a mark gets nothing through.
 */
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ErrorCode } from '../../src/errors.js';
import { deleteNamedNetns } from '../../src/lab/sys.js';

const CHILD = join(dirname(fileURLToPath(import.meta.url)), 'fixtures/socket-mark-child.ts');
const MARK = '0x45444e53';
const root = process.getuid?.() === 0;
const ns = `egdsm${randomBytes(3).toString('hex')}`;

function run(command: string, args: readonly string[], input?: string): string {
  const result = spawnSync(command, args, { encoding: 'utf8', input });
  if (result.status !== 0) throw new Error(`${command} ${args.join(' ')}: ${result.stderr}`);
  return result.stdout;
}

/** A counter's packets in the test's table, by the comment on its rule. */
function counted(comment: string): number {
  const listing = JSON.parse(run('ip', ['netns', 'exec', ns, 'nft', '-j', 'list', 'table', 'inet', 'egdmarktest'])) as {
    nftables: { rule?: { comment?: string; expr: { counter?: { packets: number } }[] } }[];
  };
  const rule = listing.nftables.find((item) => item.rule?.comment === comment)?.rule;
  const counter = rule?.expr.find((e) => e.counter !== undefined)?.counter;
  if (counter === undefined) throw new Error(`no counter "${comment}"`);
  return counter.packets;
}

describe.skipIf(!root)('socket mark (needs root)', () => {
  beforeAll(() => {
    run('ip', ['netns', 'add', ns]);
    run('ip', ['-n', ns, 'link', 'set', 'lo', 'up']);
  });
  afterAll(() => deleteNamedNetns(ns));

  it('is on every packet of the upstream queries, UDP and TCP, and a table can tell them apart', async () => {
    const child = spawn('ip', ['netns', 'exec', ns, process.execPath, '--import', 'tsx', CHILD, 'resolve'], { stdio: ['pipe', 'pipe', 'inherit'] });
    const lines = createInterface({ input: child.stdout });
    const next = () =>
      new Promise<Record<string, unknown>>((resolve, reject) => {
        lines.once('line', (line) => resolve(JSON.parse(line) as Record<string, unknown>));
        child.once('exit', (code) => reject(new Error(`child exited ${code}`)));
      });
    try {
      const { port } = (await next()) as { port: number };
      run(
        'ip',
        ['netns', 'exec', ns, 'nft', '-f', '-'],
        `
table inet egdmarktest {
  chain out {
    type filter hook output priority 0; policy accept;
    udp dport ${port} meta mark ${MARK} counter comment "udp marked"
    tcp dport ${port} tcp flags syn meta mark ${MARK} counter comment "syn marked"
    tcp dport ${port} meta mark ${MARK} counter comment "tcp marked"
    udp dport ${port} meta mark != ${MARK} counter drop comment "udp unmarked"
    tcp dport ${port} meta mark != ${MARK} counter drop comment "tcp unmarked"
  }
}
`,
      );
      child.stdin.write('go\n');
      const result = (await next()) as {
        markedA: { rcode: number; answers: number };
        markedTxt: { rcode: number; answers: number };
        plainA: { rcode: number; answers: number };
        markedStats: { upstreamTcpRetries: number };
      };
      expect(result.markedA).toEqual({ rcode: 0, answers: 1 });
      expect(result.markedTxt).toEqual({ rcode: 0, answers: 1 });
      expect(result.markedStats.upstreamTcpRetries).toBe(1);
      // Without the mark the same query is dropped by the table: SERVFAIL.
      expect(result.plainA).toEqual({ rcode: 2, answers: 0 });
      expect(counted('udp marked')).toBe(2);
      expect(counted('syn marked')).toBe(1);
      expect(counted('tcp marked')).toBeGreaterThanOrEqual(3);
      expect(counted('udp unmarked')).toBeGreaterThanOrEqual(2);
      expect(counted('tcp unmarked')).toBe(0);
    } finally {
      child.kill();
    }
  });

  it('cannot be set without CAP_NET_ADMIN (nor CAP_NET_RAW, which Linux 5.17+ also takes): a clear error with code and reason', () => {
    const out = run('setpriv', ['--inh-caps=-net_admin,-net_raw', '--bounding-set=-net_admin,-net_raw', process.execPath, '--import', 'tsx', CHILD, 'probe']);
    const probe = JSON.parse(out) as { code?: string; reason?: string; message?: string };
    expect(probe).toMatchObject({ code: ErrorCode.ResolverStart, reason: 'mark' });
    expect(probe.message).toContain('CAP_NET_ADMIN');
    // With it (as the test runs), the same probe succeeds.
    expect(JSON.parse(run(process.execPath, ['--import', 'tsx', CHILD, 'probe']))).toEqual({ ok: true });
  });
});
