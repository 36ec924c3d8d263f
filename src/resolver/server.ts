/**
 * egressd's DNS resolver: listens on UDP and TCP, answers each query
 * through the pipeline (pipeline.ts: policy hooks, cache, upstream), and
 * keeps every client's share of memory and time bounded (limits.ts).
 *
 * The hooks are the policy's (identify/admit/shape: who.ts, decide.ts;
 * learn: the daemon, which fills the nft sets); this module only says when
 * each is called. `startResolver` binds everything before it returns and
 * fails whole (ResolverStartError) when anything cannot be bound or the
 * upstream sockets cannot carry the required mark.
 */
import net from 'node:net';
import { ResolverStartError } from '../errors.js';
import { openSocketMarker, type SocketMarker } from '../system/socket-mark.js';
import { DnsCache } from './cache.js';
import { createDatagramServer, type DatagramServer } from './datagrams.js';
import { resolverLimits, type ResolverLimits } from './limits.js';
import { createPipeline, type PipelineStats } from './pipeline.js';
import { Shares } from './shares.js';
import { parseUpstream, UpstreamClient } from './upstream.js';

export interface Client {
  readonly transport: 'udp' | 'tcp';
  readonly address: string;
  readonly port: number;
  readonly local: { readonly address: string; readonly port: number };
}
/** name lower-case, no trailing dot; type 'A', 'AAAA', … */
export interface Question {
  readonly name: string;
  readonly type: string;
}
/** data: address for A/AAAA, target name for CNAME */
export interface AnswerRecord {
  readonly name: string;
  readonly type: string;
  readonly ttl: number;
  readonly data: string;
}
/** What admit says of a question: ask upstream ('go'), or the answer it gets without asking. */
export type Admission = 'go' | 'refused' | 'nxdomain' | 'null';
export interface ResolverHooks<Who> {
  /** Who sent the query (helper C: sock_diag). May throw (socket not found): the core then answers REFUSED and counts it — fail closed. */
  identify(client: Client): Who | Promise<Who>;
  /**
   * Optional: who sent queries from each of `clients`, all at once and
   * synchronously, undefined where it cannot say (the query then goes
   * through identify). The same Who (===) identify would give for the same
   * client at that moment. With learnQuietUntil, it lets kept replies be
   * given to UDP queries read many at a time without leaving the receive
   * buffers (pipeline.answerInPlace).
   */
  identifyNow?(clients: readonly Client[]): readonly (Who | undefined)[];
  /**
   * Before anything goes upstream: 'refused' (system domain members), 'nxdomain' (use-application-dns.net, a name below a
   * denied suffix), 'null' (the null answer, NXDOMAIN for types without one: a name below a denied suffix), or 'go'.
   */
  admit(who: Who, question: Question): Admission;
  /** Every answer (from upstream or cache, whatever the client will get) BEFORE any reply leaves: the lead fills nft sets here. Awaited. */
  learn(question: Question, records: readonly AnswerRecord[], fromCache: boolean): void | Promise<void>;
  /** What this client gets, given every name of the answer's CNAME chain (question name first). */
  shape(who: Who, question: Question, chain: readonly string[]): 'answer' | 'nxdomain' | 'null';
  /**
   * Optional: `who` is sent the answer's records (shape let it have them),
   * before the reply leaves; what it throws is an unexpected error and the
   * reply goes anyway. Not called again for a kept reply given again: that
   * reply goes only to the same Who, told of it when it was made.
   */
  answered?(who: Who, question: Question, records: readonly AnswerRecord[]): void;
  /**
   * Optional: until when (ms, the resolver's clock) `learn(question,
   * records, true)` would write nothing and wait for nothing — and so would
   * learn for the same records with the TTL they have left later, counting
   * down to `expiresAt` (the cache entry's) — as long as nothing else
   * changes. Where it is given, the resolver keeps the reply it made from a
   * cache hit, for the same query bytes and the same Who (===), and answers
   * with it again (with the TTL left) until then, for 10 s at most, without
   * calling admit, learn or shape: so admit and shape must decide the same
   * for the same Who and question until the resolver is told otherwise
   * (Resolver.forgetReplies).
   */
  learnQuietUntil?(question: Question, records: readonly AnswerRecord[], expiresAt: number): number;
}

