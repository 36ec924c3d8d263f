import { spawnSync } from 'node:child_process';
import { chmodSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';

/**
 * The real CLI on the real paths (/etc/resolv.conf, /etc/systemd/resolved.conf.d),
 * in a private mount namespace: /etc is an overlay there whose changes land in
 * a temporary directory, so the machine's own /etc is never written. A
 * stand-in `systemctl` first on PATH plays a running systemd-resolved and
 * records what it is asked, so no test reloads the host's resolver.
 */

const ROOT = join(import.meta.dirname, '..', '..');
const CLI = `${process.execPath} --import tsx ${join(ROOT, 'src/cli/main.ts')}`;
const skip =
  process.getuid?.() !== 0
    ? 'needs root'
    : spawnSync('unshare', ['-m', '--propagation', 'private', 'true']).status !== 0
      ? 'no private mount namespace (unshare -m)'
      : '';
const work = mkdtempSync(join(tmpdir(), 'egd-dns-ns-'));
const hostResolvConf = readFileSync('/etc/resolv.conf');
afterAll(() => {
  rmSync(work, { recursive: true, force: true });
  // The namespace's /etc was an overlay: the machine's own is as it was.
  expect(readFileSync('/etc/resolv.conf')).toEqual(hostResolvConf);
});

const FINGERPRINT = `fp() { if [ -L "$1" ]; then echo "link $(readlink "$1") $(stat -c '%u:%g' "$1")"; elif [ -e "$1" ]; then echo "file $(stat -c '%a %u:%g' "$1") $(base64 -w0 < "$1")"; else echo absent; fi; }`;

/** Runs `setup` then enable, disable in the namespace; returns each step's fingerprint of resolv.conf and the drop-in. */
function roundTrip(name: string, setup: string, extra = '') {
  const dir = join(work, name);
  const script = `set -eu
${FINGERPRINT}
D=${dir}
mkdir -p $D/ovl $D/state $D/bin
mount -t tmpfs tmpfs $D/ovl
mkdir $D/ovl/upper $D/ovl/work
mount -t overlay overlay -o lowerdir=/etc,upperdir=$D/ovl/upper,workdir=$D/ovl/work /etc
cat > $D/bin/systemctl <<'EOF'
#!/bin/sh
echo "$*" >> ${dir}/systemctl.log
exit 0
EOF
chmod +x $D/bin/systemctl
export PATH=$D/bin:$PATH EGRESSD_STATE_DIR=$D/state
${setup}
snap() { { fp /etc/resolv.conf; fp /etc/systemd/resolved.conf.d/egressd.conf; [ -d /etc/systemd/resolved.conf.d ] && echo dir || echo nodir; } > $D/$1; }
snap before
${CLI} dns enable ${extra} 2> $D/enable.err
snap enabled
${CLI} dns enable ${extra} 2> $D/enable2.err
snap enabled2
${CLI} dns disable 2> $D/disable.err
snap after
${CLI} dns disable 2> $D/disable2.err
`;
  spawnSync('mkdir', ['-p', dir]);
  const run = spawnSync('unshare', ['-m', '--propagation', 'private', 'bash', '-c', script], { encoding: 'utf8', timeout: 60_000 });
  const read = (file: string) => readFileSync(join(dir, file), 'utf8');
  if (run.status !== 0) throw new Error(`namespace script failed (${run.status}): ${run.stderr}`);
  return {
    before: read('before'),
    enabled: read('enabled'),
    enabled2: read('enabled2'),
    after: read('after'),
    said: { enable: read('enable.err'), enable2: read('enable2.err'), disable: read('disable.err'), disable2: read('disable2.err') },
    systemctl: (() => {
      try {
        return read('systemctl.log');
      } catch {
        return '';
      }
    })(),
  };
}

const decoded = (fingerprintLine: string) => Buffer.from(fingerprintLine.split(' ').at(-1)!, 'base64').toString('utf8');

describe.skipIf(skip)(`dns enable/disable round trip on the real paths (private mount namespace) ${skip ? `(skipped: ${skip})` : ''}`, () => {
  it('a regular file (mode 0600, not root-owned, no final newline) comes back byte for byte', () => {
    const r = roundTrip(
      'file',
      `printf 'search example.test\\nnameserver 192.0.2.1\\noptions ndots:2' > /etc/resolv.conf; chmod 0600 /etc/resolv.conf; chown 1234:5678 /etc/resolv.conf`,
    );
    expect(r.before).toMatch(/^file 600 1234:5678 /);
    expect(decoded(r.enabled.split('\n')[0]!)).toMatch(/nameserver 127\.0\.0\.153\nnameserver ::1\nsearch example\.test\noptions ndots:2\n/);
    expect(r.enabled).toMatch(/^file 600 1234:5678 /);
    expect(r.enabled2).toBe(r.enabled);
    expect(r.said.enable2).toMatch(/already enabled/);
    expect(r.after).toBe(r.before);
    expect(r.said.disable2).toMatch(/not enabled/);
    expect(r.systemctl).not.toMatch(/reload/);
  });

  it('a symlink comes back as the same symlink, its target untouched', () => {
    const target = join(work, 'nm-resolv.conf');
    writeFileSync(target, 'nameserver 198.51.100.7\n');
    chmodSync(target, 0o644);
    const r = roundTrip('link', `rm -f /etc/resolv.conf; ln -s ${target} /etc/resolv.conf`);
    expect(r.before).toMatch(new RegExp(`^link ${target} 0:0\\n`));
    expect(r.enabled).toMatch(/^file 644 0:0 /);
    expect(r.after).toBe(r.before);
    expect(readFileSync(target, 'utf8')).toBe('nameserver 198.51.100.7\n');
  });

  it("a file bound over /etc/resolv.conf (a container's) cannot be renamed over: written in place, and still restored byte for byte", () => {
    const bound = join(work, 'bound-resolv.conf');
    writeFileSync(bound, 'nameserver 10.0.0.2\r\nsearch svc.cluster.local\n');
    chmodSync(bound, 0o640);
    const original = readFileSync(bound);
    const r = roundTrip('bound', `mount --bind ${bound} /etc/resolv.conf`);
    expect(r.said.enable).toMatch(/is a mount point .*written in place, not atomically/);
    expect(r.enabled).toMatch(/^file 640 0:0 /);
    expect(r.after).toBe(r.before);
    expect(readFileSync(bound)).toEqual(original);
  });

  it('a link into /run/systemd/resolve: a resolved drop-in, reloaded through systemctl, removed again with its directory', () => {
    const r = roundTrip(
      'resolved',
      `mount -t tmpfs tmpfs /run
mkdir -p /run/systemd/resolve && printf 'nameserver 127.0.0.53\\n' > /run/systemd/resolve/stub-resolv.conf
rm -f /etc/resolv.conf; ln -s ../run/systemd/resolve/stub-resolv.conf /etc/resolv.conf; rm -rf /etc/systemd/resolved.conf.d`,
    );
    expect(r.before).toMatch(/^link \.\.\/run\/systemd\/resolve\/stub-resolv\.conf 0:0\nabsent\nnodir\n$/);
    const [link, dropIn, dir] = r.enabled.split('\n');
    expect(link).toBe(r.before.split('\n')[0]);
    expect(decoded(dropIn!)).toMatch(/\[Resolve\]\nDNS=127\.0\.0\.153 ::1\nDomains=~\.\n/);
    expect(dir).toBe('dir');
    expect(r.after).toBe(r.before);
    // Reloaded on enable and on disable, not on the enable that changed nothing.
    expect(r.systemctl.match(/try-reload-or-restart systemd-resolved\.service/g)).toHaveLength(2);
  });
});
