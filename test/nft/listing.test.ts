import { describe, expect, it } from 'vitest';
import { parseListing } from '../../src/nft/client.js';
import { elementReferences, ruleReferences } from '../../src/nft/listing.js';
import type { NftJson } from '../../src/nft/types.js';

const META = '{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}';

describe('parseListing', () => {
  it('reads one document, and joins the documents a batch of list commands prints, one metainfo kept', () => {
    expect(parseListing(`{"nftables": [${META}, {"chain": {"name": "c"}}]}\n`).nftables).toHaveLength(2);
    const joined = parseListing(`{"nftables": [${META}, {"chain": {"name": "c"}}]}\n{"nftables": [${META}, {"set": {"name": "s"}}]}\n`);
    expect(joined.nftables).toEqual([JSON.parse(META), { chain: { name: 'c' } }, { set: { name: 's' } }]);
  });

  it('refuses what is not a libnftables listing, whole or in part', () => {
    expect(() => parseListing('Error: something')).toThrow(/not JSON/);
    expect(() => parseListing(`{"nftables": [${META}]}\nError: half`)).toThrow(/not JSON/);
    expect(() => parseListing(`{"nftables": [${META}]}\n[1, 2]`)).toThrow(/not a libnftables listing/);
    expect(() => parseListing('{"tables": []}')).toThrow(/not a libnftables listing/);
  });
});

const rule = (...expr: NftJson[]) => ({ expr });

describe('listing walkers', () => {
  it('find the sets a rule looks up and the chains it sends packets to, in order', () => {
    const refs = ruleReferences(
      rule(
        { match: { op: '==', left: { payload: { protocol: 'ip', field: 'daddr' } }, right: '@g0_net4.0123456789abcdef' } },
        { match: { op: '==', left: { meta: { key: 'l4proto' } }, right: '@protos.fedcba9876543210' } },
        { counter: { packets: 3, bytes: 180 } },
        { goto: { target: 'log_a_0.b' } },
      ),
    );
    expect(refs).toEqual({ chains: ['log_a_0.b'], sets: ['g0_net4.0123456789abcdef', 'protos.fedcba9876543210'] });
  });

  it('follow a vmap to its map, and an inline anonymous map to its chains', () => {
    expect(ruleReferences(rule({ vmap: { key: { meta: { key: 'skuid' } }, data: '@app_uid.0123456789abcdef' } }))).toEqual({
      chains: [],
      sets: ['app_uid.0123456789abcdef'],
    });
    const inline = rule({
      vmap: {
        key: { meta: { key: 'skuid' } },
        data: {
          set: [
            [1000, { jump: { target: 'app_a.a' } }],
            [1001, { drop: null }],
          ],
        },
      },
    });
    expect(ruleReferences(inline)).toEqual({ chains: ['app_a.a'], sets: [] });
    expect(ruleReferences(rule({ jump: { target: 'global_deny.a' } }))).toEqual({ chains: ['global_deny.a'], sets: [] });
  });

  it('take no text for a reference: a log prefix or a set element that starts with "@" is no set', () => {
    expect(ruleReferences(rule({ log: { prefix: '@not_a_set ', group: 7745 } }, { drop: null }))).toEqual({ chains: [], sets: [] });
    // A rule without references at all.
    expect(ruleReferences(rule({ match: { op: '==', left: { meta: { key: 'oif' } }, right: 'lo' } }, { accept: null }))).toEqual({ chains: [], sets: [] });
  });

  it('find the chains a verdict map sends to, whether its elements carry options or not', () => {
    const map = {
      elem: [
        [1000, { goto: { target: 'app_a.b' } }],
        [{ elem: { val: 'system.slice/x.service', timeout: 60, expires: 59 } }, { jump: { target: 'app_x.b' } }],
        ['system.slice/y.service', { drop: null }],
      ],
    } as const;
    expect(elementReferences(map as never)).toEqual({ chains: ['app_a.b', 'app_x.b'], sets: [] });
    expect(elementReferences({})).toEqual({ chains: [], sets: [] });
  });
});
