import { spawn, spawnSync } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { denialStorePath, openDenialStore, type DenialDatabase, type StoredDenial } from '../../src/denials/store.js';
import { ensureTestUsers, type TestUsers } from '../harness/index.js';
import { runEgressctl } from '../support/cli-run.js';
import { denial } from '../denials/store-records.js';

const ROOT = join(import.meta.dirname, '..', '..');
const scratch = mkdtempSync(join(tmpdir(), 'egd-cli-denials-'));
// Other users (the test's auditor and outsider) must pass through to the state directory.
chmodSync(scratch, 0o711);
afterAll(() => rmSync(scratch, { recursive: true, force: true }));
let n = 0;
const NOW = Date.now();
const MIN = 60_000;

const records = [
  denial({ lastSeen: NOW - 3 * 60 * MIN, name: 'telemetry.mozilla.org', address: '192.0.2.7', count: 4 }),
  denial({ lastSeen: NOW - 30 * MIN, name: 'incoming.telemetry.mozilla.org', address: '192.0.2.8', count: 2 }),
  denial({
    lastSeen: NOW - 20 * MIN,
    name: undefined,
    app: undefined,
    domain: 'updates',
    family: 6,
    address: '2001:db8::53',
    port: 53,
    protocol: 'udp',
    uid: 0,
    shortId: 'rdeadbeef',
    ruleId: 'sd/updates',
    kind: 'system-domain',
    file: '30-domains.yaml',
    line: 4,
  }),
  denial({
    lastSeen: NOW - 10 * MIN,
    name: 'popcon.debian.org',
    // Looked up by another user only: the audit view shows it, marked.
    nameAskedBy: 'others',
    address: '198.51.100.3',
    app: 'popcon',
    uid: 1001,
    shortId: 'rc4aca5f8',
    ruleId: 'deny/10-phone-home.yaml/1',
    kind: 'global-deny',
    file: '10-phone-home.yaml',
    line: 27,
  }),
];

function stateWith(group: string | null = null): { stateDir: string; store: DenialDatabase } {
  const stateDir = join(scratch, `state${++n}`);
  const store = openDenialStore(denialStorePath(stateDir), { group });
  store.add(records);
  store.flush();
  return { stateDir, store };
}

