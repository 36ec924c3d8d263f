/**
 * The bounds that keep the resolver's memory and time finite whatever its
 * clients and upstreams do. Every limit that is hit is counted (stats()).
 */
export interface ResolverLimits {
  /** Client queries in progress at once (parsed, not yet answered); more are dropped (UDP) or answered SERVFAIL (TCP). */
  readonly maxPending: number;
  /**
   * Of those, from one asker (the resolver's `askerKey`: a user, its
   * subordinate uids counted as it, owner.ts): one local user asking names
   * whose servers never answer must not take every slot and leave everyone
   * else unanswered.
   */
  readonly maxPendingPerAsker: number;
  /** Open TCP client connections; more are closed at once. */
  readonly maxTcpConnections: number;
  /**
   * Of those, of one asker (as maxPendingPerAsker), found when it connects:
   * a connection sending a query now and then is never idle, so one user
   * could otherwise hold every one and leave the others no TCP fallback.
   */
  readonly maxTcpConnectionsPerAsker: number;
  /** Of those, whose owner was not found (one bucket for all of them): such a connection's queries are REFUSED anyway. */
  readonly maxTcpConnectionsUnowned: number;
  /** Queries in progress on one TCP connection; while there are this many, the connection is not read. */
  readonly maxTcpPipeline: number;
  /** A TCP connection with nothing in progress and nothing received for this long is closed. */
  readonly tcpIdleMs: number;
  /** A TCP message begun must be whole this long after its first byte, or the connection is closed (a byte every few seconds holds no slot). */
  readonly tcpFrameMs: number;
  /** Replies a TCP client has not read, in bytes: past this the connection is closed. */
  readonly maxTcpUnread: number;
  /** A client hears SERVFAIL at the latest this long after its query went upstream. */
  readonly upstreamTimeoutMs: number;
  /** One upstream gets this long before the next is tried. */
  readonly upstreamAttemptMs: number;
  /** Cache entries and their (approximate) bytes; the least recently used go first. */
  readonly cacheEntries: number;
  readonly cacheBytes: number;
  /** Positive answers are kept at most this long (seconds), whatever their TTL. */
  readonly maxTtl: number;
  /** Negative answers (NXDOMAIN, no data) at most this long (seconds; RFC 2308 suggests 1–3 hours, resolvers use less). */
  readonly maxNegativeTtl: number;
  /** TTL of the 0.0.0.0 / :: answer a 'null' shape gives (seconds). */
  readonly nullTtl: number;
}

export const DEFAULT_LIMITS: ResolverLimits = {
  maxPending: 4096,
  maxPendingPerAsker: 512,
  maxTcpConnections: 256,
  maxTcpConnectionsPerAsker: 32,
  maxTcpConnectionsUnowned: 8,
  maxTcpPipeline: 64,
  tcpIdleMs: 10_000,
  tcpFrameMs: 3000,
  maxTcpUnread: 256 * 1024,
  upstreamTimeoutMs: 2500,
  upstreamAttemptMs: 1000,
  cacheEntries: 50_000,
  cacheBytes: 32 * 1024 * 1024,
  maxTtl: 86_400,
  maxNegativeTtl: 900,
  nullTtl: 60,
};

/** The defaults with `overrides` laid over them. */
export function resolverLimits(overrides: Partial<ResolverLimits> = {}): ResolverLimits {
  const limits = { ...DEFAULT_LIMITS };
  for (const [key, value] of Object.entries(overrides) as [keyof ResolverLimits, number | undefined][]) if (value !== undefined) limits[key] = value;
  return limits;
}
