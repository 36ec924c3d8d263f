/**
 * Who sent a DNS query: the client's socket, found through sock_diag's
 * exact lookup on the query's four addresses, says the uid it was made with
 * and (cgroup v2) its cgroup. The kernel's answer, not the packet's: a
 * process cannot claim another's identity by what it sends.
 *
 * What this sees is the socket that sent the query. Where another resolver
 * sits in front (systemd-resolved, nscd, a browser's own), that resolver is
 * who asks, for everyone behind it.
 *
 * The lookup is one netlink round trip in the resolver's own network
 * namespace (measured ≈ 5–9 µs here), the cgroup path one
 * open_by_handle_at on a miss of its cache (≈ 5 µs, cgroup-id.ts).
 */
import { EgressError, ErrorCode } from '../errors.js';
import { openCgroupPaths, type CgroupPaths, type CgroupPathsOptions } from '../system/cgroup-id.js';
import { openSockDiag, type SockDiag, type SocketQuery, type TcpSocket } from '../system/sock-diag.js';
import type { Client } from './server.js';

/** Who asks, as the kernel knows the socket. */
export interface Who {
  /** The uid the socket was made with. */
  readonly uid: number;
  /** Not reported by sock_diag: set only by callers that know it. */
  readonly gid?: number;
  /** The socket's cgroup relative to the cgroup2 root ('' for the root), when cgroup2 is mounted at /sys/fs/cgroup and the cgroup still exists. */
  readonly cgroup?: string;
}

/** The socket a query came from is not there: it closed before it was looked up, or it is on another host (EGD_SOCKET_NOT_FOUND). */
export class SocketNotFoundError extends EgressError {
  constructor(readonly client: Client) {
    super(
      ErrorCode.SocketNotFound,
      `no ${client.transport} socket ${client.address}#${client.port} → ${client.local.address}#${client.local.port} in this network namespace`,
    );
    this.name = 'SocketNotFoundError';
  }
}

export interface WhoAsks {
  /** Who sent a query from `client`; throws a SocketNotFoundError when its socket is gone. */
  identify(client: Client): Who;
  /**
   * The same answer, for every client asked about in this turn of the event
   * loop together: one netlink round trip for all of them (a resolver reads
   * its datagrams many at a time), and one lookup for clients on the same
   * four addresses. Each lookup is made after every query that asks it
   * arrived, as `identify` would be; nothing is remembered past the turn,
   * so a port another user takes over later is looked up anew.
   */
  identifyInBatch(client: Client): Promise<Who>;
  /**
   * Who sent queries from each of `clients`, in one netlink round trip, now:
   * for a resolver that has read a round of datagrams and looks up their
   * senders after all of them arrived. Undefined where the socket is not
   * found or the lookup failed; the caller then asks `identifyInBatch`,
   * which says why.
   */
  identifyNow(clients: readonly Client[]): (Who | undefined)[];
  close(): void;
}

export interface WhoAsksOptions {
  /** cgroup ids to paths (cgroup-id.ts); default /sys/fs/cgroup by open_by_handle_at. */
  readonly cgroups?: CgroupPathsOptions;
  /** For tests: a sock_diag to ask instead of this namespace's. */
  readonly sockDiag?: SockDiag;
}

/** Identifies clients in the calling process's network namespace, until `close`. */
export function openWhoAsks(options: WhoAsksOptions = {}): WhoAsks {
  const diag = options.sockDiag ?? openSockDiag();
  let paths: CgroupPaths | undefined;
  try {
    paths = openCgroupPaths(options.cgroups);
  } catch (error) {
    if (!options.sockDiag) diag.close();
    throw error;
  }
  const interned = internedWho();
  const whoOf = (socket: TcpSocket): Who => interned(socket.uid, paths && socket.cgroupId !== undefined ? paths.pathOf(socket.cgroupId) : undefined);
  const queryOf = (client: Client): SocketQuery => ({
    protocol: client.transport,
    local: { address: client.address, port: client.port },
    remote: client.local,
  });
  let waiting = new Map<string, { query: SocketQuery; client: Client; settle: { resolve: (who: Who) => void; reject: (error: unknown) => void }[] }>();
  const lookUp = (): void => {
    const asked = [...waiting.values()];
    waiting = new Map();
    let found: ReturnType<SockDiag['findMany']>;
    try {
      found = diag.findMany(asked.map((a) => a.query));
    } catch (error) {
      for (const a of asked) for (const s of a.settle) s.reject(error);
      return;
    }
    asked.forEach((a, i) => {
      const socket = found[i];
      let outcome: { who: Who } | { error: unknown };
      try {
        outcome = socket instanceof Error ? { error: socket } : socket === undefined ? { error: new SocketNotFoundError(a.client) } : { who: whoOf(socket) };
      } catch (error) {
        outcome = { error };
      }
      for (const s of a.settle)
        if ('who' in outcome) s.resolve(outcome.who);
        else s.reject(outcome.error);
    });
  };
  return {
    identify(client) {
      const socket = diag.find(queryOf(client));
      if (!socket) throw new SocketNotFoundError(client);
      return whoOf(socket);
    },
    identifyNow(clients) {
      let found: ReturnType<SockDiag['findMany']>;
      try {
        found = diag.findMany(clients.map(queryOf));
      } catch {
        return clients.map(() => undefined);
      }
      return found.map((socket) => {
        if (socket === undefined || socket instanceof Error) return undefined;
        try {
          return whoOf(socket);
        } catch {
          return undefined;
        }
      });
    },
    identifyInBatch(client) {
      return new Promise<Who>((resolve, reject) => {
        const key = `${client.transport} ${client.address} ${client.port} ${client.local.address} ${client.local.port}`;
        if (waiting.size === 0) queueMicrotask(lookUp);
        const same = waiting.get(key);
        if (same) same.settle.push({ resolve, reject });
        else waiting.set(key, { query: queryOf(client), client, settle: [{ resolve, reject }] });
      });
    },
    close() {
      paths?.close();
      if (!options.sockDiag) diag.close();
    },
  };
}

/** Identities kept at once, past which the interned ones start again (a user can make cgroups without end). */
const INTERNED = 16_384;

/**
 * One Who object per uid and cgroup while it is seen: what is decided for
 * an identity (the pipeline's reply memo, decide.ts) can then be known by
 * the object, not by a key built for every query.
 */
export function internedWho(): (uid: number, cgroup: string | undefined) => Who {
  const byCgroup = new Map<string | undefined, Map<number, Who>>();
  let count = 0;
  return (uid, cgroup) => {
    let byUid = byCgroup.get(cgroup);
    let who = byUid?.get(uid);
    if (who !== undefined) return who;
    if (count >= INTERNED) {
      byCgroup.clear();
      count = 0;
      byUid = undefined;
    }
    if (byUid === undefined) byCgroup.set(cgroup, (byUid = new Map<number, Who>()));
    who = cgroup === undefined ? { uid } : { uid, cgroup };
    byUid.set(uid, who);
    count++;
    return who;
  };
}
