import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ErrorCode, isEgressError } from '../../src/errors.js';
import { discoverUpstreams } from '../../src/resolver/upstreams.js';
import { enableDns, notRunning } from '../../src/system/resolv-conf.js';
import { policyDir } from '../support/policy-dir.js';

const FIXTURES = join(import.meta.dirname, 'fixtures', 'upstreams');
const fixture = (name: string) => readFileSync(join(FIXTURES, name), 'utf8');
const LISTEN = ['127.0.0.153', '::1'];

function machine(files: Parameters<typeof policyDir>[0]) {
  const root = policyDir(files);
  return { root, stateDir: join(root, 'var/lib/egressd'), listen: LISTEN };
}

function discoveryError(options: Parameters<typeof discoverUpstreams>[0]) {
  try {
    discoverUpstreams(options);
  } catch (error) {
    if (isEgressError(error)) return error;
    throw error;
  }
  throw new Error('discovery found upstreams');
}

describe('discoverUpstreams', () => {
  it('the current resolv.conf: ports kept, duplicates once, link-local servers and garbage skipped with a note', () => {
    const m = machine({ 'etc/resolv.conf': fixture('networkmanager.conf') });
    const found = discoverUpstreams(m);
    // A link-local server would need its socket bound to the link: skipped, not a resolver that cannot start.
    expect(found.upstreams).toEqual(['192.0.2.1', '198.51.100.53#5353', '2001:db8::53#5300']);
    expect(found.source).toBe(join(m.root, 'etc/resolv.conf'));
    expect(found.notes).toEqual([
      expect.stringMatching(/line 7: ignored: "nameserver not-an-address"/),
      expect.stringMatching(/line 8: ignored: "this line is garbage"/),
      expect.stringMatching(/fe80::1%enp3s0 is a link-local server, which egressd's resolver cannot ask: skipped/),
    ]);
  });

  it("systemd-resolved's stub is never an upstream: its real servers are, without egressd's own", () => {
    const m = machine({
      'etc/resolv.conf': { symlink: '../run/systemd/resolve/stub-resolv.conf' },
      'run/systemd/resolve/stub-resolv.conf': fixture('resolved-stub.conf'),
      'run/systemd/resolve/resolv.conf': fixture('resolved-upstreams.conf'),
    });
    const found = discoverUpstreams(m);
    expect(found.upstreams).toEqual(['203.0.113.10', '2001:db8::10']);
    expect(found.source).toBe(join(m.root, 'run/systemd/resolve/resolv.conf'));
    expect(found.notes).toContainEqual(expect.stringMatching(/127\.0\.0\.53 is systemd-resolved's stub/));
    expect(found.notes).toContainEqual(expect.stringMatching(/127\.0\.0\.153 is egressd's own resolver: skipped/));
  });

  it('after enable replaced resolv.conf: the servers enable recorded, not egressd itself', () => {
    const m = machine({ 'etc/resolv.conf': fixture('networkmanager.conf') });
    enableDns(LISTEN, { force: false }, { ...m, resolved: notRunning, now: () => new Date() });
    expect(readFileSync(join(m.root, 'etc/resolv.conf'), 'utf8')).toMatch(/nameserver 127\.0\.0\.153/);
    const found = discoverUpstreams(m);
    expect(found.upstreams).toEqual(['192.0.2.1', '198.51.100.53#5353', '2001:db8::53#5300']);
    expect(found.source).toMatch(/as recorded by "egressctl dns enable"/);
  });

  it('after enable replaced a link: the file it led to, as its owner keeps it now; as recorded once that is gone', () => {
    const m = machine({ 'etc/resolv.conf': { symlink: '../run/NetworkManager/resolv.conf' }, 'run/NetworkManager/resolv.conf': 'nameserver 192.0.2.1\n' });
    enableDns(LISTEN, { force: false }, { ...m, resolved: notRunning, now: () => new Date() });
    // DHCP gave a new server since.
    writeFileSync(join(m.root, 'run/NetworkManager/resolv.conf'), 'nameserver 192.0.2.77\n');
    expect(discoverUpstreams(m)).toMatchObject({ upstreams: ['192.0.2.77'], source: join(m.root, 'run/NetworkManager/resolv.conf') });
    writeFileSync(join(m.root, 'run/NetworkManager/resolv.conf'), '');
    // An empty file there: nothing usable, and the record is not consulted as a fallback for a file that is there.
    expect(discoveryError(m).code).toBe(ErrorCode.NoUpstreams);
  });

  it('after enable with systemd-resolved: its real servers, where the drop-in made egressd one of them', () => {
    const m = machine({
      'etc/resolv.conf': { symlink: '../run/systemd/resolve/stub-resolv.conf' },
      'run/systemd/resolve/stub-resolv.conf': fixture('resolved-stub.conf'),
      'run/systemd/resolve/resolv.conf': fixture('resolved-upstreams.conf'),
    });
    enableDns(LISTEN, { force: false }, { ...m, resolved: notRunning, now: () => new Date() });
    expect(discoverUpstreams(m).upstreams).toEqual(['203.0.113.10', '2001:db8::10']);
  });

  it('none found: a clear error saying where it looked and how to name them', () => {
    for (const files of [
      { 'etc/resolv.conf': fixture('egressd-only.conf') },
      { 'etc/resolv.conf': fixture('no-nameserver.conf') },
      { 'etc/hostname': 'h\n' },
    ]) {
      const m = machine(files);
      const error = discoveryError(m);
      expect(error.code).toBe(ErrorCode.NoUpstreams);
      expect(error.message).toMatch(/no upstream server/);
      expect(error.details).toContainEqual(`looked in: ${join(m.root, 'etc/resolv.conf')}${'etc/resolv.conf' in files ? '' : ' (not there)'}`);
      expect(error.details.at(-1)).toMatch(/dns: \{ upstreams:/);
    }
  });

  it('a stub with resolved gone (no /run/systemd/resolve/resolv.conf): the error names both places', () => {
    const m = machine({ 'etc/resolv.conf': fixture('resolved-stub.conf') });
    const error = discoveryError(m);
    expect(error.details[0]).toBe(`looked in: ${join(m.root, 'etc/resolv.conf')}, ${join(m.root, 'run/systemd/resolve/resolv.conf')} (not there)`);
  });
});
