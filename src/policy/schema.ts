import { z } from 'zod';
import { parseDestination, parseNetwork } from './destination.js';
import { clip } from './issues.js';
import { unitNameProblem } from './units.js';

/**
 * The policy file format. This schema is the only source of the file types
 * (`z.infer`) and of the JSON Schema that `egressctl schema` prints. Objects
 * are strict: an unknown key is an error, because a misspelt key silently
 * ignored in a firewall policy is a hole.
 */

const entityName = z.string().regex(/^[a-z][a-z0-9_-]{0,31}$/, 'names are 1–32 characters: lower case letters, digits, "-" and "_", starting with a letter');

const destination = z.string().superRefine((value, ctx) => {
  const parsed = parseDestination(value);
  if (!parsed.ok) ctx.addIssue({ code: 'custom', message: parsed.message, params: parsed.hint ? { hint: parsed.hint } : {} });
});

const port = z.union([
  z.number().int().min(1).max(65535),
  z.string().superRefine((value, ctx) => {
    const range = /^(\d{1,5})-(\d{1,5})$/.exec(value.trim());
    const single = /^\d{1,5}$/.test(value.trim());
    const [low, high] = range ? [Number(range[1]), Number(range[2])] : [Number(value), Number(value)];
    if ((!range && !single) || low < 1 || high > 65535 || low > high) {
      ctx.addIssue({
        code: 'custom',
        message: `"${clip(value)}" is not a port or port range`,
        params: { hint: 'ports are 1–65535; a range is written "8000-8100" with the lower port first' },
      });
    }
  }),
]);

const protocol = z.enum(['tcp', 'udp', 'icmp']);

/** What a rule matches besides the identity: destinations, ports, protocols. */
const matchFields = {
  ports: z.array(port).min(1).optional().describe('Destination ports or ranges ("8000-8100"). Without `proto`, they apply to tcp and udp.'),
  proto: z
    .union([protocol, z.array(protocol).min(1)])
    .optional()
    .describe('tcp, udp or icmp (icmp covers ICMPv6 too).'),
  log: z.boolean().optional().describe('Log denials of this rule (default: defaults.log.denials).'),
  why: z.string().max(500).optional().describe('Why this rule exists; shown by `egressctl explain`.'),
  sharedAddresses: z
    .enum(['deny', 'spare'])
    .optional()
    .describe(
      'Deny rules with names only: an address the resolver learned for one of its names that also answers a name this rule does not deny (a CDN) is denied too (deny, the default) or left out of the rule (spare). Whoever looked up the other name, the address is spared for everyone.',
    ),
};

const destinations = z.union([z.literal('any'), z.array(destination).min(1)]);

const appRule = z.union([
  z.strictObject({ allow: destinations.describe('Destinations this rule allows: names, *.suffix, @list, catalogue:X, IPs, CIDRs, or "any".'), ...matchFields }),
  z.strictObject({ deny: destinations.describe('Destinations this rule denies.'), ...matchFields }),
]);

const userOrGroup = z.union([z.number().int().min(0).max(4294967294), z.string().regex(/^[a-z_][a-z0-9_.-]{0,31}\$?$/i, 'not a valid user or group name')]);

/** A unit that can run: a template (`foo@.service`) never does, so a member written so would match nothing and be let out. */
const unitName = z
  .string()
  .regex(/^[A-Za-z0-9:_.\\@-]+\.(service|scope)$/, 'a unit is NAME.service or NAME.scope')
  .superRefine((unit, ctx) => {
    const problem = unitNameProblem(unit);
    if (problem) ctx.addIssue({ code: 'custom', message: problem.message, params: { hint: problem.hint } });
  });

