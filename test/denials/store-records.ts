import type { DenialRecord } from '../../src/denials/record.js';

/** A denial record as the reader makes them; `over` replaces fields. */
export function denial(over: Partial<DenialRecord> = {}): DenialRecord {
  const lastSeen = over.lastSeen ?? Date.UTC(2026, 11, 4, 12, 30);
  return {
    firstSeen: lastSeen - 2000,
    lastSeen,
    count: 1,
    shortId: 'r1a2b3c4d',
    ruleId: 'app/firefox/2',
    kind: 'app-rule',
    file: '20-apps.yaml',
    line: 12,
    app: 'firefox',
    domain: undefined,
    uid: 1000,
    gid: 1000,
    protocol: 'tcp',
    family: 4,
    address: '192.0.2.7',
    port: 443,
    name: 'telemetry.mozilla.org',
    // The sender's own lookup, unless a test says whose; no name, no asker.
    nameAskedBy: 'name' in over && over.name === undefined ? undefined : 'sender',
    ...over,
  };
}

/** A denial by the global list (10-phone-home.yaml:23) of firefox's connection to a telemetry name, as the D-Bus and journal tests use; `over` replaces fields. */
export function telemetryDenial(over: Partial<DenialRecord> = {}): DenialRecord {
  return denial({
    shortId: 'r0a1b2c3d',
    ruleId: 'deny/10-phone-home.yaml/0',
    kind: 'global-deny',
    file: '10-phone-home.yaml',
    line: 23,
    address: '203.0.113.7',
    name: 'telemetry.example.org',
    ...over,
  });
}

/** A varied set of records for sizes and benchmarks: `apps` apps, `dests` destinations, `rules` rules, one record per `stepMs` back from `end`. */
export function* manyDenials(
  n: number,
  options: { end?: number; stepMs?: number; apps?: number; dests?: number; rules?: number; start?: number } = {},
): Generator<DenialRecord> {
  const { end = Date.UTC(2026, 11, 4, 12), stepMs = 1000, apps = 40, dests = 5000, rules = 200, start = 0 } = options;
  for (let i = start; i < start + n; i++) {
    const d = (i * 7919) % dests;
    const v6 = d % 4 === 0;
    yield denial({
      lastSeen: end - (n + start - 1 - i) * stepMs,
      count: 1 + (i % 5),
      app: `app${i % apps}`,
      uid: 1000 + (i % 7),
      shortId: `r${((i * 31) % rules).toString(16).padStart(8, '0')}`,
      ruleId: `app/app${i % apps}/${(i * 31) % rules}`,
      line: 1 + ((i * 31) % rules),
      family: v6 ? 6 : 4,
      address: v6 ? `2001:db8:${(d >> 8).toString(16)}::${(d & 255).toString(16)}` : `198.51.${(d >> 8) & 255}.${d & 255}`,
      port: 443,
      name: d % 3 === 0 ? undefined : `host${d}.tracker${d % 50}.example`,
    });
  }
}
