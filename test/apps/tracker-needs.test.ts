import { chownSync, existsSync, lstatSync, mkdirSync, mkdtempSync, rmdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CgroupTracker } from '../../src/apps/tracker.js';
import type { Compiled } from '../../src/compile/compile.js';
import { withGeneration } from '../../src/enforce/swap.js';
import type { CgroupElementRemoval, CgroupElementWrite, CgroupMapWriter } from '../../src/nft/set-elements.js';
import { listCgroups } from '../../src/system/facts.js';
import { compileYaml, FACTS } from '../support/compile-text.js';

/**
 * What a user can make the tracker do with cgroups it names: the tracker
 * in this process over a directory tree standing in for cgroupfs (lstat
 * gives the same ids and owners it gives on cgroupfs), a writer that
 * records what would go to the kernel, and a clock the test moves. A
 * "re-apply" is what the daemon does when asked: compile with the facts
 * the tree gives at that moment, then `setPolicy`. What is counted is
 * re-applies and writes, never time. (test/apps/tracker-kernel.test.ts
 * does the same against real cgroupfs and nft.)
 */
const UID = 2001;
const POLICY = `
defaults: {egress: allow}
apps:
  browser: {identity: {cgroup: "apps/browser-*"}, rules: [{deny: [192.0.2.2]}]}
  vault: {identity: {cgroup: "apps/*/vault-*"}, default: deny, rules: [{allow: [192.0.2.2]}]}
  viewer: {identity: {cgroup: "home/viewer-*"}, default: deny, rules: [{allow: [192.0.2.2]}]}
  build: {identity: {user: ${UID}}, default: deny}
`;

interface Rig {
  readonly tracker: CgroupTracker;
  readonly adds: CgroupElementWrite[];
  readonly removals: CgroupElementRemoval[];
  readonly warnings: string[];
  readonly reapplies: () => number;
  compiled: () => Compiled;
}

