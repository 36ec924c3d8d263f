import { describe, expect, it } from 'vitest';
import { parseListing } from '../../src/nft/client.js';

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
