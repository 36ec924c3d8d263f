/**
 * The NFLOG parser on bytes alone: well-formed packet messages built here
 * (the layout nfnetlink_log sends) read back to the right event; any bytes
 * at all (fast-check: random, and mutations of well-formed datagrams) give
 * events or counted `unparsed`, never a throw; and the aggregation counts
 * add up, with the open aggregates bounded.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { Aggregator, type Aggregate } from '../../src/denials/aggregate.js';
import { configMessage, NFULNL_MSG_PACKET } from '../../src/denials/nflog.js';
import { ipv6Text, parseDatagram, type DenialEvent } from '../../src/denials/parse.js';
import { DenialFeedHub, DenialPipeline, drainTurn } from '../../src/denials/reader.js';
import type { DenialRecord } from '../../src/denials/record.js';
import { encodeMessage, NetlinkError, NlmsgType } from '../../src/system/netlink.js';

function attr(type: number, value: Buffer): Buffer {
  const out = Buffer.alloc((4 + value.length + 3) & ~3);
  out.writeUInt16LE(4 + value.length, 0);
  out.writeUInt16LE(type, 2);
  value.copy(out, 4);
  return out;
}
const be32 = (n: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
};

function ipv4Packet(dst: string, protocol: number, port: number, fragmentOffset = 0): Buffer {
  const b = Buffer.alloc(28);
  b[0] = 0x45;
  b.writeUInt16BE(fragmentOffset, 6);
  b[9] = protocol;
  dst.split('.').forEach((octet, i) => (b[16 + i] = Number(octet)));
  b.writeUInt16BE(51000, 20);
  b.writeUInt16BE(port, 22);
  return b;
}

function ipv6Packet(dst: Buffer, next: number, port: number, extensions: Buffer = Buffer.alloc(0), firstNext = next): Buffer {
  const b = Buffer.alloc(40 + extensions.length + 8);
  b[0] = 0x60;
  b[6] = extensions.length > 0 ? firstNext : next;
  dst.copy(b, 24);
  extensions.copy(b, 40);
  b.writeUInt16BE(51000, 40 + extensions.length);
  b.writeUInt16BE(port, 42 + extensions.length);
  return b;
}

function packetMessage(o: { family: 2 | 10; prefix: string; packet: Buffer; uid?: number; gid?: number; seq?: number }): Buffer {
  const hdr = Buffer.alloc(4);
  hdr.writeUInt16BE(o.family === 2 ? 0x0800 : 0x86dd, 0);
  const parts = [Buffer.from([o.family, 0, 0x1e, 0x41]), attr(1, hdr), attr(10, Buffer.from(`${o.prefix}\0`, 'latin1'))];
  if (o.uid !== undefined) parts.push(attr(11, be32(o.uid)));
  if (o.gid !== undefined) parts.push(attr(14, be32(o.gid)));
  if (o.seq !== undefined) parts.push(attr(12, be32(o.seq)));
  parts.push(attr(9, o.packet));
  return encodeMessage({ type: NFULNL_MSG_PACKET, flags: 0, seq: 0, payload: Buffer.concat(parts) });
}

const V6 = Buffer.from('20010db8000100000000000000000009', 'hex');

describe('NFLOG packet messages', () => {
  it('reads prefix, owner, sequence and the IPv4 destination', () => {
    const parsed = parseDatagram(
      packetMessage({ family: 2, prefix: 'egd r1a2b3c4d ', packet: ipv4Packet('203.0.113.7', 17, 5353), uid: 1001, gid: 1002, seq: 41 }),
    );
    expect(parsed).toEqual({
      events: [{ shortId: 'r1a2b3c4d', uid: 1001, gid: 1002, family: 4, protocol: 'udp', address: '203.0.113.7', port: 5353, seq: 41 }],
      unparsed: 0,
      overruns: 0,
    });
  });

  it('reads IPv6 through extension headers, leaves ports out of later fragments and of protocols without them', () => {
    const hopByHop = Buffer.alloc(8);
    hopByHop[0] = 6; // then tcp
    const [a] = parseDatagram(packetMessage({ family: 10, prefix: 'egd r00000001 ', packet: ipv6Packet(V6, 6, 443, hopByHop, 0) })).events;
    expect(a).toMatchObject({ family: 6, protocol: 'tcp', address: '2001:db8:1::9', port: 443, uid: undefined });
    const fragment = Buffer.alloc(8);
    fragment[0] = 17;
    fragment.writeUInt16BE(8 << 3, 2); // offset 64: not the first
    const [b] = parseDatagram(packetMessage({ family: 10, prefix: 'egd r00000001 ', packet: ipv6Packet(V6, 17, 53, fragment, 44) })).events;
    expect(b).toMatchObject({ protocol: 'udp', port: undefined });
    const [c] = parseDatagram(packetMessage({ family: 2, prefix: 'egd r00000001 ', packet: ipv4Packet('192.0.2.9', 1, 0) })).events;
    expect(c).toMatchObject({ protocol: 'icmp', port: undefined });
    const [d] = parseDatagram(packetMessage({ family: 2, prefix: 'egd r00000001 ', packet: ipv4Packet('192.0.2.9', 6, 80, 0x10) })).events;
    expect(d).toMatchObject({ protocol: 'tcp', port: undefined });
  });

  it("counts another program's prefix, a truncated header or a family mismatch as unparsed", () => {
    expect(parseDatagram(packetMessage({ family: 2, prefix: 'DROP ', packet: ipv4Packet('192.0.2.9', 6, 80) }))).toMatchObject({ events: [], unparsed: 1 });
    expect(parseDatagram(packetMessage({ family: 2, prefix: 'egd r00000001 ', packet: ipv4Packet('192.0.2.9', 6, 80).subarray(0, 19) }))).toMatchObject({
      unparsed: 1,
    });
    expect(parseDatagram(packetMessage({ family: 10, prefix: 'egd r00000001 ', packet: ipv4Packet('192.0.2.9', 6, 80) }))).toMatchObject({ unparsed: 1 });
  });

  it('counts an overrun the kernel reports in the stream', () => {
    const error = Buffer.alloc(4);
    error.writeInt32LE(-105);
    const datagram = Buffer.concat([
      encodeMessage({ type: NlmsgType.Overrun, flags: 0, seq: 0 }),
      encodeMessage({ type: NlmsgType.Error, flags: 0, seq: 0, payload: error }),
    ]);
    expect(parseDatagram(datagram)).toEqual({ events: [], unparsed: 0, overruns: 2 });
  });

  it('writes IPv6 addresses as RFC 5952 does', () => {
    expect(ipv6Text(Buffer.from('20010db8000000000001000000000001', 'hex'))).toBe('2001:db8::1:0:0:1');
    expect(ipv6Text(Buffer.alloc(16))).toBe('::');
    expect(ipv6Text(Buffer.from('00000000000000000000ffffc0000205', 'hex'))).toBe('::ffff:192.0.2.5');
    expect(ipv6Text(Buffer.from('20010db8000100020003000400050006', 'hex'))).toBe('2001:db8:1:2:3:4:5:6');
  });

  it('binds a group with a small copy range, sequence numbers and an acknowledgement', () => {
    const message = configMessage(7745, 'bind', 9);
    expect(message.readUInt16LE(4)).toBe(0x0401);
    expect(message.readUInt16LE(6) & 0x5).toBe(0x5);
    expect(message.readUInt16BE(18)).toBe(7745);
    // NFULA_CFG_MODE: copy range 96, NFULNL_COPY_PACKET.
    expect(message.subarray(20).indexOf(Buffer.from([0, 0, 0, 96, 2]))).toBeGreaterThan(0);
  });
});

describe('the parser under any bytes (fast-check)', () => {
  const good = fc
    .record({
      family: fc.constantFrom(2 as const, 10 as const),
      uid: fc.option(fc.nat(), { nil: undefined }),
      seq: fc.option(fc.nat(), { nil: undefined }),
      port: fc.integer({ min: 0, max: 65535 }),
      proto: fc.constantFrom(6, 17, 1, 58, 132, 47),
    })
    .map((o) =>
      packetMessage({
        family: o.family,
        prefix: 'egd r0000abcd ',
        packet: o.family === 2 ? ipv4Packet('198.51.100.4', o.proto, o.port) : ipv6Packet(V6, o.proto, o.port),
        ...(o.uid !== undefined && { uid: o.uid }),
        ...(o.seq !== undefined && { seq: o.seq }),
      }),
    );

  it('random bytes: events or counted unparsed, never a throw', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 600 }), (bytes) => {
        const parsed = parseDatagram(bytes);
        expect(parsed.unparsed).toBeGreaterThanOrEqual(0);
        for (const event of parsed.events) expect(event.shortId).toMatch(/^r[0-9a-f]{8}$/);
      }),
      { numRuns: 5000 },
    );
  });

  it('mutated and cut well-formed datagrams: every packet message is an event or one unparsed', () => {
    fc.assert(
      fc.property(
        fc.array(good, { minLength: 1, maxLength: 4 }),
        fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { maxLength: 6 }),
        fc.nat(),
        (messages, flips, cut) => {
          const bytes = Buffer.concat(messages);
          for (const [at, value] of flips) bytes[at % bytes.length] = value;
          const datagram = bytes.subarray(0, bytes.length - (cut % 8 === 0 ? cut % 24 : 0));
          const parsed = parseDatagram(datagram);
          expect(parsed.events.length + parsed.unparsed).toBeLessThanOrEqual(messages.length + 1);
          if (flips.length === 0 && datagram.length === bytes.length) expect(parsed.events.length).toBe(messages.length);
        },
      ),
      { numRuns: 3000 },
    );
  });

  it('the pipeline under any bytes: counters only grow, the counts of records add up to the events', () => {
    fc.assert(
      fc.property(
        fc.array(
          fc.oneof(
            good,
            fc.uint8Array({ maxLength: 200 }).map((b) => Buffer.from(b)),
          ),
          { maxLength: 20 },
        ),
        (datagrams) => {
          const hub = new DenialFeedHub();
          const records: DenialRecord[] = [];
          hub.subscribe((r) => records.push(r));
          let now = 0;
          const pipeline = new DenialPipeline(
            hub,
            () => [],
            { windowMs: 10, maxOpen: 3 },
            () => (now += 3),
          );
          for (const d of datagrams) pipeline.datagram(d);
          pipeline.flush();
          expect(records.reduce((n, r) => n + r.count, 0)).toBe(hub.counters().events);
        },
      ),
      { numRuns: 500 },
    );
  });
});

describe('aggregation', () => {
  const event = (address: string, uid = 1000, seq?: number): DenialEvent => ({
    shortId: 'r0000abcd',
    uid,
    gid: uid,
    family: 4,
    protocol: 'udp',
    address,
    port: 53,
    seq,
  });

  it('tells the first packet at once and the rest when the window closes, per identity and destination', () => {
    const out: Aggregate[] = [];
    const aggregator = new Aggregator((a) => out.push(a), { windowMs: 100 });
    aggregator.add(event('192.0.2.1'), 0);
    aggregator.add(event('192.0.2.1'), 10);
    aggregator.add(event('192.0.2.1'), 20);
    aggregator.add(event('192.0.2.1', 1001), 30);
    expect(out.map((a) => [a.event.uid, a.count, a.firstSeen])).toEqual([
      [1000, 1, 0],
      [1001, 1, 30],
    ]);
    aggregator.tick(99);
    expect(out).toHaveLength(2);
    aggregator.tick(100);
    expect(out[2]).toMatchObject({ count: 2, firstSeen: 10, lastSeen: 20 });
    aggregator.tick(130);
    // The other uid's aggregate had only its first packet: nothing more to tell.
    expect(out).toHaveLength(3);
    expect(aggregator.size).toBe(0);
  });

  it('closes the oldest early when the open aggregates are at their cap, losing no count', () => {
    const out: Aggregate[] = [];
    const aggregator = new Aggregator((a) => out.push(a), { windowMs: 1_000_000, maxOpen: 100 });
    let packets = 0;
    for (let i = 0; i < 10_000; i++) {
      aggregator.add(event(`10.0.${(i >> 8) & 255}.${i & 255}`), i);
      aggregator.add(event(`10.0.${(i >> 8) & 255}.${i & 255}`), i);
      packets += 2;
      expect(aggregator.size).toBeLessThanOrEqual(100);
    }
    aggregator.flush();
    expect(out.reduce((n, a) => n + a.count, 0)).toBe(packets);
    expect(aggregator.closedEarly).toBe(9_900);
  });

  it('counts a gap in the sequence numbers as lost packets', () => {
    const hub = new DenialFeedHub();
    const pipeline = new DenialPipeline(hub, () => []);
    const message = (seq: number) => packetMessage({ family: 2, prefix: 'egd r0000abcd ', packet: ipv4Packet('192.0.2.9', 17, 53), uid: 1, seq });
    pipeline.datagram(Buffer.concat([message(0), message(1), message(5), message(6)]));
    expect(hub.counters()).toMatchObject({ events: 4, lost: 3, sequenceGaps: 1 });
    // Across the wrap of the 32-bit sequence.
    pipeline.datagram(Buffer.concat([message(0xfffffffe), message(0xffffffff), message(0), message(2)]));
    expect(hub.counters()).toMatchObject({ events: 8, lost: 3 + 1, sequenceGaps: 2 });
  });
});

describe('draining the socket in turns', () => {
  // A flood as the kernel batches it: 64 datagrams of 256 packets, each packet to a new destination (a new record each).
  const flood = () => {
    let seq = 0;
    return Array.from({ length: 64 }, (_, d) =>
      Buffer.concat(
        Array.from({ length: 256 }, (_, p) =>
          packetMessage({ family: 2, prefix: 'egd r0000abcd ', packet: ipv4Packet(`10.${d}.${p}.1`, 17, 53), uid: 1, seq: seq++ }),
        ),
      ),
    );
  };

  it('a turn publishes a bounded number of records however many packets a datagram holds, and loses none of the count', () => {
    const hub = new DenialFeedHub();
    let published = 0;
    hub.subscribe(() => published++);
    const pipeline = new DenialPipeline(hub, () => []);
    const queue = flood();
    // An overflow the socket reports between datagrams: counted, and the turn goes on.
    let overflowOnce = true;
    const receive = () => {
      if (queue.length === 32 && overflowOnce) {
        overflowOnce = false;
        throw new NetlinkError('overflow', { errno: 105 });
      }
      return queue.shift();
    };
    const perTurn: number[] = [];
    for (;;) {
      const before = published;
      const turn = drainTurn(
        receive,
        (b) => pipeline.datagram(b),
        () => pipeline.overflow(),
        { eventsPerTurn: 512, budgetMs: 60_000 },
      );
      perTurn.push(published - before);
      expect(turn.events).toBeLessThanOrEqual(512);
      if (!turn.more) break;
    }
    expect(Math.max(...perTurn)).toBeLessThanOrEqual(512);
    expect(perTurn.length).toBeGreaterThanOrEqual(32);
    expect(hub.counters()).toMatchObject({ events: 64 * 256, lost: 0, enobufs: 1, unparsed: 0 });
    expect(published).toBe(64 * 256);
  });

  it('a turn stops at its time budget even below its event limit', () => {
    const queue = flood();
    let clock = 0;
    const turn = drainTurn(
      () => queue.shift(),
      () => {
        clock += 2;
        return 1;
      },
      () => undefined,
      { eventsPerTurn: 1_000_000, budgetMs: 5 },
      () => clock,
    );
    expect(turn).toEqual({ datagrams: 3, events: 3, more: true });
    expect(queue).toHaveLength(61);
  });
});
