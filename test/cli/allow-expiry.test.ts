import { describe, expect, it } from 'vitest';
import { runEgressctl } from '../support/cli-run.js';
import { policyDir } from '../support/policy-dir.js';

/** An allowed entry whose `until` has passed: valid, but check, explain and plan say it is no longer applied. */
const POLICY = {
  '30-apps.yaml': 'apps:\n  app1:\n    identity: {user: root}\n    default: deny\n',
  '80-allowed.yaml': `allowed:
  - app: app1
    allow: ["192.0.2.7"]
    until: "2020-01-01T00:00:00Z"
  - app: app1
    allow: ["198.51.100.7"]
    until: "2999-01-01T00:00:00Z"
`,
};

describe('egressctl and expired allowed entries', () => {
  it('check: valid, with a warning at the expired entry', async () => {
    const dir = policyDir(POLICY);
    const result = await runEgressctl(['check', dir]);
    expect(result.code).toBe(0);
    expect(result.err).toContain(`${dir}/80-allowed.yaml:2:`);
    expect(result.err).toMatch(/allowed entry for app "app1" expired at 2020-01-01T00:00:00\.000Z; it is not applied/);
    expect(result.err).not.toMatch(/expired at 2999/);
  });

  it('explain: the expired entry decides nothing, and is named', async () => {
    const dir = policyDir(POLICY);
    const gone = await runEgressctl(['explain', dir, '--app', 'app1', '--to', '192.0.2.7:443/tcp']);
    expect(gone.code).toBe(1);
    expect(gone.err).toMatch(/^DENIED by app\/app1\/default/);
    expect(gone.err).toMatch(/note: allowed entry for app "app1" expired at 2020-01-01/);
    const live = await runEgressctl(['explain', dir, '--app', 'app1', '--to', '198.51.100.7:443/tcp']);
    expect(live.code).toBe(0);
    expect(live.err).toMatch(/^ALLOWED by app\/app1\/allowed\/1/);
    const json = await runEgressctl(['explain', dir, '--app', 'app1', '--to', '192.0.2.7:443/tcp', '--json']);
    expect(JSON.parse(json.out)).toMatchObject({
      verdict: 'deny',
      expired: [{ app: 'app1', ruleId: 'app/app1/allowed/0', until: '2020-01-01T00:00:00.000Z' }],
    });
  });
});
