/**
 * datagrams.ts against real UDP sockets on loopback: a burst from several
 * clients is read many at a time, and a round handler answers some of it in
 * place (the bytes it edits are what the client gets), the rest reaching
 * the datagram handler as before; every client gets the replies to its own
 * datagrams and no other's.
 */
import dgram from 'node:dgram';
import { afterEach, describe, expect, it } from 'vitest';
import { createDatagramServer, type DatagramHandler, type DatagramServer, type RoundHandler } from '../../src/resolver/datagrams.js';
import { until } from '../support/wait.js';

/** 300 datagrams: more than one recvmmsg takes (64), so a wake-up reads several rounds into the same arena. */
const PER_CLIENT = 100;
const CLIENTS = 3;
let server: DatagramServer | undefined;
const sockets: dgram.Socket[] = [];

afterEach(async () => {
  for (const socket of sockets.splice(0)) socket.close();
  await server?.close();
  server = undefined;
});

/**
 * CLIENTS sockets each send PER_CLIENT datagrams "c<client> <seq> <P|H>" at
 * once, in turn; resolves to what each got back, once all is in. P or H by
 * seq + client: the datagrams answered in place are not every CLIENTS-th of
 * a round, so a reply sent from the wrong slot's address reaches another
 * client.
 */
async function burst(address: string, port: number): Promise<string[][]> {
  const got: string[][] = [];
  const clients = await Promise.all(
    Array.from({ length: CLIENTS }, async (_, c) => {
      const socket = dgram.createSocket(address.includes(':') ? 'udp6' : 'udp4');
      sockets.push(socket);
      got[c] = [];
      socket.on('message', (reply) => got[c]!.push(reply.toString()));
      await new Promise<void>((resolve) => socket.bind(0, address, resolve));
      return socket;
    }),
  );
  // Every datagram sent before the server's loop turns: the kernel queues them, recvmmsg takes them in rounds.
  for (let seq = 0; seq < PER_CLIENT; seq++) clients.forEach((socket, c) => socket.send(payload(c, seq), port, address));
  await until('every reply came', () => got.every((replies) => replies.length >= PER_CLIENT), { timeoutMs: 5000, everyMs: 10 });
  return got;
}

const payload = (c: number, seq: number) => `c${c} ${seq} ${(seq + c) % 2 === 0 ? 'P' : 'H'}`;
const payloads = (c: number) => Array.from({ length: PER_CLIENT }, (_, seq) => payload(c, seq)).sort();

/** Replies to a client's own datagrams, once each; the H ones only through the handler, the P ones in place unless dgram read them (the first of a wake-up). */
function checkReplies(got: string[][]): { inPlace: number } {
  let inPlace = 0;
  got.forEach((replies, c) => {
    expect(replies.map((r) => r.replace(/^(In place|handler): /, '')).sort()).toEqual(payloads(c));
    for (const r of replies.filter((reply) => reply.startsWith('In place: '))) {
      expect(r).toMatch(/ P$/);
      inPlace++;
    }
  });
  return { inPlace };
}

/** The datagram handler's answer: "handler: " and the datagram. */
const byHandler: DatagramHandler = (raw, _from, _local, reply) => reply(Buffer.from(`handler: ${raw.toString()}`));

describe('datagrams read many at a time, some answered where they lie', () => {
  for (const address of ['127.0.0.1', '::1']) {
    it(`over ${address}: each client gets its own replies, the in-place ones as the round handler edited them`, async () => {
      const rounds: number[] = [];
      const wrongKeys: string[] = [];
      const inPlace: RoundHandler = (round, local) => {
        rounds.push(round.count);
        if (local.address !== address) wrongKeys.push(`local ${local.address}`);
        for (let i = 0; i < round.count; i++) {
          for (let j = 0; j < round.count; j++) {
            const [a, b] = [round.sender(i), round.sender(j)];
            const same = a.address === b.address && a.port === b.port;
            // Equal keys only for the same sender (IPv6: a flow label may tell one sender's datagrams apart; loopback sends none).
            if ((round.senderKey(i) === round.senderKey(j)) !== same) wrongKeys.push(`${i}/${j}`);
          }
          const text = round.data.toString('latin1', round.offset(i), round.offset(i) + round.length(i));
          if (!text.endsWith('P')) continue;
          const at = round.reply(i, Buffer.from(`in place: ${text}`));
          round.out.write('I', at, 'latin1');
        }
      };
      server = createDatagramServer(
        byHandler,
        (error) => {
          throw error;
        },
        { inPlace },
      );
      const port = await server.bind(address, 0);
      const got = await burst(address, port);
      // All but the first few P datagrams (each read by dgram at a wake-up) answered in place.
      expect(checkReplies(got).inPlace).toBeGreaterThan((CLIENTS * PER_CLIENT) / 4);
      // The burst came in full rounds and more than one (the first datagram of a wake-up through dgram alone).
      expect(Math.max(...rounds)).toBe(64);
      expect(rounds.length).toBeGreaterThan(1);
      expect(wrongKeys).toEqual([]);
      expect(server.sendErrors).toBe(0);
    });
  }

  it('a datagram answered twice in a round gets one reply; the second attempt is an error the server reports, and the rest goes on', async () => {
    const errors: unknown[] = [];
    const inPlace: RoundHandler = (round) => {
      for (let i = 0; i < round.count; i++) {
        const text = round.data.toString('latin1', round.offset(i), round.offset(i) + round.length(i));
        if (!text.endsWith('P')) continue;
        round.reply(i, Buffer.from(`In place: ${text}`));
        if (text.startsWith('c1 ')) round.reply(i, Buffer.from('again'));
      }
    };
    server = createDatagramServer(byHandler, (error) => errors.push(error), {
      inPlace,
    });
    const port = await server.bind('127.0.0.1', 0);
    const got = await burst('127.0.0.1', port);
    // What a round had left after the throw went to the handler instead: every datagram still answered exactly once, and never 'again'.
    checkReplies(got);
    expect(errors.length).toBeGreaterThan(0);
    expect(String(errors[0])).toContain('cannot be answered again');
  });

  it('unbatched (a Node.js that hides the descriptor): every datagram through the handler, the round handler never asked', async () => {
    let asked = 0;
    server = createDatagramServer(
      byHandler,
      (error) => {
        throw error;
      },
      {
        batched: false,
        inPlace: () => asked++,
      },
    );
    const port = await server.bind('127.0.0.1', 0);
    const got = await burst('127.0.0.1', port);
    expect(checkReplies(got).inPlace).toBe(0);
    expect(asked).toBe(0);
    expect(server.unbatched).toBe(1);
  });
});
