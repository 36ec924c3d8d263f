import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { parseLogPrefix } from '../../src/compile/log-prefix.js';
import { renderText } from '../../src/compile/ruleset.js';
import { readRuleTable, RULES_FILE, ruleTableText, writeRuleTable } from '../../src/state/rule-table.js';
import { nextSwitches, readSwitches, SWITCHES_FILE, switchesText, writeSwitches } from '../../src/state/switches.js';
import { compileYaml } from '../support/compile-text.js';

const dirs: string[] = [];
const newDir = () => {
  const dir = mkdtempSync(join(tmpdir(), 'egd-records-'));
  dirs.push(dir);
  return dir;
};
afterEach(() => {
  for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
});

describe('the switch record', () => {
  it('round-trips; a switch keeps its "since" while it stays, and takes the time of the apply that flips it', () => {
    const dir = newDir();
    expect(readSwitches(dir)).toEqual({ state: 'absent' });
    const t0 = new Date('2026-01-01T00:00:00.000Z');
    const first = nextSwitches(readSwitches(dir), { lockdown: false, torUpdates: true }, 'applied_0123456789abcdef.a', t0);
    writeSwitches(dir, first);
    expect(readSwitches(dir)).toEqual({ state: 'ok', value: first });
    expect(first).toEqual({
      version: 1,
      lockdown: { on: false, since: t0.toISOString() },
      torUpdates: { on: true, since: t0.toISOString() },
      apply: 'applied_0123456789abcdef.a',
    });

    const t1 = new Date('2026-01-02T00:00:00.000Z');
    writeSwitches(dir, nextSwitches(readSwitches(dir), { lockdown: true, torUpdates: true }, 'applied_1111111111111111.b', t1));
    const second = readSwitches(dir);
    expect(second).toEqual({
      state: 'ok',
      value: {
        version: 1,
        lockdown: { on: true, since: t1.toISOString() },
        torUpdates: { on: true, since: t0.toISOString() },
        apply: 'applied_1111111111111111.b',
      },
    });
  });

  it('a damaged record is reported as damaged, never read as "off", and counts as no record for the next one', () => {
    const dir = newDir();
    const good = switchesText(nextSwitches({ state: 'absent' }, { lockdown: true, torUpdates: false }, 'applied_0123456789abcdef.a', new Date(0)));
    for (const bad of [
      '',
      '{',
      'null',
      good.replace('"on": true', '"on": "yes"'),
      good.replace('"version": 1', '"version": 2'),
      good.replace('"apply"', '"extra": 1, "apply"'),
      good.replace(/"since": "[^"]*"/, '"since": "yesterday"'),
    ]) {
      writeFileSync(join(dir, SWITCHES_FILE), bad);
      const read = readSwitches(dir);
      expect(read.state, JSON.stringify(bad.slice(0, 60))).toBe('damaged');
      if (read.state === 'damaged') expect(read.problem).toContain(SWITCHES_FILE);
      const t = new Date('2026-03-03T00:00:00.000Z');
      expect(nextSwitches(read, { lockdown: true, torUpdates: false }, 'applied_2222222222222222.b', t).lockdown.since).toBe(t.toISOString());
    }
  });
});

describe('the rule id table', () => {
  it('round-trips, and maps every log prefix of the compiled table back to its rule in a reader that has only the state directory', () => {
    const dir = newDir();
    const compiled = compileYaml(
      'defaults: {egress: deny}\napps: {web: {identity: {user: alice}, rules: [{deny: [192.0.2.0/24]}]}}\ndeny: [{to: [tracker.example.com]}]\n',
    );
    writeRuleTable(dir, { digest: 'd'.repeat(64), rules: compiled.ruleIds });
    const read = readRuleTable(dir);
    if (read.state !== 'ok') throw new Error(JSON.stringify(read));
    expect(read.value.rules).toEqual(compiled.ruleIds);
    expect(read.value.digest).toBe('d'.repeat(64));
    // Each logging tail logs twice (by uid, and for packets without an owner), with one prefix.
    const prefixes = [...new Set([...renderText(compiled.ruleset).matchAll(/log prefix "([^"]*)"/g)].map((m) => m[1]!))];
    expect(prefixes.map((p) => read.value.byId.get(parseLogPrefix(p)!)?.ruleId).sort()).toEqual([
      'app/web/0',
      'app/web/default',
      'default',
      'deny/f.yaml/0',
      'dns/exclusive',
      'routing-header',
    ]);
    expect(read.value.byId.get(parseLogPrefix(prefixes[0]!)!)).toMatchObject({ file: 'f.yaml', line: expect.any(Number) });
  });

  it('a damaged table is reported, not half read', () => {
    const dir = newDir();
    expect(readRuleTable(dir)).toEqual({ state: 'absent' });
    const good = ruleTableText({ digest: 'x', rules: compileYaml('defaults: {egress: deny}\n').ruleIds });
    for (const bad of [
      '[]',
      good.replace(/"id": "r[0-9a-f]{8}"/, '"id": "deny/x"'),
      good.replace('"kind": "default"', '"kind": "other"'),
      good.slice(0, -10),
    ]) {
      writeFileSync(join(dir, RULES_FILE), bad);
      expect(readRuleTable(dir).state, bad.slice(0, 80)).toBe('damaged');
    }
  });
});
