import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseLogPrefix } from '../../src/compile/log-prefix.js';
import { readRuleTable } from '../../src/state/rule-table.js';
import { readSwitches, SWITCHES_FILE } from '../../src/state/switches.js';
import { nftAvailable } from '../support/nft-check.js';
import { deleteNamedNetns } from '../../src/lab/sys.js';
import { policyDir } from '../support/policy-dir.js';

/**
 * What apply leaves in the state directory beside last-good.nft — the short
 * rule id table (rules.json) and the switch record (switches.json) — read
 * back by processes that did not write them, against a real table.
 */
const ROOT = join(import.meta.dirname, '..', '..');
const skip = nftAvailable();
const ns = `egd-st-${randomBytes(3).toString('hex')}`;
const states: string[] = [];
const newState = () => {
  const dir = mkdtempSync(join(tmpdir(), 'egd-state-'));
  states.push(dir);
  return dir;
};

const inNs = (command: string, ...args: string[]) => spawnSync('nsenter', [`--net=/run/netns/${ns}`, command, ...args], { encoding: 'utf8', timeout: 60_000 });
const egressctl = (state: string, ...args: string[]): SpawnSyncReturns<string> =>
  spawnSync('nsenter', [`--net=/run/netns/${ns}`, process.execPath, '--import', 'tsx', join(ROOT, 'src/cli/main.ts'), ...args], {
    encoding: 'utf8',
    env: { ...process.env, EGRESSD_STATE_DIR: state },
    timeout: 60_000,
  });

function apply(state: string, dir: string, ...flags: string[]): { lockdown: boolean; liveFrom: string } {
  const run = egressctl(state, 'apply', dir, '--json', ...flags);
  expect(run.status, run.stderr).toBe(0);
  return JSON.parse(run.stdout) as { lockdown: boolean; liveFrom: string };
}

/** The log prefixes of the live table, read from the kernel, by the rule comment they sit in. */
function livePrefixes(): { prefix: string; comment: string }[] {
  const listing = inNs('nft', '-j', 'list', 'table', 'inet', 'egressd');
  expect(listing.status, listing.stderr).toBe(0);
  const items = (JSON.parse(listing.stdout) as { nftables: Record<string, { expr?: Record<string, { prefix?: string }>[]; comment?: string }>[] }).nftables;
  return items.flatMap((item) => {
    const r = item['rule'];
    const log = r?.expr?.find((e) => 'log' in e)?.['log'];
    return log?.prefix ? [{ prefix: log.prefix, comment: r!.comment ?? '' }] : [];
  });
}

/** Where a short id's rule is, for a reader with nothing but the state directory. */
function lookUp(state: string, prefix: string) {
  const table = readRuleTable(state);
  if (table.state !== 'ok') throw new Error(`rules.json: ${JSON.stringify(table)}`);
  const id = parseLogPrefix(prefix);
  expect(id, prefix).toBeDefined();
  return table.value.byId.get(id!);
}

const POLICY = `defaults: {egress: deny}
apps:
  web:
    identity: {user: root}
    rules:
      - deny: [198.51.100.0/24]
deny:
  - to: [203.0.113.0/24]
`;
// Rules written above both: each keeps its short id, while its position id and line move.
const INSERTED = POLICY.replace('    rules:\n', '    rules:\n      - deny: [192.0.2.0/24]\n').replace(
  'deny:\n  - to:',
  'deny:\n  - to: [192.0.2.128/25]\n  - to:',
);

