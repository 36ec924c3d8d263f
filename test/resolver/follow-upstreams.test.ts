import { mkdirSync, mkdtempSync, renameSync, rmSync, symlinkSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { followUpstreams, rediscover, type Rediscovery } from '../../src/resolver/follow-upstreams.js';
import { discoverUpstreams, type Discovered } from '../../src/resolver/upstreams.js';
import type { FileWatch } from '../../src/system/watch-files.js';

const LISTEN = ['127.0.0.153', '::1'];

/** A machine of its own under a temp root, its resolv.conf replaced the way tools do it: a new file renamed over the old. */
function machine() {
  const root = mkdtempSync(join(tmpdir(), 'egd-follow-'));
  mkdirSync(join(root, 'etc'));
  const stateDir = join(root, 'var/lib/egressd');
  mkdirSync(stateDir, { recursive: true });
  const replace = (path: string, text: string) => {
    mkdirSync(join(root, path, '..'), { recursive: true });
    writeFileSync(join(root, `${path}.new`), text);
    renameSync(join(root, `${path}.new`), join(root, path));
  };
  return { root, stateDir, replace, discover: () => discoverUpstreams({ root, stateDir, listen: LISTEN }) };
}

describe('rediscover (the decision)', () => {
  const m = machine();
  afterAll(() => rmSync(m.root, { recursive: true, force: true }));

  it('same servers in the same order: same; another server, or another order: changed; none found: none, the servers in use kept', () => {
    m.replace('etc/resolv.conf', 'nameserver 192.0.2.1\nnameserver 192.0.2.2\n');
    expect(rediscover(['192.0.2.1', '192.0.2.2'], m.discover).kind).toBe('same');
    const changed = rediscover(['192.0.2.1'], m.discover);
    expect(changed).toMatchObject({ kind: 'changed', found: { upstreams: ['192.0.2.1', '192.0.2.2'] } });
    expect(rediscover(['192.0.2.2', '192.0.2.1'], m.discover).kind).toBe('changed');
    m.replace('etc/resolv.conf', '# nothing yet\n');
    const none = rediscover(['192.0.2.1'], m.discover);
    expect(none.kind).toBe('none');
    expect((none as Extract<Rediscovery, { kind: 'none' }>).error).toMatchObject({ code: 'EGD_NO_UPSTREAMS' });
  });

  it("the files a discovery read: resolv.conf, the links it went through, systemd-resolved's file behind the stub, and enable's record", () => {
    m.replace('run/systemd/resolve/stub-resolv.conf', 'nameserver 127.0.0.53\n');
    m.replace('run/systemd/resolve/resolv.conf', 'nameserver 203.0.113.10\n');
    unlinkSync(join(m.root, 'etc/resolv.conf'));
    symlinkSync('../run/systemd/resolve/stub-resolv.conf', join(m.root, 'etc/resolv.conf'));
    const found = m.discover();
    expect(found.upstreams).toEqual(['203.0.113.10']);
    expect([...found.watched].sort()).toEqual(
      [
        join(m.stateDir, 'dns-enable.json'),
        join(m.root, 'etc/resolv.conf'),
        join(m.root, 'run/systemd/resolve/stub-resolv.conf'),
        join(m.root, 'run/systemd/resolve/resolv.conf'),
      ].sort(),
    );
  });
});

describe('followUpstreams', () => {
  const m = machine();
  let follow: FileWatch | undefined;
  afterEach(() => follow?.close());
  afterAll(() => rmSync(m.root, { recursive: true, force: true }));

  it('restarts with the new servers when the file is replaced, not when it is rewritten the same, and follows the discovery to the files it reads next', async () => {
    m.replace('etc/resolv.conf', 'nameserver 192.0.2.1\n');
    let found: Discovered = m.discover();
    let upstreams = found.upstreams;
    const restarts: (readonly string[])[] = [];
    const decisions: string[] = [];
    let wake: (() => void) | undefined;
    // Each decision is looked at as it is made; the test's timeout bounds the wait.
    const until = (done: () => boolean) => new Promise<void>((resolve) => (done() ? resolve() : (wake = () => done() && resolve())));
    const decided = (n: number) => until(() => decisions.length >= n);
    // What the runtime's rediscover() does, with the restart recorded instead of sockets.
    follow = followUpstreams({
      watched: () => found.watched,
      rediscover: async () => {
        const again = rediscover(upstreams, m.discover);
        if (again.kind !== 'none') found = again.found;
        if (again.kind === 'changed') {
          restarts.push(again.found.upstreams);
          upstreams = again.found.upstreams;
        }
        decisions.push(again.kind);
        wake?.();
      },
      watch: { debounceMs: 50 },
    });

    m.replace('etc/resolv.conf', 'nameserver 192.0.2.7\n');
    await decided(1);
    expect(restarts).toEqual([['192.0.2.7']]);

    m.replace('etc/resolv.conf', '# rewritten, same servers\nnameserver 192.0.2.7\n');
    await decided(2);
    expect(decisions[1]).toBe('same');
    expect(restarts).toHaveLength(1);

    // resolv.conf becomes systemd-resolved's stub: the servers are now read from /run, which is watched from then on.
    m.replace('run/systemd/resolve/stub-resolv.conf', 'nameserver 127.0.0.53\n');
    m.replace('run/systemd/resolve/resolv.conf', 'nameserver 203.0.113.10\n');
    symlinkSync('../run/systemd/resolve/stub-resolv.conf', join(m.root, 'etc/resolv.conf.new'));
    renameSync(join(m.root, 'etc/resolv.conf.new'), join(m.root, 'etc/resolv.conf'));
    await until(() => restarts.length === 2);
    expect(restarts[1]).toEqual(['203.0.113.10']);
    m.replace('run/systemd/resolve/resolv.conf', 'nameserver 203.0.113.11\nnameserver 2001:db8::11\n');
    await until(() => restarts.length === 3);
    expect(restarts[2]).toEqual(['203.0.113.11', '2001:db8::11']);
    expect(decisions.filter((d) => d === 'changed')).toHaveLength(3);
  });
});
