import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { DaemonStatus } from '../../src/daemon/part.js';
import { startFirewallService, type FirewallService } from '../../src/dbus/service.js';
import { nssAccounts, type Accounts } from '../../src/system/nss.js';
import { ensureTestUsers, type TestUsers } from '../harness/index.js';
import { until } from '../support/wait.js';
import {
  dbusUnavailable,
  denial,
  ensureAuditUser,
  quietLog,
  runClient,
  startBuses,
  startClient,
  TestFeed,
  type Agent,
  type AuditUsers,
  type Buses,
} from './support.js';

const skip = dbusUnavailable();

/**
 * What one local user can make the service hold: polkit checks (each a
 * pkcheck process that may wait for a person), NSS lookups, subscriptions
 * (through its subordinate uids too, and by leaving the bus at once).
 */
describe.skipIf(skip)(`the D-Bus service's limits on a real system-like bus ${skip ? `(skipped: ${skip})` : ''}`, () => {
  let buses: Buses;
  let users: TestUsers;
  let audit: AuditUsers;
  let service: FirewallService;
  const feed = new TestFeed();
  /** The service's clock runs this far ahead: a role looked up is looked up again once it is moved past the cache. */
  let clockAhead = 0;
  /** Set: NSS no longer lists the auditor in the audit group, as after `gpasswd -d`. */
  let auditorRemoved = false;
  let dir: string;
  const polkitWaiting: ((yes: boolean) => void)[] = [];
  let polkitAsked = 0;
  const lookups: (string | number)[] = [];
  const status: DaemonStatus = { state: 'enforcing', digest: 'abc', lockdown: false, parts: [] };

  beforeAll(async () => {
    users = ensureTestUsers();
    audit = ensureAuditUser();
    buses = await startBuses();
    dir = mkdtempSync(join(tmpdir(), 'egd-dbus-limits-'));
    // The bus lets only uids NSS knows connect (dbus-daemon looks up their groups), so two test users stand for egd-app3's subordinate uids.
    writeFileSync(join(dir, 'subuid'), `egd-app3:${users.app1.uid}:1\negd-app3:${users.app2.uid}:1\n`);
    const nss = nssAccounts();
    const accounts: Accounts = {
      ...nss,
      user: (key) => {
        lookups.push(key);
        return nss.user(key);
      },
      group: (key) => nss.group(key),
      everyUser: () => nss.everyUser(),
      groupsOf: (name, gid) => {
        const groups = nss.groupsOf(name, gid);
        return auditorRemoved && name === audit.auditor.name && !('error' in groups) ? groups.filter((g) => g !== audit.gid) : groups;
      },
    };
    service = await startFirewallService({
      busAddress: buses.system,
      status: () => status,
      reload: () => Promise.resolve({ applied: true, digest: 'abc' }),
      policyDir: dir,
      log: quietLog(),
      accounts,
      auditGroup: audit.group,
      feed,
      now: () => Date.now() + clockAhead,
      // A polkit that waits for a person who never answers, until the test says.
      polkit: () => {
        polkitAsked += 1;
        return new Promise((resolve) => polkitWaiting.push(resolve));
      },
      maxPolkitChecks: 3,
      maxPolkitChecksPerUid: 2,
      maxSubscriptions: 18,
      reservedSubscriptions: 4,
      subuidFile: join(dir, 'subuid'),
    });
  }, 30_000);
  afterAll(async () => {
    for (const resolve of polkitWaiting.splice(0)) resolve(false);
    await service?.close();
    buses?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it('polkit checks are bounded per uid and in all: past the bound a call is refused at once with LimitsExceeded; the role is looked up once per uid', async () => {
    const lookupsBefore = lookups.length;
    const first = runClient(users.app1, buses.system, [['reload-many', 4]]);
    await until('two checks of app1 waiting', () => polkitAsked === 2);
    const second = runClient(audit.auditor, buses.system, [['reload-many', 2]]);
    await until('a third check waiting (the auditor)', () => polkitAsked === 3);
    // The ones past the bound were refused without a check; answer those that wait.
    await new Promise((r) => setTimeout(r, 500));
    expect(polkitAsked).toBe(3);
    for (const resolve of polkitWaiting.splice(0)) resolve(false);
    const [a] = await first;
    const [b] = await second;
    const errors = [...(a!.ok as { error?: string }[]), ...(b!.ok as { error?: string }[])].map((r) => r.error ?? '');
    expect(errors, JSON.stringify(errors)).toHaveLength(6);
    expect(errors.filter((e) => e.includes('Error.LimitsExceeded: too many authorization checks'))).toHaveLength(3);
    expect(errors.filter((e) => /Reload: not allowed for uid/.test(e))).toHaveLength(3);
    // Six calls of two uids within the cache's time: NSS asked once per uid.
    expect(lookups.length - lookupsBefore).toBe(2);
    // The slots came back: a new check is asked.
    const again = runClient(users.app1, buses.system, [['reload']]);
    await until('a new check', () => polkitAsked === 4);
    for (const resolve of polkitWaiting.splice(0)) resolve(false);
    expect((await again)[0]!.error).toBe('EGD_ACCESS_DENIED');
  }, 60_000);

  it("a user's subordinate uids share its polkit checks: one of them cannot wait on more than the user itself may", async () => {
    // app1 and app2 stand for two of egd-app3's subordinate uids (the subuid file above).
    const asked = polkitAsked;
    const first = runClient(users.app1, buses.system, [['reload-many', 2]]);
    await until("two checks of egd-app3's first subordinate uid waiting", () => polkitAsked === asked + 2);
    // The total bound (3) has room: only the per-user bound refuses these.
    const [refused] = await runClient(users.app2, buses.system, [['reload']]);
    expect(refused).toMatchObject({ message: expect.stringContaining('Error.LimitsExceeded: too many authorization checks') });
    expect(polkitAsked).toBe(asked + 2);
    for (const resolve of polkitWaiting.splice(0)) resolve(false);
    const [waited] = await first;
    expect((waited!.ok as { error?: string }[]).map((r) => r.error ?? '')).toEqual([
      expect.stringMatching(/Reload: not allowed/),
      expect.stringMatching(/Reload: not allowed/),
    ]);
  }, 60_000);

  it("a member taken out of the audit group stops getting other users' denials within the role's cache time, not at its next call", async () => {
    const auditor = startClient(audit.auditor, buses.system, [['subscribe', { all: true }]]);
    try {
      await auditor.waitFor((l) => l.length >= 1);
      expect(auditor.lines[0]!.ok).toEqual({ uid: audit.auditor.uid, all: true });
      feed.emit(denial({ uid: users.app1.uid, address: '203.0.113.31', name: 'before.example.org' }));
      await auditor.waitFor((l) => l.some((x) => x.denied));

      auditorRemoved = true;
      clockAhead += 60_000;
      feed.emit(denial({ uid: users.app1.uid, address: '203.0.113.32', name: 'after.example.org' }));
      // A record of its own uid still goes to a plain subscription: the last, so that its absence below is not a race.
      const own = startClient(users.app1, buses.system, [['subscribe', {}]]);
      try {
        await own.waitFor((l) => l.length >= 1);
        feed.emit(denial({ uid: users.app1.uid, address: '203.0.113.33', name: 'last.example.org' }));
        await own.waitFor((l) => l.some((x) => x.denied?.name === 'last.example.org'));
      } finally {
        own.stop();
      }
      expect(auditor.lines.filter((x) => x.denied).map((x) => x.denied!.name)).toEqual(['before.example.org']);
    } finally {
      auditor.stop();
      auditorRemoved = false;
    }
  }, 60_000);

  it('a client that subscribes and leaves at once leaves no subscription behind', async () => {
    const [sent] = await runClient(users.app1, buses.system, [['subscribe-and-leave', 40]]);
    expect(sent!.ok).toBe('sent');
    await new Promise((r) => setTimeout(r, 1000));
    expect(service.stats().subscribers).toBe(0);
  }, 60_000);

  it("a user's subordinate uids share its limit, and the last slots are kept for root", async () => {
    type Result = { ok?: unknown; error?: string; message?: string };
    const agents: Agent[] = [];
    const hold = async (user: { uid: number; gid: number }, more: number) => {
      // One subscription on the agent's own connection (it keeps running), then `more` connections each subscribing.
      const agent = startClient(user, buses.system, [
        ['subscribe', {}],
        ['subscribe-many', more],
      ]);
      agents.push(agent);
      await agent.waitFor((lines) => lines.some((l) => l.error !== undefined) || lines.length >= 2);
      const [first, many] = agent.lines;
      return [first!, ...((many?.ok as Result[] | undefined) ?? [])];
    };
    try {
      // egd-app3's subordinate uids (as its user namespaces send): 8 in all, whichever uid asks.
      expect((await hold(users.app1, 7)).filter((r) => r.ok)).toHaveLength(8);
      const other = await hold(users.app2, 7);
      expect(other.filter((r) => r.ok)).toHaveLength(0);
      expect(other[0]!.message).toMatch(/LimitsExceeded: too many subscriptions \(at most 8 per user\)/);
      // egd-app3 itself fills what is left for users (18 - 4 kept) ...
      const own = await hold(users.app3, 7);
      expect(own.filter((r) => r.ok)).toHaveLength(6);
      expect(own.find((r) => r.error)?.error).toMatch(/LimitsExceeded: too many subscriptions \(at most 18 in all, 4 of them kept for root/);
      expect(service.stats().subscribers).toBe(14);
      // ... and root still subscribes.
      const [root] = await runClient({ uid: 0, gid: 0 }, buses.system, [['subscribe-many', 2]]);
      expect((root!.ok as Result[]).filter((r) => r.ok)).toHaveLength(2);
    } finally {
      for (const agent of agents) agent.stop();
    }
  }, 120_000);
});
