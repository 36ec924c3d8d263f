import { chownSync, existsSync, lstatSync, mkdirSync, mkdtempSync, rmdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CgroupTracker } from '../../src/apps/tracker.js';
import type { Compiled } from '../../src/compile/compile.js';
import { withGeneration } from '../../src/enforce/swap.js';
import { SetWriteRefusedError } from '../../src/errors.js';
import type { CgroupElementRemoval, CgroupElementWrite } from '../../src/nft/set-elements.js';
import { compileYaml } from '../support/compile-text.js';
import { until } from '../support/wait.js';

const POLICY = `
defaults: {egress: allow}
systemDomains:
  offline: {members: [{cgroup: "sys/sd-*"}, {cgroup: "user/*/sd-*"}]}
`;
const LINGER_CHECK_MS = 20;

/**
 * A removed cgroup's id, while a closed socket may still send for it: kept
 * in its maps (test/apps/linger-kernel.test.ts shows why, for real), written
 * into a new generation's maps with what that policy claims, and taken out
 * once no socket carries it — nor one of a cgroup that is gone, which may be
 * its child's. A user's cgroups are not kept.
 */
describe('removed cgroups whose closed sockets may still send', () => {
  let root: string;
  let tracker: CgroupTracker | undefined;
  const adds: CgroupElementWrite[] = [];
  const removals: CgroupElementRemoval[] = [];
  let carried: () => ReadonlySet<bigint>;
  /** Ids of cgroups that exist; the tracker asks about those `carried` gives. */
  let alive: (id: bigint) => boolean;
  const errors: string[] = [];
  /** How many add transactions the kernel refuses next, as it would for want of memory. */
  let refuseAdds = 0;

  const liveNames = (compiled: Compiled, generation: 'a' | 'b') =>
    new Map(compiled.ruleset.sets.map((s, i) => [s.name, [withGeneration(compiled.ruleset, generation).sets[i]!.name]]));
  /** The live name of the system domains' cgroup map of a level in a generation (maps are named for their contents). */
  const mapIn = (compiled: Compiled, generation: 'a' | 'b', level = 2) => liveNames(compiled, generation).get(`sd_cg_l${level}`)![0]!;
  const idOf = (path: string) => lstatSync(join(root, path), { bigint: true }).ino;
  /** Checks of the sockets go on every LINGER_CHECK_MS: several pass in this time. */
  const severalChecks = () => new Promise((resolve) => setTimeout(resolve, LINGER_CHECK_MS * 5));
  const start = async (compiled: Compiled, maxTracked?: number) => {
    tracker = new CgroupTracker({
      ...(maxTracked === undefined ? {} : { maxTracked }),
      writer: {
        add: (w) => {
          if (refuseAdds > 0) {
            refuseAdds--;
            throw new SetWriteRefusedError('full', 'netlink: Cannot allocate memory', { errno: 12 });
          }
          adds.push(...w);
        },
        remove: (r) => void removals.push(...r),
        close: () => undefined,
      },
      log: pino({ level: 'warn' }, { write: (line: string) => void errors.push(line) }),
      root,
      watch: false,
      liveSets: () => Promise.reject(new Error('not asked')),
      carried: () => carried(),
      cgroupAlive: (id) => alive(id),
      lingerCheckMs: LINGER_CHECK_MS,
    });
    await tracker.setPolicy({ compiled, liveNames: liveNames(compiled, 'a') });
    await until('the members are written', () => adds.length > 0);
  };
  const removeAndLook = (path: string) => {
    rmdirSync(join(root, path));
    tracker!.lookEverywhere();
  };

  beforeEach(() => {
    // tmpfs: a removed directory's inode number is not given to the next one at once (ext4 does), as a cgroup's id never is.
    root = mkdtempSync(join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'egd-tracker-linger-'));
    writeFileSync(join(root, 'cgroup.controllers'), '');
    mkdirSync(join(root, 'sys/sd-one'), { recursive: true });
    adds.length = 0;
    removals.length = 0;
    errors.length = 0;
    refuseAdds = 0;
    carried = () => new Set();
    alive = () => true;
  });
  afterEach(() => {
    tracker?.close();
    rmSync(root, { recursive: true, force: true });
  });

  it('stays while a socket carries it, through a re-apply, and goes once none does', async () => {
    const compiled = compileYaml(POLICY);
    const id = idOf('sys/sd-one');
    carried = () => new Set([id]);
    await start(compiled);
    expect(adds).toEqual([{ map: mapIn(compiled, 'a'), id, verdict: { kind: 'goto', chain: 'sd_offline.a' } }]);

    removeAndLook('sys/sd-one');
    await severalChecks();
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

  it("a socket of a cgroup that is gone keeps it (a removed child of the member's, as far as can be told); one of a live cgroup does not", async () => {
    const compiled = compileYaml(POLICY);
    mkdirSync(join(root, 'sys/sd-one/payload'));
    const id = idOf('sys/sd-one');
    const child = idOf('sys/sd-one/payload');
    const unrelated = 999_999_999n;
    await start(compiled);
    rmdirSync(join(root, 'sys/sd-one/payload'));
    carried = () => new Set([child, unrelated]);
    alive = (asked) => asked === unrelated;
    removeAndLook('sys/sd-one');
    await severalChecks();
    expect(removals).toEqual([]);
    expect(tracker!.counters()).toMatchObject({ lingering: 1 });
    carried = () => new Set([unrelated]);
    await until('it goes once only live cgroups carry sockets', () => removals.length > 0);
    expect(removals).toEqual([{ map: mapIn(compiled, 'a'), id }]);
  });

  it('stays while the sockets cannot be read, said once, and goes once they can', async () => {
    const compiled = compileYaml(POLICY);
    const id = idOf('sys/sd-one');
    await start(compiled);
    carried = () => {
      throw new Error('sock_diag: EPERM');
    };
    removeAndLook('sys/sd-one');
    await severalChecks();
    expect(removals).toEqual([]);
    expect(errors.filter((line) => line.includes('apps-sockets-unread'))).toHaveLength(1);
    carried = () => new Set();
    await until('it goes once the sockets can be read', () => removals.length > 0);
    expect(removals).toEqual([{ map: mapIn(compiled, 'a'), id }]);
  });

  it('a re-apply writes it with what the new policy claims for its path, and drops it where the policy claims nothing', async () => {
    const id = idOf('sys/sd-one');
    carried = () => new Set([id]);
    await start(compileYaml(POLICY));
    removeAndLook('sys/sd-one');
    await severalChecks();
    expect(tracker!.counters()).toMatchObject({ lingering: 1 });

    // The same members, in a domain renamed: its chain is another, and the kept id goes there.
    const renamed = compileYaml(POLICY.replace('offline:', 'sealed:'));
    adds.length = 0;
    await tracker!.setPolicy({ compiled: renamed, liveNames: liveNames(renamed, 'b') });
    await until('it is written with the new claim', () => adds.length > 0);
    expect(adds).toEqual([{ map: mapIn(renamed, 'b'), id, verdict: { kind: 'goto', chain: 'sd_sealed.b' } }]);

    // No member there any more: nothing keeps it, and its old generation's map went with that generation.
    removals.length = 0;
    const none = compileYaml('defaults: {egress: allow}\n');
    await tracker!.setPolicy({ compiled: none, liveNames: liveNames(none, 'a') });
    await severalChecks();
    expect(tracker!.counters()).toMatchObject({ lingering: 0 });
    expect(removals).toEqual([]);
  });

  it('a write of it the kernel refused is tried again at the next check of the sockets, not at the next apply', async () => {
    const compiled = compileYaml(POLICY);
    const id = idOf('sys/sd-one');
    carried = () => new Set([id]);
    await start(compiled);
    removeAndLook('sys/sd-one');
    await severalChecks();

    adds.length = 0;
    refuseAdds = 1;
    await tracker!.setPolicy({ compiled, liveNames: liveNames(compiled, 'b') });
    await until('it is written into the new generation', () => adds.length > 0);
    expect(refuseAdds).toBe(0);
    expect(adds).toEqual([{ map: mapIn(compiled, 'b'), id, verdict: { kind: 'goto', chain: 'sd_offline.b' } }]);
    expect(errors.filter((line) => line.includes('"apps-write-failed"'))).toHaveLength(1);
    expect(tracker!.counters()).toMatchObject({ lingering: 1, failed: 1 });
  });

  it("the root of a unit's delegated subtree (Delegate= with User=, chowned to its user) is kept: only root removes it", async () => {
    mkdirSync(join(root, 'sys/sd-delegated'));
    chownSync(join(root, 'sys/sd-delegated'), 1000, 1000);
    const compiled = compileYaml(POLICY);
    const id = idOf('sys/sd-delegated');
    carried = () => new Set([id]);
    await start(compiled);
    removeAndLook('sys/sd-delegated');
    await severalChecks();
    expect(removals).toEqual([]);
    expect(tracker!.counters()).toMatchObject({ lingering: 1 });
  });

  it('past the bound (held and kept together) a removed id goes at once, and that is said', async () => {
    mkdirSync(join(root, 'sys/sd-two'));
    const compiled = compileYaml(POLICY);
    const [one, two] = [idOf('sys/sd-one'), idOf('sys/sd-two')];
    carried = () => new Set([one, two]);
    await start(compiled, 2);
    removeAndLook('sys/sd-one');
    await severalChecks();
    expect(tracker!.counters()).toMatchObject({ tracked: 1, lingering: 1 });
    mkdirSync(join(root, 'sys/sd-three'));
    tracker!.lookEverywhere();
    await until('the third is held', () => tracker!.counters().tracked === 2);
    removeAndLook('sys/sd-two');
    await until('it goes', () => removals.length > 0);
    expect(removals).toEqual([{ map: mapIn(compiled, 'a'), id: two }]);
    expect(errors.filter((line) => line.includes('"apps-full"'))).toHaveLength(1);
  });

  it("a user's own cgroup goes at once, whatever its sockets: a user leaves its cgroups at will, and must not fill the bound", async () => {
    mkdirSync(join(root, 'user/u1/sd-mine'), { recursive: true });
    for (const path of ['user/u1', 'user/u1/sd-mine']) chownSync(join(root, path), 1000, 1000);
    const compiled = compileYaml(POLICY);
    const id = idOf('user/u1/sd-mine');
    carried = () => new Set([id]);
    await start(compiled);
    expect(adds.map((a) => a.id)).toContain(id);
    removeAndLook('user/u1/sd-mine');
    await until('it goes', () => removals.length > 0);
    expect(removals).toEqual([{ map: mapIn(compiled, 'a', 3), id }]);
    expect(tracker!.counters()).toMatchObject({ lingering: 0 });
  });
});
