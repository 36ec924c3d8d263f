/**
 * Who asks, as the resolver's pipeline sees it: one object per identity, so
 * that a reply kept for one asker (pipeline.ts) is known by the object, and
 * a socket of another identity on the same addresses is never taken for it.
 */
import { describe, expect, it } from 'vitest';
import type { Client } from '../../src/resolver/server.js';
import { internedWho, openWhoAsks } from '../../src/resolver/who.js';
import { NetlinkError } from '../../src/system/netlink.js';
import type { SockDiag, SocketQuery, TcpSocket } from '../../src/system/sock-diag.js';

/** A sock_diag that says the socket on `client.port` belongs to `owners[port]`, in no cgroup. */
function fakeDiag(owners: Map<number, number>): SockDiag {
  const socket = (query: SocketQuery): TcpSocket | undefined => {
    const uid = owners.get(query.local.port);
    if (uid === undefined) return undefined;
    return { family: 4, state: 7, local: query.local, remote: query.remote, uid, inode: 1, cookie: 1n, cgroupId: undefined, sockid: Buffer.alloc(48) };
  };
  return {
    tcpSockets: () => [],
    tcpCgroupIds: () => new Set(),
    find: socket,
    findMany: (queries) => queries.map(socket),
    destroy: () => 'gone',
    close: () => undefined,
  };
}

const client = (port: number): Client => ({ transport: 'udp', address: '127.0.0.1', port, local: { address: '127.0.0.153', port: 53 } });

describe('who asks', () => {
  it('is the same object for the same identity, and another for another uid on the same port', async () => {
    const owners = new Map([
      [40000, 1000],
      [40001, 1000],
    ]);
    const who = openWhoAsks({ sockDiag: fakeDiag(owners), cgroups: { root: '/nonexistent' } });
    const first = who.identify(client(40000));
    expect(who.identify(client(40001))).toBe(first);
    expect(await who.identifyInBatch(client(40000))).toBe(first);
    // The port passes to another user's socket: another identity, at once.
    owners.set(40000, 1001);
    const other = who.identify(client(40000));
    expect(other).not.toBe(first);
    expect(other).toEqual({ uid: 1001 });
    who.close();
  });

  it('for a round at once (identifyNow): the objects identify gives, undefined for a socket that is gone, and all undefined when netlink fails', () => {
    const owners = new Map([
      [40000, 1000],
      [40001, 1001],
    ]);
    const diag = fakeDiag(owners);
    const who = openWhoAsks({ sockDiag: diag, cgroups: { root: '/nonexistent' } });
    const [a, b, gone] = who.identifyNow([client(40000), client(40001), client(40002)]);
    expect(a).toBe(who.identify(client(40000)));
    expect(b).toBe(who.identify(client(40001)));
    expect(gone).toBeUndefined();
    // The kernel refused one lookup of the batch: that one unknown, the others found.
    const found = diag.findMany.bind(diag);
    diag.findMany = (queries) => found(queries).map((socket, i) => (i === 0 ? new NetlinkError('sock_diag refused the lookup', { errno: 22 }) : socket));
    const [refused, still] = who.identifyNow([client(40000), client(40001)]);
    expect(refused).toBeUndefined();
    expect(still).toBe(b);
    diag.findMany = () => {
      throw new Error('netlink is gone');
    };
    expect(who.identifyNow([client(40000), client(40001)])).toEqual([undefined, undefined]);
    who.close();
  });

  it('is one object per uid and cgroup: another cgroup of the same user (another app) is another identity', () => {
    const intern = internedWho();
    const app = intern(1000, 'user.slice/user-1000.slice/app-a.scope');
    expect(intern(1000, 'user.slice/user-1000.slice/app-a.scope')).toBe(app);
    expect(intern(1000, 'user.slice/user-1000.slice/app-b.scope')).not.toBe(app);
    expect(intern(1001, 'user.slice/user-1000.slice/app-a.scope')).not.toBe(app);
    expect(intern(1000, undefined)).not.toBe(app);
    expect(intern(1000, undefined)).toBe(intern(1000, undefined));
  });

  it('starts again past its bound: old objects are never handed out for another identity', () => {
    const intern = internedWho();
    const first = intern(1000, 'a.scope');
    for (let i = 0; i < 16_384; i++) intern(2000, `scope-${i}`);
    const again = intern(1000, 'a.scope');
    expect(again).toEqual(first);
    expect(again).not.toBe(first);
  });
});