export interface ResolverOptions<Who> {
  /** Addresses to listen on, UDP and TCP each. */
  readonly listen: readonly string[];
  /** false: UDP one datagram at a time through dgram, no recvmmsg/sendmmsg (what a Node.js that hides socket descriptors gets; tests). */
  readonly batchedUdp?: boolean;
  /** Default 53. 0: one free port, the same for every address and both transports (tests). */
  readonly port?: number;
  /** "ADDR" or "ADDR#PORT", tried in order (the last that answered first). */
  readonly upstreams: readonly string[];
  readonly hooks: ResolverHooks<Who>;
  /** The meta mark every upstream socket must carry (DnsSettings.mark); undefined: none. Setting it needs CAP_NET_ADMIN. */
  readonly mark?: number | undefined;
  readonly limits?: Partial<ResolverLimits>;
  /** Told of unexpected errors (bugs, socket failures), which never stop the resolver. */
  readonly onError?: (error: unknown) => void;
  /** Who counts as one asker for limits.maxPendingPerAsker and maxTcpConnectionsPerAsker (e.g. its uid); undefined: no cap per asker. */
  readonly askerKey?: (who: Who) => string;
}

export interface ListenAddress {
  readonly transport: 'udp' | 'tcp';
  readonly address: string;
  readonly port: number;
}

export interface ResolverStats extends PipelineStats {
  readonly cacheHits: number;
  readonly cacheMisses: number;
  readonly cacheEntries: number;
  readonly cacheBytes: number;
  readonly evictions: number;
  readonly expired: number;
  readonly upstreamQueries: number;
  readonly upstreamTimeouts: number;
  readonly upstreamTcpRetries: number;
  readonly upstreamMismatched: number;
  readonly upstreamErrors: number;
  /** Questions no upstream answered within the bound (each one SERVFAIL). */
  readonly upstreamFailed: number;
  readonly upstreamInFlight: number;
  /** TCP client connections open now. */
  readonly tcpConnections: number;
  /** Turned away: at maxTcpConnections, or by one of the caps below. */
  readonly tcpRejected: number;
  /** Of those, closed at once for their owner's maxTcpConnectionsPerAsker. */
  readonly tcpRejectedByAsker: number;
  /** Of those, closed at once for maxTcpConnectionsUnowned: their owner was not found. */
  readonly tcpRejectedUnowned: number;
  /** Closed after tcpIdleMs without a query. */
  readonly tcpIdleClosed: number;
  /** Closed for a frame too short to be a message, or for replies left unread past maxTcpUnread. */
  readonly tcpAborted: number;
  /** Replies the kernel would not send. */
  readonly sendErrors: number;
  /** UDP sockets read one datagram at a time: this Node.js did not show their descriptors for recvmmsg (slower, not less correct). */
  readonly udpUnbatched: number;
}

export interface Resolver {
  readonly addresses: readonly ListenAddress[];
  /** What admit or shape decide, or what learn needs, may have changed (a new policy, new sets): no reply kept from before is given again. */
  forgetReplies(): void;
  stats(): ResolverStats;
  close(): Promise<void>;
}

/** The smallest frame worth reading: a DNS header. */
const MIN_FRAME = 12;

/** Gives back what a connection took of its owner's share; called once, when it closes. */
type GiveBack = () => void;

