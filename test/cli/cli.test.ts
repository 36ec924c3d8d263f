import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { main } from '../../src/cli/egressctl.js';
import { Exit, exitCodeFor } from '../../src/cli/deps.js';
import { EgressError, ErrorCode } from '../../src/errors.js';
import { FACTS } from '../support/compile-text.js';
import { runEgressctl } from '../support/cli-run.js';
import { policyDir } from '../support/policy-dir.js';

const ROOT = join(import.meta.dirname, '..', '..');
const SHIPPED = join(ROOT, 'policies');

const run = (...argv: string[]) => runEgressctl(argv);

describe('egressctl', () => {
  it('check: the shipped policies are valid', async () => {
    const result = await run('check', SHIPPED);
    expect(result.code).toBe(0);
    expect(result.err).toMatch(/valid — \d+ files, 0 apps, 0 system domains, 3 global deny rules over 14\d,\d{3}|valid — .* over 145\d{3} listed names/);
  });

  it('check --json: errors as data with locations, exit 2', async () => {
    const dir = policyDir({ 'a.yaml': 'deny:\n  - to: [192.0.2.1/24]\n' });
    const result = await run('check', dir, '--json');
    expect(result.code).toBe(2);
    const report = JSON.parse(result.out) as { ok: boolean; errors: { file: string; line: number; col: number; hint: string }[] };
    expect(report.ok).toBe(false);
    expect(report.errors).toEqual([expect.objectContaining({ file: 'a.yaml', line: 2, col: 10, hint: 'did you mean 192.0.2.0/24?' })]);
  });

  it('compile prints nft text by default and JSON with --json; both deterministic', async () => {
    const text = await run('compile', SHIPPED);
    expect(text.code).toBe(0);
    expect(text.out).toMatch(/^table inet egressd \{/);
    expect((await run('compile', SHIPPED)).out).toBe(text.out);
    const json = await run('compile', SHIPPED, '--json');
    expect(JSON.parse(json.out)).toHaveProperty('nftables');
    expect((await run('compile', SHIPPED, '--nft', '--json')).code).toBe(2);
  });

  it('compile of a bad policy prints every error and exits 2', async () => {
    const dir = policyDir({ '1.yaml': 'defaults: {egress: maybe}\n', '2.yaml': 'apps: {x: {identity: {}}}\n' });
    const result = await run('compile', dir);
    expect(result.code).toBe(2);
    expect(result.out).toBe('');
    expect(result.err).toContain(`${dir}/1.yaml:1:20: `);
    expect(result.err).toContain(`${dir}/2.yaml:1:22: empty selector`);
    expect(result.err).toContain('2 errors; nothing was changed');
  });

  it('explain: exit 1 for denied, 0 for allowed, with the deciding file:line', async () => {
    const denied = await run('explain', SHIPPED, '--app', 'user:alice', '--to', 'popcon.debian.org:443/tcp');
    expect(denied.code).toBe(1);
    expect(denied.err).toMatch(/^DENIED by deny\/10-phone-home\.yaml\/1 \[r[0-9a-f]{8}\] \(global-deny\) at .*policies\/10-phone-home\.yaml:\d+/);
    expect(denied.err).toContain('catalogue: debian-popularity-contest');
    // The short id explain names is the one the compiled table logs and counts the rule by.
    const shortId = /\[(r[0-9a-f]{8})\]/.exec(denied.err)![1]!;
    const compiled = (await run('compile', SHIPPED)).out;
    expect(compiled).toContain(`log prefix "egd ${shortId} "`);
    expect(compiled).toMatch(new RegExp(`comment "${shortId} 10-phone-home\\.yaml:\\d+ deny/10-phone-home\\.yaml/1 #`));
    const allowed = await run('explain', SHIPPED, '--app', 'uid:1000', '--to', '[2001:db8::1]:443', '--json');
    expect(allowed.code).toBe(0);
    expect(JSON.parse(allowed.out)).toMatchObject({ verdict: 'allow', level: 'default', ruleId: 'default', shortId: expect.stringMatching(/^r[0-9a-f]{8}$/) });
    expect((await run('explain', SHIPPED, '--app', 'user:alice', '--to', 'example.org', '--lockdown')).code).toBe(1);
  });

  it("explain: DNS off the host is the resolver's alone, and --mark resolver asks as the resolver", async () => {
    const denied = await run('explain', SHIPPED, '--app', 'user:alice', '--to', '9.9.9.9:53/udp');
    expect(denied.code).toBe(1);
    expect(denied.err).toMatch(/^DENIED by dns\/exclusive \[r[0-9a-f]{8}\] \(dns\) at \(built in\)/);
    const shortId = /\[(r[0-9a-f]{8})\]/.exec(denied.err)![1]!;
    expect((await run('compile', SHIPPED)).out).toContain(`log prefix "egd ${shortId} "`);
    const resolver = await run('explain', SHIPPED, '--app', 'user:root', '--to', '9.9.9.9:853/tcp', '--mark', 'resolver', '--json');
    expect(resolver.code).toBe(0);
    expect(JSON.parse(resolver.out)).toMatchObject({ verdict: 'allow', level: 'dns', ruleId: 'dns/resolver' });
    expect((await run('explain', SHIPPED, '--app', 'user:root', '--to', '9.9.9.9:853/tcp', '--mark', '0x45444e53')).code).toBe(0);
    expect((await run('explain', SHIPPED, '--app', 'user:root', '--to', '9.9.9.9:853/tcp', '--mark', '7')).code).toBe(1);
  });

  it.each([
    [['explain', SHIPPED, '--to', 'x.org'], /--app WHO is required/],
    [['explain', SHIPPED, '--app', 'pid:1', '--to', 'x.org'], /unknown kind "pid"/],
    [['explain', SHIPPED, '--app', 'uid:x', '--to', 'x.org'], /uid: needs a number/],
    [['explain', SHIPPED, '--app', 'uid:1', '--to', 'x.org:99999'], /port "99999" is not 1–65535/],
    [['explain', SHIPPED, '--app', 'uid:1', '--to', 'x.org/sctp'], /unknown protocol "sctp"/],
    [['explain', SHIPPED, '--app', 'uid:1', '--to', '192.0.2.1:1/icmp'], /icmp has no ports/],
    [['explain', SHIPPED, '--app', 'uid:1', '--to', '192.0.2.1:53', '--mark', '0x100000000'], /--mark "0x100000000" is not a 32-bit mark or "resolver"/],
    [['explain', SHIPPED, '--app', 'uid:1', '--as', 'gid:2', '--to', 'x.org'], /--as: only with --app unit:NAME or cgroup:PATH/],
    [
      ['explain', SHIPPED, '--app', 'unit:vault-agent@.service', '--to', 'x.org'],
      /unit: "vault-agent@\.service" is a template, which never runs: only its instances do \(name an instance, e\.g\. vault-agent@NAME\.service, or match every instance by cgroup: cgroup: 'system\.slice\/system-vault\\x2dagent\.slice\/vault-agent@\*\.service'/,
    ],
    [
      ['explain', SHIPPED, '--app', 'cgroup:a/b', '--as', 'uid:1', '--as', 'user:x', '--to', 'x.org'],
      /--as: user:x: give one user:, uid:, group: or gid: of each/,
    ],
    [['compile', '--frobnicate'], /Unknown option '--frobnicate'/],
    [['check', 'a', 'b'], /unexpected argument "b"/],
    [['frobnicate'], /unknown command "frobnicate"/],
  ])('bad flags %j: a clear message and exit 2', async (argv, message) => {
    const result = await run(...argv);
    expect(result.code).toBe(2);
    expect(result.err).toMatch(message);
  });

  it('--help on every command, for people', async () => {
    for (const command of ['check', 'compile', 'explain', 'schema']) {
      const result = await run(command, '--help');
      expect(result.code).toBe(0);
      expect(result.err).toMatch(new RegExp(`^Usage: egressctl ${command}`));
      expect(result.err).toContain('Exit status');
    }
    expect((await run('--help')).err).toContain('Commands:');
  });

  it('each command the usage lists is loaded under its own name', async () => {
    // Commands are loaded when they run (egressctl.ts): a name mapped to another command's module shows here.
    const listed = [...(await run('--help')).err.matchAll(/^ {2}([a-z]+) {2,}/gm)].map((m) => m[1]!);
    expect(listed).toEqual([
      'check',
      'compile',
      'explain',
      'apply',
      'plan',
      'status',
      'lockdown',
      'release',
      'schema',
      'dns',
      'tor',
      'try',
      'denials',
      'allow',
      'notify',
    ]);
    for (const command of listed) {
      const result = await run(command, '--help');
      expect(result.code).toBe(0);
      expect(result.err).toMatch(new RegExp(`^Usage: egressctl ${command}[ \n]`));
    }
  });

  it('schema prints a JSON Schema that describes the policy file', async () => {
    const result = await run('schema');
    const schema = JSON.parse(result.out) as { $schema: string; properties: Record<string, unknown>; additionalProperties: boolean };
    expect(schema.$schema).toContain('json-schema.org');
    expect(Object.keys(schema.properties)).toEqual(['defaults', 'lists', 'catalogue', 'identities', 'apps', 'deny', 'allowed', 'systemDomains', 'tor', 'dns']);
    expect(schema.additionalProperties).toBe(false);
  });

  it('maps every error code to its documented exit status; another writer at the same time is a system error', async () => {
    const codes = Object.values(ErrorCode).map((code) => [code, exitCodeFor(new EgressError(code, 'x'))]);
    expect(Object.fromEntries(codes)).toEqual({
      EGD_POLICY_INVALID: Exit.BadInput,
      EGD_USAGE: Exit.BadInput,
      EGD_IO: Exit.SystemError,
      EGD_NFT_APPLY: Exit.SystemError,
      EGD_NFT_UNAVAILABLE: Exit.SystemError,
      EGD_NFT_STATE: Exit.SystemError,
      EGD_BUSY: Exit.SystemError,
      EGD_CONCURRENT_CHANGE: Exit.SystemError,
      EGD_NAME_LOOKUP: Exit.SystemError,
      EGD_NETLINK: Exit.SystemError,
      EGD_SOCKETS_NOT_CUT: Exit.SystemError,
      EGD_SOCKET_NOT_FOUND: Exit.SystemError,
      EGD_DNS_CONFIG_CHANGED: Exit.Answer,
      EGD_NO_UPSTREAMS: Exit.SystemError,
      EGD_RESOLVER_START: Exit.SystemError,
      EGD_TOR_CONFLICT: Exit.Answer,
      EGD_TOR_MISSING: Exit.SystemError,
      EGD_DENIAL_STORE: Exit.SystemError,
      EGD_DENIAL_FILTER: Exit.BadInput,
      EGD_NOT_PERMITTED: Exit.SystemError,
      EGD_ACCESS_DENIED: Exit.Answer,
      EGD_INVALID_ARGUMENT: Exit.BadInput,
      EGD_NOT_FOUND: Exit.BadInput,
      EGD_NOT_ALLOWABLE: Exit.Answer,
      EGD_DAEMON_UNAVAILABLE: Exit.SystemError,
      EGD_STOPPING: Exit.SystemError,
    });
    const err: string[] = [];
    const raced = new EgressError(ErrorCode.ConcurrentChange, 'another writer changed table inet egressd at the same time; this run changed nothing in force');
    const code = await main(['release'], {
      out: () => undefined,
      err: (t) => err.push(t),
      facts: () => FACTS,
      nft: () => Promise.reject(raced),
      stateDir: '/nonexistent',
      audit: () => undefined,
    });
    expect(code).toBe(3);
    expect(err.join('\n')).toContain('another writer changed table inet egressd at the same time');
  });

  it('the installed entry point runs as a program and exits with the documented codes', () => {
    const cli = (args: string[]) => spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'src/cli/main.ts'), ...args], { encoding: 'utf8', cwd: ROOT });
    const ok = cli(['check', SHIPPED]);
    expect(ok.status).toBe(0);
    expect(ok.stderr).toContain('valid');
    const missing = cli(['check', '/nonexistent/egressd']);
    expect(missing.status).toBe(3);
    expect(missing.stderr).toContain('cannot read policy directory /nonexistent/egressd');
  });
});
