import { describe, expect, it } from 'vitest';
import { socketsToCut, sweepSockets, type SocketAccess } from '../../src/enforce/sweep.js';
import { ErrorCode } from '../../src/errors.js';
import { NetlinkError } from '../../src/system/netlink.js';
import { TcpState, type TcpSocket } from '../../src/system/sock-diag.js';
import { FACTS, policyFrom } from '../support/compile-text.js';

/** Which sockets apply cuts, decided by explain over the policy; the kernel side is in orphans.test.ts. */
let cookie = 0n;
const socket = (uid: number, remote: string, port = 443, inode = 0): TcpSocket => ({
  family: remote.includes(':') ? 6 : 4,
  state: TcpState.Established,
  local: { address: '192.0.2.1', port: 40000 },
  remote: { address: remote, port },
  uid,
  inode,
  cookie: ++cookie,
  cgroupId: undefined,
  sockid: Buffer.alloc(48),
});

const access = (over: Partial<SocketAccess> = {}): SocketAccess => ({
  tcpSockets: () => [],
  destroy: () => 'destroyed',
  socketGroups: () => new Map(),
  groupsOfUser: () => [],
  localAddresses: () => new Set(['192.0.2.1']),
  close: () => undefined,
  ...over,
});

const cutOf = (yaml: string, sockets: TcpSocket[], options: { lockdown?: boolean; access?: SocketAccess } = {}) =>
  socketsToCut(policyFrom(yaml), FACTS, options.lockdown ?? false, sockets, options.access ?? access()).map((c) => [
    c.socket.uid,
    c.socket.remote.address,
    c.because.ruleId,
  ]);

describe('which connections apply cuts', () => {
  it('explicit denies cut, for every socket they cover; a default deny keeps established connections', () => {
    const yaml = `
defaults: {egress: deny}
apps:
  alice: {identity: {user: alice}, default: allow, rules: [{deny: [198.51.100.0/24]}]}
deny:
  - to: [203.0.113.9]
systemDomains:
  offline: {members: [{user: vault}]}
`;
    expect(
      cutOf(yaml, [socket(1000, '198.51.100.5'), socket(1000, '192.0.2.2'), socket(990, '192.0.2.2'), socket(4242, '203.0.113.9'), socket(4242, '192.0.2.2')]),
    ).toEqual([
      [1000, '198.51.100.5', 'app/alice/0'],
      [990, '192.0.2.2', 'sd/offline'],
      [4242, '203.0.113.9', 'deny/f.yaml/0'],
    ]);
  });

  it('v4-mapped addresses are judged as IPv4; a connection to this machine leaves through lo and is loopback', () => {
    const yaml = 'defaults: {egress: allow}\nsystemDomains:\n  offline: {members: [{user: vault}]}\n';
    expect(cutOf(yaml, [socket(990, '::ffff:198.51.100.5'), socket(990, '192.0.2.1'), socket(990, '127.0.0.1')])).toEqual([
      [990, '::ffff:198.51.100.5', 'sd/offline'],
    ]);
  });

  it("a dual-stack socket to this machine's own IPv4 address (v4-mapped) leaves through lo too: never cut, under lockdown neither", () => {
    const yaml = 'defaults: {egress: allow}\nsystemDomains:\n  offline: {members: [{user: vault}]}\n';
    const mapped = [socket(990, '::ffff:192.0.2.1'), socket(1000, '::ffff:192.0.2.1'), socket(990, '::ffff:192.0.2.9')];
    expect(cutOf(yaml, mapped)).toEqual([[990, '::ffff:192.0.2.9', 'sd/offline']]);
    expect(cutOf(yaml, mapped, { lockdown: true })).toEqual([[990, '::ffff:192.0.2.9', 'sd/offline']]);
    expect(cutOf('defaults: {egress: allow}\n', mapped, { lockdown: true })).toEqual([[990, '::ffff:192.0.2.9', 'lockdown']]);
  });

  it("lockdown cuts everything but loopback and Tor's own user", () => {
    const yaml = 'defaults: {egress: allow}\ntor: {enabled: true}\n';
    expect(cutOf(yaml, [socket(1000, '192.0.2.2'), socket(110, '192.0.2.2'), socket(1000, '::1')], { lockdown: true })).toEqual([
      [1000, '192.0.2.2', 'lockdown'],
    ]);
  });

  it("a live socket is asked as its own group; an orphan as each of its user's groups; a failed lookup counts every group named", () => {
    const yaml = 'defaults: {egress: allow}\nsystemDomains:\n  offline: {members: [{group: wheel}]}\n';
    const live = socket(1000, '192.0.2.2', 443, 77);
    const liveOther = socket(1001, '192.0.2.2', 443, 78);
    const orphanMember = socket(1002, '192.0.2.2');
    const orphanStranger = socket(1003, '192.0.2.2');
    const orphanUnknown = socket(1004, '192.0.2.2');
    const groups = access({
      socketGroups: () =>
        new Map([
          [77, 10],
          [78, 1001],
        ]),
      groupsOfUser: (uid) => (uid === 1002 ? [1002, 10] : uid === 1003 ? [1003] : { error: 'no answer' }),
    });
    expect(cutOf(yaml, [live, liveOther, orphanMember, orphanStranger, orphanUnknown], { access: groups }).map(([uid]) => uid)).toEqual([1000, 1002, 1004]);
  });
});

describe('the sweep', () => {
  it('destroys what it chose, counts sockets gone meanwhile, and reports the ones it could not destroy', () => {
    const policy = policyFrom('defaults: {egress: allow}\ndeny:\n  - to: [203.0.113.0/24]\n');
    const sockets = [socket(1, '203.0.113.1'), socket(2, '203.0.113.2'), socket(3, '203.0.113.3'), socket(4, '192.0.2.2')];
    let closed = false;
    const outcome = sweepSockets(policy, FACTS, false, () =>
      access({
        tcpSockets: () => sockets,
        destroy: (s) => {
          if (s.uid === 2) return 'gone';
          if (s.uid === 3) throw new NetlinkError('netlink: the kernel refused message type 21: EOPNOTSUPP', { errno: 95 });
          return 'destroyed';
        },
        close: () => void (closed = true),
      }),
    );
    expect(outcome).toEqual({
      examined: 4,
      cut: [{ socket: 'uid 1 192.0.2.1:40000 -> 203.0.113.1:443 ESTABLISHED (orphan)', ruleId: 'deny/f.yaml/0' }],
      gone: 1,
      failed: [{ socket: 'uid 3 192.0.2.1:40000 -> 203.0.113.3:443 ESTABLISHED (orphan)', reason: expect.stringContaining('EOPNOTSUPP') as string }],
    });
    expect(closed).toBe(true);
  });

  it('sockets that cannot be listed fail the sweep with EGD_SOCKETS_NOT_CUT', () => {
    const policy = policyFrom('defaults: {egress: allow}\n');
    const fails = () => {
      throw new NetlinkError('netlink: socket(AF_NETLINK, 4) failed: EPERM', { errno: 1 });
    };
    expect(() => sweepSockets(policy, FACTS, false, fails)).toThrow(expect.objectContaining({ code: ErrorCode.SocketsNotCut }) as Error);
    expect(() => sweepSockets(policy, FACTS, false, () => access({ tcpSockets: fails }))).toThrow(
      expect.objectContaining({ code: ErrorCode.SocketsNotCut }) as Error,
    );
  });
});
