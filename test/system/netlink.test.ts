import { describe, expect, it } from 'vitest';
import { ErrorCode } from '../../src/errors.js';
import { encodeMessage, NetlinkSocket, NlmFlag, NlmsgType, parseAttributes, parseMessages, type NetlinkTransport } from '../../src/system/netlink.js';
import { dumpTcpCgroupIds, parseTcpSocket, stateName } from '../../src/system/sock-diag.js';

/** A transport that answers each request with the datagrams `answer` makes from its sequence number. */
function fake(answer: (seq: number) => Buffer[]): NetlinkTransport & { sent: Buffer[] } {
  const queue: Buffer[] = [];
  const sent: Buffer[] = [];
  return {
    sent,
    send(datagram) {
      sent.push(datagram);
      queue.push(...answer(datagram.readUInt32LE(8)));
    },
    receive() {
      const next = queue.shift();
      // The real socket fails after its receive timeout: never wait for ever.
      if (!next) throw new Error('nothing more to receive');
      return next;
    },
    close() {},
  };
}

const int32 = (value: number) => {
  const out = Buffer.alloc(4);
  out.writeInt32LE(value, 0);
  return out;
};
const errorMessage = (seq: number, code: number) =>
  encodeMessage({ type: NlmsgType.Error, flags: 0, seq, payload: Buffer.concat([int32(code), Buffer.alloc(16)]) });
const done = (seq: number, code = 0) => encodeMessage({ type: NlmsgType.Done, flags: NlmFlag.Multi, seq, payload: int32(code) });

/** An inet_diag_msg for 192.0.2.1:40000 -> 198.51.100.7:443, ESTABLISHED, uid 1001, inode 0, cookie 5, with a cgroup id attribute. */
function diagMessage(): Buffer {
  const msg = Buffer.alloc(72);
  msg.writeUInt8(2, 0);
  msg.writeUInt8(1, 1);
  msg.writeUInt16BE(40000, 4);
  msg.writeUInt16BE(443, 6);
  Buffer.from([192, 0, 2, 1]).copy(msg, 8);
  Buffer.from([198, 51, 100, 7]).copy(msg, 24);
  msg.writeUInt32LE(5, 44);
  msg.writeUInt32LE(1001, 64); // idiag_uid; idiag_inode (68) stays 0: an orphan
  const attribute = Buffer.alloc(12);
  attribute.writeUInt16LE(12, 0);
  attribute.writeUInt16LE(21, 2);
  attribute.writeBigUInt64LE(77n, 4);
  return Buffer.concat([msg, attribute]);
}

