/**
 * src/nft/set-elements.ts against the real kernel and the real libnftnl, in
 * a throwaway network namespace: the writer runs in a child placed in it
 * (./fixtures/set-writer.ts), and every outcome is read back with the real
 * `nft` binary in the same namespace.
 */
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ElementWrite } from '../../src/nft/set-elements.js';
import type { ConcurrentValue, SetWriterOp, SetWriterResult } from './fixtures/set-writer.js';
import { addNetns, deleteNetns, kernelSkipReason, netnsName, nft, nftJson, nsenterArgs, REPO_ROOT, runChild } from './helpers.js';

const skipReason = kernelSkipReason();
if (skipReason !== null) console.warn(`skipping set element writer kernel tests: ${skipReason}`);

const WRITER = join(REPO_ROOT, 'test/nft/fixtures/set-writer.ts');

const TABLE = `table inet egd {
  set d4 { type ipv4_addr; flags timeout; }
  set d6 { type ipv6_addr; flags timeout; }
  set plain4 { type ipv4_addr; }
}
`;

/** A table nobody asked the writer to touch, with a set of the same name. */
const FOREIGN = `table inet other {
  set d4 { type ipv4_addr; flags timeout; }
}
`;

interface ListedElem {
  readonly val: string;
  readonly timeout?: number;
  readonly expires?: number;
  readonly comment?: string;
}

