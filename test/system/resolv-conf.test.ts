import { chmodSync, chownSync, existsSync, lstatSync, readFileSync, readlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ErrorCode, isEgressError } from '../../src/errors.js';
import {
  disableDns,
  dnsStatus,
  DNS_RECORD_FILE,
  enableDns,
  parseResolvConf,
  readDnsRecord,
  type DnsSwitchDeps,
  type ResolvedControl,
} from '../../src/system/resolv-conf.js';
import { policyDir } from '../support/policy-dir.js';

const LISTEN = ['127.0.0.153', '::1'];

/** A stand-in for systemd-resolved that records its reloads. */
function fakeResolved(running: boolean): ResolvedControl & { reloads: number } {
  const fake = {
    reloads: 0,
    running: () => running,
    reload: () => {
      fake.reloads++;
      return undefined;
    },
  };
  return fake;
}

function machine(files: Parameters<typeof policyDir>[0], resolved = fakeResolved(false)) {
  const root = policyDir(files);
  const deps: DnsSwitchDeps & { resolved: ReturnType<typeof fakeResolved> } = {
    root,
    stateDir: join(root, 'var/lib/egressd'),
    resolved,
    now: () => new Date('2026-12-04T12:00:00Z'),
  };
  return { root, deps, at: (path: string) => join(root, path) };
}

/** Everything disable must bring back: the kind, bytes or link target, mode and owner. */
function look(path: string) {
  if (!existsSync(path) && !isLink(path)) return { kind: 'absent' };
  const stat = lstatSync(path);
  if (stat.isSymbolicLink()) return { kind: 'symlink', target: readlinkSync(path), uid: stat.uid, gid: stat.gid };
  return { kind: 'file', bytes: readFileSync(path).toString('hex'), mode: stat.mode & 0o7777, uid: stat.uid, gid: stat.gid };
}
const isLink = (path: string) => {
  try {
    return lstatSync(path).isSymbolicLink();
  } catch {
    return false;
  }
};

const ORIGINAL = '# from dhcp\r\nsearch lan example.test\nnameserver 192.0.2.1\nnameserver fe80::1%eth0\noptions edns0 trust-ad\nno newline at the end';