describe('netlink framing', () => {
  it('reads back what it writes, several messages to a datagram', () => {
    const datagram = Buffer.concat([encodeMessage({ type: 20, flags: 2, seq: 7, payload: Buffer.from([1, 2, 3]) }), done(7)]);
    expect(parseMessages(datagram).map((m) => [m.type, m.seq, [...m.payload]])).toEqual([
      [20, 7, [1, 2, 3]],
      [NlmsgType.Done, 7, [0, 0, 0, 0]],
    ]);
  });

  it.each([
    ['a datagram shorter than a header', Buffer.alloc(10), /10 bytes left at offset 0, too short/],
    ['a length below the header size', Buffer.from([4, 0, 0, 0, ...Buffer.alloc(12)]), /says it is 4 bytes long/],
    ['a length past the datagram', Buffer.from([200, 0, 0, 0, ...Buffer.alloc(12)]), /says it is 200 bytes long, but 16 bytes are left/],
    ['a zero length (which would never advance)', Buffer.alloc(32), /says it is 0 bytes long/],
    ['a good message, then a truncated one', Buffer.concat([done(1), Buffer.alloc(6)]), /6 bytes left at offset 20/],
  ])('refuses %s with a clear EGD_NETLINK error', (_what, datagram, message) => {
    expect(() => parseMessages(datagram)).toThrow(message);
    expect(() => parseMessages(datagram)).toThrow(expect.objectContaining({ code: ErrorCode.Netlink }) as Error);
  });

  it('refuses attributes whose lengths do not fit', () => {
    expect(() => parseAttributes(Buffer.from([2, 0, 1, 0]))).toThrow(/says it is 2 bytes long/);
    expect(() => parseAttributes(Buffer.from([40, 0, 1, 0, 0, 0, 0, 0]))).toThrow(/says it is 40 bytes long, but 8 bytes are left/);
    expect(() => parseAttributes(Buffer.from([8, 0, 1, 0, 0, 0, 0, 0, 9]))).toThrow(/1 stray bytes/);
    expect([...parseAttributes(Buffer.from([5, 0, 1, 0, 42, 0, 0, 0])).entries()]).toEqual([[1, Buffer.from([42])]]);
  });

  it('a request ends at the acknowledgement, or at the end of a dump; answers to other requests are skipped', () => {
    const acked = new NetlinkSocket(fake((seq) => [Buffer.concat([errorMessage(seq - 1, -2), errorMessage(seq, 0)])]));
    expect(acked.request(21, NlmFlag.Ack, Buffer.alloc(4))).toEqual([]);
    const dumped = new NetlinkSocket(
      fake((seq) => [
        encodeMessage({ type: 20, flags: NlmFlag.Multi, seq, payload: Buffer.from([9]) }),
        Buffer.concat([encodeMessage({ type: 20, flags: NlmFlag.Multi, seq, payload: Buffer.from([8]) }), done(seq)]),
      ]),
    );
    expect(dumped.request(20, NlmFlag.Dump, Buffer.alloc(4)).map((m) => m.payload[0])).toEqual([9, 8]);
  });

  it('a refusal carries the errno; a dump that failed part-way says so; a short error message is malformed', () => {
    const refused = new NetlinkSocket(fake((seq) => [errorMessage(seq, -1)]));
    expect(() => refused.request(21, NlmFlag.Ack, Buffer.alloc(4))).toThrow(expect.objectContaining({ code: ErrorCode.Netlink, errno: 1 }) as Error);
    const failedDump = new NetlinkSocket(fake((seq) => [done(seq, -12)]));
    expect(() => failedDump.request(20, NlmFlag.Dump, Buffer.alloc(4))).toThrow(
      expect.objectContaining({ errno: 12, message: expect.stringMatching(/dump .* failed/) as string }) as Error,
    );
    const short = new NetlinkSocket(fake((seq) => [encodeMessage({ type: NlmsgType.Error, flags: 0, seq, payload: Buffer.from([1, 2]) })]));
    expect(() => short.request(21, NlmFlag.Ack, Buffer.alloc(4))).toThrow(/an error message with 2 bytes of payload/);
  });

  it('several requests in one datagram: each gets its own answer or refusal, in the order asked, whatever order they come in', () => {
    // The kernel answers each message of the datagram on its own: here the second first, the third refused, a stray answer of an earlier request among them.
    const transport = fake((first) => [
      encodeMessage({ type: 20, flags: 0, seq: first + 1, payload: Buffer.from('b') }),
      errorMessage(first - 1, -2),
      Buffer.concat([encodeMessage({ type: 20, flags: 0, seq: first, payload: Buffer.from('a') }), errorMessage(first + 2, -2)]),
    ]);
    const socket = new NetlinkSocket(transport);
    const results = socket.requestEach([0, 1, 2].map(() => ({ type: 20, flags: 0, payload: Buffer.alloc(4) })));
    expect(transport.sent).toHaveLength(1);
    expect(parseMessages(transport.sent[0]!).map((m) => m.seq)).toEqual([0, 1, 2].map((i) => transport.sent[0]!.readUInt32LE(8) + i));
    expect(results.map((r) => (r instanceof Error ? { errno: (r as { errno?: number }).errno } : r.map((m) => m.payload.toString())))).toEqual([
      ['a'],
      ['b'],
      { errno: 2 },
    ]);
    expect(() => socket.requestEach([{ type: 20, flags: NlmFlag.Dump, payload: Buffer.alloc(4) }])).toThrow(/dump/);
  });

  it('a dump that never ends waits no longer than the transport does', () => {
    const endless = new NetlinkSocket(fake((seq) => [encodeMessage({ type: 20, flags: NlmFlag.Multi, seq, payload: Buffer.alloc(0) })]));
    expect(() => endless.request(20, NlmFlag.Dump, Buffer.alloc(4))).toThrow(/nothing more to receive/);
  });
});

