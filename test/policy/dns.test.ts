import { describe, expect, it } from 'vitest';
import { formatIssue } from '../../src/policy/issues.js';
import { loadPolicyDir, loadPolicyOrThrow } from '../../src/policy/load.js';
import { DNS_DEFAULTS } from '../../src/policy/model.js';
import { policyDir } from '../support/policy-dir.js';

/** Loads and returns the formatted errors (file:line:col: message (hint)), failing if the load succeeded. */
function errorsOf(files: Parameters<typeof policyDir>[0]): string[] {
  const result = loadPolicyDir(policyDir(files));
  if (result.ok) throw new Error('expected the policy to be rejected');
  return result.errors.map((issue) => formatIssue(issue));
}

describe('policy: the dns section', () => {
  it('has its defaults when no file sets it', () => {
    const { policy } = loadPolicyOrThrow(policyDir({ 'a.yaml': 'defaults: {egress: allow}\n' }));
    expect(policy.dns).toEqual({
      listen: ['127.0.0.153', '::1'],
      upstreams: undefined,
      ttlFloor: 60,
      ttlCap: 86400,
      deniedAnswer: 'nxdomain',
      exclusive: true,
      mark: 0x45444e53,
    });
    expect(policy.dns).toEqual(DNS_DEFAULTS);
  });

  it('merges field by field across files, later files overriding; addresses in their canonical form', () => {
    const { policy, warnings } = loadPolicyOrThrow(
      policyDir({
        '10-a.yaml': 'dns:\n  listen: [127.0.0.153, "0:0:0:0:0:0:0:1"]\n  mark: 0x2a\n  ttlFloor: 30\n  deniedAnswer: "true"\n',
        '20-b.yaml': 'dns:\n  upstreams: [192.0.2.53, "2001:DB8::53#853", "127.0.0.1#5353"]\n  exclusive: false\n  mark: 0x45444e54\n  ttlCap: 600\n',
      }),
    );
    expect(warnings).toEqual([]);
    expect(policy.dns).toEqual({
      listen: ['127.0.0.153', '::1'],
      upstreams: ['192.0.2.53', '2001:db8::53#853', '127.0.0.1#5353'],
      ttlFloor: 30,
      ttlCap: 600,
      deniedAnswer: 'true',
      exclusive: false,
      mark: 0x45444e54,
    });
  });

  it('bad addresses, ports and upstreams are errors at their file:line', () => {
    expect(
      errorsOf({
        'a.yaml': 'dns:\n  listen: [127.0.0.1/8, localhost]\n  upstreams: [dns.example, "192.0.2.53#0", "192.0.2.53#53#53", "[2001:db8::53]:53"]\n',
      }),
    ).toEqual([
      'a.yaml:2:12: "127.0.0.1/8" is not an IPv4 or IPv6 address (at dns.listen[0]) (e.g. 127.0.0.153 or ::1; the port is 53)',
      'a.yaml:2:25: "localhost" is not an IPv4 or IPv6 address (at dns.listen[1]) (e.g. 127.0.0.153 or ::1; the port is 53)',
      'a.yaml:3:15: "dns.example" is not an upstream server ADDR or ADDR#PORT (at dns.upstreams[0]) (e.g. 192.0.2.53, 2001:db8::53 or 192.0.2.53#853; addresses only, no names)',
      'a.yaml:3:28: "192.0.2.53#0" is not an upstream server ADDR or ADDR#PORT (at dns.upstreams[1]) (e.g. 192.0.2.53, 2001:db8::53 or 192.0.2.53#853; addresses only, no names)',
      'a.yaml:3:44: "192.0.2.53#53#53" is not an upstream server ADDR or ADDR#PORT (at dns.upstreams[2]) (e.g. 192.0.2.53, 2001:db8::53 or 192.0.2.53#853; addresses only, no names)',
      'a.yaml:3:64: "[2001:db8::53]:53" is not an upstream server ADDR or ADDR#PORT (at dns.upstreams[3]) (e.g. 192.0.2.53, 2001:db8::53 or 192.0.2.53#853; addresses only, no names)',
    ]);
  });

  it('the resolver listens on loopback only, and never asks itself', () => {
    expect(errorsOf({ 'a.yaml': 'dns:\n  listen: [::1, 192.0.2.1]\n  upstreams: ["::1#53", "::1#5353"]\n' })).toEqual([
      'a.yaml:2:17: the resolver listens on loopback only, not on "192.0.2.1" (an address in 127.0.0.0/8, or ::1)',
      'a.yaml:3:15: upstream ::1#53 is where the resolver itself listens: it would ask itself (name the server it should ask)',
    ]);
  });

  it("warns that an upstream on another port than 53 or 853 meets the rules like any of egressd's packets", () => {
    const { warnings } = loadPolicyOrThrow(policyDir({ 'a.yaml': 'dns:\n  upstreams: [192.0.2.53, "192.0.2.54#5300"]\n' }));
    expect(warnings.map((w) => formatIssue(w))).toEqual([
      "a.yaml:2:27: warning: upstream 192.0.2.54#5300: only the resolver's packets to port 53 and 853 pass whatever the policy says; to port 5300 they meet the rules like any other packet of egressd's",
    ]);
  });

  it('a TTL floor above the cap is an error where the later of the two was written, across files', () => {
    expect(errorsOf({ '10-a.yaml': 'dns: {ttlCap: 100}\n', '20-b.yaml': 'dns:\n  ttlFloor: 200\n' })).toEqual([
      '20-b.yaml:2:13: dns.ttlFloor 200 is above dns.ttlCap 100 (the floor is the least time a learned address stays, the cap the most)',
    ]);
    expect(errorsOf({ '10-a.yaml': 'dns: {ttlFloor: 200}\n', '20-b.yaml': 'dns:\n  ttlCap: 100\n' })[0]).toMatch(
      /^20-b\.yaml:2:11: dns\.ttlFloor 200 is above/,
    );
    // The default cap counts too.
    expect(errorsOf({ 'a.yaml': 'dns:\n  ttlFloor: 90000\n' })[0]).toMatch(/^a\.yaml:2:13: dns\.ttlFloor 90000 is above dns\.ttlCap 86400/);
    expect(errorsOf({ 'a.yaml': 'dns:\n  ttlFloor: 0\n  ttlCap: 1.5\n' })).toEqual([
      'a.yaml:2:13: a TTL bound is at least 1 second (at dns.ttlFloor)',
      'a.yaml:3:11: a TTL bound is whole seconds (at dns.ttlCap)',
    ]);
  });

  it('mark 0 and marks beyond 32 bits are errors', () => {
    expect(errorsOf({ 'a.yaml': 'dns:\n  mark: 0\n' })).toEqual([
      'a.yaml:2:9: mark 0 is the mark of every unmarked packet (at dns.mark) (pick a mark no other software on the machine sets; default 0x45444e53)',
    ]);
    expect(errorsOf({ 'a.yaml': 'dns:\n  mark: 0x100000000\n' })).toEqual([
      'a.yaml:2:9: mark 4294967296 is not a 32-bit packet mark (at dns.mark) (a mark is 1–0xffffffff; YAML reads 0x45444e53 as a number)',
    ]);
    expect(errorsOf({ 'a.yaml': 'dns:\n  mark: -1\n' })[0]).toMatch(/^a\.yaml:2:9: mark -1 is not a 32-bit packet mark/);
    expect(loadPolicyOrThrow(policyDir({ 'a.yaml': 'dns: {mark: 0xffffffff}\n' })).policy.dns.mark).toBe(0xffffffff);
  });

  it('deniedAnswer written as an unquoted YAML null or true says to quote it', () => {
    expect(errorsOf({ 'a.yaml': 'dns:\n  deniedAnswer: null\n' })).toEqual([
      'a.yaml:2:17: YAML reads an unquoted null as no value: write "null" in quotes (at dns.deniedAnswer)',
    ]);
    expect(errorsOf({ 'a.yaml': 'dns:\n  deniedAnswer: true\n' })).toEqual([
      'a.yaml:2:17: YAML reads an unquoted true as a boolean: write "true" in quotes (at dns.deniedAnswer)',
    ]);
    expect(errorsOf({ 'a.yaml': 'dns:\n  deniedAnswer: refused\n' })[0]).toMatch(/^a\.yaml:2:17: deniedAnswer is "nxdomain", "null"/);
    expect(loadPolicyOrThrow(policyDir({ 'a.yaml': 'dns: {deniedAnswer: "null"}\n' })).policy.dns.deniedAnswer).toBe('null');
  });

  it('an unknown key in the section is an error at the key', () => {
    expect(errorsOf({ 'a.yaml': 'dns:\n  exclusiv: false\n' })[0]).toMatch(/^a\.yaml:2:3: unknown key "exclusiv" \(at dns\)/);
  });
});