describe('egressctl denials', () => {
  let stateDir: string;
  beforeAll(() => {
    const made = stateWith();
    made.store.close();
    stateDir = made.stateDir;
  });
  const run = (...argv: string[]) => runEgressctl(['denials', ...argv], { stateDir });

  it('a table, newest first: time, app, name and address, port, rule with file:line, count', async () => {
    const result = await run();
    expect(result.code).toBe(0);
    const lines = result.err.split('\n');
    expect(lines[0]).toMatch(/^TIME\s+APP\s+NAME\s+ADDRESS\s+PORT\s+RULE\s+COUNT$/);
    expect(lines).toHaveLength(5);
    expect(lines[1]).toMatch(
      /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ\s+popcon\s+popcon\.debian\.org \(another user's lookup\)\s+198\.51\.100\.3\s+443\/tcp\s+deny\/10-phone-home\.yaml\/1 \[rc4aca5f8\] 10-phone-home\.yaml:27\s+1$/,
    );
    expect(lines[2]).toMatch(/updates\s+-\s+2001:db8::53\s+53\/udp\s+sd\/updates \[rdeadbeef\] 30-domains\.yaml:4\s+1$/);
    expect(lines[4]).toMatch(/firefox\s+telemetry\.mozilla\.org\s+192\.0\.2\.7\s+443\/tcp\s+app\/firefox\/2 \[r1a2b3c4d\] 20-apps\.yaml:12\s+4$/);
    expect(result.out).toBe('');
  });

  it('--json and --csv give the records to programs on stdout', async () => {
    const json = JSON.parse((await run('--json')).out) as StoredDenial[];
    expect(json.map(({ id: _, ...r }) => r)).toEqual(JSON.parse(JSON.stringify([...records].reverse())));
    const csv = (await run('--csv', '--app', 'updates')).out.split('\n');
    expect(csv[0]).toBe('id,firstSeen,lastSeen,count,shortId,ruleId,kind,file,line,app,domain,uid,gid,protocol,family,address,port,name,nameAskedBy');
    expect(csv).toHaveLength(2);
    expect(csv[1]).toMatch(/^\d+,\d+,\d+,1,rdeadbeef,sd\/updates,system-domain,30-domains\.yaml,4,,updates,0,1000,udp,6,2001:db8::53,53,,$/);
  });

  it('filters: --since, --until, --app, --dest (name, *.suffix, CIDR), --rule (short id or rule id), --uid', async () => {
    const addresses = async (...argv: string[]) => (JSON.parse((await run('--json', ...argv)).out) as StoredDenial[]).map((r) => r.address);
    expect(await addresses('--since', '1h')).toEqual(['198.51.100.3', '2001:db8::53', '192.0.2.8']);
    expect(await addresses('--until', '15m', '--since', '25m')).toEqual(['2001:db8::53']);
    expect(await addresses('--since', new Date(NOW - 31 * MIN).toISOString())).toHaveLength(3);
    expect(await addresses('--app', 'firefox')).toEqual(['192.0.2.8', '192.0.2.7']);
    expect(await addresses('--dest', '*.mozilla.org')).toEqual(['192.0.2.8', '192.0.2.7']);
    expect(await addresses('--dest', 'telemetry.mozilla.org')).toEqual(['192.0.2.7']);
    expect(await addresses('--dest', '192.0.2.0/24')).toEqual(['192.0.2.8', '192.0.2.7']);
    expect(await addresses('--dest', '2001:db8::/32')).toEqual(['2001:db8::53']);
    expect(await addresses('--rule', 'rc4aca5f8')).toEqual(['198.51.100.3']);
    expect(await addresses('--rule', 'sd/updates')).toEqual(['2001:db8::53']);
    expect(await addresses('--uid', '1001')).toEqual(['198.51.100.3']);
    expect(await addresses('--limit', '1')).toEqual(['198.51.100.3']);
  });

  it('--summary: totals and the top apps, destinations and rules over the period', async () => {
    const text = await run('--summary');
    expect(text.code).toBe(0);
    expect(text.err).toContain('4 records, 8 packets denied');
    expect(text.err).toMatch(/top apps \(packets\):\n\s+6\s+firefox\n\s+1\s+popcon\n\s+1\s+updates/);
    expect(text.err).toMatch(/top rules \(packets\):\n\s+6\s+r1a2b3c4d app\/firefox\/2 20-apps\.yaml:12/);
    const json = JSON.parse((await run('--summary', '--json', '--since', '1h')).out) as {
      records: number;
      packets: number;
      destinations: { key: string; count: number }[];
    };
    expect(json.records).toBe(3);
    expect(json.packets).toBe(4);
    expect(json.destinations).toContainEqual({ key: 'incoming.telemetry.mozilla.org', count: 2 });
  });

  it('bad input: a clear error naming the flag, exit 2', async () => {
    for (const [argv, flag] of [
      [['--dest', '300.1.2.3'], '--dest'],
      [['--dest', '192.0.2.1/24'], '--dest'],
      [['--dest', '@tracking'], '--dest'],
      [['--since', 'yesterday'], '--since'],
      [['--until', '2026-13-45'], '--until'],
      [['--uid', 'root'], '--uid'],
      [['--limit', '0'], '--limit'],
      [['--since', '1h', '--until', '2h'], '--since'],
      [['--json', '--csv'], '--json'],
      [['--colour'], '--colour'],
    ] as const) {
      const result = await run(...argv);
      expect([argv, result.code], result.err).toEqual([argv, 2]);
      expect(result.err, argv.join(' ')).toContain(flag);
      expect(result.err).toMatch(/^egressctl denials: /);
    }
  });

  it('no store yet: says so and exits 0', async () => {
    const result = await runEgressctl(['denials', '--json'], { stateDir: join(scratch, 'never') });
    expect(result.code).toBe(0);
    expect(result.out).toBe('[]');
    expect(result.err).toContain('no denials recorded here');
  });

  it('--help names every field a record holds, where it is kept, for how long, and who can read it', async () => {
    const help = (await run('--help')).err;
    for (const field of ['id', ...Object.keys(records[0]!)]) expect(help, field).toMatch(new RegExp(`\\b${field}\\b`));
    expect(help).toContain('/var/lib/egressd/denials/denials.sqlite');
    expect(help).toContain('90 days');
    expect(help).toContain('256 MiB');
    expect(help).toContain('egressd-audit');
    expect(help).toContain('EGRESSD_');
  });
});

describe.skipIf(process.getuid?.() !== 0)('egressctl denials: who may read', () => {
  let users: TestUsers;
  beforeAll(() => {
    users = ensureTestUsers();
  });
  const as = (user: { uid: number; gid: number }, stateDir: string, ...argv: string[]) =>
    spawnSync(
      'setpriv',
      ['--reuid', String(user.uid), '--regid', String(user.gid), '--clear-groups', process.execPath, '--import', 'tsx', 'src/cli/main.ts', 'denials', ...argv],
      {
        cwd: ROOT,
        encoding: 'utf8',
        env: { ...process.env, EGRESSD_STATE_DIR: stateDir },
      },
    );

  for (const daemon of ['running', 'stopped'] as const) {
    it(`root and the audit group read it, others get a clear error (egressd ${daemon})`, () => {
      const { stateDir, store } = stateWith(users.grp.name);
      if (daemon === 'stopped') store.close();
      try {
        // egd-app3's primary group is the test's audit group.
        const auditor = as({ uid: users.app3.uid, gid: users.grp.gid }, stateDir, '--json');
        expect(auditor.status, auditor.stderr).toBe(0);
        expect(JSON.parse(auditor.stdout)).toHaveLength(records.length);
        const outsider = as(users.app1, stateDir, '--summary');
        expect(outsider.status).toBe(3);
        expect(outsider.stdout).toBe('');
        expect(outsider.stderr).toContain(`egressctl denials: cannot read ${denialStorePath(stateDir)}: permission denied`);
        expect(outsider.stderr).toContain('readable by root and members of group egressd-audit only');
      } finally {
        store.close();
      }
    });
  }

  it('--follow prints new records as egressd writes them', async () => {
    const { stateDir, store } = stateWith(users.grp.name);
    const child = spawn(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'denials', '--follow', '--json', '--app', 'curl'], {
      cwd: ROOT,
      env: { ...process.env, EGRESSD_STATE_DIR: stateDir },
    });
    let out = '';
    child.stdout.on('data', (chunk: Buffer) => (out += chunk.toString()));
    try {
      await waitFor(() => out.startsWith('[]\n'));
      store.add([denial({ app: 'curl', name: 'one.example', lastSeen: Date.now() }), denial({ app: 'other', lastSeen: Date.now() })]);
      store.flush();
      await waitFor(() => out.includes('one.example'));
      store.add([denial({ app: 'curl', name: 'two.example', lastSeen: Date.now() })]);
      store.flush();
      await waitFor(() => out.includes('two.example'));
      const lines = out.trim().split('\n');
      expect(lines.slice(1).map((l) => (JSON.parse(l) as StoredDenial).name)).toEqual(['one.example', 'two.example']);
    } finally {
      child.kill();
      store.close();
    }
  });
});

async function waitFor(check: () => boolean, timeoutMs = 15_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > until) throw new Error('timed out');
    await new Promise((r) => setTimeout(r, 50));
  }
}