const selectorObject = z.strictObject({
  unit: unitName
    .optional()
    .describe(
      'A system service, e.g. "cups.service", or an instance of a template, e.g. "getty@tty1.service": its cgroup under `slice`, default system.slice, an instance\'s system-TEMPLATE.slice within it.',
    ),
  slice: z
    .string()
    .regex(/^[A-Za-z0-9:_.\\-]+\.slice$/, 'a slice is NAME.slice')
    .optional()
    .describe('A slice, e.g. "machine.slice"; with `unit`, the slice the unit runs in.'),
  cgroup: z
    .string()
    .regex(/^\/?[A-Za-z0-9:_.@\\*?-]+(\/[A-Za-z0-9:_.@\\*?-]+)*\/?$/, 'a cgroup path relative to the cgroup2 root; "*" matches within one path segment')
    .optional()
    .describe('A cgroup path glob relative to the cgroup2 root; "*" and "?" match within one segment.'),
  flatpak: z
    .string()
    .regex(/^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*){2,}$/, 'a Flatpak app id has at least three dot-separated parts, e.g. org.mozilla.firefox')
    .optional()
    .describe('A Flatpak application id, e.g. "org.mozilla.firefox".'),
  user: userOrGroup
    .optional()
    .describe('A user name or uid: every socket this user opens. Names are looked up through NSS (passwd: in nsswitch.conf) when the policy is compiled.'),
  group: userOrGroup
    .optional()
    .describe(
      'A group name or gid: sockets whose primary group is this one. Names are looked up through NSS (group: in nsswitch.conf) when the policy is compiled.',
    ),
  optional: z
    .boolean()
    .optional()
    .describe(
      'With user or group: the name may be missing on this machine. Without it, a system domain member whose user or group does not exist is an error, since it would match nothing.',
    ),
});

/** One selector names exactly one way of recognising a process. */
const selector = selectorObject.superRefine((value, ctx) => {
  const keys = Object.keys(value).filter((key) => key !== 'optional' && value[key as keyof typeof value] !== undefined);
  const main = keys.filter((key) => key !== 'slice');
  if (value.slice === '-.slice' && value.unit === undefined) {
    ctx.addIssue({
      code: 'custom',
      message: 'the root slice "-.slice" holds every process',
      params: { hint: 'name a slice below it, a unit, a user or a group' },
    });
  } else if (keys.length === 0) {
    ctx.addIssue({ code: 'custom', message: 'empty selector', params: { hint: 'give one of: unit, slice, cgroup, flatpak, user, group' } });
  } else if (main.length > 1 || (keys.includes('slice') && main.length === 1 && main[0] !== 'unit')) {
    ctx.addIssue({
      code: 'custom',
      message: `a selector has one kind, not ${keys.join(' and ')}`,
      params: { hint: 'write a list of selectors instead; a process matching any of them belongs to the identity' },
    });
  } else if (value.optional !== undefined && value.user === undefined && value.group === undefined) {
    // A unit or cgroup that does not exist yet is matched when it appears; only a name can be missing for good.
    ctx.addIssue({
      code: 'custom',
      message: '"optional" applies to a user or group selector',
      params: { hint: 'a unit, slice, cgroup or Flatpak app that does not exist yet is matched when it appears' },
    });
  }
});

const selectors = z.union([selector, z.array(selector).min(1)]);

/** Where a rule, app or domain refers to an identity: by name, or inline. */
const identityRef = z.union([entityName, selector]);

const listSpec = z.union([
  z.strictObject({
    file: z.string().min(1).describe('Path of the list file, relative to the policy directory.'),
    format: z.enum(['auto', 'plain', 'hosts']).optional().describe('plain: one name per line; hosts: "0.0.0.0 name" lines; auto (default) detects per line.'),
    why: z.string().max(500).optional(),
  }),
  z.strictObject({
    names: z.array(destination).min(1).describe('Names (or *.suffix) given inline.'),
    why: z.string().max(500).optional(),
  }),
]);

export const CATALOGUE_CATEGORIES = ['telemetry', 'crash-reports', 'connectivity-checks', 'news', 'update-checks', 'location'] as const;

const catalogueEntry = z.strictObject({
  software: z.string().min(1).max(200),
  reports: z.string().min(1).max(500),
  category: z.enum(CATALOGUE_CATEGORIES),
  names: z.array(destination).min(1),
  source: z.string().regex(/^https:\/\/\S+$/, 'source is one https URL'),
});

const socksAddress = z.string().superRefine((value, ctx) => {
  const match = /^(?:\[([0-9a-fA-F:.]+)\]|([0-9.]+)):(\d{1,5})$/.exec(value);
  const host = match?.[1] ?? match?.[2];
  const portNumber = Number(match?.[3]);
  const hostOk = host !== undefined && parseNetwork(host).ok;
  if (!match || !hostOk || portNumber < 1 || portNumber > 65535) {
    ctx.addIssue({ code: 'custom', message: `"${clip(value)}" is not an address:port`, params: { hint: 'e.g. 127.0.0.1:9050 or [::1]:9050' } });
  }
});

