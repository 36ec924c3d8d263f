import type { ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { DenialCounters } from '../../src/denials/reader.js';
import type { DenialRecord } from '../../src/denials/record.js';
import { readRuleTable } from '../../src/state/rule-table.js';
import { createTestNet, ensureTestUsers, harnessUnavailableReason, type TestNet, type TestUsers } from '../harness/index.js';
import { policyDir } from '../support/policy-dir.js';
import { until } from '../support/wait.js';

/**
 * The denial reader against real denied traffic: a table applied by
 * egressctl in the harness's host namespace logs to NFLOG, the reader (in
 * that namespace, test/denials/reader-agent.ts) reads the group and prints
 * its records. What it records is compared with what was sent and with
 * rules.json; a flood shows that every packet is either in a record's count
 * or counted as lost, and that one uid's flood leaves another's denials on
 * the same rule logged (the per-rule-and-identity log limit).
 */
const ROOT = join(import.meta.dirname, '..', '..');
const CLI = join(ROOT, 'src/cli/main.ts');
const AGENT = join(import.meta.dirname, 'reader-agent.ts');
const FLOOD = join(import.meta.dirname, 'flood.cjs');
const GROUP = 7761;
const unavailable = harnessUnavailableReason();

const RECORD_FIELDS = [
  'firstSeen',
  'lastSeen',
  'count',
  'shortId',
  'ruleId',
  'kind',
  'file',
  'line',
  'app',
  'domain',
  'uid',
  'gid',
  'protocol',
  'family',
  'address',
  'port',
  'name',
  'nameAskedBy',
].sort();

interface Agent {
  readonly child: ChildProcess;
  readonly records: DenialRecord[];
  counters(): Promise<{ counters: DenialCounters; open: number; rss: number }>;
  stop(): Promise<void>;
}

let net: TestNet;
let users: TestUsers;
let state: string;
let dir: string;

function policy(rate: string, burst: number, moreApps = ''): string {
  return `
defaults: {egress: allow, log: {denials: true, group: ${GROUP}, rate: ${rate}, burst: ${burst}}}
deny:
  - to: [203.0.113.0/24, "2001:db8:1::/64"]
    why: the test's global deny
apps:
  one:
    identity: {user: ${users.app1.name}}
    default: deny
    rules:
      - deny: [198.51.100.3]
        proto: udp
        ports: [9999]
${moreApps}`;
}

async function apply(text: string): Promise<void> {
  if (dir) rmSync(dir, { recursive: true, force: true });
  dir = policyDir({ '00.yaml': text }, { keep: true });
  const applied = await net.host.node(CLI, ['apply', dir], { env: { ...process.env, EGRESSD_STATE_DIR: state } });
  if (applied.code !== 0) throw new Error(`apply failed: ${applied.stderr}`);
}

async function startAgent(
  names: Record<string, string> = {},
  options: { windowMs?: number; maxOpen?: number; receiveBufferBytes?: number } = {},
): Promise<Agent> {
  const child = net.host.spawn(
    process.execPath,
    [
      '--import',
      'tsx',
      AGENT,
      String(GROUP),
      JSON.stringify(names),
      String(options.windowMs ?? 1000),
      String(options.maxOpen ?? 10_000),
      String(options.receiveBufferBytes ?? 8 * 1024 * 1024),
    ],
    { env: { ...process.env, EGRESSD_STATE_DIR: state, EGRESSD_POLICY_DIR: dir } },
  );
  const records: DenialRecord[] = [];
  const waiting: ((value: { counters: DenialCounters; open: number; rss: number }) => void)[] = [];
  let ready!: () => void;
  const isReady = new Promise<void>((resolve) => (ready = resolve));
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  let buffered = '';
  child.stdout!.on('data', (d: Buffer) => {
    buffered += d.toString();
    for (let at = buffered.indexOf('\n'); at >= 0; at = buffered.indexOf('\n')) {
      const line = JSON.parse(buffered.slice(0, at)) as { record?: DenialRecord; ready?: number; counters?: DenialCounters; open?: number; rss?: number };
      buffered = buffered.slice(at + 1);
      if (line.record) records.push(line.record);
      if (line.ready !== undefined) ready();
      if (line.counters) waiting.shift()?.({ counters: line.counters, open: line.open!, rss: line.rss! });
    }
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  await Promise.race([isReady, exited.then(() => Promise.reject(new Error(`the reader exited before binding: ${stderr}`)))]);
  return {
    child,
    records,
    counters: () =>
      new Promise((resolve) => {
        waiting.push(resolve);
        child.stdin!.write('counters\n');
      }),
    async stop() {
      child.stdin!.end();
      await exited;
    },
  };
}

async function flood(addresses: readonly string[], ports: number, ms: number, max: number, user: string, cgroup?: string): Promise<number> {
  const result = await net.host.exec(process.execPath, [FLOOD, addresses.join(','), '40000', String(ports), String(ms), String(max)], {
    user,
    ...(cgroup !== undefined && { cgroup }),
    timeoutMs: ms + 20_000,
  });
  const line = result.stdout.trim().split('\n').pop() ?? '';
  if (!line.startsWith('{')) throw new Error(`the flood printed nothing: ${result.stderr}`);
  return (JSON.parse(line) as { sent: number }).sent;
}

/** A flood of `sent` packets over `seconds` under a 10/s, burst 20 log limit was logged at its own rate beside `others` events, and nothing was lost. */
async function expectThinned(agent: Agent, others: number, sent: number, seconds: number): Promise<void> {
  const { counters } = await agent.counters();
  const flooded = counters.events - others;
  expect(sent).toBeGreaterThan(10_000);
  expect(flooded).toBeGreaterThanOrEqual(20);
  expect(flooded).toBeLessThanOrEqual(20 + Math.ceil(10 * seconds) + 2);
  expect(counters.lost).toBe(0);
}

const sum = (records: readonly DenialRecord[]) => records.reduce((n, r) => n + r.count, 0);

describe.skipIf(unavailable)(`the denial reader against real denied traffic ${unavailable ? `(skipped: ${unavailable})` : ''}`, () => {
  beforeAll(async () => {
    users = ensureTestUsers();
    net = await createTestNet();
    state = mkdtempSync(join(tmpdir(), 'egd-denials-state-'));
    await apply(policy('1000/second', 1000));
  }, 60_000);
  afterAll(async () => {
    await net?.destroy();
    if (state) rmSync(state, { recursive: true, force: true });
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('records a denied v4 and v6 datagram, a TCP connect and an app default deny with their rule, uid, protocol, address, port and name, and nothing else', async () => {
    const table = readRuleTable(state);
    if (table.state !== 'ok') throw new Error(`rules.json: ${table.state}`);
    const byRule = new Map(table.value.rules.map((r) => [r.ruleId, r]));
    const global = byRule.get('deny/00.yaml/0')!;
    const appDefault = [...byRule.values()].find((r) => r.app === 'one' && r.kind === 'app-default')!;
    expect(global, 'the global deny in rules.json').toBeDefined();
    expect(appDefault, "app one's default in rules.json").toBeDefined();

    const agent = await startAgent({ '203.0.113.7': 'tracker.example.test' });
    try {
      const { app2, app3, app1 } = users;
      await net.host.connect({ proto: 'udp', addr: '203.0.113.7', port: 5353, user: app2.name, timeoutMs: 300 });
      await net.host.connect({ proto: 'udp', addr: '2001:db8:1::9', port: 443, user: app3.name, timeoutMs: 300 });
      await net.host.connect({ proto: 'tcp', addr: '203.0.113.8', port: 8443, user: app2.name, timeoutMs: 300 });
      await net.host.connect({ proto: 'tcp', addr: '198.51.100.1', port: 80, user: app1.name, timeoutMs: 300 });
      await until('four records', () => new Set(agent.records.map((r) => r.address)).size >= 4, { timeoutMs: 10_000 });
      const of = (address: string) => agent.records.find((r) => r.address === address)!;

      for (const record of agent.records)
        expect(
          Object.keys(record).every((k) => RECORD_FIELDS.includes(k)),
          JSON.stringify(record),
        ).toBe(true);

      expect(of('203.0.113.7')).toMatchObject({
        count: 1,
        shortId: global.id,
        ruleId: 'deny/00.yaml/0',
        kind: global.kind,
        file: '00.yaml',
        line: global.line,
        uid: app2.uid,
        gid: app2.gid,
        protocol: 'udp',
        family: 4,
        port: 5353,
        name: 'tracker.example.test',
      });
      expect(of('2001:db8:1::9')).toMatchObject({
        shortId: global.id,
        ruleId: 'deny/00.yaml/0',
        uid: app3.uid,
        gid: app3.gid,
        protocol: 'udp',
        family: 6,
        port: 443,
      });
      expect(of('2001:db8:1::9').name).toBeUndefined();
      expect(of('203.0.113.8')).toMatchObject({ shortId: global.id, uid: app2.uid, protocol: 'tcp', family: 4, port: 8443 });
      expect(of('198.51.100.1')).toMatchObject({ shortId: appDefault.id, ruleId: appDefault.ruleId, app: 'one', uid: app1.uid, protocol: 'tcp', port: 80 });
      expect(typeof of('198.51.100.1').line).toBe('number');
      const { counters } = await agent.counters();
      expect(counters).toMatchObject({ lost: 0, enobufs: 0, sequenceGaps: 0, unparsed: 0 });
      // TCP retries its SYN inside the 300 ms: every packet read is in a record or an aggregate still open.
      expect(counters.events).toBeGreaterThanOrEqual(4);
    } finally {
      await agent.stop();
    }
  }, 60_000);

  it('a flood to many destinations is read and aggregated: the counts add up to the packets read, the open aggregates stay bounded', async () => {
    const agent = await startAgent({}, { windowMs: 500, maxOpen: 200 });
    try {
      const addresses = ['203.0.113.21', '203.0.113.22', '2001:db8:1::21', '2001:db8:1::22'];
      let open = 0;
      let sampling = true;
      const sampler = (async () => {
        while (sampling) open = Math.max(open, (await agent.counters()).open);
      })();
      const sent = await flood(addresses, 500, 1500, 20_000, users.app2.name);
      sampling = false;
      await sampler;
      expect(sent).toBe(20_000);
      expect(open, 'aggregates open at once').toBeLessThanOrEqual(200);
      expect(open).toBeGreaterThan(0);
      await until(
        'every packet in a record',
        async () => sum(agent.records) === (await agent.counters()).counters.events && (await agent.counters()).open === 0,
        {
          timeoutMs: 15_000,
          everyMs: 200,
        },
      );
      const { counters } = await agent.counters();
      // The log limit (1000/s, burst 1000) thins the flood before NFLOG; everything it let through is read or counted lost.
      expect(counters.events + counters.lost).toBeGreaterThan(1000);
      expect(counters.events + counters.lost).toBeLessThanOrEqual(sent);
      expect(counters.unparsed).toBe(0);
      expect(sum(agent.records)).toBe(counters.events);
      expect(new Set(agent.records.map((r) => r.family))).toEqual(new Set([4, 6]));
      expect(agent.records.every((r) => r.uid === users.app2.uid && r.protocol === 'udp' && r.port! >= 40000 && r.port! < 40500)).toBe(true);
    } finally {
      await agent.stop();
    }
  }, 60_000);

  it("a flood from one uid does not silence another uid's denials on the same rule: the log limit is per rule and uid", async () => {
    await apply(policy('10/second', 20));
    const agent = await startAgent({}, { windowMs: 60_000 });
    const { app2, app3 } = users;
    try {
      const started = Date.now();
      const flooding = flood(['203.0.113.41'], 1, 4000, 10_000_000, app2.name);
      // The flood has spent its burst: from here on the rule's limit is all used, were it one for everyone.
      await until('the flood logged past its burst', async () => (await agent.counters()).counters.events >= 20, { timeoutMs: 10_000 });
      for (let i = 0; i < 5; i++) await net.host.connect({ proto: 'udp', addr: '203.0.113.42', port: 7000 + i, user: app3.name, timeoutMs: 100 });
      await until("the other uid's denials recorded", () => agent.records.filter((r) => r.uid === app3.uid).length === 5, { timeoutMs: 5000 });
      const sent = await flooding;
      const seconds = (Date.now() - started) / 1000;
      expect(agent.records.filter((r) => r.uid === app3.uid).map((r) => r.port)).toEqual([7000, 7001, 7002, 7003, 7004]);
      // The flood itself is still thinned to its own rate: its burst and 10/s.
      await expectThinned(agent, 5, sent, seconds);
    } finally {
      await agent.stop();
      await apply(policy('1000/second', 1000));
    }
  }, 60_000);

  it('a flood into a small receive buffer overflows it: ENOBUFS and the sequence gaps are counted, and read plus lost is every packet logged', async () => {
    await apply(policy('999999/second', 10000));
    const agent = await startAgent({}, { windowMs: 500, receiveBufferBytes: 128 * 1024 });
    try {
      const flooded = await flood(['203.0.113.31', '2001:db8:1::31'], 50, 3000, 60_000, users.app2.name);
      // A loss is counted when a later packet's sequence number shows it: one more, once the socket has room, shows a loss at the very end too.
      await until('the reader to catch up', async () => (await agent.counters()).counters.events > 0, { timeoutMs: 5000 });
      await net.host.connect({ proto: 'udp', addr: '203.0.113.32', port: 9, user: users.app2.name, timeoutMs: 100 });
      const sent = flooded + 1;
      await until(
        'every packet read or counted lost',
        async () => {
          const { counters } = await agent.counters();
          return counters.events + counters.lost === sent;
        },
        { timeoutMs: 15_000, everyMs: 200 },
      ).catch(() => undefined);
      const { counters } = await agent.counters();
      expect(counters.enobufs, JSON.stringify(counters)).toBeGreaterThan(0);
      expect(counters.sequenceGaps).toBeGreaterThan(0);
      expect(counters.lost).toBeGreaterThan(0);
      // The limit (999,999/s, above what one flooding process sends here) lets every packet to NFLOG: each was read or counted lost, none vanished.
      expect(counters.events + counters.lost).toBe(sent);
      await until('the aggregates closed', async () => (await agent.counters()).open === 0, { timeoutMs: 5000 });
      expect(sum(agent.records)).toBe(counters.events);
    } finally {
      await agent.stop();
      await apply(policy('1000/second', 1000));
    }
  }, 90_000);

  it("a global rule's denial of an app chosen by cgroup names that app, and one such app's flood leaves another's of the same user logged", async () => {
    // NFLOG carries the uid, not the cgroup: each app chosen by cgroup meets the global list in a copy of its own, with short ids (and log limits) of its own.
    const E = `egd-denials-${net.id}`;
    for (const app of ['browser', 'mail']) net.host.mkCgroup(`${E}/${app}`);
    await apply(
      policy(
        '10/second',
        20,
        `  browser: {identity: {cgroup: "${E}/browser"}}
  mail: {identity: {cgroup: "${E}/mail"}}
`,
      ),
    );
    const table = readRuleTable(state);
    if (table.state !== 'ok') throw new Error(`rules.json: ${table.state}`);
    const globalFor = (app: string | undefined) => table.value.rules.find((r) => r.ruleId === 'deny/00.yaml/0' && r.app === app)!;
    expect(new Set([globalFor(undefined).id, globalFor('browser').id, globalFor('mail').id]).size).toBe(3);

    const agent = await startAgent({}, { windowMs: 60_000 });
    const { app1, app2 } = users;
    try {
      const started = Date.now();
      const flooding = flood(['203.0.113.51'], 1, 4000, 10_000_000, app2.name, `${E}/browser`);
      await until('the flood logged past its burst', async () => (await agent.counters()).counters.events >= 20, { timeoutMs: 10_000 });
      // The same user's other app, the uid's own app, and a process of no app, on the same global rule.
      for (let i = 0; i < 5; i++)
        await net.host.connect({ proto: 'udp', addr: '203.0.113.52', port: 7000 + i, user: app2.name, cgroup: `${E}/mail`, timeoutMs: 100 });
      await net.host.connect({ proto: 'udp', addr: '203.0.113.53', port: 7100, user: app1.name, timeoutMs: 100 });
      await net.host.connect({ proto: 'udp', addr: '203.0.113.54', port: 7200, user: app2.name, timeoutMs: 100 });
      await until('the others recorded', () => agent.records.filter((r) => r.address !== '203.0.113.51').length === 7, { timeoutMs: 5000 });
      const sent = await flooding;
      const seconds = (Date.now() - started) / 1000;

      const to = (address: string) => agent.records.filter((r) => r.address === address);
      expect(to('203.0.113.52').map((r) => r.port)).toEqual([7000, 7001, 7002, 7003, 7004]);
      for (const record of to('203.0.113.52'))
        expect(record).toMatchObject({ app: 'mail', shortId: globalFor('mail').id, ruleId: 'deny/00.yaml/0', kind: 'global-deny', uid: app2.uid });
      expect(to('203.0.113.51').length).toBeGreaterThan(0);
      for (const record of to('203.0.113.51')) expect(record).toMatchObject({ app: 'browser', shortId: globalFor('browser').id, uid: app2.uid });
      expect(to('203.0.113.53')).toMatchObject([{ app: 'one', shortId: globalFor(undefined).id, uid: app1.uid }]);
      expect(to('203.0.113.54')).toMatchObject([{ shortId: globalFor(undefined).id, uid: app2.uid }]);
      expect(to('203.0.113.54')[0]!.app).toBeUndefined();
      // The browser's flood is still thinned to its own rate.
      await expectThinned(agent, 7, sent, seconds);
    } finally {
      await agent.stop();
      await apply(policy('1000/second', 1000));
    }
  }, 60_000);
});
