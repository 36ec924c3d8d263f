import fc from 'fast-check';
import { isIPv4 } from 'node:net';
import type { Who } from '../../src/compile/explain.js';
import type { Protocol } from '../../src/policy/model.js';
import { GEN_CGROUPS, GEN_DNS_MARK, GEN_FACTS } from './policy-gen.js';
import { addressBits, type Packet } from './ruleset-interpreter.js';

/** A new connection as `explain --app WHO --to ADDR[:PORT]/PROTO` describes it. */
export interface Connection {
  readonly who: Who;
  readonly address: string;
  readonly port: number | undefined;
  readonly proto: Protocol;
  /** The socket's mark (SO_MARK), as `explain --mark` takes it; undefined: none. */
  readonly mark?: number;
}

/** A uid and gid that no generated policy names: a socket whose other id the query does not give. */
const NOBODY = 65534;

export const arbConnection: fc.Arbitrary<Connection> = fc
  .record({
    who: fc.oneof(
      fc.constantFrom<Who>(
        { kind: 'user', user: 'alice' },
        // Root, as the resolver runs: only its sockets pass with the resolver's mark.
        { kind: 'user', user: 0 },
        { kind: 'user', user: 1000 },
        { kind: 'user', user: 4242 },
        { kind: 'user', user: 'vault' },
        { kind: 'user', user: 'debian-tor' },
        { kind: 'user', user: 5555 },
        { kind: 'user', user: 100005 },
        { kind: 'user', user: 165200 },
        { kind: 'user', user: 200999 },
        { kind: 'group', group: 'wheel' },
        { kind: 'group', group: 'staff' },
        { kind: 'group', group: 77 },
        { kind: 'group', group: 100007 },
        { kind: 'group', group: 200000 },
      ),
      // A cgroup with the socket's user and group, or neither: a delegated cgroup's verdict depends on them.
      fc
        .record({
          path: fc.constantFrom(
            ...GEN_CGROUPS,
            'system.slice/a.service/worker',
            'system.slice/d.service/sub',
            'user.slice/user-1000.slice/session-2.scope/x',
            'user.slice/user-1000.slice/user@1000.service/app.slice/app-firefox-1.scope/sub',
          ),
          user: fc.constantFrom(undefined, 'alice', 0, 1000, 4242, 'vault', 'debian-tor'),
          group: fc.constantFrom(undefined, 'wheel', 77),
        })
        .map(({ path, user, group }): Who => ({ kind: 'cgroup', path, ...(user !== undefined ? { user } : {}), ...(group !== undefined ? { group } : {}) })),
      // The user's own processes in the cgroups delegated to it: where a cgroup's app and the user's meet.
      fc
        .record({
          path: fc.constantFrom(
            'user.slice/user-1000.slice/user@1000.service/app.slice/app-firefox-1.scope',
            'user.slice/user-1000.slice/user@1000.service/app.slice/app-flatpak-org.example.Web-2.scope',
            'user.slice/user-1000.slice/user@1000.service/app.slice',
          ),
          user: fc.constantFrom<string | number>('alice', 1000),
          group: fc.constantFrom(undefined, 'wheel'),
        })
        .map(({ path, user, group }): Who => ({ kind: 'cgroup', path, user, ...(group !== undefined ? { group } : {}) })),
    ),
    address: fc.constantFrom(
      '192.0.2.5',
      '192.0.2.50',
      '198.51.100.9',
      '198.51.100.200',
      '203.0.113.1',
      '127.0.0.1',
      '127.0.0.53',
      '2001:db8::5',
      '2001:DB8:0:0::5',
      '2001:db8::50',
      '2001:DB8:0::50',
      '2001:db8:1::1',
      '2001:db8:2::1',
      '::1',
      '0:0:0:0:0:0:0:1',
      '::ffff:192.0.2.5',
      '::ffff:198.51.100.9',
      '::ffff:203.0.113.1',
      '::ffff:127.0.0.1',
      '::ffff:c000:205',
      '0.0.0.0',
      '::',
      '::ffff:0.0.0.0',
    ),
    port: fc.constantFrom(443, 53, 853, 8080, 9050, 9150, 22),
    proto: fc.constantFrom<Protocol>('tcp', 'udp', 'icmp'),
    // The resolver's default mark, GEN_DNS_MARK (which some generated policies choose), and marks nobody chose.
    mark: fc.constantFrom(undefined, undefined, 0x45444e53, GEN_DNS_MARK, 1),
    // Half the marked sockets are root's, as the resolver's are: the mark passes only on those.
    byRoot: fc.boolean(),
  })
  .map(({ mark, byRoot, ...c }) => ({
    ...c,
    ...(mark === undefined ? {} : { mark }),
    ...(mark !== undefined && byRoot ? { who: { kind: 'user', user: 0 } } : {}),
    ...(c.proto === 'icmp' ? { port: undefined } : {}),
  }));

/**
 * The packet the kernel sees for a new connection, from what Linux does, not
 * from explain: a dual-stack socket sends to ::ffff:a.b.c.d as IPv4 to
 * a.b.c.d (tcp_v6_connect and udpv6_sendmsg hand v4-mapped destinations to
 * IPv4); a connection to 0.0.0.0 or :: goes to 127.0.0.1 or ::1
 * (ip_route_output, tcp_v6_connect). Loopback addresses leave through lo and
 * every other address through the network, as explain's --help says it assumes.
 */
export function packetFor(c: Connection): Packet {
  let family: 4 | 6 = isIPv4(c.address) ? 4 : 6;
  let bits = addressBits(family, c.address);
  if (family === 6 && bits >> 32n === 0xffffn) {
    family = 4;
    bits &= 0xffffffffn;
  }
  if (bits === 0n) bits = family === 4 ? 0x7f000001n : 1n;
  const daddr = family === 4 ? [24n, 16n, 8n, 0n].map((shift) => String((bits >> shift) & 255n)).join('.') : c.address === '::' ? '::1' : c.address;
  const loopback = family === 4 ? bits >> 24n === 127n : bits === 1n;
  const id = (kind: 'user' | 'group', name: string | number | undefined): number => {
    if (name === undefined) return NOBODY;
    if (typeof name === 'number') return name;
    const known = (kind === 'user' ? GEN_FACTS.users : GEN_FACTS.groups).get(name);
    if (typeof known !== 'number') throw new Error(`no ${kind} ${name} in the facts`);
    return known;
  };
  const icmp = c.proto === 'icmp';
  return {
    oif: loopback ? 'lo' : 'eth0',
    family,
    daddr,
    l4proto: icmp ? (family === 4 ? 'icmp' : 'ipv6-icmp') : c.proto,
    ...(c.port !== undefined ? { dport: c.port } : {}),
    skuid: id('user', c.who.kind === 'user' || c.who.kind === 'cgroup' ? c.who.user : undefined),
    skgid: id('group', c.who.kind === 'group' || c.who.kind === 'cgroup' ? c.who.group : undefined),
    cgroup: c.who.kind === 'cgroup' ? c.who.path : '',
    ct: 'new',
    ...(icmp && family === 6 ? { icmpv6Type: 'echo-request', hoplimit: 64 } : {}),
    ...(c.mark === undefined ? {} : { mark: c.mark }),
  };
}