describe('dns enable / disable on resolv.conf', () => {
  it('a regular file: replaced by one naming the resolver (search and options kept), then restored byte for byte with its mode and owner', () => {
    const m = machine({ 'etc/resolv.conf': ORIGINAL });
    chmodSync(m.at('etc/resolv.conf'), 0o755);
    chownSync(m.at('etc/resolv.conf'), 1234, 5678);
    const before = look(m.at('etc/resolv.conf'));

    const enabled = enableDns(LISTEN, { force: false }, m.deps);
    expect(enabled).toMatchObject({ changed: true, manager: 'resolv.conf', touched: [m.at('etc/resolv.conf')] });
    const written = readFileSync(m.at('etc/resolv.conf'), 'utf8');
    expect(parseResolvConf(written).nameservers.map((n) => n.text)).toEqual(LISTEN);
    expect(written).toContain('search lan example.test\n');
    expect(written).toContain('options edns0 trust-ad\n');
    expect(look(m.at('etc/resolv.conf'))).toMatchObject({ kind: 'file', mode: 0o755, uid: 1234, gid: 5678 });
    // What was there is recorded, the bytes included.
    expect(readDnsRecord(m.deps.stateDir)?.resolvConf.before).toMatchObject({ kind: 'file', content: Buffer.from(ORIGINAL).toString('base64') });

    const disabled = disableDns({ force: false }, m.deps);
    expect(disabled).toMatchObject({ changed: true, touched: [m.at('etc/resolv.conf')] });
    expect(look(m.at('etc/resolv.conf'))).toEqual(before);
    expect(existsSync(join(m.deps.stateDir, DNS_RECORD_FILE))).toBe(false);
  });

  it('idempotent: enable twice is enable once; disable without enable changes nothing and says so', () => {
    const m = machine({ 'etc/resolv.conf': ORIGINAL });
    const first = disableDns({ force: false }, m.deps);
    expect(first.changed).toBe(false);
    expect(first.said.join('\n')).toMatch(/not enabled/);
    expect(readFileSync(m.at('etc/resolv.conf'), 'utf8')).toBe(ORIGINAL);

    enableDns(LISTEN, { force: false }, m.deps);
    const once = look(m.at('etc/resolv.conf'));
    const record = readFileSync(join(m.deps.stateDir, DNS_RECORD_FILE), 'utf8');
    const again = enableDns(LISTEN, { force: false }, m.deps);
    expect(again.changed).toBe(false);
    expect(again.said.join('\n')).toMatch(/already enabled/);
    expect(look(m.at('etc/resolv.conf'))).toEqual(once);
    expect(readFileSync(join(m.deps.stateDir, DNS_RECORD_FILE), 'utf8')).toBe(record);

    disableDns({ force: false }, m.deps);
    expect(readFileSync(m.at('etc/resolv.conf'), 'utf8')).toBe(ORIGINAL);
    expect(disableDns({ force: false }, m.deps).changed).toBe(false);
    expect(readFileSync(m.at('etc/resolv.conf'), 'utf8')).toBe(ORIGINAL);
  });

  it('a symlink to a file someone else keeps (NetworkManager): replaced by a file, restored as the same link; its target untouched', () => {
    const nm = 'nameserver 198.51.100.7\n';
    const m = machine({ 'etc/resolv.conf': { symlink: '../run/NetworkManager/resolv.conf' }, 'run/NetworkManager/resolv.conf': nm });
    const before = look(m.at('etc/resolv.conf'));
    expect(enableDns(LISTEN, { force: false }, m.deps).manager).toBe('resolv.conf');
    expect(look(m.at('etc/resolv.conf'))).toMatchObject({ kind: 'file', mode: 0o644 });
    expect(readFileSync(m.at('run/NetworkManager/resolv.conf'), 'utf8')).toBe(nm);
    disableDns({ force: false }, m.deps);
    expect(look(m.at('etc/resolv.conf'))).toEqual(before);
    expect(readFileSync(m.at('run/NetworkManager/resolv.conf'), 'utf8')).toBe(nm);
  });

  it('no resolv.conf at all: enable writes one, disable removes it', () => {
    const m = machine({ 'etc/hostname': 'h\n' });
    enableDns(LISTEN, { force: false }, m.deps);
    expect(parseResolvConf(readFileSync(m.at('etc/resolv.conf'), 'utf8')).nameservers.map((n) => n.text)).toEqual(LISTEN);
    disableDns({ force: false }, m.deps);
    expect(look(m.at('etc/resolv.conf'))).toEqual({ kind: 'absent' });
  });

  it('someone else rewrote it after enable: status says so, disable leaves their change and says why; --force restores the original', () => {
    const m = machine({ 'etc/resolv.conf': ORIGINAL });
    enableDns(LISTEN, { force: false }, m.deps);
    expect(dnsStatus(m.deps)).toMatchObject({ enabled: true, pointsAtEgressd: true, changedElsewhere: [] });
    const theirs = 'nameserver 203.0.113.53\n';
    writeFileSync(m.at('etc/resolv.conf'), theirs);

    const status = dnsStatus(m.deps);
    expect(status).toMatchObject({ enabled: true, pointsAtEgressd: false, nameservers: ['203.0.113.53'] });
    expect(status.changedElsewhere).toEqual([expect.stringContaining('now a file naming 203.0.113.53')]);

    let thrown: unknown;
    try {
      disableDns({ force: false }, m.deps);
    } catch (error) {
      thrown = error;
    }
    expect(isEgressError(thrown) && thrown.code).toBe(ErrorCode.DnsConfigChanged);
    expect(readFileSync(m.at('etc/resolv.conf'), 'utf8')).toBe(theirs);
    // Nor does enable write over them without --force.
    expect(() => enableDns(LISTEN, { force: false }, m.deps)).toThrow(/someone else changed/);
    expect(readFileSync(m.at('etc/resolv.conf'), 'utf8')).toBe(theirs);

    expect(disableDns({ force: true }, m.deps).changed).toBe(true);
    expect(readFileSync(m.at('etc/resolv.conf'), 'utf8')).toBe(ORIGINAL);
    expect(dnsStatus(m.deps).enabled).toBe(false);
  });

  it('enable --force over a change points it at egressd again and keeps the record of the first original', () => {
    const m = machine({ 'etc/resolv.conf': ORIGINAL });
    enableDns(LISTEN, { force: false }, m.deps);
    writeFileSync(m.at('etc/resolv.conf'), 'nameserver 203.0.113.53\n');
    enableDns(LISTEN, { force: true }, m.deps);
    expect(dnsStatus(m.deps)).toMatchObject({ pointsAtEgressd: true, changedElsewhere: [] });
    disableDns({ force: false }, m.deps);
    expect(readFileSync(m.at('etc/resolv.conf'), 'utf8')).toBe(ORIGINAL);
  });

  it('new listen addresses rewrite what enable wrote; disable still restores the original', () => {
    const m = machine({ 'etc/resolv.conf': ORIGINAL });
    enableDns(LISTEN, { force: false }, m.deps);
    expect(enableDns(['127.0.0.154'], { force: false }, m.deps).changed).toBe(true);
    expect(parseResolvConf(readFileSync(m.at('etc/resolv.conf'), 'utf8')).nameservers.map((n) => n.text)).toEqual(['127.0.0.154']);
    disableDns({ force: false }, m.deps);
    expect(readFileSync(m.at('etc/resolv.conf'), 'utf8')).toBe(ORIGINAL);
  });

  it('the record is written before anything changes: a crash between the two leaves a record disable clears without a change', () => {
    const m = machine({ 'etc/resolv.conf': ORIGINAL });
    enableDns(LISTEN, { force: false }, m.deps);
    // As if enable had died right after its record: the file is still the original.
    writeFileSync(m.at('etc/resolv.conf'), ORIGINAL);
    expect(dnsStatus(m.deps)).toMatchObject({ enabled: true, pointsAtEgressd: false, changedElsewhere: [] });
    const disabled = disableDns({ force: false }, m.deps);
    expect(disabled.changed).toBe(false);
    expect(readFileSync(m.at('etc/resolv.conf'), 'utf8')).toBe(ORIGINAL);
    expect(existsSync(join(m.deps.stateDir, DNS_RECORD_FILE))).toBe(false);
  });

  it('refuses addresses that are not addresses, before changing anything', () => {
    const m = machine({ 'etc/resolv.conf': ORIGINAL });
    expect(() => enableDns(['localhost'], { force: false }, m.deps)).toThrow(/not an IP address/);
    expect(() => enableDns([], { force: false }, m.deps)).toThrow(/no address/);
    expect(readFileSync(m.at('etc/resolv.conf'), 'utf8')).toBe(ORIGINAL);
    expect(existsSync(m.deps.stateDir)).toBe(false);
  });
});