/** An address without a prefix, as parseNetwork reads it. */
function isAddress(text: string): boolean {
  const parsed = parseNetwork(text);
  return parsed.ok && parsed.value.prefix === (parsed.value.family === 4 ? 32 : 128) && !text.includes('/');
}

const listenAddress = z.string().superRefine((value, ctx) => {
  if (!isAddress(value)) {
    ctx.addIssue({ code: 'custom', message: `"${clip(value)}" is not an IPv4 or IPv6 address`, params: { hint: 'e.g. 127.0.0.153 or ::1; the port is 53' } });
  }
});

/** "ADDR" or "ADDR#PORT", as dnsmasq and systemd-resolved write upstreams; IPv6 needs no brackets. */
const upstreamAddress = z.string().superRefine((value, ctx) => {
  const [host = '', portText, extra] = value.split('#');
  const portNumber = Number(portText);
  const portOk = portText === undefined || (/^\d{1,5}$/.test(portText) && portNumber >= 1 && portNumber <= 65535);
  if (extra !== undefined || !isAddress(host) || !portOk) {
    ctx.addIssue({
      code: 'custom',
      message: `"${clip(value)}" is not an upstream server ADDR or ADDR#PORT`,
      params: { hint: 'e.g. 192.0.2.53, 2001:db8::53 or 192.0.2.53#853; addresses only, no names' },
    });
  }
});

/** What an answer's TTL may be at most (RFC 2181: 2^31 - 1 seconds). */
export const MAX_TTL = 2147483647;

const ttl = z
  .number()
  .int('a TTL bound is whole seconds')
  .min(1, 'a TTL bound is at least 1 second')
  .max(MAX_TTL, `a TTL bound is at most ${MAX_TTL} seconds (RFC 2181)`);

const packetMark = z.number().superRefine((value, ctx) => {
  if (value === 0) {
    ctx.addIssue({
      code: 'custom',
      message: 'mark 0 is the mark of every unmarked packet',
      params: { hint: 'pick a mark no other software on the machine sets; default 0x45444e53' },
    });
  } else if (!Number.isInteger(value) || value < 0 || value > 0xffffffff) {
    ctx.addIssue({
      code: 'custom',
      message: `mark ${value} is not a 32-bit packet mark`,
      params: { hint: 'a mark is 1–0xffffffff; YAML reads 0x45444e53 as a number' },
    });
  }
});

const deniedAnswer = z.enum(['nxdomain', 'null', 'true'], {
  error: (issue) =>
    issue.input === null || issue.input === true
      ? `YAML reads an unquoted ${String(issue.input)} as ${issue.input === null ? 'no value' : 'a boolean'}: write "${String(issue.input)}" in quotes`
      : 'deniedAnswer is "nxdomain", "null" (0.0.0.0 and ::) or "true" (the true answer)',
});

const rate = z.string().regex(/^[1-9]\d{0,5}\/(second|minute|hour)$/, 'a rate is N/second, N/minute or N/hour');

