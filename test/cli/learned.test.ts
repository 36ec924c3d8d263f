import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { resolverStatusLine } from '../../src/cli/learned.js';
import { startControlServer, type ControlServer } from '../../src/resolver/control.js';
import { AddressMemory } from '../../src/resolver/memory.js';
import { runEgressctl } from '../support/cli-run.js';
import { policyDir } from '../support/policy-dir.js';

const dirs: string[] = [];
const servers: ControlServer[] = [];
afterEach(async () => {
  for (const server of servers.splice(0)) await server.close();
  for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
});

/** A control server as the running resolver would have it, over a memory the test fills. */
async function resolverWith(memory: AddressMemory): Promise<string> {
  const dir = mkdtempSync(join(tmpdir(), 'egd-learned-'));
  dirs.push(dir);
  const server = await startControlServer({ path: join(dir, 'resolver.sock'), memory });
  servers.push(server);
  return server.path;
}

const POLICY = { '00.yaml': 'defaults: {egress: allow}\ndeny:\n  - to: [tracker.example]\n' };

describe('explain --to ADDRESS asks the running resolver', () => {
  it('names what the address was learned from with expiries, and a shared address whose names are judged differently, naming both', async () => {
    const memory = new AddressMemory();
    memory.rememberAnswer('tracker.example', [
      { name: 'tracker.example', type: 'CNAME', ttl: 300, data: 'edge.cdn.example' },
      { name: 'edge.cdn.example', type: 'A', ttl: 60, data: '198.51.100.20' },
    ]);
    memory.remember(['docs.example'], '198.51.100.20', 3600);
    const socket = await resolverWith(memory);
    const dir = policyDir(POLICY);

    const text = await runEgressctl(['explain', dir, '--app', 'user:alice', '--to', '198.51.100.20:443/tcp'], { resolverSocket: socket });
    expect(text.err).toMatch(
      /^ {2}learned from: docs\.example \(expires in (59|60) min\), edge\.cdn\.example \(expires in (59|60) s\), tracker\.example \(expires in (59|60) s\)$/m,
    );
    expect(text.err).toMatch(/^ {2}shared: 198\.51\.100\.20 answers 2 separate lookups: docs\.example; tracker\.example → edge\.cdn\.example$/m);
    expect(text.err).toMatch(
      /^ {2}note: 198\.51\.100\.20 answers names with different verdicts: tracker\.example → edge\.cdn\.example \(DENIED by deny\/00\.yaml\/0\) and docs\.example \(ALLOWED by default\);/m,
    );

    const json = await runEgressctl(['explain', dir, '--app', 'user:alice', '--to', '198.51.100.20', '--json'], { resolverSocket: socket });
    expect(JSON.parse(json.out)).toMatchObject({
      learnedFrom: {
        running: true,
        differentVerdicts: true,
        names: expect.arrayContaining([
          expect.objectContaining({ name: 'tracker.example', verdict: 'deny', ruleId: 'deny/00.yaml/0' }),
          // Asked alone, the CDN's name is allowed: only its chain makes it denied.
          expect.objectContaining({ name: 'edge.cdn.example', verdict: 'allow', ruleId: 'default' }),
          expect.objectContaining({ name: 'docs.example', verdict: 'allow', ruleId: 'default' }),
        ]),
        chains: [
          { names: ['docs.example'], verdict: 'allow', ruleId: 'default' },
          { names: ['tracker.example', 'edge.cdn.example'], verdict: 'deny', ruleId: 'deny/00.yaml/0' },
        ],
      },
    });
  });

  it('an address no answer holds, and no resolver running: said plainly, the verdict unchanged', async () => {
    const dir = policyDir(POLICY);
    const socket = await resolverWith(new AddressMemory());
    const unknown = await runEgressctl(['explain', dir, '--app', 'user:alice', '--to', '192.0.2.1'], { resolverSocket: socket });
    expect(unknown.code).toBe(0);
    expect(unknown.err).toContain('  learned from: no name (the resolver holds no unexpired answer with 192.0.2.1)');

    const gone = join(dirs[0]!, 'nothing.sock');
    const down = await runEgressctl(['explain', dir, '--app', 'user:alice', '--to', '192.0.2.1'], { resolverSocket: gone });
    expect(down.code).toBe(0);
    expect(down.err).toContain(`  learned from: unknown (resolver not running: no control socket at ${gone})`);
    // A name is not an address: the resolver is not asked.
    const byName = await runEgressctl(['explain', dir, '--app', 'user:alice', '--to', 'tracker.example'], { resolverSocket: gone });
    expect(byName.code).toBe(1);
    expect(byName.err).not.toContain('learned from');
  });

  it("status's resolver line: running with the names it remembers, or not running", async () => {
    const memory = new AddressMemory();
    memory.remember(['a.example', 'b.example'], '192.0.2.1', 60);
    memory.remember(['c.example'], '192.0.2.2', 60);
    expect((await resolverStatusLine(await resolverWith(memory))).line).toBe('resolver: running, 3 names remembered for 2 addresses');
    const gone = join(dirs[0]!, 'nothing.sock');
    expect(await resolverStatusLine(gone)).toEqual({
      line: `resolver: not running: no control socket at ${gone}`,
      json: { running: false, why: `not running: no control socket at ${gone}` },
    });
  });
});

describe('egressctl dns (on an image root)', () => {
  it('status, enable, status --json, disable; usage errors exit 2', async () => {
    const root = policyDir({ 'etc/resolv.conf': 'nameserver 192.0.2.1\n' });
    expect(await runEgressctl(['dns', 'status', '--root', root])).toMatchObject({
      code: 1,
      err: expect.stringMatching(/^not enabled: \/etc\/resolv.conf names 192\.0\.2\.1/),
    });
    const enabled = await runEgressctl(['dns', 'enable', '--root', root, '--listen', '127.0.0.153', '--json']);
    expect(enabled.code).toBe(0);
    expect(JSON.parse(enabled.out)).toMatchObject({ action: 'enable', changed: true, manager: 'resolv.conf' });
    const status = await runEgressctl(['dns', 'status', '--root', root, '--json']);
    expect(status.code).toBe(0);
    expect(JSON.parse(status.out)).toMatchObject({ enabled: true, pointsAtEgressd: true, nameservers: ['127.0.0.153'], listen: ['127.0.0.153'] });
    expect((await runEgressctl(['dns', 'disable', '--root', root])).code).toBe(0);
    expect((await runEgressctl(['dns', 'frob'])).code).toBe(2);
    expect((await runEgressctl(['dns', 'status', '--force'])).err).toMatch(/--force goes with enable or disable/);
    expect((await runEgressctl(['dns', 'enable', '--root', root, '--listen', 'localhost'])).code).toBe(2);
    expect((await runEgressctl(['dns', '--help'])).err).toMatch(/^Usage: egressctl dns enable/);
  });
});
