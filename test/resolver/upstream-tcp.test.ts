import { execFileSync } from 'node:child_process';
import dgram from 'node:dgram';
import net from 'node:net';
import dnsPacket from 'dns-packet';
import { afterEach, describe, expect, it } from 'vitest';
import { MAX_TCP_CLOSING, UpstreamClient } from '../../src/resolver/upstream.js';
import { until } from '../support/wait.js';

/**
 * How the resolver ends a TCP query upstream (upstream.ts, closeAnswered):
 * it sends its FIN and keeps the socket until the server's FIN came, so
 * that its last ACK leaves from a socket that still has its owner; a server
 * that does not close gets a reset after the wait; at most MAX_TCP_CLOSING
 * wait at once. An upstream on loopback truncates every UDP answer and
 * answers over TCP, and tells what each connection saw: the client's FIN
 * ('end') or a reset.
 */

interface Seen {
  ended: number;
  reset: number;
}

interface FakeUpstream {
  readonly port: number;
  readonly seen: Seen;
  close(): Promise<void>;
}

/** `closes`: whether the server closes its side once the client's FIN came (as dnsmasq does). */
async function fakeUpstream(closes: boolean): Promise<FakeUpstream> {
  const seen: Seen = { ended: 0, reset: 0 };
  const sockets = new Set<net.Socket>();
  const tcp = net.createServer({ allowHalfOpen: true }, (socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    // A reset shows on the next read or write: a server that keeps its side open goes on writing, which also gives the client
    // data after its answer.
    let writing: NodeJS.Timeout | undefined;
    socket.on('error', (error: NodeJS.ErrnoException) => {
      clearInterval(writing);
      if (error.code === 'ECONNRESET' || error.code === 'EPIPE') seen.reset++;
    });
    socket.on('end', () => {
      seen.ended++;
      if (closes) socket.end();
      else writing = setInterval(() => socket.write('x'), 20);
    });
    socket.on('close', () => clearInterval(writing));
    let received = Buffer.alloc(0);
    socket.on('data', (chunk: Buffer) => {
      received = Buffer.concat([received, chunk]);
      if (received.length < 2 || received.length < 2 + received.readUInt16BE(0)) return;
      const asked = dnsPacket.decode(received.subarray(2, 2 + received.readUInt16BE(0)));
      const reply = dnsPacket.encode({
        type: 'response',
        id: asked.id,
        flags: dnsPacket.RECURSION_DESIRED,
        questions: asked.questions,
        answers: [{ type: 'A', name: asked.questions![0]!.name, ttl: 60, data: '192.0.2.7' }],
      });
      const frame = Buffer.alloc(2);
      frame.writeUInt16BE(reply.length, 0);
      socket.write(Buffer.concat([frame, reply]));
    });
  });
  await new Promise<void>((resolve) => tcp.listen(0, '127.0.0.1', resolve));
  const port = (tcp.address() as net.AddressInfo).port;
  const udp = dgram.createSocket('udp4');
  udp.on('message', (raw, from) => {
    const asked = dnsPacket.decode(raw);
    const truncated = dnsPacket.encode({ type: 'response', id: asked.id, flags: dnsPacket.TRUNCATED_RESPONSE, questions: asked.questions });
    udp.send(truncated, from.port, from.address);
  });
  await new Promise<void>((resolve) => udp.bind(port, '127.0.0.1', resolve));
  return {
    port,
    seen,
    close: async () => {
      for (const socket of sockets) socket.destroy();
      udp.close();
      await new Promise((resolve) => tcp.close(resolve));
    },
  };
}

describe('the resolver ends its TCP queries upstream', () => {
  const open: { close(): unknown }[] = [];
  afterEach(async () => {
    for (const thing of open.splice(0)) await thing.close();
  });

  async function setUp(closes: boolean, tcpCloseWaitMs: number) {
    const server = await fakeUpstream(closes);
    const client = new UpstreamClient([{ address: '127.0.0.1', port: server.port, family: 4 }], { timeoutMs: 3000, attemptMs: 3000, tcpCloseWaitMs });
    open.push(server, client);
    return { server, client };
  }

  it('with its FIN once answered, and holds the socket until the server closes: no reset', async () => {
    const { server, client } = await setUp(true, 60_000);
    const answer = await client.query('a.example.test', 'A');
    expect(answer).toMatchObject({ transport: 'tcp', rcode: 0 });
    await until('the server to see the FIN', () => server.seen.ended === 1);
    // The server closed its side in turn, and the client answered its FIN: its socket waits in TIME_WAIT, which a reset leaves none of.
    await until('the client in TIME_WAIT, nothing else open', () => {
      const states = statesTowards(server.port);
      return states.length === 1 && states[0] === 'TIME-WAIT';
    });
    expect(server.seen.reset).toBe(0);
  });

  it('holds the socket while it waits, ignoring what the server still sends, and resets it past the wait', async () => {
    const { server, client } = await setUp(false, 3000);
    expect(await client.query('b.example.test', 'A')).toMatchObject({ transport: 'tcp' });
    await until('the server to see the FIN', () => server.seen.ended === 1);
    // Still this process's socket (a closed one would be an orphan, owned by no process, and send without an owner).
    await until(
      'the client socket, closing, still held by this process',
      () =>
        execFileSync('ss', ['-Htanp', `( dport = :${server.port} )`], { encoding: 'utf8' })
          .split('\n')
          .some((line) => /^FIN-WAIT-[12]\s/.test(line) && line.includes(`pid=${process.pid},`)),
      { timeoutMs: 2500 },
    );
    await until('the reset', () => server.seen.reset === 1, { timeoutMs: 5000 });
  });

  it(`keeps at most ${MAX_TCP_CLOSING} waiting at once, resetting the rest at once; close() resets those waiting`, async () => {
    const { server, client } = await setUp(false, 60_000);
    const count = MAX_TCP_CLOSING + 6;
    const answers = await Promise.all(Array.from({ length: count }, (_, i) => client.query(`n${i}.example.test`, 'A')));
    expect(answers.every((a) => a?.transport === 'tcp')).toBe(true);
    await until(`${MAX_TCP_CLOSING} FINs and 6 resets`, () => server.seen.ended === MAX_TCP_CLOSING && server.seen.reset === 6, { timeoutMs: 5000 });
    client.close();
    await until('every socket reset', () => server.seen.reset === count, { timeoutMs: 5000 });
  });
});

/** The states of TCP sockets on loopback to or from `port` (the listener's left out). */
function statesTowards(port: number): string[] {
  const out = execFileSync('ss', ['-Htan', `( sport = :${port} or dport = :${port} )`], { encoding: 'utf8' });
  return out
    .split('\n')
    .map((line) => line.trim().split(/\s+/)[0] ?? '')
    .filter((state) => state !== '' && state !== 'LISTEN');
}
