import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import dnsPacket from 'dns-packet';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DnsCache } from '../../src/resolver/cache.js';
import { resolverLimits } from '../../src/resolver/limits.js';
import { ownerKeys } from '../../src/resolver/owner.js';
import { createPipeline } from '../../src/resolver/pipeline.js';
import type { Client } from '../../src/resolver/server.js';
import type { UpstreamAnswer } from '../../src/resolver/upstream.js';
import type { Who } from '../../src/resolver/who.js';
import type { NameLookup } from '../../src/system/nss.js';
import { dataOf, rcodeOf } from './dns-support.js';

/**
 * Whose share a query takes (owner.ts) with the pipeline's cap per asker, as
 * runtime.ts joins them: a user's subordinate uids (a rootless container
 * sending from the machine's network namespace) take one share, its owner's.
 */
const ALICE = 1000;
const BOB = 1001;
const SUBUIDS = 100_000;

let dir: string;
let subuid: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'egd-owner-'));
  subuid = join(dir, 'subuid');
  // Alice's range named by name, a second by uid; carol's names a user NSS does not know.
  writeFileSync(subuid, `alice:${SUBUIDS}:65536\n${ALICE}:300000:10\ncarol:400000:10\nmallory:0:1\n`);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const lookup: NameLookup = (kind, name) => (kind === 'user' ? ({ alice: ALICE, bob: BOB, mallory: 1002 } as Record<string, number>)[name] : undefined);

describe('ownerKeys', () => {
  it("counts a subordinate uid as its range's owner, by name or by uid, and root as root", () => {
    const ownerOf = ownerKeys({ subuidFile: subuid, lookup });
    expect(ownerOf(ALICE)).toBe('1000');
    expect(ownerOf(SUBUIDS)).toBe('1000');
    expect(ownerOf(SUBUIDS + 65535)).toBe('1000');
    expect(ownerOf(300_009)).toBe('1000');
    expect(ownerOf(SUBUIDS + 65536)).toBe(String(SUBUIDS + 65536));
    expect(ownerOf(BOB)).toBe('1001');
    // An owner NSS does not know still makes one share of its range.
    expect(ownerOf(400_000)).toBe(ownerOf(400_009));
    expect(ownerOf(400_000)).not.toBe('400000');
    // A range that gives a user uid 0 does not put root's queries into that user's share.
    expect(ownerOf(0)).toBe('0');
  });

  it('reads the file again once what it read is maxAgeMs old, and each uid counts alone without it', () => {
    let now = 0;
    const file = join(dir, 'changing');
    writeFileSync(file, '');
    const ownerOf = ownerKeys({ subuidFile: file, lookup, maxAgeMs: 5000, now: () => now });
    expect(ownerOf(SUBUIDS)).toBe(String(SUBUIDS));
    writeFileSync(file, `bob:${SUBUIDS}:10\n`);
    now = 4999;
    expect(ownerOf(SUBUIDS)).toBe(String(SUBUIDS));
    now = 5000;
    expect(ownerOf(SUBUIDS)).toBe('1001');
    rmSync(file);
    now = 10_000;
    expect(ownerOf(SUBUIDS)).toBe(String(SUBUIDS));
  });
});

describe("a user's subordinate uids hold one share of the query slots", () => {
  it('8 subordinate uids asking names whose servers never answer leave another user answered', async () => {
    const answered = dnsPacket.decode(
      dnsPacket.encode({
        type: 'response',
        id: 1,
        questions: [{ type: 'A', name: 'bob.example' }],
        answers: [{ type: 'A', name: 'bob.example', ttl: 300, data: '192.0.2.7' }],
      }),
    );
    // The flood's names are asked of a server that never answers: each query holds its slot.
    const upstream = {
      query: (name: string): Promise<UpstreamAnswer | undefined> =>
        name === 'bob.example'
          ? Promise.resolve({
              message: answered,
              rcode: 0,
              bytes: 60,
              server: { address: '127.0.0.1', port: 53 },
              transport: 'udp',
            } as unknown as UpstreamAnswer)
          : new Promise(() => undefined),
    };
    // The defaults, as egressd runs: 4,096 slots, 512 per asker.
    const limits = resolverLimits();
    const ownerOf = ownerKeys({ subuidFile: subuid, lookup });
    const pipeline = createPipeline<Who>({
      hooks: {
        // Who asks is the client's port here: the uid the test says sent from it.
        identify: (client) => ({ uid: client.port }),
        admit: () => 'go',
        learn: () => undefined,
        shape: () => 'answer',
      },
      upstream,
      cache: new DnsCache(limits),
      limits,
      askerKey: (who) => ownerOf(who.uid),
    });
    const from = (uid: number, transport: Client['transport'] = 'udp'): Client => ({
      transport,
      address: '127.0.0.1',
      port: uid,
      local: { address: '127.0.0.153', port: 53 },
    });
    const ask = (name: string, uid: number, transport: Client['transport'] = 'udp'): Promise<Buffer | undefined> =>
      pipeline.answer(dnsPacket.encode({ type: 'query', id: 7, flags: dnsPacket.RECURSION_DESIRED, questions: [{ type: 'A', name }] }), from(uid, transport));
    for (let sub = 0; sub < 8; sub++) for (let i = 0; i < limits.maxPendingPerAsker; i++) void ask(`n${sub}-${i}.never.example`, SUBUIDS + sub * 1000);
    // Bob is answered, over UDP and TCP.
    for (const transport of ['udp', 'tcp'] as const) {
      const reply = await ask('bob.example', BOB, transport);
      expect(reply, transport).toBeDefined();
      expect(dnsPacket.decode(reply!).answers?.map(dataOf)).toEqual(['192.0.2.7']);
    }
    // Alice's share is full: the rest of her subordinate uids' queries were turned away, and so is she.
    expect(pipeline.stats().pending).toBe(limits.maxPendingPerAsker);
    expect(pipeline.stats().overloadedByAsker).toBe(7 * limits.maxPendingPerAsker);
    expect(rcodeOf(dnsPacket.decode((await ask('more.never.example', ALICE, 'tcp'))!))).toBe(2);
  });
});