describe('the tracker bounds what cgroup names a user controls can make it do', () => {
  let root: string;
  let clock = 0;
  let rig: Rig;
  const path = (relative: string | Buffer): Buffer => Buffer.concat([Buffer.from(`${root}/`), Buffer.from(relative)]);
  const idOf = (relative: string | Buffer): bigint => lstatSync(path(relative), { bigint: true }).ino;
  const mk = (relative: string | Buffer, uid = 0): void => {
    mkdirSync(path(relative));
    if (uid !== 0) chownSync(path(relative), uid, uid);
  };
  const rm = (relative: string | Buffer): void => rmdirSync(path(relative));
  /** A turn of the event loop: the tracker writes what it heard of, and what that queued (an ancestor to cut off). */
  const settle = async (): Promise<void> => {
    for (let i = 0; i < 3; i++) await new Promise((resolve) => setImmediate(resolve));
  };
  const look = async (): Promise<void> => {
    rig.tracker.lookEverywhere();
    await settle();
  };
  let policy = POLICY;
  const compileNow = (): Compiled => {
    const found = listCgroups(root, 6);
    return compileYaml(policy, {
      facts: { ...FACTS, cgroups: found.named, unnamedCgroups: found.unnamed, cgroupOwners: found.owners },
    });
  };
  const liveNames = (compiled: Compiled) => new Map(compiled.ruleset.sets.map((s, i) => [s.name, [withGeneration(compiled.ruleset, 'a').sets[i]!.name]]));

  const start = async (options: { intervalMs?: number; maxBackoffMs?: number; maxTracked?: number; beforeFirstPolicy?: () => void } = {}): Promise<Rig> => {
    const adds: CgroupElementWrite[] = [];
    const removals: CgroupElementRemoval[] = [];
    const warnings: string[] = [];
    let reapplies = 0;
    let current = compileNow();
    const writer: CgroupMapWriter = { add: (w) => void adds.push(...w), remove: (r) => void removals.push(...r), close: () => undefined };
    const log = pino({ level: 'warn' }, { write: (line: string) => void warnings.push(line) });
    const tracker: CgroupTracker = new CgroupTracker({
      writer,
      log,
      root,
      watch: false,
      liveSets: () => Promise.resolve(new Set(liveNames(current).values().next().value)),
      now: () => clock,
      recompileIntervalMs: options.intervalMs ?? 10_000,
      ...(options.maxBackoffMs === undefined ? {} : { maxRecompileBackoffMs: options.maxBackoffMs }),
      ...(options.maxTracked === undefined ? {} : { maxTracked: options.maxTracked }),
      // The daemon's reload, a turn later (it is queued): the facts are the tree as it is then.
      recompile: () => {
        reapplies++;
        setImmediate(() => {
          current = compileNow();
          void tracker.setPolicy({ compiled: current, liveNames: liveNames(current) });
        });
      },
    });
    options.beforeFirstPolicy?.();
    await tracker.setPolicy({ compiled: current, liveNames: liveNames(current) });
    await settle();
    return { tracker, adds, removals, warnings, reapplies: () => reapplies, compiled: () => current };
  };

  beforeEach(() => {
    clock = 0;
    policy = POLICY;
    // tmpfs, as cgroupfs, never gives a removed directory's inode number to the next one (ext4 does at once).
    root = mkdtempSync(join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'egd-tracker-needs-'));
    // What listCgroups takes for a cgroup2 root.
    writeFileSync(join(root, 'cgroup.controllers'), '');
    mk('apps');
    mk('home', UID);
  });
  afterEach(() => {
    rig?.tracker.close();
    rmSync(root, { recursive: true, force: true });
  });

  it('cgroups an app that lets out matches, with names nft cannot carry: left out, no re-apply, no write, said once', async () => {
    rig = await start();
    const names = Array.from({ length: 200 }, (_, i) => Buffer.concat([Buffer.from(`apps/browser-${i}-`), Buffer.from([0xff, 0x22, 0x09])]));
    for (const name of names) mk(name);
    await look();
    expect(rig.reapplies()).toBe(0);
    expect(rig.adds).toEqual([]);
    expect(rig.tracker.counters().leftOut).toBe(200);
    expect(rig.warnings.filter((w) => w.includes('apps-unnamed-left-out'))).toHaveLength(1);
    // Named ones beside them are written as ever.
    mk('apps/browser-ok');
    await look();
    expect(rig.adds.map((a) => a.id)).toEqual([idOf('apps/browser-ok')]);
  });

  it("cgroups a default-deny app matches, with names nft cannot carry: each one's nearest nameable ancestor is cut off by its id at once, without a re-apply, and freed when it goes", async () => {
    rig = await start();
    // The closed chain is there before any member needs it.
    expect(rig.compiled().cgroupBindings.find((b) => b.owner === 'app vault')!.cutOff).toEqual({ goto: { target: 'cut_app_vault' } });
    const bad = Buffer.from([0xc3, 0x28]);
    const unnamed = (i: number) => Buffer.concat([Buffer.from(`apps/p${i}/vault-`), bad]);
    mk('apps/p0');
    mk(unnamed(0));
    await look();
    await settle();
    const cutVerdict = { kind: 'goto', chain: 'cut_app_vault.a' };
    expect(rig.reapplies()).toBe(0);
    expect(rig.adds).toContainEqual(expect.objectContaining({ id: idOf('apps/p0'), verdict: cutVerdict }));
    // 100 more, each under an ancestor of its own: no re-apply for any of them.
    for (let i = 1; i <= 100; i++) {
      mk(`apps/p${i}`);
      mk(unnamed(i));
      clock += 60_000;
    }
    await look();
    await settle();
    expect(rig.reapplies()).toBe(0);
    const ancestors = Array.from({ length: 100 }, (_, i) => idOf(`apps/p${i + 1}`));
    const cutAdds = rig.adds.filter((a) => a.map.startsWith('app_cg_l2.') && JSON.stringify(a.verdict) === JSON.stringify(cutVerdict));
    for (const id of ancestors) expect(cutAdds.map((a) => a.id)).toContain(id);
    expect(rig.adds.some((a) => a.map.startsWith('app_cg_l3.'))).toBe(false);
    expect(rig.tracker.counters().cut).toBe(101);
    // The unnameable cgroups go: their ancestors are no longer cut off.
    for (let i = 1; i <= 100; i++) rm(unnamed(i));
    await look();
    await settle();
    for (const id of ancestors) expect(rig.removals.map((r) => r.id)).toContain(id);
    expect(rig.tracker.counters().cut).toBe(1);
    expect(rig.reapplies()).toBe(0);
  });

  it('an ancestor an identity claims itself keeps its own verdict: a cut-off from below does not override it', async () => {
    rig = await start();
    mk('apps/browser-x');
    mk(Buffer.concat([Buffer.from('apps/browser-x/vault-'), Buffer.from([0xff])]));
    await look();
    await settle();
    mk(Buffer.concat([Buffer.from('apps/browser-x/vault-2'), Buffer.from([0xff])]));
    await look();
    await settle();
    const id = idOf('apps/browser-x');
    const written = rig.adds.filter((a) => a.id === id);
    expect(written.length).toBeGreaterThan(0);
    for (const a of written) expect(a.verdict).toEqual({ kind: 'goto', chain: 'app_browser.a' });
  });

  it("a user's app started again and again (a delegated cgroup made and removed in a loop): each one written at once and taken out when it goes, without a re-apply", async () => {
    rig = await start({ intervalMs: 10_000 });
    // The chain for viewer's delegated members is in the table before any exists, and after any apply.
    expect(rig.compiled().cgroupBindings.find((b) => b.owner === 'app viewer')!.delegatedVerdict).toEqual({ goto: { target: 'uc_app_viewer' } });
    for (let i = 0; i < 500; i++) {
      mk(`home/viewer-${i}`, UID);
      await look();
      expect(rig.adds.at(-1)).toEqual(expect.objectContaining({ id: idOf(`home/viewer-${i}`), verdict: { kind: 'goto', chain: 'uc_app_viewer.a' } }));
      rm(`home/viewer-${i}`);
      await look();
      clock += 1000;
    }
    expect(rig.reapplies()).toBe(0);
    expect(rig.adds).toHaveLength(500);
    expect(rig.removals).toHaveLength(500);
    expect(rig.tracker.counters()).toMatchObject({ tracked: 0, recompiles: 0, recompilesHeld: 0 });
  });

  /** A cgroup of `app` its user names with a byte nft cannot carry: its nearest nameable ancestor, home (level 1), is cut off — in a map no selector makes. */
  const unnameable = (app: string, i: number | string): Buffer => Buffer.concat([Buffer.from(`home/${app}-${i}`), Buffer.from([0xff])]);
  /** The verdict compile gave `path` in the level-1 map, where the compile cut it off. */
  const cutInTable = (compiled: Compiled, path: string) => {
    const map = compiled.ruleset.sets.find((set) => set.name === 'app_cg_l1');
    const at = map?.elements.indexOf(path) ?? -1;
    return at < 0 ? undefined : map!.verdicts![at];
  };

  it('a user making and removing cgroups nft cannot name, in a loop, whose ancestor sits at a level no map has: re-applies grow with the log of how long it keeps at it, not with the cgroups; a cgroup that stays then has its ancestor cut off', async () => {
    rig = await start({ intervalMs: 10_000, maxBackoffMs: 3_600_000 });
    expect(rig.compiled().ruleset.sets.some((set) => set.name === 'app_cg_l1')).toBe(false);
    // 2,000 cgroups over 2,000 s, each gone before the next look: the old tracker asked once per id, one re-apply every 10 s (200).
    for (let i = 0; i < 2000; i++) {
      mk(unnameable('viewer', i), UID);
      rig.tracker.lookEverywhere();
      // Gone before the re-apply it asked for looks.
      rm(unnameable('viewer', i));
      await settle();
      clock += 1000;
    }
    // Asked at 0, 10, 30, 70, 150, 310, 630, 1270 s: doubling waits.
    expect(rig.reapplies()).toBeLessThanOrEqual(Math.ceil(Math.log2(2000 / 10 + 1)) + 1);
    expect(rig.reapplies()).toBeGreaterThanOrEqual(2);
    expect(rig.adds).toEqual([]);
    // A cgroup that stays: asked for once its wait is over; after that re-apply its ancestor is cut off.
    const before = rig.reapplies();
    mk(unnameable('viewer', 'stays'), UID);
    await look();
    clock += 3_600_000;
    await look();
    await settle();
    expect(rig.reapplies()).toBe(before + 1);
    expect(cutInTable(rig.compiled(), 'home')).toEqual({ goto: { target: 'cut_app_viewer' } });
    // More such cgroups now need nothing the table lacks.
    for (let i = 0; i < 50; i++) mk(unnameable('viewer', `more-${i}`), UID);
    clock += 1000;
    await look();
    expect(rig.reapplies()).toBe(before + 1);
    expect(rig.tracker.counters().cut).toBe(51);
  });

  it('a user alternating two needs (an unnameable cgroup of one app, then of another, each kept until its re-apply looked): a met need keeps its back-off, so re-applies still grow with the log of the time', async () => {
    // The reader's cut-off ancestor is at level 4, the viewer's at level 1: two maps no selector makes, which a compile makes only while such a cgroup is there.
    policy = `${POLICY}  reader: {identity: {cgroup: "home/r/s/t/reader-*"}, default: deny, rules: [{allow: [192.0.2.2]}]}\n`;
    for (const dir of ['home/r', 'home/r/s', 'home/r/s/t']) mk(dir, UID);
    rig = await start({ intervalMs: 10_000, maxBackoffMs: 3_600_000 });
    // 200 rounds over 2,000 s: the old tracker forgot a need once met, and the next compile (for the other app) dropped its map again: 200 re-applies.
    for (let i = 0; i < 200; i++) {
      const name = i % 2 === 0 ? unnameable('viewer', i) : Buffer.concat([Buffer.from(`home/r/s/t/reader-${i}`), Buffer.from([0xff])]);
      mk(name, UID);
      rig.tracker.lookEverywhere();
      // The re-apply runs and looks while the cgroup is there: the need is met.
      await settle();
      await settle();
      rm(name);
      await settle();
      clock += 10_000;
    }
    // Per need, doubling waits: 10, 20, 40 ... s, twice (two needs).
    expect(rig.reapplies()).toBeLessThanOrEqual(2 * (Math.ceil(Math.log2(2000 / 10 + 1)) + 1));
    expect(rig.reapplies()).toBeGreaterThanOrEqual(4);
  });

  it("one user's back-off does not hold another user's cgroup of the same app: needs are keyed by the cgroup's owner too", async () => {
    // Each viewer cgroup a delegation of its own (home root's), so A's and B's are two users'.
    chownSync(path('home'), 0, 0);
    rig = await start({ intervalMs: 10_000, maxBackoffMs: 1_800_000 });
    // User A pushes viewer's need far out: cgroups gone before each re-apply looks.
    // Asked at 0, 10, 30, 70, 150 s; the next not before 310 s.
    for (let i = 0; i < 250; i++) {
      mk(unnameable('viewer', `a${i}`), UID);
      rig.tracker.lookEverywhere();
      rm(unnameable('viewer', `a${i}`));
      await settle();
      clock += 1000;
    }
    const before = rig.reapplies();
    clock += 10_000;
    // User B makes one: its own need, asked for at once (the interval is over), and its ancestor cut off after.
    mk(unnameable('viewer', 'b'), UID + 1);
    await look();
    await settle();
    expect(rig.reapplies()).toBe(before + 1);
    expect(cutInTable(rig.compiled(), 'home')).toEqual({ goto: { target: 'cut_app_viewer' } });
  });

  it("a user filling the tracker's bound does not stop a root-owned cgroup from being written", async () => {
    for (let i = 0; i < 40; i++) mk(`home/viewer-${i}`, UID);
    rig = await start({ maxTracked: 16 });
    expect(rig.tracker.counters().tracked).toBeLessThan(16);
    expect(rig.tracker.counters().dropped).toBeGreaterThan(0);
    mk('apps/browser-restarted');
    await look();
    expect(rig.adds.map((a) => a.id)).toContain(idOf('apps/browser-restarted'));
  });

  it("subordinate uids do not multiply a user's share: cgroups it chowns to other uids in its delegated subtree count against it", async () => {
    // home is delegated to UID; inside it, a user namespace mapping its /etc/subuid range can give each cgroup another owner.
    for (let i = 0; i < 40; i++) mk(`home/viewer-${i}`, 100_000 + i);
    rig = await start({ maxTracked: 16 });
    // An eighth of 16: the user's, whatever owners it gave its cgroups.
    expect(rig.tracker.counters().tracked).toBe(2);
    expect(rig.tracker.counters().dropped).toBeGreaterThan(0);
  });

  it('an ancestor compile cut off for an unnameable cgroup that went during the apply is freed by the tracker', async () => {
    const bad = Buffer.concat([Buffer.from('apps/p0/vault-'), Buffer.from([0xc3, 0x28])]);
    mk('apps/p0');
    mk(bad);
    // Compile saw it (the ancestor is cut off in the table); it is gone before the tracker looks.
    rig = await start({ beforeFirstPolicy: () => rm(bad) });
    expect(rig.compiled().ruleset.sets.find((s) => s.name === 'app_cg_l2')!.elements).toContain('apps/p0');
    await settle();
    expect(rig.removals).toContainEqual({ map: expect.stringMatching(/^app_cg_l2\./), id: idOf('apps/p0') });
    // One still there keeps its ancestor's cut-off.
    const bad1 = Buffer.concat([Buffer.from('apps/p1/vault-'), Buffer.from([0xc3, 0x28])]);
    mk('apps/p1');
    mk(bad1);
    rig.tracker.close();
    rig = await start();
    await look();
    expect(rig.removals.map((r) => r.id)).not.toContain(idOf('apps/p1'));
  });

  it('glob metacharacters, spaces and a long name are only bytes: written by id like any other', async () => {
    rig = await start();
    const names = ['apps/browser-*', 'apps/browser-[x]', 'apps/browser-?', 'apps/browser- a b', `apps/browser-${'x'.repeat(247)}`];
    for (const name of names) mk(name);
    await look();
    for (const name of names) expect(rig.adds.map((a) => a.id)).toContain(idOf(name));
    expect(rig.reapplies()).toBe(0);
    // "apps/*" is a name too: it matches no app of its own ("apps/*/vault-*" is deeper).
    expect(rig.tracker.counters().tracked).toBe(names.length);
  });
});