describe('policy: sharedAddresses', () => {
  it('deny rules with names carry it, deny by default; rules without names and allow rules carry none', () => {
    const { policy } = loadPolicyOrThrow(
      policyDir({
        'a.yaml': `
lists:
  doh: {names: [dns.example]}
deny:
  - to: ["@doh"]
    sharedAddresses: spare
  - to: ["*.example.org", 192.0.2.0/24]
  - to: [198.51.100.0/24]
apps:
  web:
    identity: {user: 1000}
    rules:
      - deny: [cdn.example.net]
        sharedAddresses: spare
      - allow: [example.net]
`,
      }),
    );
    expect(policy.globalDeny.map((r) => r.sharedAddresses)).toEqual(['spare', 'deny', undefined]);
    expect(policy.apps[0]!.rules.map((r) => r.sharedAddresses)).toEqual(['spare', undefined]);
  });

  it('is an error on an allow rule and on a deny rule without names, at its file:line', () => {
    expect(
      errorsOf({
        'a.yaml': `deny:
  - to: [198.51.100.0/24]
    sharedAddresses: spare
apps:
  web:
    identity: {user: 1000}
    rules:
      - allow: [example.net]
        sharedAddresses: deny
      - deny: any
        sharedAddresses: spare
`,
      }),
    ).toEqual([
      'a.yaml:9:26: sharedAddresses applies to deny rules only (an allow rule takes every address its names answer)',
      'a.yaml:11:26: sharedAddresses applies to deny rules with names only (the addresses a rule writes are denied as written; only addresses learned from names can be shared with another name)',
      'a.yaml:3:22: sharedAddresses applies to deny rules with names only (the addresses a rule writes are denied as written; only addresses learned from names can be shared with another name)',
    ]);
    expect(errorsOf({ 'a.yaml': 'deny:\n  - to: [x.example]\n    sharedAddresses: sometimes\n' })[0]).toMatch(/^a\.yaml:3:22: /);
  });
});