describe.skipIf(skipReason !== null)('set element writer (libnftnl, in a namespace)', () => {
  const ns = netnsName('setw');

  async function write(ops: readonly SetWriterOp[], options: { table?: string; user?: string; destroy?: boolean } = {}): Promise<SetWriterResult[]> {
    const asUser =
      options.user === undefined
        ? []
        : ['setpriv', `--reuid=${options.user}`, `--regid=${options.user}`, '--clear-groups', '--inh-caps=-all', '--bounding-set=-all'];
    const argv = ['nsenter', ...nsenterArgs(ns), ...asUser, process.execPath, '--import', 'tsx', WRITER];
    const input = { table: { family: 'inet', name: options.table ?? 'egd' }, ...(options.destroy === undefined ? {} : { destroy: options.destroy }), ops };
    return (JSON.parse(await runChild(argv, JSON.stringify(input))) as { results: SetWriterResult[] }).results;
  }

  function elems(set: string, table = 'egd'): ListedElem[] {
    for (const item of nftJson(ns, ['list', 'set', 'inet', table, set]).nftables) {
      const s = item['set'] as { elem?: ({ elem: ListedElem } | string)[] } | undefined;
      if (s !== undefined) return (s.elem ?? []).map((e) => (typeof e === 'string' ? { val: e } : e.elem));
    }
    throw new Error(`no set ${set} in the listing`);
  }
  const elem = (set: string, address: string): ListedElem | undefined => elems(set).find((e) => e.val === address);

  function succeeded(result: SetWriterResult | undefined): unknown {
    if (result === undefined) throw new Error('the writer returned fewer results than ops');
    if (!result.ok) throw new Error(`expected success, got ${result.error.code ?? ''} ${result.error.reason ?? ''}: ${result.error.message}`);
    return result.value;
  }
  function refused(result: SetWriterResult | undefined) {
    if (result === undefined) throw new Error('the writer returned fewer results than ops');
    if (result.ok) throw new Error('expected a refusal, got success');
    return result.error;
  }
  const add = (...writes: ElementWrite[]): SetWriterOp => ({ op: 'add', writes });

  beforeAll(() => {
    addNetns(ns);
    nft(ns, ['-f', '-'], TABLE + FOREIGN);
  });
  afterAll(() => deleteNetns(ns));

  it('adds v4 and v6 elements to several sets in one call, with their timeouts and comments, and touches no other table', async () => {
    const [result] = await write([
      add(
        { set: 'd4', address: '192.0.2.7', timeoutMs: 60_000, comment: 'api.example.test' },
        { set: 'd6', address: '2001:db8::7', timeoutMs: 30_000, comment: 'api.example.test' },
        { set: 'd4', address: '192.0.2.8', timeoutMs: 120_000 },
        { set: 'd6', address: '::ffff:192.0.2.9', timeoutMs: 45_000, comment: 'a "quoted" name' },
      ),
    ]);
    succeeded(result);
    const a = elem('d4', '192.0.2.7');
    expect(a).toMatchObject({ timeout: 60, comment: 'api.example.test' });
    expect(a?.expires).toBeGreaterThanOrEqual(55);
    expect(elem('d4', '192.0.2.8')).toMatchObject({ timeout: 120 });
    expect(elem('d4', '192.0.2.8')?.comment).toBeUndefined();
    expect(elem('d6', '2001:db8::7')).toMatchObject({ timeout: 30, comment: 'api.example.test' });
    // nft strings have no escapes: the quotes are replaced, as in every comment egressd writes.
    expect(elem('d6', '::ffff:192.0.2.9')).toMatchObject({ timeout: 45, comment: "a 'quoted' name" });
    // The text listing shows the comment as nft's own element comment.
    expect(nft(ns, ['list', 'set', 'inet', 'egd', 'd4'])).toContain('192.0.2.7 timeout 1m expires');
    expect(nft(ns, ['list', 'set', 'inet', 'egd', 'd4'])).toContain('comment "api.example.test"');
    expect(elems('d4', 'other')).toEqual([]);
  });

  it('refreshes the expiry of an element that is there already, and never shortens it', async () => {
    // Without the expiration attribute the kernel leaves an element re-added with the same timeout as it was (seen failing that way).
    await write([add({ set: 'd4', address: '192.0.2.20', timeoutMs: 60_000 }, { set: 'd4', address: '192.0.2.21', timeoutMs: 60_000 })]);
    await sleep(2500);
    const before = elem('d4', '192.0.2.20')?.expires ?? Infinity;
    expect(before).toBeLessThanOrEqual(58);
    const results = await write([
      add({ set: 'd4', address: '192.0.2.20', timeoutMs: 60_000 }),
      // In one writer: a later, shorter timeout keeps the longer expiry.
      add({ set: 'd4', address: '192.0.2.22', timeoutMs: 60_000 }),
      add({ set: 'd4', address: '192.0.2.22', timeoutMs: 5_000 }),
    ]);
    results.forEach(succeeded);
    expect(elem('d4', '192.0.2.20')?.expires).toBeGreaterThanOrEqual(59);
    expect(elem('d4', '192.0.2.21')?.expires).toBeLessThanOrEqual(58);
    expect(elem('d4', '192.0.2.22')?.expires).toBeGreaterThanOrEqual(55);
  });

  for (const destroy of [true, false]) {
    it(`removes elements, one that is not there being no error (${destroy ? 'NFT_MSG_DESTROYSETELEM, Linux 6.3' : 'one NFT_MSG_DELSETELEM a batch, before Linux 6.3'})`, async () => {
      const base = destroy ? 50 : 60;
      const [a, b, c] = [`192.0.2.${base}`, `2001:db8::${base}`, `192.0.2.${base + 1}`];
      succeeded(
        (
          await write([
            add({ set: 'd4', address: a, timeoutMs: 60_000 }, { set: 'd6', address: b, timeoutMs: 60_000 }, { set: 'd4', address: c, timeoutMs: 60_000 }),
          ])
        )[0],
      );
      const removals = [
        { set: 'd4', address: a },
        { set: 'd4', address: `192.0.2.${base + 9}` },
        { set: 'd6', address: b },
      ];
      (await write([{ op: 'remove', removals }], { destroy })).forEach(succeeded);
      expect(elem('d4', a)).toBeUndefined();
      expect(elem('d6', b)).toBeUndefined();
      expect(elem('d4', c)).toBeDefined();
    });
  }

  it('lets an element expire', async () => {
    succeeded((await write([add({ set: 'd4', address: '192.0.2.30', timeoutMs: 1000 }, { set: 'd4', address: '192.0.2.31', timeoutMs: 60_000 })]))[0]);
    expect(elem('d4', '192.0.2.30')).toBeDefined();
    await sleep(2500);
    expect(elem('d4', '192.0.2.30')).toBeUndefined();
    expect(elem('d4', '192.0.2.31')).toBeDefined();
  });

  it('types its refusals: a missing set, a missing table, no permission, an address the set cannot take', async () => {
    const [missingSet, wrongFamily, noTimeouts] = await write([
      add({ set: 'd4', address: '192.0.2.40', timeoutMs: 60_000 }, { set: 'd4_gone', address: '192.0.2.41', timeoutMs: 60_000 }),
      add({ set: 'd6', address: '192.0.2.42', timeoutMs: 60_000 }),
      add({ set: 'plain4', address: '192.0.2.43', timeoutMs: 60_000 }),
    ]);
    expect(refused(missingSet)).toMatchObject({ code: 'EGD_NFT_APPLY', reason: 'missing-set', set: 'd4_gone', errno: 2 });
    expect(refused(wrongFamily)).toMatchObject({ code: 'EGD_NFT_APPLY', reason: 'invalid', set: 'd6' });
    expect(refused(noTimeouts)).toMatchObject({ code: 'EGD_NFT_APPLY', reason: 'invalid', set: 'plain4' });

    const [missingTable] = await write([add({ set: 'd4', address: '192.0.2.44', timeoutMs: 60_000 })], { table: 'egd_gone' });
    expect(refused(missingTable)).toMatchObject({ code: 'EGD_NFT_APPLY', reason: 'missing-table', errno: 2 });

    const [permission] = await write([add({ set: 'd4', address: '192.0.2.45', timeoutMs: 60_000 })], { user: '65534' });
    expect(refused(permission)).toMatchObject({ code: 'EGD_NFT_APPLY', reason: 'permission', errno: 1 });

    // Refused before anything is sent: a name that is no plain identifier, an address that is none, a timeout of 0.
    const before = await write([
      add({ set: 'd4; flush ruleset', address: '192.0.2.46', timeoutMs: 60_000 }),
      add({ set: 'd4', address: 'example.org', timeoutMs: 60_000 }),
      add({ set: 'd4', address: '192.0.2.47', timeoutMs: 0 }),
    ]);
    for (const r of before) expect(refused(r)).toMatchObject({ code: 'EGD_NFT_APPLY', reason: 'invalid', errno: null });
    for (const address of ['192.0.2.40', '192.0.2.44', '192.0.2.45', '192.0.2.46', '192.0.2.47']) expect(elem('d4', address)).toBeUndefined();
    expect(elems('d6').map((e) => e.val)).not.toContain('192.0.2.42');
  });

  it('writes nothing of a transaction one of whose sets is missing', async () => {
    const [result] = await write([
      add(
        { set: 'd4', address: '192.0.2.50', timeoutMs: 60_000 },
        { set: 'd6', address: '2001:db8::50', timeoutMs: 60_000 },
        { set: 'nosuch', address: '192.0.2.51', timeoutMs: 60_000 },
      ),
    ]);
    expect(refused(result)).toMatchObject({ reason: 'missing-set', set: 'nosuch' });
    expect(elem('d4', '192.0.2.50')).toBeUndefined();
    expect(elem('d6', '2001:db8::50')).toBeUndefined();
  });

  it('puts the writes of concurrent requests in one transaction, and fails only the request with a bad set', async () => {
    const [shared, mixed] = await write([
      {
        op: 'concurrent',
        requests: [
          [{ set: 'd4', address: '192.0.2.60', timeoutMs: 60_000 }],
          [
            { set: 'd4', address: '192.0.2.61', timeoutMs: 60_000 },
            { set: 'd6', address: '2001:db8::61', timeoutMs: 60_000 },
          ],
          [{ set: 'd6', address: '2001:db8::62', timeoutMs: 60_000 }],
        ],
      },
      {
        op: 'concurrent',
        requests: [
          [{ set: 'd4', address: '192.0.2.63', timeoutMs: 60_000 }],
          [{ set: 'gone', address: '192.0.2.64', timeoutMs: 60_000 }],
          [{ set: 'd4', address: '192.0.2.65', timeoutMs: 60_000 }],
        ],
      },
    ]);
    const one = succeeded(shared) as ConcurrentValue;
    expect(one.transactions).toBe(1);
    expect(one.outcomes).toEqual([{ ok: true }, { ok: true }, { ok: true }]);
    for (const a of ['192.0.2.60', '192.0.2.61']) expect(elem('d4', a)).toBeDefined();
    for (const a of ['2001:db8::61', '2001:db8::62']) expect(elem('d6', a)).toBeDefined();

    const two = succeeded(mixed) as ConcurrentValue;
    // The shared one, refused whole; then each request alone.
    expect(two.transactions).toBe(4);
    expect(two.outcomes[0]).toEqual({ ok: true });
    expect(two.outcomes[1]).toMatchObject({ ok: false, error: { reason: 'missing-set', set: 'gone' } });
    expect(two.outcomes[2]).toEqual({ ok: true });
    expect(elem('d4', '192.0.2.63')).toBeDefined();
    expect(elem('d4', '192.0.2.65')).toBeDefined();
  });

  it('drops a packet to an address the moment the writer returns', async () => {
    execFileSync('ip', ['-n', ns, 'link', 'set', 'lo', 'up']);
    execFileSync('ip', ['-n', ns, 'addr', 'add', '192.0.2.70/32', 'dev', 'lo']);
    nft(ns, ['-f', '-'], 'table inet egd {\n  chain out {\n    type filter hook output priority 0; policy accept;\n    ip daddr @d4 counter drop\n  }\n}\n');
    const ping = () => {
      try {
        execFileSync('nsenter', [...nsenterArgs(ns), 'ping', '-n', '-q', '-c', '1', '-W', '1', '192.0.2.70'], { stdio: 'ignore' });
        return true;
      } catch {
        return false;
      }
    };
    expect(ping()).toBe(true);
    succeeded((await write([add({ set: 'd4', address: '192.0.2.70', timeoutMs: 60_000 })]))[0]);
    expect(ping()).toBe(false);
    expect(nft(ns, ['list', 'chain', 'inet', 'egd', 'out'])).toMatch(/counter packets [1-9]/);
  });

  describe('with a 100,000-CIDR interval set in the table', () => {
    beforeAll(() => {
      const cidrs = Array.from({ length: 100_000 }, (_, i) => `10.${(i >> 12) & 255}.${(i >> 4) & 255}.${(i & 15) << 4}/28`);
      nft(ns, ['-f', '-'], `table inet egd {\n  set big {\n    type ipv4_addr; flags interval;\n    elements = { ${cidrs.join(', ')} }\n  }\n}\n`);
    });

    it('still completes 200 single-address adds, each one its own call', async () => {
      const big = execFileSync('nsenter', [...nsenterArgs(ns), 'nft', 'list', 'set', 'inet', 'egd', 'big'], { encoding: 'utf8', maxBuffer: 64 << 20 });
      expect(big.split(',').length).toBe(100_000);
      nft(ns, ['flush', 'set', 'inet', 'egd', 'd4']);
      const addresses = Array.from({ length: 200 }, (_, i) => `198.51.100.${i}`);
      const [result] = await write([{ op: 'singles', set: 'd4', addresses, timeoutMs: 600_000 }]);
      expect(succeeded(result)).toEqual({ calls: 200, returned: 200 });
      expect(
        elems('d4')
          .map((e) => e.val)
          .sort(),
      ).toEqual([...addresses].sort());
    });
  });
});