describe.skipIf(skip)(`the state directory, against a table in a namespace ${skip ? `(skipped: ${skip})` : ''}`, () => {
  beforeAll(() => {
    spawnSync('ip', ['netns', 'add', ns]);
    // A route out, so that packets reach the output hook and the denying rules count them.
    for (const args of [
      ['link', 'add', 'v0', 'type', 'veth', 'peer', 'name', 'v1'],
      ['link', 'set', 'v0', 'up'],
      ['link', 'set', 'v1', 'up'],
      ['addr', 'add', '192.0.2.1/24', 'dev', 'v0'],
      ['route', 'add', 'default', 'dev', 'v0'],
    ]) {
      const done = inNs('ip', ...args);
      expect(done.status, done.stderr).toBe(0);
    }
  });
  afterAll(() => {
    deleteNamedNetns(ns);
    for (const dir of states) rmSync(dir, { recursive: true, force: true });
  });

  it('every live log prefix maps back to its rule through rules.json, after a re-apply that moved the rules, in a process that did not apply', () => {
    const state = newState();
    apply(state, policyDir({ '00.yaml': POLICY }));
    const first = new Map(livePrefixes().map(({ prefix }) => [prefix, lookUp(state, prefix)]));
    expect([...first.values()].map((e) => e?.ruleId).sort()).toEqual([
      'app/web/0',
      'app/web/default',
      'default',
      'deny/00.yaml/0',
      'dns/exclusive',
      'routing-header',
    ]);
    const denyPrefix = [...first].find(([, e]) => e?.ruleId === 'deny/00.yaml/0')![0];
    expect(first.get(denyPrefix)).toMatchObject({ kind: 'global-deny', verdict: 'deny', file: '00.yaml', line: 8 });

    apply(state, policyDir({ '00.yaml': INSERTED }));
    const second = new Map(livePrefixes().map(({ prefix }) => [prefix, lookUp(state, prefix)]));
    // The same prefix in the kernel, now for the second deny rule, one line further down.
    expect(second.get(denyPrefix)).toMatchObject({ ruleId: 'deny/00.yaml/1', file: '00.yaml', line: 10 });
    const webDeny = [...first].find(([, e]) => e?.ruleId === 'app/web/0')![0];
    expect(second.get(webDeny)).toMatchObject({ ruleId: 'app/web/1', app: 'web' });
    expect(second.size).toBe(first.size + 2);
    // Only whole files in the state directory: no temporary file is left by an apply.
    expect(readdirSync(state).sort()).toEqual(['applied.json', 'last-good-boot.nft', 'last-good.json', 'last-good.nft', 'rules.json', 'switches.json']);
  });

  it('status names the rule that dropped, by short id and file:line', () => {
    const state = newState();
    const dir = policyDir({ '00.yaml': POLICY });
    apply(state, dir);
    const sent = inNs(process.execPath, '-e', "const s=require('dgram').createSocket('udp4');s.send('x',9,'203.0.113.9',()=>s.close())");
    expect(sent.status, sent.stderr).toBe(0);
    const status = egressctl(state, 'status', dir, '--json');
    const report = JSON.parse(status.stdout) as { dropped: { id: string; shortId: string; at: string; packets: number }[] };
    const denyPrefix = livePrefixes().find(({ comment }) => comment.includes('deny/00.yaml/0'))!.prefix;
    expect(report.dropped).toEqual([{ id: 'deny/00.yaml/0', shortId: parseLogPrefix(denyPrefix), at: '00.yaml:8', packets: 1, bytes: expect.any(Number) }]);
    expect(status.stderr).toContain(`dropped by ${parseLogPrefix(denyPrefix)} deny/00.yaml/0 (00.yaml:8): 1 packet`);
  });

  it('the switch record follows lockdown; status reports it and says when it disagrees with the table, which stays in force', () => {
    const state = newState();
    const dir = policyDir({ '00.yaml': POLICY });
    apply(state, dir);
    const off = readSwitches(state);
    expect(off).toMatchObject({ state: 'ok', value: { lockdown: { on: false }, torUpdates: { on: false } } });
    expect(egressctl(state, 'lockdown', 'on', dir).status).toBe(0);
    const on = readSwitches(state);
    if (on.state !== 'ok' || off.state !== 'ok') throw new Error('no switch record');
    expect(on.value.lockdown.on).toBe(true);
    expect(on.value.torUpdates).toEqual(off.value.torUpdates);
    expect(Date.parse(on.value.lockdown.since)).toBeGreaterThanOrEqual(Date.parse(off.value.lockdown.since));
    expect(on.value.apply).not.toBe(off.value.apply);
    const agreeing = JSON.parse(egressctl(state, 'status', dir, '--json').stdout) as { switches: unknown };
    expect(agreeing.switches).toEqual({
      recorded: { lockdown: true, lockdownSince: on.value.lockdown.since, torUpdates: false, torUpdatesSince: on.value.torUpdates.since },
      problem: null,
      disagree: [],
    });

    // A record that says otherwise (changed by hand): reported, and the table's lockdown stands through an apply.
    writeFileSync(join(state, SWITCHES_FILE), readFileSync(join(state, SWITCHES_FILE), 'utf8').replace('"on": true', '"on": false'));
    const disagreeing = egressctl(state, 'status', dir, '--json');
    expect((JSON.parse(disagreeing.stdout) as { switches: { disagree: unknown } }).switches.disagree).toEqual([
      { switch: 'lockdown', recorded: false, live: true },
    ]);
    expect(disagreeing.stderr).toContain('the switch record says lockdown off, but the live table has it on: the table is what is enforced');
    const fixture = join(import.meta.dirname, 'fixtures', 'apply-audited.ts');
    const run = spawnSync('nsenter', [`--net=/run/netns/${ns}`, process.execPath, '--import', 'tsx', fixture, dir, state], {
      encoding: 'utf8',
      timeout: 60_000,
    });
    expect(run.status, run.stderr).toBe(0);
    const reapplied = JSON.parse(run.stdout) as { lockdown: boolean; liveFrom: string; audits: { event: string; fields: unknown }[] };
    expect(reapplied).toMatchObject({ liveFrom: 'record', lockdown: true });
    expect(reapplied.audits.map((a) => a.event)).toEqual(['the switch record disagrees with the live table; the table decides', 'applied (lockdown on)']);
    expect(reapplied.audits[0]!.fields).toEqual({ lockdown: true, recorded: false });
    expect(readSwitches(state)).toMatchObject({ state: 'ok', value: { lockdown: { on: true } } });

    // A damaged record is said to be damaged.
    writeFileSync(join(state, SWITCHES_FILE), '{"version": 1, "lockdown": ');
    const damaged = egressctl(state, 'status', dir, '--json');
    expect((JSON.parse(damaged.stdout) as { switches: { problem: string } }).switches.problem).toMatch(/switches\.json is not JSON/);
    expect(damaged.stderr).toMatch(/the switch record \(switches\.json\) is damaged and was not used/);
    expect(egressctl(state, 'lockdown', 'off', dir).status).toBe(0);
    expect(readSwitches(state)).toMatchObject({ state: 'ok', value: { lockdown: { on: false } } });
  });
});