export const policyFileSchema = z
  .strictObject({
    defaults: z
      .strictObject({
        egress: z.enum(['allow', 'deny']).optional().describe('Verdict for traffic no rule decides.'),
        log: z
          .strictObject({
            denials: z.boolean().optional().describe('Log denied packets to NFLOG (default true).'),
            group: z.number().int().min(0).max(65535).optional().describe('NFLOG group (default 7745).'),
            rate: rate.optional().describe('Log at most this often per rule and sending uid (default 10/second).'),
            burst: z.number().int().min(1).max(10000).optional().describe('Packets logged in a burst above the rate (default 20).'),
          })
          .optional(),
      })
      .optional()
      .describe('Loopback is always allowed and cannot be switched off.'),
    lists: z.record(entityName, listSpec).optional().describe('Named destination lists, used as @name.'),
    catalogue: z.record(z.string().regex(/^[a-z][a-z0-9-]{0,47}$/, 'catalogue ids are lower case letters, digits and "-"'), catalogueEntry).optional(),
    identities: z.record(entityName, selectors).optional().describe('Named identities: who is sending.'),
    apps: z
      .record(
        entityName,
        z.strictObject({
          identity: z.union([identityRef, z.array(identityRef).min(1)]),
          default: z
            .enum(['allow', 'deny'])
            .optional()
            .describe('Verdict when none of the rules (nor the global deny list) decides; default: defaults.egress.'),
          rules: z.array(appRule).optional().describe('Checked in order; the first match decides.'),
          why: z.string().max(500).optional(),
        }),
      )
      .optional(),
    deny: z
      .array(z.strictObject({ to: destinations.describe('Destinations denied for everyone (unless an app rule allows them).'), ...matchFields }))
      .optional()
      .describe('The global deny list.'),
    allowed: z
      .array(
        z.strictObject({
          app: entityName.describe('An app from `apps` (in any file): this allow goes before its own rules.'),
          allow: z.array(destination).min(1).describe('Destinations the app may reach: names, *.suffix, IPs, CIDRs.'),
          ...matchFields,
          until: z.iso
            .datetime({ offset: true })
            .optional()
            .describe(
              'When the allow ends (ISO 8601). From then on every apply leaves the entry out of the table, and the running daemon re-applies at that time; loading never reads the clock (apply does), and egressd removes the entry from the file later.',
            ),
        }),
      )
      .optional()
      .describe('Allows added to apps defined elsewhere: what `egressctl allow` and allow-from-alert write into 80-allowed.yaml.'),
    systemDomains: z
      .record(
        entityName,
        z.strictObject({
          members: z.array(identityRef).min(1),
          why: z.string().max(500).optional(),
        }),
      )
      .optional()
      .describe('Groups of processes with no network at all except loopback. Nothing else in the policy can open them up.'),
    tor: z
      .strictObject({
        enabled: z.boolean().optional(),
        socks: socksAddress.optional().describe('Tor SOCKS address (default 127.0.0.1:9050).'),
        user: z
          .union([userOrGroup, z.strictObject({ user: userOrGroup, optional: z.boolean().optional() })])
          .optional()
          .describe(
            "Tor's own user, which may reach the network (default debian-tor); looked up through NSS. While `enabled`, a user that does not exist is an error unless written {user: NAME, optional: true}.",
          ),
        updaters: z.array(identityRef).optional().describe('Identities that may reach only the SOCKS port when enabled.'),
      })
      .optional()
      .describe('Updates over Tor.'),
    dns: z
      .strictObject({
        listen: z.array(listenAddress).min(1).optional().describe("Loopback addresses the resolver listens on, port 53 (default ['127.0.0.153', '::1'])."),
        upstreams: z
          .array(upstreamAddress)
          .min(1)
          .optional()
          .describe("Upstream servers, ADDR or ADDR#PORT (default: the machine's own, from resolv.conf or systemd-resolved)."),
        ttlFloor: ttl.optional().describe("A learned address stays in its rule's set at least this many seconds (default 60)."),
        ttlCap: ttl.optional().describe("… and at most this many (default 86400), whatever the answer's TTL."),
        deniedAnswer: deniedAnswer
          .optional()
          .describe(
            'What a name the global deny list holds is answered: "nxdomain" (default), "null" (0.0.0.0 and ::) or "true" (the true answer, so the kernel\'s deny logs the attempt).',
          ),
        exclusive: z
          .boolean()
          .optional()
          .describe("Only the resolver's own sockets may send udp/tcp 53 and 853 off the host; everyone else's are dropped and logged (default true)."),
        mark: packetMark.optional().describe("The packet mark (SO_MARK) on the resolver's upstream sockets (default 0x45444e53)."),
      })
      .optional()
      .describe("egressd's DNS resolver. Fields set by a later file override earlier ones."),
  })
  .describe('An egressd policy file. A policy directory holds *.yaml files merged in lexical order.');

export type PolicyFile = z.infer<typeof policyFileSchema>;
export type Selector = z.infer<typeof selectorObject>;
export type IdentityRef = z.infer<typeof identityRef>;
export type AppRuleInput = z.infer<typeof appRule>;
export type CatalogueCategory = (typeof CATALOGUE_CATEGORIES)[number];

export function policyJsonSchema(): unknown {
  return z.toJSONSchema(policyFileSchema, { io: 'input', unrepresentable: 'any' });
}
