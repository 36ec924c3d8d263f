import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { compile } from '../../src/compile/compile.js';
import { readRecord, RECORD_FILE, recordText } from '../../src/enforce/record.js';
import { summarizeCompiled } from '../../src/enforce/summary.js';
import { namesAfterSwap, withGeneration } from '../../src/enforce/swap.js';
import { loadPolicyOrThrow } from '../../src/policy/load.js';
import { nftAvailable } from '../support/nft-check.js';
import { policyDir } from '../support/policy-dir.js';
import { deleteNamedNetns } from '../../src/lab/sys.js';

/**
 * apply knows the live table from the last apply's record (applied.json)
 * when the table's names are exactly the recorded ones, and reads the table
 * whole otherwise. The record must never be trusted for a table it does not
 * describe, and must give the same answers as reading the table would.
 */
const ROOT = join(import.meta.dirname, '..', '..');
const skip = nftAvailable();
const ns = `egd-rec-${randomBytes(3).toString('hex')}`;
const stateDirs: string[] = [];
const newState = () => {
  const dir = mkdtempSync(join(tmpdir(), 'egd-state-'));
  stateDirs.push(dir);
  return dir;
};

function egressctl(state: string, ...args: string[]): SpawnSyncReturns<string> {
  return spawnSync('nsenter', [`--net=/run/netns/${ns}`, process.execPath, '--import', 'tsx', join(ROOT, 'src/cli/main.ts'), ...args], {
    encoding: 'utf8',
    env: { ...process.env, EGRESSD_STATE_DIR: state },
    timeout: 60_000,
  });
}
const nft = (...args: string[]) => spawnSync('nsenter', [`--net=/run/netns/${ns}`, 'nft', ...args], { encoding: 'utf8' });

interface ApplyJson {
  liveFrom: string;
  liveNames: Record<string, string>;
  lockdown: boolean;
  plan: {
    changes: boolean;
    digest: { live?: string; compiled?: string };
    lockdown: { live: boolean };
    added: unknown[];
    removed: unknown[];
    sets: { name: string; change: string }[];
  };
}
function apply(state: string, dir: string): ApplyJson {
  const run = egressctl(state, 'apply', dir, '--json');
  expect(run.status, run.stderr).toBe(0);
  return JSON.parse(run.stdout) as ApplyJson;
}

// Every kind of object apply makes: interval sets, DNS timeout sets, uid and cgroup maps, log chains, app chains.
const POLICY = `defaults: {egress: allow}
deny:
  - to: [203.0.113.0/24, "2001:db8:dead::/48", tracker.example]
apps:
  rooty:
    identity: {user: root}
    default: deny
    rules:
      - allow: [198.51.100.7, "updates.example.org"]
        ports: [443]
  unit:
    identity: {unit: nothing-like-this.service}
    rules:
      - deny: [192.0.2.0/25]
`;
const CHANGED = POLICY.replace('198.51.100.7', '198.51.100.8').replace('ports: [443]', 'ports: [443, 8443]');

describe('the applied record, without the kernel', () => {
  it('round-trips, and a damaged or foreign file is not trusted', () => {
    const state = newState();
    const { policy } = loadPolicyOrThrow(policyDir({ '00.yaml': POLICY }));
    const { ruleset } = compile(policy, { users: new Map([['root', 0]]), groups: new Map(), cgroups: [] });
    const record = {
      generation: 'b' as const,
      names: namesAfterSwap(withGeneration(ruleset, 'b'), 'applied_0123456789abcdef.b'),
      summary: summarizeCompiled(ruleset),
    };
    writeFileSync(join(state, RECORD_FILE), recordText(record));
    const back = readRecord(state)!;
    expect(back.names).toEqual(record.names);
    expect(back.generation).toBe('b');
    expect([...back.summary.chains.keys()]).toEqual([...record.summary.chains.keys()]);
    expect([...back.summary.sets]).toEqual([...record.summary.sets]);
    expect(back.summary.digest).toBe(policy.digest.slice(0, 32));
    for (const bad of [
      '',
      '{',
      '[]',
      recordText(record).replace('"generation":"b"', '"generation":"c"'),
      recordText(record).replace('"version":1', '"version":2'),
      '\u0000'.repeat(10),
    ]) {
      writeFileSync(join(state, RECORD_FILE), bad);
      expect(readRecord(state), JSON.stringify(bad.slice(0, 40))).toBeUndefined();
    }
    rmSync(join(state, RECORD_FILE));
    expect(readRecord(state)).toBeUndefined();
  });
});

