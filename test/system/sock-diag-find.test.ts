import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ErrorCode } from '../../src/errors.js';
import { openCgroupPaths } from '../../src/system/cgroup-id.js';
import { encodeMessage, NetlinkSocket, NlmsgType, type NetlinkTransport } from '../../src/system/netlink.js';
import { findSocket, socketId, TcpState } from '../../src/system/sock-diag.js';

/**
 * The exact lookup's request bytes and how its answers are read. That the
 * kernel finds the client's socket (and not the resolver's own) in this
 * order is test/resolver/who-kernel.test.ts's.
 */
function fake(answer: (seq: number, request: Buffer) => Buffer[]): NetlinkTransport & { sent: Buffer[] } {
  const queue: Buffer[] = [];
  const sent: Buffer[] = [];
  return {
    sent,
    send(datagram) {
      sent.push(datagram);
      queue.push(...answer(datagram.readUInt32LE(8), datagram));
    },
    receive() {
      const next = queue.shift();
      if (!next) throw new Error('nothing more to receive');
      return next;
    },
    close() {},
  };
}

const errorMessage = (seq: number, code: number) => {
  const payload = Buffer.alloc(20);
  payload.writeInt32LE(code, 0);
  return encodeMessage({ type: NlmsgType.Error, flags: 0, seq, payload });
};

/**
 * An inet_diag_msg for the socket the request names, in `state`, for uid
 * 999, with its addresses as the kernel reports a socket's: its own first.
 * A UDP request names the socket from its peer's side (src is the peer),
 * so the answer has them the other way round.
 */
function diagAnswer(seq: number, request: Buffer, state: number): Buffer {
  const msg = Buffer.alloc(72);
  msg.writeUInt8(request.readUInt8(16), 0);
  msg.writeUInt8(state, 1);
  request.subarray(24, 24 + 48).copy(msg, 4);
  if (request.readUInt8(17) === 17) {
    request.subarray(24, 26).copy(msg, 6);
    request.subarray(26, 28).copy(msg, 4);
    request.subarray(28, 44).copy(msg, 24);
    request.subarray(44, 60).copy(msg, 8);
  }
  msg.writeUInt32LE(999, 64);
  return encodeMessage({ type: 20, flags: 0, seq, payload: msg });
}

const client = { address: '127.0.0.1', port: 40000 };
const resolver = { address: '127.0.0.153', port: 53 };

describe('sock_diag: one socket by its addresses', () => {
  it('UDP asks with the peer as src and the socket as dst; TCP the other way round; no cookie, loopback', () => {
    const udp = socketId({ protocol: 'udp', local: client, remote: resolver });
    expect(udp.family).toBe(4);
    expect(udp.sockid.readUInt16BE(0)).toBe(53);
    expect(udp.sockid.readUInt16BE(2)).toBe(40000);
    expect([...udp.sockid.subarray(4, 8)]).toEqual([127, 0, 0, 153]);
    expect([...udp.sockid.subarray(20, 24)]).toEqual([127, 0, 0, 1]);
    expect(udp.sockid.readUInt32LE(36)).toBe(1);
    expect([udp.sockid.readUInt32LE(40), udp.sockid.readUInt32LE(44)]).toEqual([0xffffffff, 0xffffffff]);
    const tcp = socketId({ protocol: 'tcp', local: client, remote: resolver });
    expect(tcp.sockid.readUInt16BE(0)).toBe(40000);
    expect([...tcp.sockid.subarray(4, 8)]).toEqual([127, 0, 0, 1]);
    expect([...tcp.sockid.subarray(20, 24)]).toEqual([127, 0, 0, 153]);
  });

  it('IPv6 addresses whole; v4-mapped addresses as IPv4, where the kernel keeps them; mixed families refused', () => {
    const v6 = socketId({ protocol: 'tcp', local: { address: '2001:db8::1', port: 1 }, remote: { address: '::1', port: 53 } });
    expect(v6.family).toBe(6);
    expect(v6.sockid.subarray(4, 20).toString('hex')).toBe('20010db8000000000000000000000001');
    expect(v6.sockid.subarray(20, 36).toString('hex')).toBe('00000000000000000000000000000001');
    const mapped = socketId({ protocol: 'udp', local: { address: '::ffff:127.0.0.1', port: 1 }, remote: { address: '::FFFF:127.0.0.153', port: 53 } });
    expect(mapped.family).toBe(4);
    expect([...mapped.sockid.subarray(4, 8)]).toEqual([127, 0, 0, 153]);
    expect(() => socketId({ protocol: 'udp', local: client, remote: { address: '::1', port: 53 } })).toThrow(
      expect.objectContaining({ code: ErrorCode.Netlink }),
    );
  });

  it('a request for the protocol asked, answered by one socket; not found (ENOENT) is undefined, other refusals throw', () => {
    const transport = fake((seq, request) => [diagAnswer(seq, request, 7)]);
    const found = findSocket(new NetlinkSocket(transport, 1), { protocol: 'udp', local: client, remote: resolver });
    expect(transport.sent[0]!.readUInt16LE(4)).toBe(20);
    expect(transport.sent[0]!.readUInt16LE(6)).toBe(1); // NLM_F_REQUEST alone: no dump
    expect(transport.sent[0]!.readUInt8(17)).toBe(17); // IPPROTO_UDP
    expect(found?.uid).toBe(999);
    expect(
      findSocket(
        new NetlinkSocket(
          fake((seq) => [errorMessage(seq, -2)]),
          1,
        ),
        { protocol: 'tcp', local: client, remote: resolver },
      ),
    ).toBeUndefined();
    expect(() =>
      findSocket(
        new NetlinkSocket(
          fake((seq) => [errorMessage(seq, -1)]),
          1,
        ),
        { protocol: 'tcp', local: client, remote: resolver },
      ),
    ).toThrow(expect.objectContaining({ code: ErrorCode.Netlink, errno: 1 }));
  });

  it("a TCP socket in TIME_WAIT is no socket: the kernel reports it with uid 0, which is nobody's", () => {
    const timeWait = fake((seq, request) => [diagAnswer(seq, request, TcpState.TimeWait)]);
    expect(findSocket(new NetlinkSocket(timeWait, 1), { protocol: 'tcp', local: client, remote: resolver })).toBeUndefined();
    const established = fake((seq, request) => [diagAnswer(seq, request, TcpState.Established)]);
    expect(findSocket(new NetlinkSocket(established, 1), { protocol: 'tcp', local: client, remote: resolver })?.uid).toBe(999);
  });
});

describe('cgroup ids', () => {
  it('where /sys/fs/cgroup (or the root given) is not cgroup2, no path is made up', () => {
    const dir = mkdtempSync(join(tmpdir(), 'egd-cg-'));
    try {
      expect(openCgroupPaths({ root: dir })).toBeUndefined();
    } finally {
      rmSync(dir, { recursive: true });
    }
  });
});
