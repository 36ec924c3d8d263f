import * as fs from 'node:fs';
import { existsSync, mkdirSync, mkdtempSync, rmdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { CgroupTracker } from '../../src/apps/tracker.js';
import { withGeneration } from '../../src/enforce/swap.js';
import type { CgroupElementRemoval, CgroupElementWrite } from '../../src/nft/set-elements.js';
import { listCgroups } from '../../src/system/facts.js';
import { compileYaml, FACTS } from '../support/compile-text.js';

// Every lstat the tracker makes, counted per path: how often a cgroup is looked at.
const lstats = new Map<string, number>();
vi.mock('node:fs', async (original) => {
  const real = await original<typeof import('node:fs')>();
  const lstatSync = ((path: fs.PathLike, options?: fs.StatSyncOptions) => {
    const key = Buffer.isBuffer(path) ? path.toString('latin1') : String(path);
    lstats.set(key, (lstats.get(key) ?? 0) + 1);
    return real.lstatSync(path, options);
  }) as typeof real.lstatSync;
  return { ...real, lstatSync };
});

const POLICY = `
defaults: {egress: allow}
apps:
  vault: {identity: {cgroup: "apps/*/vault-*"}, default: deny, rules: [{allow: [192.0.2.2]}]}
`;

/**
 * Many cgroups nft cannot name under one ancestor, each heard of in its
 * own turn: the ancestor is looked at again when what it is given changes,
 * not once more per cut — the old tracker did, and each look went over
 * every cut under it (quadratic). systemd's notice of a path looks at its
 * ancestors too, once per notice: that one look stays.
 */
describe('cut-offs under one ancestor', () => {
  let root: string;
  // A quote: UTF-8, so systemd could tell of it (notice takes text), and still a name nft cannot carry.
  const bad = (i: number): Buffer => Buffer.from(`apps/p/vault-${i}-"`);
  const abs = (relative: string | Buffer): Buffer => Buffer.concat([Buffer.from(`${root}/`), Buffer.from(relative)]);
  const settle = async (): Promise<void> => {
    for (let i = 0; i < 3; i++) await new Promise((resolve) => setImmediate(resolve));
  };
  let tracker: CgroupTracker | undefined;

  beforeEach(() => {
    root = mkdtempSync(join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'egd-tracker-cuts-'));
    writeFileSync(join(root, 'cgroup.controllers'), '');
    mkdirSync(join(root, 'apps/p'), { recursive: true });
    lstats.clear();
  });
  afterEach(() => {
    tracker?.close();
    rmSync(root, { recursive: true, force: true });
  });

  it('2,000 cuts made one per turn: the ancestor is looked at a few times, written once, and freed when the last goes', async () => {
    // One there at compile: the table has the closed chain to cut off with.
    mkdirSync(abs(bad(0)));
    const found = listCgroups(root, 3);
    const compiled = compileYaml(POLICY, { facts: { ...FACTS, cgroups: found.named, unnamedCgroups: found.unnamed, cgroupOwners: found.owners } });
    const liveNames = new Map(compiled.ruleset.sets.map((s, i) => [s.name, [withGeneration(compiled.ruleset, 'a').sets[i]!.name]]));
    const adds: CgroupElementWrite[] = [];
    const removals: CgroupElementRemoval[] = [];
    tracker = new CgroupTracker({
      writer: { add: (w) => void adds.push(...w), remove: (r) => void removals.push(...r), close: () => undefined },
      log: pino({ level: 'silent' }),
      root,
      watch: false,
      liveSets: () => Promise.reject(new Error('not asked')),
      recompile: () => expect.unreachable('no re-apply is needed'),
    });
    await tracker.setPolicy({ compiled, liveNames });
    await settle();
    const ancestor = abs('apps/p').toString('latin1');
    const id = fs.lstatSync(abs('apps/p'), { bigint: true }).ino;
    lstats.clear();
    const count = 2000;
    for (let i = 1; i <= count; i++) {
      mkdirSync(abs(bad(i)));
      tracker.notice(bad(i).toString('latin1'));
      await settle();
    }
    expect(tracker.counters().cut).toBe(count + 1);
    // One per notice, and a few more: the old tracker made two per cut.
    expect(lstats.get(ancestor) ?? 0).toBeLessThanOrEqual(count + count / 100);
    expect(adds.filter((a) => a.id === id).length).toBeLessThanOrEqual(1);
    // All but one go: the ancestor stays cut off, and is not looked at per cut.
    lstats.clear();
    for (let i = 0; i < count; i++) {
      rmdirSync(abs(bad(i)));
      tracker.notice(bad(i).toString('latin1'));
      await settle();
    }
    expect(removals.filter((r) => r.id === id)).toEqual([]);
    expect(lstats.get(ancestor) ?? 0).toBeLessThanOrEqual(count + count / 100);
    rmdirSync(abs(bad(count)));
    tracker.notice(bad(count).toString('latin1'));
    await settle();
    expect(removals.filter((r) => r.id === id)).toHaveLength(1);
    expect(tracker.counters().cut).toBe(0);
  });
});