describe.skipIf(skip)(`apply and its record, in a namespace ${skip ? `(skipped: ${skip})` : ''}`, () => {
  beforeAll(() => {
    spawnSync('ip', ['netns', 'add', ns]);
  });
  afterAll(() => {
    deleteNamedNetns(ns);
    for (const dir of stateDirs) rmSync(dir, { recursive: true, force: true });
  });

  it('after its own apply, apply trusts the record, and reports what reading the table whole reports', () => {
    const state = newState();
    const dir = policyDir({ '00.yaml': POLICY });
    const changed = policyDir({ '00.yaml': CHANGED });
    expect(apply(state, dir).liveFrom).not.toBe('record');
    // The record's names are the kernel's: the next apply does not read the table.
    const again = apply(state, dir);
    expect(again.liveFrom).toBe('record');
    expect(again.plan.changes).toBe(false);
    // `plan` always reads the table whole; apply from the record must say the same.
    const planned = egressctl(state, 'plan', changed, '--json');
    expect(planned.status).toBe(1);
    const fromTable = JSON.parse(planned.stdout) as ApplyJson['plan'];
    const fromRecord = apply(state, changed);
    expect(fromRecord.liveFrom).toBe('record');
    expect(fromRecord.plan.added).toEqual(fromTable.added);
    expect(fromRecord.plan.removed).toEqual(fromTable.removed);
    expect(fromRecord.plan.sets.filter((s) => s.change !== 'same')).toEqual(fromTable.sets.filter((s) => s.change !== 'same'));
    expect(fromRecord.plan.digest).toEqual(fromTable.digest);
    expect(fromRecord.plan.added.length).toBeGreaterThan(0);
    expect(nft('list', 'table', 'inet', 'egressd').stdout).toContain('198.51.100.8');
  });

  it('a table changed behind its back is read whole, and the stranger is removed', () => {
    const state = newState();
    const dir = policyDir({ '00.yaml': POLICY });
    apply(state, dir);
    expect(nft('add', 'chain', 'inet', 'egressd', 'intruder').status).toBe(0);
    const after = apply(state, dir);
    expect(after.liveFrom).toBe('listing');
    expect(nft('list', 'chains', 'inet').stdout).not.toContain('intruder');
    expect(apply(state, dir).liveFrom).toBe('record');
  });

  it("another state directory's applies make the record stale, even when the names come back the same", () => {
    const mine = newState();
    const theirs = newState();
    const dir = policyDir({ '00.yaml': POLICY });
    const changed = policyDir({ '00.yaml': CHANGED });
    apply(mine, dir);
    // Two applies flip the generation back to the one my record names, with the same object names.
    apply(theirs, changed);
    const theirLast = apply(theirs, changed);
    const mineNext = apply(mine, dir);
    expect(mineNext.liveFrom).toBe('listing');
    expect(mineNext.plan.digest.live).toBe(theirLast.plan.digest.compiled);
    expect(mineNext.plan.changes).toBe(true);
  });

  it('lockdown set through another state directory survives an apply from mine', () => {
    const mine = newState();
    const theirs = newState();
    const dir = policyDir({ '00.yaml': POLICY });
    apply(mine, dir);
    expect(egressctl(theirs, 'lockdown', 'on', dir).status).toBe(0);
    const next = apply(mine, dir);
    expect(next.liveFrom).toBe('listing');
    expect(next.lockdown).toBe(true);
    expect(egressctl(mine, 'lockdown', 'off', dir).status).toBe(0);
  });

  it('a re-apply keeps the sets whose contents did not change, and the addresses the resolver put in DNS sets', () => {
    const state = newState();
    const dir = policyDir({ '00.yaml': POLICY });
    apply(state, dir);
    const setHandles = () =>
      new Map([...nft('-a', '-t', 'list', 'sets', 'inet').stdout.matchAll(/set (\S+)\.[0-9a-f]{16} \{ # handle (\d+)/g)].map((m) => [m[1]!, Number(m[2])]));
    const dnsSet = () => /set (g0_dns4\.[0-9a-f]{16})/.exec(nft('-t', 'list', 'sets', 'inet').stdout)![1]!;
    // apply names the live set a compiled one became: where the resolver will write.
    expect(apply(state, dir).liveNames['g0_dns4']).toBe(dnsSet());
    // What the resolver will do: put an answer's address in the DNS set of tracker.example.
    expect(nft('add', 'element', 'inet', 'egressd', dnsSet(), '{ 192.0.2.99 timeout 1h }').status).toBe(0);
    const before = setHandles();
    expect(before.size).toBeGreaterThan(4);
    // Only the app's allow rule changes, in one address and its ports: that address set is new,
    // and so is the set of its two ports; every other set is the same object.
    const after = apply(state, policyDir({ '00.yaml': CHANGED }));
    expect(after.liveFrom).toBe('record');
    const now = setHandles();
    expect([...now.keys()].sort()).toEqual([...before.keys(), 'ports_443_8443'].sort());
    const changed = [...now].filter(([name, handle]) => before.get(name) !== handle).map(([name]) => name);
    expect(changed.sort()).toEqual(['a_rooty_0_net4', 'ports_443_8443']);
    expect(nft('list', 'set', 'inet', 'egressd', dnsSet()).stdout).toContain('192.0.2.99');
    // A rule bound to other names gets a new, empty DNS set: old answers must not stand for new names.
    apply(state, policyDir({ '00.yaml': CHANGED.replace('tracker.example', 'tracker2.example') }));
    expect(nft('list', 'set', 'inet', 'egressd', dnsSet()).stdout).not.toContain('192.0.2.99');
    // And nothing is left over: one set per name.
    const bases = [...nft('-t', 'list', 'sets', 'inet').stdout.matchAll(/(?:set|map) (\S+)\.[0-9a-f]{16} \{/g)].map((m) => m[1]);
    expect(new Set(bases).size).toBe(bases.length);
  });

  it('when something holds on to the previous generation, the new policy is in force all the same; the next apply removes the rest', () => {
    const state = newState();
    const fixture = join(import.meta.dirname, 'fixtures', 'apply-interfered.ts');
    const run = spawnSync(
      'nsenter',
      [`--net=/run/netns/${ns}`, process.execPath, '--import', 'tsx', fixture, policyDir({ '00.yaml': POLICY }), policyDir({ '00.yaml': CHANGED }), state],
      { encoding: 'utf8', timeout: 60_000 },
    );
    expect(run.status, run.stderr).toBe(0);
    const { previous, audits, table } = JSON.parse(run.stdout) as { previous: string; audits: string[]; table: string };
    expect(audits).toEqual(['applied', 'applied, but the previous generation could not be removed yet', 'applied']);
    // The switch took: the base chain uses the new generation, whose rules hold the changed address.
    const next = previous.endsWith('.a') ? 'b' : 'a';
    expect(table).toMatch(new RegExp(`jump global_deny\\.${next} comment "global deny list`));
    expect(table).toContain('198.51.100.8');
    expect(table).toContain(`chain ${previous} {`);
    // No record: the next apply reads the table whole, removes what is left of the old generation, and leaves one.
    expect(() => readFileSync(join(state, RECORD_FILE))).toThrow();
    expect(apply(state, policyDir({ '00.yaml': POLICY })).liveFrom).toBe('listing');
    const chains = [...nft('list', 'chains', 'inet').stdout.matchAll(/chain (\S+) \{/g)]
      .map((m) => m[1]!)
      .filter((c) => c !== 'output' && !c.startsWith('applied_'));
    expect(new Set(chains.map((c) => c.slice(-2))), chains.join(' ')).toEqual(new Set([`.${previous.slice(-1)}`]));
    expect(apply(state, policyDir({ '00.yaml': POLICY })).liveFrom).toBe('record');
    // A jump added by hand from the live policy to a chain the next generation must create: refused, clearly, and nothing changes.
    const live = /chain global_deny\.(a|b) /.exec(nft('list', 'chains', 'inet').stdout)![1]!;
    const other = live === 'a' ? 'b' : 'a';
    expect(nft('add', 'chain', 'inet', 'egressd', `log_g0.${other}`).status).toBe(0);
    expect(nft('add', 'rule', 'inet', 'egressd', `global_deny.${live}`, 'meta', 'mark', '0x4243', 'jump', `log_g0.${other}`).status).toBe(0);
    const before = nft('list', 'table', 'inet', 'egressd').stdout;
    const refused = egressctl(state, 'apply', policyDir({ '00.yaml': POLICY }));
    expect(refused.status).not.toBe(0);
    expect(refused.stderr).toContain(`the policy in force still reaches log_g0.${other}, which this apply must write anew`);
    expect(nft('list', 'table', 'inet', 'egressd').stdout).toBe(before);
  });

  it("another writer changing the table at the same time is said as such: not an nft refusal, not the policy's fault, no bare lockdown", () => {
    const state = newState();
    nft('delete', 'table', 'inet', 'egressd');
    const fixture = join(import.meta.dirname, 'fixtures', 'apply-raced.ts');
    const run = spawnSync('nsenter', [`--net=/run/netns/${ns}`, process.execPath, '--import', 'tsx', fixture, policyDir({ '00.yaml': POLICY }), state], {
      encoding: 'utf8',
      timeout: 60_000,
    });
    expect(run.status, run.stderr).toBe(0);
    const {
      applied,
      locked,
      audits,
      before,
      after,
      state: left,
    } = JSON.parse(run.stdout) as Record<'applied' | 'locked', { code: string; message: string }> & {
      audits: string[];
      before: string;
      after: string;
      state: { files: string[]; lastGoodKept: boolean };
    };
    expect(applied.code).toBe('EGD_CONCURRENT_CHANGE');
    expect(applied.message).toContain('another writer changed table inet egressd at the same time');
    expect(applied.message).toContain('this run changed nothing in force');
    // Lockdown falls back to the bare lockdown only for a policy at fault; this is not one.
    expect(locked.code).toBe('EGD_CONCURRENT_CHANGE');
    expect(audits).toEqual(['applied']);
    expect(after).toBe(before);
    // The refused changes staged their rulesets while nft worked: the first apply's stay, and no temporary file is left.
    expect(left).toEqual({
      files: ['applied.json', 'last-good-boot.nft', 'last-good.json', 'last-good.nft', 'rules.json', 'switches.json'],
      lastGoodKept: true,
    });
  });

  it('a first apply of a default deny that dies between its two transactions leaves egress as it was, not blocked', () => {
    const state = newState();
    nft('delete', 'table', 'inet', 'egressd');
    const dir = policyDir({ '00.yaml': 'defaults: {egress: deny}\n' });
    const fixture = join(import.meta.dirname, 'fixtures', 'apply-until-switch.ts');
    const run = spawnSync('nsenter', [`--net=/run/netns/${ns}`, process.execPath, '--import', 'tsx', fixture, dir, state], {
      encoding: 'utf8',
      timeout: 60_000,
    });
    expect(run.status, run.stderr).toBe(0);
    const { outcome, output } = JSON.parse(run.stdout) as { outcome: string; output: string };
    expect(outcome).toBe('killed before the switch');
    // An empty base chain whose policy is accept: as if the table were not there. Policy drop would block everything, loopback too.
    expect(output).toContain('policy accept;');
    expect(output).not.toMatch(/accept comment|drop comment/);
    // The next apply finishes the job, and the default deny is in force.
    expect(apply(state, dir).liveFrom).toBe('listing');
    expect(nft('list', 'chain', 'inet', 'egressd', 'output').stdout).toContain('policy drop;');
  });

  it('takes over a table loaded by hand from `egressctl compile` (no generations), leaving one generation', () => {
    const state = newState();
    const dir = policyDir({ '00.yaml': POLICY });
    const text = egressctl(state, 'compile', dir).stdout;
    const loaded = spawnSync('nsenter', [`--net=/run/netns/${ns}`, 'nft', '-f', '-'], {
      input: `add table inet egressd; delete table inet egressd;\n${text}`,
      encoding: 'utf8',
    });
    expect(loaded.status, loaded.stderr).toBe(0);
    expect(apply(state, dir).liveFrom).toBe('listing');
    const chains = [...nft('list', 'chains', 'inet').stdout.matchAll(/chain (\S+) \{/g)].map((m) => m[1]!).filter((c) => c !== 'output');
    expect(
      chains.every((c) => /\.(a|b)$/.test(c)),
      chains.join(' '),
    ).toBe(true);
    expect(nft('-t', 'list', 'sets', 'inet').stdout).not.toMatch(/(?:set|map) [a-z0-9_]+ \{/);
    expect(apply(state, dir).plan.changes).toBe(false);
  });

  it('a set emptied by hand: status sees it, apply over the record does not, apply --reread writes it anew', () => {
    const state = newState();
    const dir = policyDir({ '00.yaml': POLICY });
    apply(state, dir);
    const net4 = /set (g0_net4\.[0-9a-f]{16})/.exec(nft('-t', 'list', 'sets', 'inet').stdout)![1]!;
    expect(nft('flush', 'set', 'inet', 'egressd', net4).status).toBe(0);
    expect(egressctl(state, 'status', dir).status).toBe(1);
    // The record vouches for names only: documented, and said by status.
    expect(apply(state, dir).liveFrom).toBe('record');
    expect(nft('list', 'set', 'inet', 'egressd', net4).stdout).not.toContain('203.0.113.0/24');
    const reread = egressctl(state, 'apply', dir, '--reread', '--json');
    expect(reread.status, reread.stderr).toBe(0);
    expect((JSON.parse(reread.stdout) as ApplyJson).liveFrom).toBe('listing');
    const live = nft('list', 'table', 'inet', 'egressd').stdout;
    expect(live).toContain('203.0.113.0/24');
    expect(live).not.toContain(`set ${net4} {`);
    expect(egressctl(state, 'status', dir).status).toBe(0);
  });

  it('a line added above a rule keeps its sets, and the DNS answers in them', () => {
    const state = newState();
    apply(state, policyDir({ '00.yaml': POLICY }));
    const names = () =>
      nft('-t', 'list', 'sets', 'inet')
        .stdout.match(/set g0_\S+/g)!
        .sort();
    const before = names();
    const dns4 = before.find((n) => n.startsWith('set g0_dns4'))!.slice(4);
    expect(nft('add', 'element', 'inet', 'egressd', dns4, '{ 192.0.2.98 timeout 1h }').status).toBe(0);
    apply(state, policyDir({ '00.yaml': `# a comment line moves every rule down\n${POLICY}` }));
    expect(names()).toEqual(before);
    expect(nft('list', 'set', 'inet', 'egressd', dns4).stdout).toContain('192.0.2.98');
  });

  it('a damaged record is ignored: apply reads the table whole and writes a good record', () => {
    const state = newState();
    const dir = policyDir({ '00.yaml': POLICY });
    apply(state, dir);
    writeFileSync(join(state, RECORD_FILE), '{"version":1,"generation":"a","names":[');
    expect(apply(state, dir).liveFrom).toBe('listing');
    expect(() => JSON.parse(readFileSync(join(state, RECORD_FILE), 'utf8')) as unknown).not.toThrow();
    expect(apply(state, dir).liveFrom).toBe('record');
  });
});