describe('dns enable / disable with systemd-resolved', () => {
  const STUB = 'nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n';

  it('resolv.conf a link into /run/systemd/resolve: a drop-in (DNS= and Domains=~.), resolved reloaded; disable removes the drop-in and the directory it made', () => {
    const resolved = fakeResolved(true);
    const m = machine(
      {
        'etc/resolv.conf': { symlink: '../run/systemd/resolve/stub-resolv.conf' },
        'run/systemd/resolve/stub-resolv.conf': STUB,
        'etc/systemd/resolved.conf': '[Resolve]\n',
      },
      resolved,
    );
    const link = look(m.at('etc/resolv.conf'));
    const enabled = enableDns(LISTEN, { force: false }, m.deps);
    expect(enabled).toMatchObject({ changed: true, manager: 'systemd-resolved', touched: [m.at('etc/systemd/resolved.conf.d/egressd.conf')] });
    expect(readFileSync(m.at('etc/systemd/resolved.conf.d/egressd.conf'), 'utf8')).toMatch(/^\[Resolve\]\nDNS=127\.0\.0\.153 ::1\nDomains=~\.\n$/m);
    expect(lstatSync(m.at('etc/systemd/resolved.conf.d')).mode & 0o777).toBe(0o755);
    expect(look(m.at('etc/resolv.conf'))).toEqual(link);
    expect(resolved.reloads).toBe(1);
    expect(enabled.said.join('\n')).toMatch(/re-read its configuration/);

    expect(enableDns(LISTEN, { force: false }, m.deps).changed).toBe(false);
    expect(resolved.reloads).toBe(1);

    disableDns({ force: false }, m.deps);
    expect(existsSync(m.at('etc/systemd/resolved.conf.d'))).toBe(false);
    expect(look(m.at('etc/resolv.conf'))).toEqual(link);
    expect(readFileSync(m.at('etc/systemd/resolved.conf'), 'utf8')).toBe('[Resolve]\n');
    expect(resolved.reloads).toBe(2);
  });

  it('resolved not running: the drop-in is written and enable says clearly that it waits for resolved; a drop-in directory that was there stays', () => {
    const m = machine({
      'etc/resolv.conf': { symlink: '/run/systemd/resolve/stub-resolv.conf' },
      'etc/systemd/resolved.conf.d/other.conf': '[Resolve]\nLLMNR=no\n',
    });
    const enabled = enableDns(LISTEN, { force: false }, m.deps);
    expect(enabled.said.join('\n')).toMatch(/systemd-resolved is not running: the drop-in takes effect when it starts/);
    expect(m.deps.resolved.reloads).toBe(0);
    disableDns({ force: false }, m.deps);
    expect(existsSync(m.at('etc/systemd/resolved.conf.d/egressd.conf'))).toBe(false);
    expect(readFileSync(m.at('etc/systemd/resolved.conf.d/other.conf'), 'utf8')).toBe('[Resolve]\nLLMNR=no\n');
  });

  it('a drop-in of the same name that was there comes back as it was', () => {
    const old = '[Resolve]\nDNS=192.0.2.99\n';
    const m = machine({ 'etc/resolv.conf': { symlink: '../run/systemd/resolve/stub-resolv.conf' }, 'etc/systemd/resolved.conf.d/egressd.conf': old });
    chmodSync(m.at('etc/systemd/resolved.conf.d/egressd.conf'), 0o600);
    const before = look(m.at('etc/systemd/resolved.conf.d/egressd.conf'));
    enableDns(LISTEN, { force: false }, m.deps);
    disableDns({ force: false }, m.deps);
    expect(look(m.at('etc/systemd/resolved.conf.d/egressd.conf'))).toEqual(before);
  });

  it("resolved running with a copy of its stub file is in charge; running beside a resolv.conf of someone else's, it is not", () => {
    const stubCopy = machine({ 'etc/resolv.conf': STUB }, fakeResolved(true));
    expect(enableDns(LISTEN, { force: false }, stubCopy.deps).manager).toBe('systemd-resolved');
    expect(readFileSync(stubCopy.at('etc/resolv.conf'), 'utf8')).toBe(STUB);

    const theirs = machine({ 'etc/resolv.conf': 'nameserver 192.0.2.1\n' }, fakeResolved(true));
    const enabled = enableDns(LISTEN, { force: false }, theirs.deps);
    expect(enabled.manager).toBe('resolv.conf');
    expect(enabled.said[0]).toMatch(/systemd-resolved runs, but \/etc\/resolv.conf does not send lookups to it/);
    expect(existsSync(theirs.at('etc/systemd/resolved.conf.d'))).toBe(false);
  });

  it("a link to resolved's upstream list (not its stub): programs ask those servers directly, so resolv.conf is what enable replaces", () => {
    const m = machine(
      { 'etc/resolv.conf': { symlink: '../run/systemd/resolve/resolv.conf' }, 'run/systemd/resolve/resolv.conf': 'nameserver 192.0.2.1\n' },
      fakeResolved(true),
    );
    const link = look(m.at('etc/resolv.conf'));
    const enabled = enableDns(LISTEN, { force: false }, m.deps);
    expect(enabled.manager).toBe('resolv.conf');
    expect(parseResolvConf(readFileSync(m.at('etc/resolv.conf'), 'utf8')).nameservers.map((n) => n.text)).toEqual(LISTEN);
    expect(existsSync(m.at('etc/systemd/resolved.conf.d'))).toBe(false);
    disableDns({ force: false }, m.deps);
    expect(look(m.at('etc/resolv.conf'))).toEqual(link);
  });

  it('someone edited the drop-in after enable: disable leaves it without --force', () => {
    const m = machine({ 'etc/resolv.conf': { symlink: '../run/systemd/resolve/stub-resolv.conf' } });
    enableDns(LISTEN, { force: false }, m.deps);
    writeFileSync(m.at('etc/systemd/resolved.conf.d/egressd.conf'), '[Resolve]\nDNS=192.0.2.5\n');
    expect(dnsStatus(m.deps)).toMatchObject({ pointsAtEgressd: false, changedElsewhere: [expect.stringContaining('egressd.conf is now a file')] });
    expect(() => disableDns({ force: false }, m.deps)).toThrow(/someone else changed/);
    expect(existsSync(m.at('etc/systemd/resolved.conf.d/egressd.conf'))).toBe(true);
    disableDns({ force: true }, m.deps);
    expect(existsSync(m.at('etc/systemd/resolved.conf.d'))).toBe(false);
  });
});

describe('parseResolvConf', () => {
  it('reads nameservers with scope ids and ports, keeps search/options, notes garbage', () => {
    const parsed = parseResolvConf(
      'nameserver 192.0.2.1\nnameserver fe80::1%eth0\nnameserver 192.0.2.2#5353\nnameserver [2001:db8::2]:5300\nnameserver 198.51.100.1:54\nnameserver example.org\nnameserver\nfrobnicate yes\n; comment\n# comment\nsearch a b\n',
    );
    expect(parsed.nameservers.map((n) => n.text)).toEqual(['192.0.2.1', 'fe80::1%eth0', '192.0.2.2#5353', '2001:db8::2#5300', '198.51.100.1#54']);
    expect(parsed.keep).toEqual(['search a b']);
    expect(parsed.notes).toEqual([
      expect.stringMatching(/^line 6: ignored: "nameserver example.org"/),
      expect.stringMatching(/^line 7: ignored/),
      expect.stringMatching(/^line 8: ignored: "frobnicate yes" \(not a resolv.conf keyword\)/),
    ]);
  });
});
