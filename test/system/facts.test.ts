import { chownSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { gatherFacts, listCgroups } from '../../src/system/facts.js';

describe('listCgroups', () => {
  const root = mkdtempSync(join(tmpdir(), 'egd-cgfs-'));
  afterAll(() => rmSync(root, { recursive: true, force: true }));

  it('reads names as bytes: those nft cannot name come apart, with their nearest nameable ancestor; no deeper than asked', () => {
    writeFileSync(join(root, 'cgroup.controllers'), '');
    mkdirSync(join(root, 'u/ok.scope/deep/deeper'), { recursive: true });
    mkdirSync(Buffer.concat([Buffer.from(join(root, 'u/app')), Buffer.from([0xff, 0x0a]), Buffer.from('"é/child')]), { recursive: true });
    const found = listCgroups(root, 3);
    expect(found.named).toEqual(['u', 'u/ok.scope', 'u/ok.scope/deep']);
    expect(found.unnamed).toEqual([
      { path: 'u/app\ufffd\n"é', shown: '"u/app\\xff\\x0a\\"é"', namedAncestor: 'u' },
      { path: 'u/app\ufffd\n"é/child', shown: '"u/app\\xff\\x0a\\"é/child"', namedAncestor: 'u' },
    ]);
    expect(listCgroups(root, 1)).toEqual({ named: ['u'], unnamed: [], owners: new Map() });
  });

  it("records who owns each named cgroup, when not root: systemd delegates a subtree by chowning it, and what the user makes there is the user's", () => {
    const delegated = join(root, 'user.slice/user-2001.slice/user@2001.service');
    mkdirSync(join(delegated, 'app.slice/app-firefox-1.scope'), { recursive: true });
    for (const path of [delegated, join(delegated, 'app.slice'), join(delegated, 'app.slice/app-firefox-1.scope')]) chownSync(path, 2001, 2001);
    const found = listCgroups(root, 5);
    expect(found.named).toContain('user.slice/user-2001.slice');
    expect(found.owners).toEqual(
      new Map([
        ['user.slice/user-2001.slice/user@2001.service', 2001],
        ['user.slice/user-2001.slice/user@2001.service/app.slice', 2001],
        ['user.slice/user-2001.slice/user@2001.service/app.slice/app-firefox-1.scope', 2001],
      ]),
    );
  });
});

describe('gatherFacts: net.ipv4.tcp_syncookies', () => {
  const dir = mkdtempSync(join(tmpdir(), 'egd-syncookies-'));
  const cgroupRoot = join(dir, 'cgroup');
  mkdirSync(cgroupRoot);
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('is read only when the table would drop SYN-ACKs sent from no socket; a file that cannot be read leaves it out', () => {
    const file = join(dir, 'tcp_syncookies');
    writeFileSync(file, '2\n');
    const needed = { users: [], groups: [], cgroupDepth: 0 };
    expect(gatherFacts({ ...needed, tcpSyncookies: true }, { cgroupRoot, syncookiesFile: file }).tcpSyncookies).toBe(2);
    expect(gatherFacts(needed, { cgroupRoot, syncookiesFile: file })).not.toHaveProperty('tcpSyncookies');
    expect(gatherFacts({ ...needed, tcpSyncookies: true }, { cgroupRoot, syncookiesFile: join(dir, 'absent') })).not.toHaveProperty('tcpSyncookies');
    // This process's own network namespace: the file is there on any kernel with IPv4.
    expect([0, 1, 2]).toContain(gatherFacts({ ...needed, tcpSyncookies: true }, { cgroupRoot }).tcpSyncookies);
  });
});
