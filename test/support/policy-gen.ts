import fc from 'fast-check';
import { stringify } from 'yaml';
import type { Facts } from '../../src/compile/compile.js';
import { FACTS } from './compile-text.js';

/**
 * Random policies for property tests (fast-check): apps with user, group and
 * cgroup identities, allow/deny rules with v4 and v6 networks, names, ports
 * and protocols, a global deny list, system domains, the default, lockdown,
 * Tor and the resolver's DNS settings. One generator, so every property test explores the same space.
 */

/**
 * Cgroups delegated to a user (owned by it, as systemd chowns them): its
 * user manager's subtree, with scopes matching a browser's glob and a
 * Flatpak's, and a system unit with `Delegate=yes` and `User=`.
 */
const DELEGATED: ReadonlyMap<string, number> = new Map([
  ['system.slice/d.service', 4242],
  ['user.slice/user-1000.slice/user@1000.service', 1000],
  ['user.slice/user-1000.slice/user@1000.service/app.slice', 1000],
  ['user.slice/user-1000.slice/user@1000.service/app.slice/app-firefox-1.scope', 1000],
  ['user.slice/user-1000.slice/user@1000.service/app.slice/app-flatpak-org.example.Web-2.scope', 1000],
]);

/** Cgroups that exist on the generated host; the compiler fills its cgroup maps from them. */
export const GEN_CGROUPS: readonly string[] = [
  'system.slice',
  'system.slice/a.service',
  'system.slice/b.service',
  'system.slice/gpg.service',
  // An instance of a template, in its template's slice as systemd runs it.
  'system.slice/system-vault\\x2dagent.slice',
  'system.slice/system-vault\\x2dagent.slice/vault-agent@alice.service',
  'user.slice',
  'user.slice/user-1000.slice',
  'user.slice/user-1000.slice/session-2.scope',
  ...DELEGATED.keys(),
].sort();

/**
 * Subordinate ranges and group members on the generated host: alice's
 * subordinate uids overlap those of uid 4242 (the first claimed keeps the
 * overlap), and alice is a member of wheel, as is uid 5555, which no
 * selector names.
 */
export const GEN_FACTS: Facts = {
  ...FACTS,
  groups: new Map([...FACTS.groups, ['staff', 50]]),
  cgroups: GEN_CGROUPS,
  cgroupOwners: DELEGATED,
  subordinate: new Map([
    [1000, { uids: [{ from: 100000, to: 165535 }], gids: [{ from: 100000, to: 165535 }] }],
    [4242, { uids: [{ from: 165000, to: 170000 }], gids: [] }],
    [990, { uids: [{ from: 200000, to: 200999 }], gids: [{ from: 200000, to: 200000 }] }],
  ]),
  members: new Map([
    [10, [1000, 5555]],
    [50, [990, 4242]],
  ]),
};

/** A resolver mark some generated policies choose instead of the default. */
export const GEN_DNS_MARK = 0x2a;

export interface GeneratedPolicy {
  readonly yaml: string;
  readonly lockdown: boolean;
}

const selector = fc.constantFrom<Record<string, string | number>>(
  { user: 'alice' },
  { user: 1000 },
  { user: 4242 },
  { user: 'vault' },
  { user: 'nobody-here' },
  { group: 'wheel' },
  { group: 10 },
  { group: 'staff' },
  { unit: 'a.service' },
  { unit: 'gpg.service' },
  { cgroup: 'system.slice/*.service' },
  { slice: 'system.slice' },
  { slice: 'user-1000.slice', unit: 'session-2.scope' },
  { cgroup: 'user.slice/*' },
  { cgroup: 'user.slice/user-*.slice/user@*.service/app.slice/app-firefox-*.scope' },
  { flatpak: 'org.example.Web' },
  { cgroup: 'user.slice/*/user@*.service' },
  { unit: 'd.service' },
  { unit: 'vault-agent@alice.service' },
);
export const selectors = fc.array(selector, { minLength: 1, maxLength: 2 });

const destination = fc.constantFrom(
  'example.org',
  '192.0.2.0/24',
  '192.0.2.5',
  '198.51.100.0/25',
  '198.51.100.9',
  '127.0.0.0/8',
  '0.0.0.0/0',
  '2001:db8::/48',
  '2001:db8::5',
  '2001:db8:1::/64',
  '::1',
  '::/0',
);

