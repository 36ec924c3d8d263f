/**
 * Asking the upstream servers. Every query goes out over UDP from a fresh
 * socket (so a fresh random source port, picked by the kernel) with a
 * random 16-bit id, and only a reply from the server asked, with that id
 * and that question, is taken: anything else arriving on the socket is
 * counted and ignored (RFC 5452). A truncated reply (TC=1) is asked again
 * over TCP. A server that stays silent for an attempt's time is left for
 * the next; when the overall bound passes, the caller gets nothing and
 * answers SERVFAIL.
 */
import { randomInt } from 'node:crypto';
import dgram from 'node:dgram';
import net from 'node:net';
import dnsPacket, { type DecodedPacket, type RecordType } from 'dns-packet';
import { ResolverStartError } from '../errors.js';
import type { Family, SocketMarker } from '../system/socket-mark.js';
import { resolverNow } from './clock.js';
import { EDNS_UDP_SIZE, normalizeName, QueryFlag, Rcode, rcodeOf } from './message.js';

export interface Upstream {
  /** Canonical text (IPv6 compressed, as Node reports a datagram's source). */
  readonly address: string;
  readonly port: number;
  readonly family: Family;
}

/** "ADDR" or "ADDR#PORT", as dnsmasq and systemd-resolved write them. */
export function parseUpstream(text: string): Upstream {
  const match = /^([^#]+?)(?:#(\d{1,5}))?$/.exec(text.trim());
  const port = match?.[2] === undefined ? 53 : Number(match[2]);
  const address = match?.[1] ?? '';
  const family = net.isIP(address);
  // A zone index (fe80::1%eth0) is left out: Node reports no zone on a datagram's source, so replies could not be matched to it.
  if (match === null || family === 0 || address.includes('%') || port < 1 || port > 65535)
    throw new ResolverStartError('upstream', `upstream "${text}" is not ADDR or ADDR#PORT (an IPv4 or IPv6 address without a zone, a port from 1 to 65535)`);
  return { address: family === 6 ? canonicalV6(address) : address, port, family: family as Family };
}

function canonicalV6(address: string): string {
  return new URL(`http://[${address}]/`).hostname.slice(1, -1);
}

/** An answer from an upstream, checked to be the reply to the question asked. */
export interface UpstreamAnswer {
  readonly message: DecodedPacket;
  readonly rcode: number;
  /** Its size on the wire. */
  readonly bytes: number;
  readonly server: Upstream;
  readonly transport: 'udp' | 'tcp';
}

export interface UpstreamStats {
  /** Queries sent (each attempt, UDP and TCP). */
  readonly queries: number;
  /** Attempts that got no answer in their time. */
  readonly timeouts: number;
  /** Truncated UDP replies asked again over TCP. */
  readonly tcpRetries: number;
  /** Datagrams or TCP replies that were not the reply asked for (wrong source, id, question, or undecodable). */
  readonly mismatched: number;
  /** Attempts that failed on a socket error. */
  readonly errors: number;
  /** Questions nobody answered within the bound. */
  readonly failed: number;
  /** Queries in flight now. */
  readonly inFlight: number;
}

export interface UpstreamOptions {
  /** When set, every upstream socket carries this marker's mark. */
  readonly marker?: SocketMarker | undefined;
  /** Overall bound for one question (ms). */
  readonly timeoutMs: number;
  /** One upstream's share before the next is tried (ms). */
  readonly attemptMs: number;
  /** How long an answered TCP query waits for the server to close its side before it resets instead (ms; closeAnswered). Default 2000. */
  readonly tcpCloseWaitMs?: number;
}

type Attempt = { answer: UpstreamAnswer } | { failure: 'timeout' | 'error' | 'closed' };

/**
 * Drops a TCP query's socket without sending from it once it is closed: a
 * connected one is reset while it is still ours (see closeAnswered); one
 * still connecting is closed, which sends nothing (Node's resetAndDestroy
 * would wait for the connection, measured); one closed already is gone.
 */
function abandon(socket: net.Socket): void {
  if (socket.destroyed) return;
  if (socket.connecting) socket.destroy();
  else socket.resetAndDestroy();
}

/** Most frame bytes a TCP reply may have (the 16-bit length says so anyway). */
const MAX_TCP_MESSAGE = 65535;

/** The default of UpstreamOptions.tcpCloseWaitMs. */
const TCP_CLOSE_WAIT_MS = 2000;
/** Answered TCP queries that may wait for their server's FIN at once; past this, one resets at once (closeAnswered). */
export const MAX_TCP_CLOSING = 64;

export class UpstreamClient {
  private preferred = 0;
  private closed = false;
  private readonly live = new Set<{ close(): void }>();
  /** Answered TCP queries waiting for the server's FIN (closeAnswered). */
  private readonly closing = new Set<net.Socket>();
  private readonly counts = { queries: 0, timeouts: 0, tcpRetries: 0, mismatched: 0, errors: 0, failed: 0 };

  constructor(
    readonly servers: readonly Upstream[],
    private readonly options: UpstreamOptions,
  ) {
    if (servers.length === 0) throw new ResolverStartError('upstream', 'no upstream servers to forward to');
  }

  /**
   * The answer to `name`/`type` (class IN) from the first server that gives
   * one within the bound, or undefined when none did. A server that answers
   * SERVFAIL or REFUSED leaves the question to the next one, if any.
   */
  async query(name: string, type: string): Promise<UpstreamAnswer | undefined> {
    const deadline = resolverNow() + this.options.timeoutMs;
    const n = this.servers.length;
    let refused: UpstreamAnswer | undefined;
    const first = this.preferred;
    // Each server gets a few turns in the time: a lost datagram is sent again, a dead server left.
    const turns = n * Math.max(1, Math.ceil(this.options.timeoutMs / this.options.attemptMs));
    for (let turn = 0; turn < turns && !this.closed; turn++) {
      const left = deadline - resolverNow();
      if (left <= 0) break;
      const index = (first + turn) % n;
      const server = this.servers[index]!;
      const attempt = await this.ask(server, name, type, Math.min(this.options.attemptMs, left), deadline);
      if ('failure' in attempt) {
        if (attempt.failure === 'closed') break;
        if (attempt.failure === 'timeout') this.counts.timeouts++;
        else this.counts.errors++;
        // The next question starts with a server that answered.
        if (index === this.preferred) this.preferred = (this.preferred + 1) % n;
        continue;
      }
      const rcode = attempt.answer.rcode;
      if (rcode === Rcode.ServFail || rcode === Rcode.Refused || rcode === Rcode.NotImp || rcode === Rcode.FormErr) {
        refused = attempt.answer;
        if (turn + 1 < n) continue;
        break;
      }
      this.preferred = index;
      return attempt.answer;
    }
    if (refused === undefined) this.counts.failed++;
    return refused;
  }

  stats(): UpstreamStats {
    return { ...this.counts, inFlight: this.live.size };
  }

  /** Ends every query in flight (they resolve with nothing) and refuses new ones. */
  close(): void {
    this.closed = true;
    for (const socket of [...this.live]) socket.close();
    for (const socket of [...this.closing]) socket.resetAndDestroy();
  }

  private async ask(server: Upstream, name: string, type: string, waitMs: number, deadline: number): Promise<Attempt> {
    const id = randomInt(65536);
    const question = { name, type: type as RecordType, class: 'IN' as const };
    const query = dnsPacket.encode({
      type: 'query',
      id,
      flags: QueryFlag.RD,
      questions: [question],
      additionals: [{ type: 'OPT', name: '.', udpPayloadSize: EDNS_UDP_SIZE, extendedRcode: 0, ednsVersion: 0, flags: 0, flag_do: false, options: [] }],
    });
    const check = (raw: Buffer): UpstreamAnswer | undefined => {
      let message: DecodedPacket;
      try {
        message = dnsPacket.decode(raw);
      } catch {
        return undefined;
      }
      const asked = message.questions?.length === 1 ? message.questions[0] : undefined;
      if (message.id !== id || !message.flag_qr || asked === undefined || normalizeName(asked.name) !== name || asked.type !== type || asked.class !== 'IN')
        return undefined;
      return { message, rcode: rcodeOf(message), bytes: raw.length, server, transport: 'udp' };
    };
    const udp = await this.overUdp(server, query, waitMs, check);
    if ('failure' in udp || !udp.answer.message.flag_tc) return udp;
    this.counts.tcpRetries++;
    const tcp = await this.overTcp(server, query, deadline - resolverNow(), check);
    return 'failure' in tcp ? tcp : { answer: { ...tcp.answer, transport: 'tcp' } };
  }

  private overUdp(server: Upstream, query: Buffer, waitMs: number, check: (raw: Buffer) => UpstreamAnswer | undefined): Promise<Attempt> {
    return new Promise((resolve) => {
      let socket: dgram.Socket;
      try {
        socket = this.options.marker ? this.options.marker.udp(server.family) : dgram.createSocket(server.family === 4 ? 'udp4' : 'udp6');
      } catch {
        resolve({ failure: 'error' });
        return;
      }
      const handle = { close: () => finish({ failure: 'closed' }) };
      const timer = setTimeout(() => finish({ failure: 'timeout' }), waitMs);
      const finish = (attempt: Attempt): void => {
        if (!this.live.delete(handle)) return;
        clearTimeout(timer);
        socket.close();
        resolve(attempt);
      };
      this.live.add(handle);
      socket.on('error', () => finish({ failure: 'error' }));
      socket.on('message', (raw, from) => {
        const answer = from.address === server.address && from.port === server.port ? check(raw) : undefined;
        if (answer === undefined) this.counts.mismatched++;
        else finish({ answer });
      });
      this.counts.queries++;
      socket.send(query, server.port, server.address, (error) => {
        if (error) finish({ failure: 'error' });
      });
    });
  }

  private overTcp(server: Upstream, query: Buffer, waitMs: number, check: (raw: Buffer) => UpstreamAnswer | undefined): Promise<Attempt> {
    return new Promise((resolve) => {
      if (waitMs <= 0) {
        resolve({ failure: 'timeout' });
        return;
      }
      let socket: net.Socket;
      try {
        socket = this.options.marker ? this.options.marker.tcp(server.family) : new net.Socket();
      } catch {
        resolve({ failure: 'error' });
        return;
      }
      const handle = { close: () => finish({ failure: 'closed' }) };
      const timer = setTimeout(() => finish({ failure: 'timeout' }), waitMs);
      const finish = (attempt: Attempt): void => {
        if (!this.live.delete(handle)) return;
        clearTimeout(timer);
        if ('answer' in attempt) this.closeAnswered(socket);
        else abandon(socket);
        resolve(attempt);
      };
      this.live.add(handle);
      let received: Buffer = Buffer.alloc(0);
      socket.on('error', () => finish({ failure: 'error' }));
      socket.on('close', () => finish({ failure: 'error' }));
      socket.on('data', (chunk: Buffer) => {
        if (!this.live.has(handle)) return;
        received = Buffer.concat([received, chunk]);
        if (received.length < 2) return;
        const length = received.readUInt16BE(0);
        if (received.length > 2 + MAX_TCP_MESSAGE || received.length < 2 + length) return;
        const answer = check(received.subarray(2, 2 + length));
        if (answer === undefined) this.counts.mismatched++;
        finish(answer === undefined ? { failure: 'error' } : { answer });
      });
      socket.setNoDelay(true);
      this.counts.queries++;
      socket.connect(server.port, server.address, () => {
        const frame = Buffer.alloc(2 + query.length);
        frame.writeUInt16BE(query.length, 0);
        query.copy(frame, 2);
        socket.write(frame);
      });
    });
  }

  /**
   * Ends an answered TCP query so that everything it still sends leaves
   * while the socket is open, with its owner. A socket closed at once would
   * wait in TIME_WAIT and send its last ACK from there, with no owner for
   * the table to see as the resolver's (it drops such packets to DNS ports
   * as anyone's; measured: the server stayed in LAST_ACK resending its FIN).
   * So the resolver sends its FIN and keeps the socket until the server's
   * FIN has come and been answered (Node closes it then), or resets it
   * after tcpCloseWaitMs — a reset leaves no TIME_WAIT behind. At most
   * MAX_TCP_CLOSING wait so at once (each holds a descriptor); past that,
   * a socket is reset at once.
   */
  private closeAnswered(socket: net.Socket): void {
    if (this.closing.size >= MAX_TCP_CLOSING) {
      abandon(socket);
      return;
    }
    this.closing.add(socket);
    const late = setTimeout(() => socket.resetAndDestroy(), this.options.tcpCloseWaitMs ?? TCP_CLOSE_WAIT_MS);
    socket.once('close', () => {
      clearTimeout(late);
      this.closing.delete(socket);
    });
    socket.end();
  }
}
