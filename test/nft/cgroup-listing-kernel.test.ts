import { lstatSync, mkdirSync, rmdirSync } from 'node:fs';
import { join } from 'node:path';
import { createRequire } from 'node:module';
import { pathToFileURL } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestNet, harnessUnavailableReason, type TestNet } from '../harness/index.js';
import type { NftTableListing } from '../../src/nft/types.js';

/**
 * egressd's listings of its own table take the elements of `socket
 * cgroupv2` maps from the kernel as ids: nft would print each as a path it
 * finds by walking all of cgroupfs (25 s for 200 elements beside 2,200
 * cgroups, measured here) and aborts on one it cannot print. Against the
 * real kernel and nft, in a test net whose host has cgroup2 at
 * /sys/fs/cgroup: the listing is nft's own but for those keys, and holds
 * where nft's aborts.
 */
const unavailable = harnessUnavailableReason();
const FIXTURE = join(import.meta.dirname, 'fixtures', 'cgroup-listing.ts');
const TSX = pathToFileURL(createRequire(import.meta.url).resolve('tsx')).href;

interface Listed {
  readonly ms: number;
  readonly listing: Omit<NftTableListing, 'raw'>;
  readonly sets: [string, { size: number; dynamic: boolean }][];
}

describe.skipIf(unavailable)(`listing a table with cgroup maps ${unavailable ? `(skipped: ${unavailable})` : ''}`, () => {
  let net: TestNet;
  let E: string;
  const made: Buffer[] = [];
  const mk = (path: string | Buffer): void => {
    const full = Buffer.concat([Buffer.from(`${net.host.cgroupFsPath('')}/`), Buffer.from(path)]);
    mkdirSync(full);
    made.push(full);
  };
  const list = async (config: object = {}): Promise<Listed> => {
    const r = await net.host.exec(process.execPath, ['--import', TSX, FIXTURE, JSON.stringify(config)], { timeoutMs: 120_000 });
    expect(r.code, r.stderr).toBe(0);
    return JSON.parse(r.stdout) as Listed;
  };

  beforeAll(async () => {
    net = await createTestNet();
    E = `egdlist-${net.id}`;
    mk(E);
    for (let i = 0; i < 20; i++) mk(`${E}/a-${i}`);
    for (let i = 0; i < 100; i++) mk(`${E}/junk-${i}`);
    const elements = Array.from({ length: 20 }, (_, i) => `"${E}/a-${i}" : ${i % 2 === 0 ? 'goto app_x' : 'drop'}`).join(', ');
    await net.host.nft({
      stdin: `table inet egressd {
  set blocked { type ipv4_addr; flags interval; elements = { 192.0.2.0/24, 198.51.100.7 } }
  map app_uid { type uid : verdict; elements = { 1000 : goto app_x } }
  map app_cg_l2 { typeof socket cgroupv2 level 2 : verdict; elements = { ${elements} } }
  chain app_x { ip daddr @blocked drop; }
  chain output { type filter hook output priority 0; policy accept; socket cgroupv2 level 2 vmap @app_cg_l2; meta skuid vmap @app_uid; }
}
`,
    });
  });
  afterAll(async () => {
    await net?.host.nft(['delete', 'table', 'inet', 'egressd'], { check: false });
    for (const full of made.reverse()) rmdirSync(full);
    await net?.destroy();
  });

  it("is nft's own listing, but for the cgroup maps' keys, which are ids", async () => {
    const printed = JSON.parse((await net.host.nft(['-j', 'list', 'table', 'inet', 'egressd'])).stdout) as {
      nftables: Record<string, Record<string, unknown>>[];
    };
    const { listing, sets } = await list();
    const of = (kind: string) => printed.nftables.filter((item) => kind in item).map((item) => item[kind]);
    expect(listing.chains).toEqual(of('chain'));
    expect(listing.rules).toEqual(of('rule'));
    expect(listing.sets).toEqual(of('set'));
    expect(listing.maps.find((m) => m.name === 'app_uid')).toEqual(of('map').find((m) => m!['name'] === 'app_uid'));
    const cgroups = of('map').find((m) => m!['name'] === 'app_cg_l2') as { elem: [string, unknown][] };
    const { elem, ...declared } = listing.maps.find((m) => m.name === 'app_cg_l2')!;
    expect(declared).toEqual(Object.fromEntries(Object.entries(cgroups).filter(([key]) => key !== 'elem')));
    // nft printed each key as its path; the listing has the same element under the path's id.
    const byId = cgroups.elem.map(([path, verdict]) => [Number(net.host.cgroupId(path)), verdict]);
    expect([...elem!].sort()).toEqual(byId.sort());
    expect(sets.find(([name]) => name === 'app_cg_l2')![1]).toMatchObject({ size: 20, dynamic: true });
  });

  it('holds where nft aborts: an element whose cgroup nft cannot print', async () => {
    const name = Buffer.concat([Buffer.from(`${E}/b-`), Buffer.from([0xff, 0xfe])]);
    mk(name);
    const { listing, sets } = await list({ write: { map: 'app_cg_l2', path: name.toString('hex'), chain: 'app_x' } });
    const id = Number(lstatSync(Buffer.concat([Buffer.from(`${net.host.cgroupFsPath('')}/`), name]), { bigint: true }).ino);
    const elem = listing.maps.find((m) => m.name === 'app_cg_l2')!.elem!;
    expect(elem).toHaveLength(21);
    expect(elem).toContainEqual([id, { goto: { target: 'app_x' } }]);
    expect(sets.find(([n]) => n === 'app_cg_l2')![1].size).toBe(21);
    // nft's own JSON listing of it does not finish (nftables 1.0.6: json.c asserts on the path).
    const printed = await net.host.nft(['-j', 'list', 'table', 'inet', 'egressd'], { check: false });
    expect(printed.code).not.toBe(0);
  });
});
