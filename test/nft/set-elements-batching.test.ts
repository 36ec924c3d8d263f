/**
 * The parts of src/nft/set-elements.ts that need no kernel: the batching
 * wrapper (over a recording writer) and the address keys.
 */
import { createSocket } from 'node:dgram';
import { once } from 'node:events';
import { describe, expect, it } from 'vitest';
import { SetWriteRefusedError } from '../../src/errors.js';
import { addressKey, createBatchingWriter, type ElementWrite, type SetElementWriter } from '../../src/nft/set-elements.js';

/** A writer that records each transaction and refuses any that names a set called "gone". */
function recordingWriter(): SetElementWriter & { transactions: ElementWrite[][]; closed: boolean } {
  const w = {
    transactions: [] as ElementWrite[][],
    closed: false,
    add(writes: readonly ElementWrite[]) {
      w.transactions.push([...writes]);
      const bad = writes.find((x) => x.set === 'gone');
      if (bad !== undefined) throw new SetWriteRefusedError('missing-set', 'no such set', { set: bad.set, errno: 2 });
    },
    remove() {
      throw new Error('not used here');
    },
    close() {
      w.closed = true;
    },
  };
  return w;
}

const write = (address: string, set = 'd4'): ElementWrite => ({ set, address, timeoutMs: 60_000 });

describe('createBatchingWriter', () => {
  it('puts requests made by separate I/O callbacks of one event-loop turn in one transaction', async () => {
    const writer = recordingWriter();
    const batching = createBatchingWriter(writer);
    const server = createSocket('udp4');
    const client = createSocket('udp4');
    server.bind(0, '127.0.0.1');
    await once(server, 'listening');
    const { port } = server.address();
    // Each datagram is its own 'message' callback, with microtasks run between them: like concurrent DNS queries.
    const done: Promise<void>[] = [];
    const all = new Promise<void>((resolve) => {
      server.on('message', (msg) => {
        done.push(batching.add([write(msg.toString())]));
        if (done.length === 3) resolve();
      });
    });
    const sent = ['192.0.2.1', '192.0.2.2', '192.0.2.3'].map((a) => new Promise<void>((r) => client.send(a, port, '127.0.0.1', () => r())));
    await Promise.all(sent);
    // Nothing read until all three wait in the socket.
    await all;
    await Promise.all(done);
    server.close();
    client.close();
    expect(writer.transactions).toHaveLength(1);
    expect(writer.transactions[0]?.map((w) => w.address).sort()).toEqual(['192.0.2.1', '192.0.2.2', '192.0.2.3']);
  });

  it('resolves each request only after its transaction, and starts a new one in the next turn', async () => {
    const writer = recordingWriter();
    const batching = createBatchingWriter(writer);
    const first = batching.add([write('192.0.2.1')]);
    expect(writer.transactions).toHaveLength(0);
    await first;
    expect(writer.transactions).toHaveLength(1);
    await batching.add([write('192.0.2.2')]);
    expect(writer.transactions).toHaveLength(2);
  });

  it('tries each request alone when the shared transaction is refused, so only the bad one fails', async () => {
    const writer = recordingWriter();
    const batching = createBatchingWriter(writer);
    const results = await Promise.allSettled([
      batching.add([write('192.0.2.1')]),
      batching.add([write('192.0.2.2', 'gone')]),
      batching.add([write('192.0.2.3')]),
    ]);
    expect(results.map((r) => r.status)).toEqual(['fulfilled', 'rejected', 'fulfilled']);
    const refused = results[1] as PromiseRejectedResult;
    expect(refused.reason).toBeInstanceOf(SetWriteRefusedError);
    expect((refused.reason as SetWriteRefusedError).reason).toBe('missing-set');
    expect(writer.transactions.map((t) => t.length)).toEqual([3, 1, 1, 1]);
  });

  it('a lone request that is refused is not tried twice', async () => {
    const writer = recordingWriter();
    const batching = createBatchingWriter(writer);
    await expect(batching.add([write('192.0.2.2', 'gone')])).rejects.toBeInstanceOf(SetWriteRefusedError);
    expect(writer.transactions).toHaveLength(1);
  });

  it('writes what is pending on close, then refuses more', async () => {
    const writer = recordingWriter();
    const batching = createBatchingWriter(writer);
    const pending = batching.add([write('192.0.2.1')]);
    batching.close();
    await pending;
    expect(writer.transactions).toHaveLength(1);
    expect(writer.closed).toBe(true);
    await expect(batching.add([write('192.0.2.2')])).rejects.toThrow(/closed/);
  });
});

describe('addressKey', () => {
  it('gives the address in network byte order, 4 bytes for v4 and 16 for v6', () => {
    expect(addressKey('192.0.2.7').toString('hex')).toBe('c0000207');
    expect(addressKey('2001:db8::7').toString('hex')).toBe('20010db8000000000000000000000007');
    expect(addressKey('::').toString('hex')).toBe('0'.repeat(32));
    expect(addressKey('::1').toString('hex')).toBe(`${'0'.repeat(31)}1`);
    expect(addressKey('fe80::').toString('hex')).toBe(`fe80${'0'.repeat(28)}`);
    expect(addressKey('2001:db8:1:2:3:4:5:6').toString('hex')).toBe('20010db8000100020003000400050006');
    expect(addressKey('::ffff:192.0.2.9').toString('hex')).toBe('00000000000000000000ffffc0000209');
    expect(addressKey('64:ff9b::192.0.2.9').toString('hex')).toBe('0064ff9b0000000000000000c0000209');
  });

  it('refuses what is no address, before anything is sent', () => {
    for (const bad of ['example.org', '192.0.2.256', '2001:db8::1::2', 'fe80::1%eth0', '']) {
      expect(() => addressKey(bad)).toThrow(SetWriteRefusedError);
    }
  });
});
