/**
 * src/nft against the real kernel and the real libnftables, for BOTH
 * backends. Each backend gets its own throwaway network namespace; the
 * binding runs in a child (./fixtures/driver.ts) placed in it, and every
 * outcome is checked with the real `nft` binary in the same namespace.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import {
  command,
  dispatch,
  match,
  renderCommandsText,
  rule,
  stmt,
  verdict,
  type Command,
  type ObjectRef,
  type Ruleset,
  type TableRef,
} from '../../src/compile/ruleset.js';
import type { NftSetInfo, NftTableListing } from '../../src/nft/types.js';
import {
  addNetns,
  deleteNetns,
  deleteTableIfPresent,
  drive,
  driverCommand,
  failed,
  kernelSkipReason,
  LIBNFTABLES,
  libnftablesSkipReason,
  listedElems,
  netnsName,
  nft,
  nftJson,
  ok,
  op,
  shellQuote,
  type DriverOutput,
  type DriverScript,
} from './helpers.js';

const skipReason = kernelSkipReason();
if (skipReason !== null) console.warn(`skipping src/nft kernel tests: ${skipReason}`);

const FOREIGN = `table ip foreign {
  set keep { type ipv4_addr; elements = { 203.0.113.9 } }
  chain c { type filter hook input priority 10; policy accept; ip saddr @keep counter accept; }
}
`;

const EGD: TableRef = { family: 'inet', name: 'egd' };
const hook = { hook: 'output', prio: 0, policy: 'accept' } as const;
const ipDaddr = { payload: { protocol: 'ip', field: 'daddr' } } as const;

const V1: Ruleset = {
  table: EGD,
  sets: [{ name: 'old_set', key: 'ipv4_addr', flags: [], elements: ['192.0.2.1'] }],
  chains: [{ name: 'old_chain', hook, rules: [rule([match.daddr(4, 'old_set'), stmt.counter(), verdict.drop()])] }],
};

const V2: Ruleset = {
  table: EGD,
  sets: [
    { name: 'dns4', key: 'ipv4_addr', flags: ['timeout'], elements: [] },
    { name: 'dns6', key: 'ipv6_addr', flags: ['timeout'], elements: [] },
    { name: 'nets', key: 'ipv4_addr', flags: ['interval'], elements: [{ prefix: { addr: '198.51.100.0', len: 24 } }] },
    { name: 'decide', key: 'ipv4_addr', map: 'verdict', flags: ['timeout'], elements: [], verdicts: [] },
  ],
  chains: [
    { name: 'allow_web', rules: [rule([stmt.counter(), verdict.accept()])] },
    { name: 'deny_log', rules: [rule([stmt.counter(), verdict.drop()])] },
    { name: 'out', hook, rules: [rule([{ vmap: { key: ipDaddr, data: '@decide' } }]), rule([match.daddr(4, 'dns4'), verdict.accept()])] },
  ],
};

/** V2 with a rule that looks up a set that does not exist. */
const BAD: Ruleset = {
  ...V2,
  chains: V2.chains.map((c) => (c.name === 'out' ? { ...c, rules: [c.rules[0]!, rule([match.daddr(4, 'nosuch'), verdict.accept()])] } : c)),
};

/** Valid, but must never reach the kernel: only ever applied with check. */
const CHECK_ONLY: Ruleset = { table: EGD, sets: [{ name: 'checked_only', key: 'ipv4_addr', flags: [], elements: [] }], chains: [] };

/** What the driver's replaceTable sends: the table added, deleted and written anew, in one transaction. */
const replacing = (ruleset: Ruleset): Command[] => [command.addTable(ruleset.table), command.deleteTable(ruleset.table), command.block(ruleset)];

const ref = (name: string, table = 'egd'): ObjectRef => ({ table: { family: 'inet', name: table }, name });

/** A text listing of table inet egd, with handles, from the real nft. */
const snapshot = (ns: string, what: string[]) => nft(ns, ['-a', 'list', ...what]);

const libSkipReason = await libnftablesSkipReason();
if (libSkipReason !== null) console.warn(`skipping src/nft kernel tests of the libnftables backend: ${libSkipReason}`);
const backends = [
  { backend: 'libnftables', skipped: libSkipReason },
  { backend: 'binary', skipped: null },
] as const;

