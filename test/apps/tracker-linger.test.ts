import { lstatSync, mkdirSync, mkdtempSync, rmdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CgroupTracker } from '../../src/apps/tracker.js';
import type { Compiled } from '../../src/compile/compile.js';
import { withGeneration } from '../../src/enforce/swap.js';
import type { CgroupElementRemoval, CgroupElementWrite } from '../../src/nft/set-elements.js';
import { compileYaml } from '../support/compile-text.js';
import { until } from '../support/wait.js';

const POLICY = `
defaults: {egress: allow}
systemDomains:
  offline: {members: [{cgroup: "sys/sd-*"}]}
`;

/**
 * A removed cgroup's id, while `carried` says a socket still has it: kept
 * in its maps (test/apps/linger-kernel.test.ts shows why, for real), written
 * into a new generation's maps as it was, and taken out once no socket
 * carries it or the policy lost its map.
 */
describe('removed cgroups whose sockets still send', () => {
  let root: string;
  let tracker: CgroupTracker | undefined;
  const adds: CgroupElementWrite[] = [];
  const removals: CgroupElementRemoval[] = [];
  let carried: () => ReadonlySet<bigint>;
  const errors: string[] = [];

  const liveNames = (compiled: Compiled, generation: 'a' | 'b') =>
    new Map(compiled.ruleset.sets.map((s, i) => [s.name, [withGeneration(compiled.ruleset, generation).sets[i]!.name]]));
  /** The live name of the system domains' cgroup map in a generation (maps are named for their contents). */
  const mapIn = (compiled: Compiled, generation: 'a' | 'b') => liveNames(compiled, generation).get('sd_cg_l2')![0]!;
  const start = async (compiled: Compiled) => {
    tracker = new CgroupTracker({
      writer: { add: (w) => void adds.push(...w), remove: (r) => void removals.push(...r), close: () => undefined },
      log: pino({ level: 'error' }, { write: (line: string) => void errors.push(line) }),
      root,
      watch: false,
      liveSets: () => Promise.reject(new Error('not asked')),
      carried: () => carried(),
      lingerCheckMs: 20,
    });
    await tracker.setPolicy({ compiled, liveNames: liveNames(compiled, 'a') });
    await until('the member is written', () => adds.length > 0);
  };

  beforeEach(() => {
    root = mkdtempSync(join(tmpdir(), 'egd-tracker-linger-'));
    writeFileSync(join(root, 'cgroup.controllers'), '');
    mkdirSync(join(root, 'sys/sd-one'), { recursive: true });
    adds.length = 0;
    removals.length = 0;
    errors.length = 0;
  });
  afterEach(() => {
    tracker?.close();
    rmSync(root, { recursive: true, force: true });
  });

  it('stays while a socket carries it, through a re-apply, and goes once none does', async () => {
    const compiled = compileYaml(POLICY);
    const id = lstatSync(join(root, 'sys/sd-one'), { bigint: true }).ino;
    carried = () => new Set([id]);
    await start(compiled);
    expect(adds).toEqual([{ map: mapIn(compiled, 'a'), id, verdict: { kind: 'goto', chain: 'sd_offline.a' } }]);

    rmdirSync(join(root, 'sys/sd-one'));
    tracker!.lookEverywhere();
    await new Promise((resolve) => setTimeout(resolve, 100));
    expect(removals).toEqual([]);
    expect(tracker!.counters()).toMatchObject({ tracked: 0, lingering: 1 });

    // A re-apply: the new generation's map has it too, with the new generation's chain; the old one's went with its map.
    adds.length = 0;
    await tracker!.setPolicy({ compiled, liveNames: liveNames(compiled, 'b') });
    await until('it is written into the new generation', () => adds.length > 0);
    expect(adds).toEqual([{ map: mapIn(compiled, 'b'), id, verdict: { kind: 'goto', chain: 'sd_offline.b' } }]);
    expect(removals).toEqual([]);

    carried = () => new Set();
    await until('it goes once no socket carries it', () => removals.length > 0);
    expect(removals).toEqual([{ map: mapIn(compiled, 'b'), id }]);
    expect(tracker!.counters()).toMatchObject({ lingering: 0 });
  });

  it('goes at once where no socket carries it; stays while the sockets cannot be read, and says so once', async () => {
    const id = lstatSync(join(root, 'sys/sd-one'), { bigint: true }).ino;
    carried = () => new Set();
    const compiled = compileYaml(POLICY);
    await start(compiled);
    rmdirSync(join(root, 'sys/sd-one'));
    tracker!.lookEverywhere();
    await until('it goes', () => removals.length > 0);
    expect(removals).toEqual([{ map: mapIn(compiled, 'a'), id }]);

    removals.length = 0;
    mkdirSync(join(root, 'sys/sd-two'));
    const two = lstatSync(join(root, 'sys/sd-two'), { bigint: true }).ino;
    tracker!.lookEverywhere();
    await until('the second member is written', () => adds.some((a) => a.id === two));
    carried = () => {
      throw new Error('sock_diag: EPERM');
    };
    rmdirSync(join(root, 'sys/sd-two'));
    tracker!.lookEverywhere();
    await new Promise((resolve) => setTimeout(resolve, 100));
    expect(removals).toEqual([]);
    expect(errors.filter((line) => line.includes('apps-sockets-unread'))).toHaveLength(1);
    carried = () => new Set();
    await until('it goes once the sockets can be read', () => removals.length > 0);
    expect(removals).toEqual([{ map: mapIn(compiled, 'a'), id: two }]);
  });

  it('goes when the policy no longer has its map', async () => {
    const id = lstatSync(join(root, 'sys/sd-one'), { bigint: true }).ino;
    carried = () => new Set([id]);
    await start(compileYaml(POLICY));
    rmdirSync(join(root, 'sys/sd-one'));
    tracker!.lookEverywhere();
    await new Promise((resolve) => setTimeout(resolve, 50));
    const without = compileYaml('defaults: {egress: allow}\n');
    await tracker!.setPolicy({ compiled: without, liveNames: liveNames(without, 'b') });
    await new Promise((resolve) => setTimeout(resolve, 50));
    expect(tracker!.counters()).toMatchObject({ lingering: 0 });
    // Its old map went with the old generation: nothing is left to take out.
    expect(removals).toEqual([]);
  });
});
