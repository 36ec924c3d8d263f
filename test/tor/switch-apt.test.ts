import { spawnSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { aptDropInText, existingAptProxies } from '../../src/tor/files.js';
import { policyDir } from '../support/policy-dir.js';

/**
 * The apt drop-in as real apt reads it. apt-get update (apt's own
 * command-line credentials) and python-apt (what unattended-upgrades and
 * other library front-ends use; the shared credentials) run in a network
 * namespace of their own with only loopback, against a SOCKS server that
 * records what it is asked: every fetch, update checks included, goes to
 * the SOCKS port as a name (socks5h), never resolved here, with the user
 * name that gives it its own Tor circuit. And egressd's reading of apt's
 * configuration finds the proxies apt itself finds.
 */
const RECORDER = join(import.meta.dirname, 'switch-socks-recorder.py');
const PYTHON = '/usr/bin/python3';
const root = process.getuid?.() === 0;
const hasApt = spawnSync('apt-get', ['--version']).status === 0 && spawnSync(PYTHON, ['-c', 'import apt_pkg']).status === 0;

/** apt's configuration confined to a staging directory: nothing of the machine's is read or written. */
function aptStage(parts: Record<string, string>): { dir: string; config: string } {
  const dir = policyDir({ 'sources.list': 'deb http://deb.example.test/debian bookworm main\ndeb https://secure.example.test/debian bookworm main\n' });
  for (const sub of ['parts', 'lists/partial', 'cache/archives/partial']) mkdirSync(join(dir, sub), { recursive: true });
  for (const [name, text] of Object.entries(parts)) writeFileSync(join(dir, 'parts', name), text);
  const config = join(dir, 'apt.conf');
  writeFileSync(
    config,
    [
      `Dir::Etc::parts "${dir}/parts";`,
      'Dir::Etc::main "/dev/null";',
      `Dir::Etc::sourcelist "${dir}/sources.list";`,
      'Dir::Etc::sourceparts "/nonexistent";',
      `Dir::State::lists "${dir}/lists";`,
      `Dir::Cache "${dir}/cache";`,
      'Debug::NoLocking "1";',
      'APT::Sandbox::User "root";',
      'Acquire::Retries "0";',
      '',
    ].join('\n'),
  );
  return { dir, config };
}

/** Runs `commands` in a new network namespace (loopback only) beside the recorder; returns what it recorded. */
function throughRecorder(stage: { dir: string; config: string }, commands: string): string[] {
  const script = `
ip link set lo up
${PYTHON} ${RECORDER} > "$1/socks.log" &
for i in $(seq 50); do [ -s "$1/socks.log" ] && break; sleep 0.1; done
PORT=$(head -1 "$1/socks.log")
sed -i "s/127.0.0.1:9050/127.0.0.1:$PORT/g" "$1"/parts/80egressd-tor
export APT_CONFIG="$2"
${commands}
sleep 0.3
kill $! 2>/dev/null
tail -n +2 "$1/socks.log"`;
  const run = spawnSync('unshare', ['-n', 'sh', '-c', script, 'sh', stage.dir, stage.config], { encoding: 'utf8', timeout: 60_000 });
  return run.stdout
    .trim()
    .split('\n')
    .filter((l) => l !== '');
}

describe.skipIf(!root || !hasApt)(`apt reads egressd's drop-in ${!root ? '(skipped: needs root)' : !hasApt ? '(skipped: no apt or python3-apt)' : ''}`, () => {
  it("apt-get update: both sources' update checks go to the SOCKS port by name, with apt's own credentials", () => {
    const stage = aptStage({ '80egressd-tor': aptDropInText({ host: '127.0.0.1', port: 9050, family: 4 }) });
    const seen = throughRecorder(stage, 'timeout 30 apt-get update >/dev/null 2>&1');
    expect(seen.sort()).toEqual(['user=egressd-apt dest=name:deb.example.test port=80', 'user=egressd-apt dest=name:secure.example.test port=443']);
  });

  it('python-apt (unattended-upgrades, other front-ends): the shared credentials, by name too', () => {
    const stage = aptStage({ '80egressd-tor': aptDropInText({ host: '127.0.0.1', port: 9050, family: 4 }) });
    const fetch = `timeout 30 ${PYTHON} -c "
import apt_pkg
apt_pkg.init()
a = apt_pkg.Acquire()
f = apt_pkg.AcquireFile(a, 'https://fwupd.example.test/firmware.xml.gz', destfile='$1/f')
a.run()
" >/dev/null 2>&1`;
    expect(throughRecorder(stage, fetch)).toEqual(['user=egressd-apt-frontends dest=name:fwupd.example.test port=443']);
  });

  it('without the drop-in nothing reaches the recorder (the test can fail)', () => {
    const stage = aptStage({ '80egressd-tor': '// nothing\n' });
    expect(throughRecorder(stage, 'timeout 30 apt-get update >/dev/null 2>&1')).toEqual([]);
  });

  it("egressd finds the proxies apt's own parser finds, nested and scoped forms included", () => {
    const files = {
      '01proxy': '# corporate\nAcquire {\n  http { Proxy "http://proxy.example:3128"; };\n};\n',
      '02perhost': '/* one host direct */\nAcquire::https::Proxy::deb.example.test "DIRECT";\n',
      '03binary': 'Binary::apt-get::Acquire::http::Proxy "socks5h://x@127.0.0.1:1";\n',
      '04other': 'APT::Periodic::Update-Package-Lists "1";\nAcquire::Languages "none"; // no Proxy here\n',
      // apt ignores these names: not a conflict.
      '05old.dpkg-old': 'Acquire::http::Proxy "http://old.example:3128";\n',
      '06x.disabled': 'Acquire::https::Proxy "http://old.example:3128";\n',
      '07proxy.conf': 'Acquire::ftp::Proxy "http://ftp.example:3128";\nAcquire::socks::Proxy "socks5h://s.example:1080";\n',
    };
    const stage = aptStage(files);
    const dumped = spawnSync('apt-config', ['dump'], { encoding: 'utf8', env: { ...process.env, APT_CONFIG: stage.config } }).stdout;
    const aptSees = dumped
      .split('\n')
      .filter((l) => /proxy/i.test(l) && !l.endsWith(' "";'))
      .map((l) => l.split(' ')[0]!.toLowerCase())
      .sort();
    const stagingRoot = policyDir(Object.fromEntries(Object.entries(files).map(([n, t]) => [`etc/apt/apt.conf.d/${n}`, t])));
    const weSee = existingAptProxies(stagingRoot, '/etc/apt/apt.conf.d/80egressd-tor')
      .map((s) => s.key)
      .sort();
    expect(weSee).toEqual(aptSees);
    expect(weSee).toHaveLength(5);
  });
});