describe('inet_diag messages', () => {
  it('reads a socket: addresses, ports, uid, inode, cookie, cgroup', () => {
    const socket = parseTcpSocket(diagMessage());
    expect({ ...socket, sockid: undefined }).toEqual({
      family: 4,
      state: 1,
      local: { address: '192.0.2.1', port: 40000 },
      remote: { address: '198.51.100.7', port: 443 },
      uid: 1001,
      inode: 0,
      cookie: 5n,
      cgroupId: 77n,
      sockid: undefined,
    });
    expect(stateName(socket.state)).toBe('ESTABLISHED');
  });

  it('reads IPv6 and v4-mapped addresses in their usual forms', () => {
    const msg = diagMessage().subarray(0, 72);
    msg.writeUInt8(10, 0);
    Buffer.from('20010db8000000000000000000000001', 'hex').copy(msg, 8);
    Buffer.from('00000000000000000000ffffc6336407', 'hex').copy(msg, 24);
    const socket = parseTcpSocket(Buffer.from(msg));
    expect([socket.local.address, socket.remote.address]).toEqual(['2001:db8::1', '::ffff:198.51.100.7']);
  });

  it('refuses a short message, another family, and bad attributes', () => {
    expect(() => parseTcpSocket(diagMessage().subarray(0, 40))).toThrow(/40 bytes, shorter than inet_diag_msg \(72\)/);
    const other = diagMessage();
    other.writeUInt8(1, 0);
    expect(() => parseTcpSocket(other)).toThrow(/address family 1/);
    const badAttribute = diagMessage();
    badAttribute.writeUInt16LE(200, 72);
    expect(() => parseTcpSocket(badAttribute)).toThrow(/says it is 200 bytes long/);
  });

  it("dumps the sockets' cgroup ids alone, of both families; a message without one adds none, a malformed one is refused", () => {
    const sockets = (messages: Buffer[]) => (seq: number) => [
      Buffer.concat([...messages.map((payload) => encodeMessage({ type: 20, flags: NlmFlag.Multi, seq, payload })), done(seq)]),
    ];
    const withId = (id: bigint, before?: Buffer) => {
      const msg = diagMessage();
      msg.writeBigUInt64LE(id, 76);
      return before ? Buffer.concat([msg.subarray(0, 72), before, msg.subarray(72)]) : msg;
    };
    // Another attribute first (INET_DIAG_INFO's type, 2, with 5 bytes: padded to 8), then the cgroup's.
    const other = Buffer.from([9, 0, 2, 0, 1, 2, 3, 4, 5, 0, 0, 0]);
    const answers = [sockets([withId(77n), diagMessage().subarray(0, 72), withId(88n, other)]), sockets([withId(77n)])];
    const netlink = new NetlinkSocket(fake((seq) => answers.shift()!(seq)));
    expect(dumpTcpCgroupIds(netlink, 0xfff)).toEqual(new Set([77n, 88n]));
    const bad = diagMessage();
    bad.writeUInt16LE(200, 72);
    expect(() => dumpTcpCgroupIds(new NetlinkSocket(fake(sockets([bad]))), 0xfff)).toThrow(/says it is 200 bytes long/);
    expect(() => dumpTcpCgroupIds(new NetlinkSocket(fake(sockets([bad.subarray(0, 40)]))), 0xfff)).toThrow(/40 bytes, shorter than inet_diag_msg/);
  });
});
