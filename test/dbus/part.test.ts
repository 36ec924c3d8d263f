import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { PartContext, ReloadOutcome } from '../../src/daemon/part.js';
import { DROP_IN, renderDropIn } from '../../src/dbus/allow.js';
import { connectFirewall } from '../../src/dbus/client.js';
import { firewallServicePart } from '../../src/dbus/part.js';
import type { InForce } from '../../src/resolver/runtime.js';
import { loadPolicyDir } from '../../src/policy/load.js';
import { policyDir } from '../support/policy-dir.js';
import { dbusUnavailable, quietLog, startBuses, type Buses } from './support.js';

const skip = dbusUnavailable();

describe.skipIf(skip)(`the D-Bus part ${skip ? `(skipped: ${skip})` : ''}`, () => {
  let buses: Buses;
  beforeAll(async () => {
    buses = await startBuses();
  });
  afterAll(() => buses?.stop());

  it('starts as a PartSpec, removes expired allowed entries (and reloads) at start and when the next one expires, answers on the bus, closes', async () => {
    let t = Date.parse('2026-12-04T12:00:00Z');
    const dir = policyDir({ '30-apps.yaml': 'apps:\n  firefox:\n    identity: {user: root}\n' });
    writeFileSync(
      join(dir, DROP_IN),
      renderDropIn([
        { app: 'firefox', allow: ['old.example.org'], until: '2026-12-04T11:00:00Z', why: 'expired an hour ago' },
        { app: 'firefox', allow: ['soon.example.org'], until: '2026-12-04T12:00:02Z', why: 'expires in 2 s' },
        { app: 'firefox', allow: ['kept.example.org'], why: 'always' },
      ]),
    );
    const reloads: string[] = [];
    const context = {
      log: quietLog(),
      stateDir: dir,
      policyDir: dir,
      reload: (why: string): Promise<ReloadOutcome> => {
        reloads.push(why);
        const loaded = loadPolicyDir(dir);
        return Promise.resolve(loaded.ok ? { applied: true, digest: loaded.policy.digest } : { applied: false, code: 'EGD_POLICY_INVALID', errors: [] });
      },
      status: () => ({ state: 'enforcing' as const, digest: 'x', lockdown: false, parts: [] }),
      learnedNames: () => [],
    } as unknown as PartContext;
    const part = await firewallServicePart({ busAddress: buses.system, polkit: false, now: () => t }).start({} as InForce, context);
    try {
      expect(reloads).toEqual(['1 allowed entries expired']);
      const text = () => readFileSync(join(dir, DROP_IN), 'utf8');
      expect(text()).not.toContain('old.example.org');
      expect(text()).toContain('soon.example.org');
      const client = await connectFirewall({ busAddress: buses.system });
      expect(await client.status()).toMatchObject({ state: 'enforcing' });
      client.close();
      expect(part.describe?.()).toMatch(/^D-Bus org\.egressd\.Firewall1, 0 subscribed$/);
      t += 2000;
      const end = Date.now() + 5000;
      while (text().includes('soon.example.org') && Date.now() < end) await new Promise((r) => setTimeout(r, 100));
      expect(text()).not.toContain('soon.example.org');
      expect(text()).toContain('kept.example.org');
      expect(reloads).toHaveLength(2);
    } finally {
      await part.close();
    }
    expect(existsSync(join(dir, DROP_IN))).toBe(true);
  }, 30_000);
});