export async function startResolver<Who>(options: ResolverOptions<Who>): Promise<Resolver> {
  const limits = resolverLimits(options.limits);
  const servers = options.upstreams.map(parseUpstream);
  if (options.listen.length === 0) throw new ResolverStartError('listen', 'no address to listen on');
  for (const address of options.listen) if (net.isIP(address) === 0) throw new ResolverStartError('listen', `"${address}" is not an IP address to listen on`);
  const marker: SocketMarker | undefined = options.mark === undefined ? undefined : openSocketMarker(options.mark);
  const upstream = new UpstreamClient(servers, { marker, timeoutMs: limits.upstreamTimeoutMs, attemptMs: limits.upstreamAttemptMs });
  const cache = new DnsCache(limits);
  const onError = (error: unknown): void => options.onError?.(error);
  const pipeline = createPipeline({ hooks: options.hooks, upstream, cache, limits, onError, ...(options.askerKey ? { askerKey: options.askerKey } : {}) });
  const counts = { tcpConnections: 0, tcpRejected: 0, tcpRejectedByAsker: 0, tcpRejectedUnowned: 0, tcpIdleClosed: 0, tcpAborted: 0, sendErrors: 0 };
  const connections = new Set<net.Socket>();
  let closed = false;
  let udpSendErrors = 0;

  const serveUdp = (raw: Buffer, from: { address: string; port: number }, local: { address: string; port: number }, send: (reply: Buffer) => void): void => {
    const client: Client = { transport: 'udp', address: from.address, port: from.port, local };
    pipeline.handle(raw, client, (reply) => {
      // A query still in progress at close() is answered into nothing.
      if (reply !== undefined && !closed) send(reply);
    });
  };
  let datagrams: DatagramServer | undefined;

  const connectionsByAsker = new Shares(limits.maxTcpConnectionsPerAsker);
  /** Connections whose owner was not found (closed at once, another namespace's, a failed lookup): one small bucket, not a share each. */
  let unowned = 0;
  /**
   * Whose share `conn` takes, looked up as its queries' askers are (the
   * socket's 4-tuple through the identify hook), before anything of it is
   * read: undefined when that owner's share, or the bucket of connections
   * without an owner, is full.
   */
  const shareOf = (client: Client): GiveBack | undefined | Promise<GiveBack | undefined> => {
    const askerKey = options.askerKey;
    if (askerKey === undefined) return () => undefined;
    const takeUnowned = (): GiveBack | undefined => {
      if (unowned >= limits.maxTcpConnectionsUnowned) {
        counts.tcpRejected++;
        counts.tcpRejectedUnowned++;
        return undefined;
      }
      unowned++;
      return () => unowned--;
    };
    const take = (who: Who): GiveBack | undefined => {
      const asker = askerKey(who);
      if (!connectionsByAsker.take(asker)) {
        counts.tcpRejected++;
        counts.tcpRejectedByAsker++;
        return undefined;
      }
      return () => connectionsByAsker.give(asker);
    };
    let identified: Who | PromiseLike<Who>;
    try {
      identified = options.hooks.identify(client);
    } catch {
      return takeUnowned();
    }
    if (typeof (identified as { then?: unknown }).then !== 'function') return take(identified as Who);
    return Promise.resolve(identified).then(take, takeUnowned);
  };

  const serveTcp = (conn: net.Socket): void => {
    if (conn.remoteAddress === undefined || conn.remotePort === undefined || conn.localAddress === undefined || conn.localPort === undefined) {
      conn.destroy();
      return;
    }
    const client: Client = {
      transport: 'tcp',
      address: conn.remoteAddress,
      port: conn.remotePort,
      local: { address: conn.localAddress, port: conn.localPort },
    };
    counts.tcpConnections++;
    connections.add(conn);
    conn.on('error', () => conn.destroy());
    let giveBack: GiveBack | undefined;
    conn.on('close', () => {
      connections.delete(conn);
      counts.tcpConnections--;
      giveBack?.();
    });
    const admitted = (share: GiveBack | undefined): void => {
      if (share === undefined) conn.destroy();
      // Closed while its owner was looked up: nothing taken stays taken.
      else if (conn.destroyed) share();
      else {
        giveBack = share;
        serveAdmitted(conn, client);
      }
    };
    let share: ReturnType<typeof shareOf>;
    try {
      share = shareOf(client);
    } catch (error) {
      onError(error);
      conn.destroy();
      return;
    }
    if (share instanceof Promise)
      share.then(admitted, (error: unknown) => {
        onError(error);
        conn.destroy();
      });
    else admitted(share);
  };

  const serveAdmitted = (conn: net.Socket, client: Client): void => {
    conn.setNoDelay(true);
    let buffered: Buffer = Buffer.alloc(0);
    let inProgress = 0;
    // A message begun must be whole soon: a byte every few seconds would otherwise hold a connection slot for ever.
    let frameDeadline: NodeJS.Timeout | undefined;
    const abort = (): void => {
      counts.tcpAborted++;
      conn.destroy();
    };
    // Frames are taken while fewer than maxTcpPipeline are in progress; the rest waits in `buffered`, and the socket is not read meanwhile.
    // A reply can come while its frame is being taken (a warm cache hit answers in the same call): the loop below takes what follows, not a nested call per frame.
    let taking = false;
    const takeFrames = (): void => {
      if (taking) return;
      taking = true;
      try {
        takeSome();
      } finally {
        taking = false;
      }
    };
    const takeSome = (): void => {
      while (inProgress < limits.maxTcpPipeline && buffered.length >= 2 && !conn.destroyed) {
        const length = buffered.readUInt16BE(0);
        if (length < MIN_FRAME) {
          abort();
          return;
        }
        if (buffered.length < 2 + length) break;
        const frame = Buffer.from(buffered.subarray(2, 2 + length));
        buffered = buffered.subarray(2 + length);
        inProgress++;
        pipeline.handle(frame, client, (reply) => {
          inProgress--;
          if (reply !== undefined && conn.writable) {
            const out = Buffer.alloc(2 + reply.length);
            out.writeUInt16BE(reply.length, 0);
            reply.copy(out, 2);
            conn.write(out);
            if (conn.writableLength > limits.maxTcpUnread) abort();
          }
          takeFrames();
        });
      }
      if (inProgress >= limits.maxTcpPipeline) conn.pause();
      else if (conn.isPaused()) conn.resume();
      // Bytes of a message not yet whole, while the connection is read: the client owes the rest.
      const owed = inProgress < limits.maxTcpPipeline && buffered.length > 0 && !conn.destroyed;
      if (!owed) {
        clearTimeout(frameDeadline);
        frameDeadline = undefined;
      } else frameDeadline ??= setTimeout(abort, limits.tcpFrameMs);
      // A client that shut its side after its queries still gets every answer, then our FIN.
      if (clientDone && inProgress === 0 && !conn.destroyed) conn.end();
    };
    let clientDone = false;
    conn.on('end', () => {
      clientDone = true;
      takeFrames();
    });
    conn.on('data', (chunk: Buffer) => {
      buffered = buffered.length === 0 ? chunk : Buffer.concat([buffered, chunk]);
      takeFrames();
    });
    conn.setTimeout(limits.tcpIdleMs, () => {
      // A query still being answered keeps the connection; idleness counts from its reply.
      if (inProgress > 0) return;
      counts.tcpIdleClosed++;
      conn.destroy();
    });
    conn.on('close', () => clearTimeout(frameDeadline));
  };

  const tcpServers: net.Server[] = [];
  const addresses: ListenAddress[] = [];
  const closeListeners = async (): Promise<void> => {
    for (const conn of connections) conn.destroy();
    const udp = datagrams;
    datagrams = undefined;
    if (udp) udpSendErrors += udp.sendErrors;
    await udp?.close();
    await Promise.all(tcpServers.splice(0).map((server) => new Promise<void>((resolve) => server.close(() => resolve()))));
  };

  const bindAll = async (wanted: number): Promise<void> => {
    let port = wanted;
    for (const address of options.listen) {
      const v6 = net.isIPv6(address);
      datagrams ??= createDatagramServer(serveUdp, onError, {
        batched: options.batchedUdp ?? true,
        inPlace: (round, local) => {
          if (!closed) pipeline.answerInPlace(round, local);
        },
      });
      port = await datagrams.bind(address, port);
      addresses.push({ transport: 'udp', address, port });
      const tcp = net.createServer({ noDelay: true, allowHalfOpen: true }, serveTcp);
      tcp.maxConnections = limits.maxTcpConnections;
      tcp.on('drop', () => counts.tcpRejected++);
      tcp.on('error', onError);
      tcpServers.push(tcp);
      await new Promise<void>((resolve, reject) => {
        tcp.once('error', reject);
        tcp.listen({ host: address, port, ipv6Only: v6, exclusive: true }, () => {
          tcp.off('error', reject);
          resolve();
        });
      });
      addresses.push({ transport: 'tcp', address, port });
    }
  };

  const wanted = options.port ?? 53;
  // Port 0 takes the port the kernel gives the first UDP socket; another program may hold it for TCP, so a few tries.
  for (let attempt = 0; ; attempt++) {
    try {
      await bindAll(wanted);
      break;
    } catch (cause) {
      await closeListeners();
      addresses.length = 0;
      const code = (cause as NodeJS.ErrnoException).code;
      if (wanted === 0 && code === 'EADDRINUSE' && attempt < 5) continue;
      upstream.close();
      throw new ResolverStartError('listen', `the resolver cannot listen on ${options.listen.join(', ')} port ${wanted}: ${(cause as Error).message}`, {
        cause,
      });
    }
  }

  return {
    addresses,
    forgetReplies: () => pipeline.forgetReplies(),
    stats() {
      const c = cache.stats();
      const u = upstream.stats();
      return {
        ...pipeline.stats(),
        cacheHits: c.hits,
        cacheMisses: c.misses,
        cacheEntries: c.entries,
        cacheBytes: c.bytes,
        evictions: c.evictions,
        expired: c.expired,
        upstreamQueries: u.queries,
        upstreamTimeouts: u.timeouts,
        upstreamTcpRetries: u.tcpRetries,
        upstreamMismatched: u.mismatched,
        upstreamErrors: u.errors,
        upstreamFailed: u.failed,
        upstreamInFlight: u.inFlight,
        ...counts,
        sendErrors: counts.sendErrors + udpSendErrors + (datagrams?.sendErrors ?? 0),
        udpUnbatched: datagrams?.unbatched ?? 0,
      };
    },
    async close() {
      closed = true;
      upstream.close();
      await closeListeners();
      cache.clear();
    },
  };
}