/** The fields every rule has besides its verdict; icmp has no ports (the policy refuses them). */
const matchFields = fc
  .record({
    to: fc.oneof(fc.constant('any' as const), fc.uniqueArray(destination, { minLength: 1, maxLength: 3 })),
    ports: fc.constantFrom(undefined, [443], [53, '8000-8100'], [8080, '8000-8100', 53, 53, '8101-8200']),
    proto: fc.constantFrom<undefined | string | string[]>(undefined, 'tcp', 'udp', 'icmp', ['tcp', 'udp'], ['udp', 'icmp']),
    log: fc.constantFrom(undefined, false),
  })
  .map((r) => (r.ports && (r.proto === 'icmp' || (Array.isArray(r.proto) && r.proto.includes('icmp'))) ? { ...r, ports: undefined } : r));

const appRule = fc
  .tuple(fc.constantFrom('allow', 'deny'), matchFields)
  .map(([verdict, r]) => ({ [verdict]: r.to, ...defined({ ports: r.ports, proto: r.proto, log: r.log }) }));

const app = fc.record({ identity: selectors, default: fc.constantFrom(undefined, 'allow', 'deny'), rules: fc.array(appRule, { maxLength: 4 }) });

const tor = fc.record({
  socks: fc.constantFrom(undefined, '127.0.0.1:9050', '[::1]:9050', '192.0.2.50:9050', '[2001:db8::50]:9150'),
  updaters: selectors,
  user: fc.constantFrom(undefined, 'debian-tor', 4242),
});

const dns = fc.record({ exclusive: fc.constantFrom(undefined, true, false), mark: fc.constantFrom(undefined, GEN_DNS_MARK) });

export const arbPolicy: fc.Arbitrary<GeneratedPolicy> = fc
  .record({
    egress: fc.constantFrom('allow', 'deny'),
    apps: fc.array(app, { maxLength: 3 }),
    deny: fc.array(matchFields, { maxLength: 3 }),
    domains: fc.array(selectors, { maxLength: 2 }),
    tor: fc.option(tor, { nil: undefined }),
    dns: fc.option(dns, { nil: undefined }),
    lockdown: fc.boolean(),
  })
  .map(policyDocument);

/** A user's own app, and apps of cgroups delegated to it (a browser's glob, a Flatpak). */
const userSide = fc.constantFrom<Record<string, string | number>[]>(
  [{ user: 'alice' }],
  [{ user: 1000 }, { group: 'wheel' }],
  [{ group: 10 }],
  [{ cgroup: 'user.slice/user-*.slice/user@*.service/app.slice/app-firefox-*.scope' }],
  [{ flatpak: 'org.example.Web' }],
  [{ cgroup: 'user.slice/*/user@*.service' }],
);

/**
 * Policies where the apps of a user's delegated cgroups and the user's own
 * app meet, which the random ones above reach only now and then: no system
 * domains and no lockdown, which would decide first.
 */
export const arbDelegatedPolicy: fc.Arbitrary<GeneratedPolicy> = fc
  .record({
    egress: fc.constantFrom('allow', 'deny'),
    apps: fc.array(fc.record({ identity: userSide, default: fc.constantFrom(undefined, 'allow', 'deny'), rules: fc.array(appRule, { maxLength: 3 }) }), {
      minLength: 2,
      maxLength: 4,
    }),
    deny: fc.array(matchFields, { maxLength: 2 }),
    domains: fc.constant([]),
    tor: fc.option(tor, { nil: undefined }),
    dns: fc.constant(undefined),
    lockdown: fc.constant(false),
  })
  .map(policyDocument);

export function policyDocument(p: {
  egress: string;
  apps: readonly { identity: unknown; default: string | undefined; rules: unknown }[];
  deny: readonly { to: unknown; ports: unknown; proto: unknown; log: unknown }[];
  domains: readonly unknown[];
  tor: { socks: string | undefined; updaters: unknown; user: string | number | undefined } | undefined;
  dns: { exclusive: boolean | undefined; mark: number | undefined } | undefined;
  lockdown: boolean;
}): GeneratedPolicy {
  {
    const doc: Record<string, unknown> = { defaults: { egress: p.egress } };
    if (p.apps.length > 0)
      doc['apps'] = Object.fromEntries(p.apps.map((a, i) => [`app${i}`, defined({ identity: a.identity, default: a.default, rules: a.rules })]));
    if (p.deny.length > 0) doc['deny'] = p.deny.map((r) => defined({ to: r.to, ports: r.ports, proto: r.proto, log: r.log }));
    if (p.domains.length > 0) doc['systemDomains'] = Object.fromEntries(p.domains.map((members, i) => [`sd${i}`, { members }]));
    if (p.tor) doc['tor'] = defined({ enabled: true, socks: p.tor.socks, user: p.tor.user, updaters: p.tor.updaters });
    if (p.dns) doc['dns'] = defined({ exclusive: p.dns.exclusive, mark: p.dns.mark });
    return { yaml: stringify(doc), lockdown: p.lockdown };
  }
}

function defined(record: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(Object.entries(record).filter(([, value]) => value !== undefined));
}
