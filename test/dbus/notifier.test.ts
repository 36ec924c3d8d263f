import { describe, expect, it } from 'vitest';
import { createNotifier, DEFAULT_NOTIFY_CONFIG, inQuietHours, parseNotifyConfig, type Notification } from '../../src/dbus/notifier.js';
import { denial } from './support.js';

function harness(config = DEFAULT_NOTIFY_CONFIG) {
  let t = Date.parse('2026-12-04T12:00:00Z');
  const shown: Notification[] = [];
  let id = 0;
  const notifier = createNotifier({
    config,
    desktop: (n) => {
      shown.push(n);
      return Promise.resolve(n.replacesId || ++id);
    },
    allow: () => Promise.resolve({ to: 'x', until: 'always' }),
    now: () => t,
  });
  return { notifier, shown, advance: (ms: number) => (t += ms) };
}

describe('the notifier (clock passed in)', () => {
  it('a group lasts groupSeconds after its last denial; then the same denial is a new notification', async () => {
    const { notifier, shown, advance } = harness({ ...DEFAULT_NOTIFY_CONFIG, groupSeconds: 10 });
    const r = denial({ name: 'a.example.org' });
    await notifier.denied(r, 1);
    advance(9_000);
    await notifier.denied({ ...r, count: 4 }, 2);
    expect(shown.map((n) => [n.replacesId, n.body.split(',')[0]])).toEqual([
      [0, 'blocked 1×'],
      [1, 'blocked 5×'],
    ]);
    advance(10_001);
    await notifier.denied(r, 3);
    expect(shown[2]).toMatchObject({ replacesId: 0, body: expect.stringMatching(/^blocked 1×/) });
  });

  it('at most maxPerMinute new notifications; the next one after the minute says how many were held back', async () => {
    const { notifier, shown, advance } = harness({ ...DEFAULT_NOTIFY_CONFIG, maxPerMinute: 2 });
    for (let i = 0; i < 5; i++) await notifier.denied(denial({ name: `n${i}.example.org` }), i + 1);
    expect(shown).toHaveLength(2);
    expect(notifier.stats().heldBack).toBe(3);
    advance(60_001);
    await notifier.denied(denial({ name: 'later.example.org' }), 9);
    expect(shown[2]!.body).toContain('(3 more held back: at most 2 a minute)');
  });

  it("a notification's Allow allows what it was shown for: the same app, name and rule on another port or protocol is another notification", async () => {
    let t = Date.parse('2026-12-04T12:00:00Z');
    const shown: Notification[] = [];
    const allowed: number[] = [];
    let id = 0;
    const notifier = createNotifier({
      config: DEFAULT_NOTIFY_CONFIG,
      desktop: (n) => {
        shown.push(n);
        return Promise.resolve(n.replacesId || ++id);
      },
      allow: (recordId) => {
        allowed.push(recordId);
        return Promise.resolve({ to: 'x', until: 'always' });
      },
      now: () => (t += 100),
    });
    const r = denial({ name: 'a.example.org', port: 443, protocol: 'tcp' });
    await notifier.denied(r, 1);
    await notifier.denied({ ...r, port: 8444 }, 2);
    await notifier.denied({ ...r, protocol: 'udp' }, 3);
    await notifier.denied({ ...r, count: 2 }, 4);
    expect(shown.map((n) => n.replacesId)).toEqual([0, 0, 0, 1]);
    // Clicked on the first: record 4 is its group's (port 443), never record 2 of port 8444.
    await notifier.actionInvoked(1, 'allow');
    expect(allowed).toEqual([4]);
  });

  it('no Allow for what no allow can open, or a record the store has not given an id', async () => {
    const { notifier, shown } = harness();
    await notifier.denied(denial({ name: 'sd.example.org', kind: 'system-domain', app: undefined, domain: 'offline' }), 5);
    await notifier.denied(denial({ name: 'noid.example.org' }), 0);
    await notifier.denied(denial({ name: 'ok.example.org' }), 6);
    expect(shown.map((n) => n.actions.length)).toEqual([0, 0, 2]);
    expect(shown[0]!.summary).toBe('system domain offline tried to reach sd.example.org');
  });

  it('quiet hours may span midnight; config errors name their key', () => {
    const q = parseNotifyConfig('quietHours: "22:30-07:00"\n', 'n.yaml').quietHours;
    const at = (h: number, m: number) => new Date(2026, 11, 4, h, m);
    expect([at(22, 29), at(22, 30), at(3, 0), at(6, 59), at(7, 0)].map((d) => inQuietHours(q, d))).toEqual([false, true, true, true, false]);
    expect(() => parseNotifyConfig('allowScope: forever\n', 'n.yaml')).toThrow(
      expect.objectContaining({ code: 'EGD_INVALID_ARGUMENT', details: [expect.stringContaining('n.yaml: allowScope: a duration')] }),
    );
    expect(() => parseNotifyConfig('mute: firefox\n', 'n.yaml')).toThrow(expect.objectContaining({ details: [expect.stringContaining('n.yaml: mute: ')] }));
  });
});

describe('what the notifier shows is escaped for where it is shown', () => {
  // A name the resolver learned for anyone's question, with a terminal escape (clear screen, set the title) and markup in it.
  const hostile = 'x\u001b[2J\u001b]0;owned\u0007<b>&<a href="http://evil">.example.org';

  it('the terminal line has no control characters; the notification body no markup', async () => {
    const lines: string[] = [];
    const shown: Notification[] = [];
    const notifier = createNotifier({
      config: DEFAULT_NOTIFY_CONFIG,
      terminal: (line) => lines.push(line),
      desktop: (n) => {
        shown.push(n);
        return Promise.resolve(1);
      },
      allow: () => Promise.reject(new Error(`cannot allow ${hostile}`)),
      now: () => Date.parse('2026-12-04T12:00:00Z'),
    });
    await notifier.denied(denial({ name: hostile, ruleId: 'app/<i>x</i>/0' }), 7);
    await notifier.actionInvoked(1, 'allow');
    expect(lines).toHaveLength(2);
    for (const line of lines) {
      // eslint-disable-next-line no-control-regex
      expect(line).not.toMatch(/[\u0000-\u001f\u007f-\u009f]/);
      expect(line).toContain('x\\x1b[2J\\x1b]0;owned\\x07');
    }
    for (const n of shown) {
      // eslint-disable-next-line no-control-regex
      expect(n.summary + n.body).not.toMatch(/[\u0000-\u001f\u007f-\u009f]/);
      expect(n.body).not.toMatch(/[<>]/);
    }
    expect(shown[0]!.body).toContain('rule app/&lt;i&gt;x&lt;/i&gt;/0');
    expect(shown[1]!.body).toContain('&lt;b&gt;&amp;&lt;a href=&quot;http://evil&quot;&gt;');
  });
});