describe.skipIf(skipReason !== null).each(backends)('src/nft on $backend', ({ backend, skipped }) => {
  const ns = netnsName(backend === 'libnftables' ? 'lib' : 'bin');
  const script = (ops: DriverScript['ops'], table: TableRef = EGD): DriverScript => ({
    open: { prefer: backend, strict: true, table, libraryPath: LIBNFTABLES },
    ops,
  });
  let foreignBefore = '';

  beforeEach((ctx) => {
    if (skipped !== null) ctx.skip(skipped);
  });

  beforeAll(() => {
    addNetns(ns);
    nft(ns, ['-f', '-'], FOREIGN);
    foreignBefore = snapshot(ns, ['table', 'ip', 'foreign']);
  });
  afterAll(() => {
    deleteNetns(ns);
  });

  const expectForeignUntouched = () => {
    expect(snapshot(ns, ['table', 'ip', 'foreign'])).toBe(foreignBefore);
  };

  it('uses the backend it was asked for and reports the nft version', async () => {
    const out = await drive(ns, script([op('version')]));
    expect(out.backend).toBe(backend);
    expect(out.fallbackReason).toBeNull();
    const real = execFileSync('nft', ['--version'], { encoding: 'utf8' });
    expect(real).toContain(`v${String(ok(out.results[0]))}`);
  });

  it('replaces a table in one transaction, leaving other tables byte-identical', async () => {
    const out = await drive(ns, script([op('replaceTable', V1), op('listTable', 'inet', 'egd'), op('replaceTable', V2)]));
    const first = ok(out.results[1]) as NftTableListing;
    expect(first.sets.map((s) => s.name)).toEqual(['old_set']);
    ok(out.results[2]);

    const live = nftJson(ns, ['list', 'table', 'inet', 'egd']).nftables;
    const named = (kind: string) => live.flatMap((item) => (item[kind] === undefined ? [] : [(item[kind] as { name: string }).name]));
    expect(named('set')).toEqual(['dns4', 'dns6', 'nets']);
    expect(named('map')).toEqual(['decide']);
    expect(named('chain')).toEqual(['allow_web', 'deny_log', 'out']);
    expect(JSON.stringify(live)).not.toContain('old_');
    expect(nft(ns, ['list', 'tables'])).toBe('table ip foreign\ntable inet egd\n');
    expectForeignUntouched();
  });

  it('refuses a bad transaction with nft’s message and changes nothing; check mode changes nothing', async () => {
    const before = snapshot(ns, ['table', 'inet', 'egd']);
    const out = await drive(
      ns,
      script([
        op('replaceTable', BAD),
        op('replaceTable', CHECK_ONLY, { check: true }),
        op('addElements', ref('dns4'), ['192.0.2.50'], { timeout: 60, check: true }),
        op('replaceTable', BAD, { check: true }),
        op('run', { commands: [command.createChain(EGD, 'checked_chain')] }, { check: true }),
        op('addElements', ref('nosuchset'), ['192.0.2.51']),
      ]),
    );
    const bad = failed(out.results[0]);
    expect(bad.code).toBe('EGD_NFT_APPLY');
    // nft names the line of the text the model rendered, and echoes it.
    const badLine =
      renderCommandsText(replacing(BAD))
        .split('\n')
        .findIndex((line) => line.includes('@nosuch')) + 1;
    expect(bad.message).toMatch(new RegExp(`<input>:${badLine}:\\d+-\\d+: Error: `));
    expect(bad.message).toContain('ip daddr @nosuch accept');
    expect(bad.details.some((line) => line.includes('@nosuch'))).toBe(true);
    ok(out.results[1]);
    ok(out.results[2]);
    expect(failed(out.results[3]).message).toContain('@nosuch');
    ok(out.results[4]);
    const missing = failed(out.results[5]);
    expect(missing.code).toBe('EGD_NFT_APPLY');
    expect(missing.message).toContain('add element inet egd nosuchset');
    expect(missing.message).toContain('No such file or directory');

    expect(snapshot(ns, ['table', 'inet', 'egd'])).toBe(before);
    expect(nft(ns, ['list', 'tables'])).toBe('table ip foreign\ntable inet egd\n');
    expectForeignUntouched();
  });

  it('classifies refusals into typed reasons, and refuses another table before nft is asked', async () => {
    const before = snapshot(ns, ['table', 'inet', 'egd']);
    const out = await drive(
      ns,
      script([
        // A chain that is there already: what a racing writer leaves.
        op('run', { commands: [command.createChain(EGD, 'allow_web')] }),
        // An element for a set that is not there.
        op('addElements', ref('nosuchset'), ['192.0.2.51']),
        // A timeout on a set without the timeout flag: the kernel says no.
        op('addElements', ref('nets'), ['192.0.2.77'], { timeout: 60 }),
        op('run', { commands: [command.addTable({ family: 'inet', name: 'foreign2' })] }),
        op('run', { commands: [command.createChain(EGD, 'fresh'), command.deleteTable({ family: 'ip', name: 'foreign' } as never)] }),
      ]),
    );
    expect(out.results.slice(0, 3).map((r) => [failed(r).code, failed(r).reason])).toEqual([
      ['EGD_NFT_APPLY', 'conflict'],
      ['EGD_NFT_APPLY', 'missing'],
      ['EGD_NFT_APPLY', 'refused'],
    ]);
    for (const r of out.results.slice(3)) {
      const refused = failed(r);
      expect(refused.code).toBe('EGD_NFT_APPLY');
      expect(refused.reason).toBeNull();
      expect(refused.message).toContain('may touch only table inet egd (nothing was sent to nft)');
    }
    expect(snapshot(ns, ['table', 'inet', 'egd'])).toBe(before);
    expect(nft(ns, ['list', 'tables'])).toBe('table ip foreign\ntable inet egd\n');
    expectForeignUntouched();
  });

  it('adds and deletes set elements with timeouts, in batches, and lists them back', async () => {
    const batch = Array.from({ length: 1000 }, (_, i) => `2001:db8:1::${(i + 1).toString(16)}`);
    const out = await drive(
      ns,
      script([
        op('addElements', ref('dns4'), ['192.0.2.10', '192.0.2.11', { key: '192.0.2.12', timeout: 600 }], {
          timeout: 300,
        }),
        op('addElements', ref('dns6'), batch, { timeout: 120 }),
        op('addElements', ref('nets'), [{ prefix: { addr: '203.0.113.0', len: 25 } }, '192.0.2.200']),
        op('deleteElements', ref('dns4'), ['192.0.2.11']),
        op('deleteElements', ref('dns4'), ['192.0.2.99']),
        op('deleteElements', ref('dns6'), batch.slice(0, 500)),
        op('listSet', ref('dns4')),
        op('addElements', ref('dns4'), ['192.0.2.13'], { timeout: 0 }),
      ]),
    );
    for (const i of [0, 1, 2, 3, 5]) ok(out.results[i]);
    expect(failed(out.results[4]).message).toContain('delete element inet egd dns4');
    expect(failed(out.results[7]).message).toContain('whole number of seconds');

    const dns4 = listedElems(nftJson(ns, ['list', 'set', 'inet', 'egd', 'dns4'])) as {
      elem: { val: string; timeout: number; expires: number };
    }[];
    expect(dns4.map((e) => [e.elem.val, e.elem.timeout])).toEqual([
      ['192.0.2.10', 300],
      ['192.0.2.12', 600],
    ]);
    for (const e of dns4) {
      expect(e.elem.expires).toBeGreaterThan(e.elem.timeout - 30);
      expect(e.elem.expires).toBeLessThanOrEqual(e.elem.timeout);
    }
    const listed = ok(out.results[6]) as NftSetInfo;
    expect(listed.name).toBe('dns4');
    expect(listed.flags).toEqual(['timeout']);
    expect(listed.elem).toHaveLength(2);

    const dns6 = listedElems(nftJson(ns, ['list', 'set', 'inet', 'egd', 'dns6'])) as { elem: { val: string } }[];
    expect(dns6).toHaveLength(500);
    expect(dns6.map((e) => e.elem.val).sort()).toEqual(batch.slice(500).sort());

    expect(listedElems(nftJson(ns, ['list', 'set', 'inet', 'egd', 'nets']))).toEqual([
      '192.0.2.200',
      { prefix: { addr: '198.51.100.0', len: 24 } },
      { prefix: { addr: '203.0.113.0', len: 25 } },
    ]);
    expectForeignUntouched();
  });

  it('adds and deletes map elements whose data are verdicts', async () => {
    const out = await drive(
      ns,
      script([
        op('addElements', ref('decide'), [
          { key: '192.0.2.20', data: verdict.jump('allow_web') },
          { key: '192.0.2.21', data: verdict.goto('deny_log'), timeout: 60 },
          { key: '192.0.2.22', data: verdict.drop() },
          { key: '192.0.2.23', data: verdict.accept() },
        ]),
        op('deleteElements', ref('decide'), ['192.0.2.22', { key: '192.0.2.23', data: verdict.accept() }]),
        op('listMap', ref('decide')),
        op('listSet', ref('decide')),
        op('addElements', ref('decide'), [{ key: '192.0.2.24', data: verdict.jump('no_such_chain') }]),
      ]),
    );
    ok(out.results[0]);
    ok(out.results[1]);
    const expected = [
      ['192.0.2.20', { jump: { target: 'allow_web' } }],
      [{ elem: { val: '192.0.2.21', timeout: 60, expires: expect.any(Number) as number } }, { goto: { target: 'deny_log' } }],
    ];
    expect(listedElems(nftJson(ns, ['list', 'map', 'inet', 'egd', 'decide']))).toEqual(expected);
    expect((ok(out.results[2]) as NftSetInfo).elem).toEqual(expected);
    // A map is not a set: asking for it as one finds nothing.
    expect(ok(out.results[3])).toBeNull();
    expect(failed(out.results[4]).code).toBe('EGD_NFT_APPLY');
    expectForeignUntouched();
  });

  it('lists names cheaply, keeps the event loop turning during a big text transaction, and never overlaps calls', async () => {
    const egdBig: TableRef = { family: 'inet', name: 'egd_big' };
    const big = Array.from({ length: 20_000 }, (_, i) => ({ prefix: { addr: `10.${i >> 8}.${i & 255}.0`, len: 25 } }));
    const table: Ruleset = {
      table: egdBig,
      sets: [{ name: 'nets', key: 'ipv4_addr', flags: ['interval'], elements: big }],
      chains: [{ name: 'c', rules: [rule([match.daddr(4, 'nets'), verdict.drop()])] }],
    };
    const later: Ruleset = { table: egdBig, sets: [{ name: 'later', key: 'ipv4_addr', flags: [], elements: [] }], chains: [] };
    const out = await drive(
      ns,
      script(
        [
          op('listNames', 'inet', 'egd_big'),
          op('runCountingTurns', { commands: [command.block(table)] }),
          op('listNames', 'inet', 'egd_big'),
          op('runThenListNames', { commands: [command.block(later)] }, 'inet', 'egd_big'),
          op('run', { commands: [command.deleteTable(egdBig)] }),
        ],
        egdBig,
      ),
    );
    expect(ok(out.results[0])).toBeNull();
    const turns = ok(out.results[1]) as number;
    // The binary backend waits on a child process; the in-process one on a worker thread.
    expect(turns).toBeGreaterThan(0);
    const names = ok(out.results[2]) as { chains: { name: string }[]; sets: { name: string }[]; maps: unknown[] };
    expect(names.chains.map((c) => c.name)).toEqual(['c']);
    expect(names.sets.map((x) => x.name)).toEqual(['nets']);
    // Asked for before the transaction finished, answered after it.
    const after = ok(out.results[3]) as typeof names;
    expect(after.sets.map((x) => x.name).sort()).toEqual(['later', 'nets']);
    ok(out.results[4]);
    expectForeignUntouched();
  });

  it('answers clearly for things that are not there', async () => {
    const out = await drive(
      ns,
      script(
        [
          op('listTable', 'inet', 'nope'),
          op('listSet', ref('dns4', 'nope')),
          op('listSet', ref('nope')),
          op('listMap', ref('nope')),
          op('tableExists', 'inet', 'egd'),
          op('tableExists', 'inet', 'nope'),
          op('tableExists', 'ip', 'egd'),
          op('deleteTable'),
          op('listTables'),
          op('run', { json: [{ list: { tables: null } }] }),
        ],
        { family: 'inet', name: 'nope' },
      ),
    );
    expect(out.results.slice(0, 4).map(ok)).toEqual([null, null, null, null]);
    expect(out.results.slice(4, 7).map(ok)).toEqual([true, false, false]);
    expect(ok(out.results[7])).toBeNull();
    expect((ok(out.results[8]) as { name: string }[]).map((t) => t.name)).toEqual(['foreign', 'egd']);
    const raw = ok(out.results[9]) as { json: { nftables: Record<string, unknown>[] }; warnings: string[] };
    expect(raw.json.nftables[0]).toHaveProperty('metainfo');
    expect(raw.warnings).toEqual([]);
    expect(nft(ns, ['list', 'tables'])).toBe('table ip foreign\ntable inet egd\n');
  });

  it('loads a typeof socket cgroupv2 map as text and adds a cgroup element as JSON', async () => {
    const cgroup = `${ns}-app`;
    const egdcg: TableRef = { family: 'inet', name: 'egdcg' };
    const table: Ruleset = {
      table: egdcg,
      sets: [{ name: 'apps', key: { cgroupLevel: 1 }, map: 'verdict', flags: [], elements: [], verdicts: [] }],
      chains: [
        { name: 'app_x', rules: [rule([stmt.counter(), verdict.accept()])] },
        { name: 'out', hook, rules: [rule([dispatch.cgroup(1, 'apps')])] },
      ],
    };
    const dir = mkdtempSync(join(tmpdir(), 'egd-nft-cg-'));
    try {
      const apps = ref('apps', 'egdcg');
      writeFileSync(
        join(dir, 'script.json'),
        JSON.stringify(
          script(
            [
              op('replaceTable', table),
              op('addElements', apps, [{ key: cgroup, data: verdict.jump('app_x') }]),
              op('listMap', apps),
              op('addElements', apps, [{ key: `${cgroup}-missing`, data: verdict.drop() }]),
              // As text, the way apply's prepare writes map elements: nft echoes the refused
              // line, and a path a user named to look like another reason must not pass for it.
              op('run', {
                commands: [
                  command.block({ ...table, sets: [{ ...table.sets[0]!, elements: [`${cgroup}-gone File exists`], verdicts: [verdict.drop()] }], chains: [] }),
                ],
              }),
            ],
            egdcg,
          ),
        ),
      );
      const net = `--net=/run/netns/${ns}`;
      // A private mount namespace with cgroup2 at /sys/fs/cgroup, as on a
      // systemd host; the cgroup is removed however the script ends.
      const shell = [
        'set -e',
        'mount -t cgroup2 none /sys/fs/cgroup',
        `mkdir /sys/fs/cgroup/${cgroup}`,
        `trap 'rmdir /sys/fs/cgroup/${cgroup}' EXIT`,
        `nsenter ${net} ${driverCommand().map(shellQuote).join(' ')} < ${shellQuote(join(dir, 'script.json'))} > ${shellQuote(join(dir, 'driver.json'))}`,
        `nsenter ${net} nft -j list map inet egdcg apps > ${shellQuote(join(dir, 'map.json'))}`,
        `nsenter ${net} nft list table inet egdcg > ${shellQuote(join(dir, 'table.nft'))}`,
      ].join('\n');
      execFileSync('unshare', ['-m', '--propagation', 'private', 'sh', '-c', shell], { stdio: 'pipe' });

      const out = JSON.parse(readFileSync(join(dir, 'driver.json'), 'utf8')) as DriverOutput;
      ok(out.results[0]);
      ok(out.results[1]);
      const expected = [[cgroup, { jump: { target: 'app_x' } }]];
      expect((ok(out.results[2]) as NftSetInfo).elem).toEqual(expected);
      // nft resolves the path when the element is added: a missing cgroup is refused.
      expect(failed(out.results[3]).code).toBe('EGD_NFT_APPLY');
      expect(failed(out.results[3]).reason).toBe('missing');
      expect(failed(out.results[4]).message).toContain('File exists');
      expect(failed(out.results[4]).reason).toBe('missing');

      const listed = JSON.parse(readFileSync(join(dir, 'map.json'), 'utf8')) as { nftables: Record<string, unknown>[] };
      expect(listedElems(listed)).toEqual(expected);
      expect(readFileSync(join(dir, 'table.nft'), 'utf8')).toContain('socket cgroupv2 level 1 vmap @apps');
    } finally {
      rmSync(dir, { recursive: true, force: true });
      deleteTableIfPresent(ns, 'inet', 'egdcg');
    }
    expectForeignUntouched();
  });

  it('says to install netbase when nft cannot resolve a protocol name, and changes nothing', async () => {
    const egdproto: TableRef = { family: 'inet', name: 'egdproto' };
    const table: Ruleset = { table: egdproto, sets: [], chains: [{ name: 'out', hook, rules: [rule([match.l4proto('ipv6-icmp'), verdict.accept()])] }] };
    const dir = mkdtempSync(join(tmpdir(), 'egd-nft-proto-'));
    try {
      writeFileSync(join(dir, 'script.json'), JSON.stringify(script([op('replaceTable', table)], egdproto)));
      writeFileSync(join(dir, 'protocols'), '');
      // /etc/protocols emptied in a private mount namespace, as on a machine without netbase.
      const shell = [
        'set -e',
        `mount --bind ${shellQuote(join(dir, 'protocols'))} /etc/protocols`,
        `nsenter --net=/run/netns/${ns} ${driverCommand().map(shellQuote).join(' ')} < ${shellQuote(join(dir, 'script.json'))} > ${shellQuote(join(dir, 'driver.json'))}`,
      ].join('\n');
      execFileSync('unshare', ['-m', '--propagation', 'private', 'sh', '-c', shell], { stdio: 'pipe' });

      const refused = failed((JSON.parse(readFileSync(join(dir, 'driver.json'), 'utf8')) as DriverOutput).results[0]);
      expect(refused.code).toBe('EGD_NFT_APPLY');
      expect(refused.message).toContain('Could not resolve protocol name');
      expect(refused.reason).toBe('refused');
      expect(refused.message).toContain('Debian package netbase');
      expect(nft(ns, ['list', 'tables'])).not.toContain('egdproto');

      // The same table with /etc/protocols in place loads: the file was the cause.
      ok((await drive(ns, script([op('replaceTable', table)], egdproto))).results[0]);
      expect(nft(ns, ['list', 'table', 'inet', 'egdproto'])).toContain('meta l4proto ipv6-icmp accept');
    } finally {
      rmSync(dir, { recursive: true, force: true });
      deleteTableIfPresent(ns, 'inet', 'egdproto');
    }
    expectForeignUntouched();
  });

  it('adds one element to a 50,000-element hash set with a fresh context every time, also after a listing', async () => {
    const size = 50_000;
    const big = Array.from({ length: size }, (_, i) => `2001:db8:2::${(i + 1).toString(16)}`);
    const egdbig: TableRef = { family: 'inet', name: 'egdbig' };
    const table: Ruleset = { table: egdbig, sets: [{ name: 'big6', key: 'ipv6_addr', flags: ['timeout'], elements: big }], chains: [] };
    const added = Array.from({ length: 5 }, (_, i) => `2001:db8:3::${i + 1}`);
    const adds = added.map((address) => op('addElements', ref('big6', 'egdbig'), [address], { timeout: 60 }));
    // The listing first fills the set's elements into that process's view: a context reused after
    // it refetches them for every later add (≈ 30–50 ms at 50,000, against ≈ 0.3 ms fresh; the
    // times are bench/nft-elements.ts's). Here the real library is counted instead: each add
    // makes its own nft_ctx and frees it. The binary starts a new nft per call by construction.
    const out = await drive(ns, {
      ...script([op('replaceTable', table), op('listSet', ref('big6', 'egdbig')), ...adds], egdbig),
      countContexts: backend === 'libnftables',
    });
    ok(out.results[0]);
    expect((ok(out.results[1]) as NftSetInfo).elem).toHaveLength(size);
    for (const result of out.results.slice(1)) {
      ok(result);
      if (backend === 'libnftables') expect(result.contexts).toEqual({ made: 1, freed: 1 });
    }
    const listed = listedElems(nftJson(ns, ['list', 'set', 'inet', 'egdbig', 'big6'])) as ({ elem: { val: string; timeout: number } } | string)[];
    expect(listed.filter((e) => typeof e === 'object' && added.includes(e.elem.val) && e.elem.timeout === 60)).toHaveLength(added.length);
    expect(listedElems(nftJson(ns, ['list', 'set', 'inet', 'egdbig', 'big6']))).toHaveLength(size + 5);
    nft(ns, ['delete', 'table', 'inet', 'egdbig']);
    expectForeignUntouched();
  });
});
