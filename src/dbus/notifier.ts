/**
 * The tattle-tale's judgement: which denials become a desktop notification,
 * grouped and rate-limited, and what a notification says. No I/O here: the
 * desktop (org.freedesktop.Notifications, desktop.ts), the terminal and the
 * daemon's AllowFromDenial are passed in, and the clock too.
 *
 * - Grouping: denials of one app to one destination under one rule within
 *   `groupSeconds` are one notification, updated in place (replaces_id):
 *   "firefox tried to reach telemetry.example.org — blocked 3×".
 * - Rate limit: at most `maxPerMinute` new notifications a minute; the
 *   others are counted and the next one says how many were held back.
 * - Quiet hours: no notifications in the window (local time); the terminal
 *   still prints. Mute: an app named in `mute` is never shown.
 * - Text: names come from the resolver (learned for anyone's question),
 *   apps and rules from policy files: a terminal line is escaped for the
 *   terminal, a notification's body for markup, its summary (plain text by
 *   the specification) of control characters.
 * - Allow: a notification of a record the daemon can allow offers "Allow";
 *   choosing it calls AllowFromDenial(record, allowScope). Nothing is
 *   allowed until the daemon has applied it: the kernel keeps denying while
 *   the notification is open.
 */
import { parse as parseYaml } from 'yaml';
import { z } from 'zod';
import type { DenialRecord } from '../denials/record.js';
import { EgressError, ErrorCode } from '../errors.js';
import { ALLOWABLE, parseScope } from './allow.js';
import { markupSafe, terminalSafe } from './text.js';

export interface NotifyConfig {
  readonly groupSeconds: number;
  readonly maxPerMinute: number;
  /** Minutes after local midnight; `from` > `to` spans midnight. */
  readonly quietHours: { readonly from: number; readonly to: number } | undefined;
  readonly mute: readonly string[];
  readonly allowScope: string;
}

export const DEFAULT_NOTIFY_CONFIG: NotifyConfig = { groupSeconds: 60, maxPerMinute: 6, quietHours: undefined, mute: [], allowScope: '1h' };

const hhmm = /^([01]\d|2[0-3]):([0-5]\d)$/;
const configSchema = z.strictObject({
  groupSeconds: z.number().int().min(1).max(86400).optional(),
  maxPerMinute: z.number().int().min(1).max(60).optional(),
  quietHours: z
    .string()
    .regex(/^([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d$/, 'quiet hours are written "22:00-07:00" (24-hour local time)')
    .optional(),
  mute: z.array(z.string().min(1).max(64)).optional(),
  allowScope: z
    .string()
    .refine((s) => {
      try {
        parseScope(s);
        return true;
      } catch {
        return false;
      }
    }, 'a duration (30m, 1h, 1d, 2w) or "always"')
    .optional(),
});

const minutes = (text: string) => {
  const m = hhmm.exec(text)!;
  return Number(m[1]) * 60 + Number(m[2]);
};

/** ~/.config/egressd/notify.yaml; every problem names its key. */
export function parseNotifyConfig(text: string, file: string): NotifyConfig {
  let data: unknown;
  try {
    data = parseYaml(text) ?? {};
  } catch (error) {
    throw new EgressError(ErrorCode.InvalidArgument, `${file}: not YAML: ${(error as Error).message.split('\n')[0]}`);
  }
  const parsed = configSchema.safeParse(data);
  if (!parsed.success) {
    const details = parsed.error.issues.map((i) => `${file}: ${i.path.join('.') || '(top)'}: ${i.message}`);
    throw new EgressError(ErrorCode.InvalidArgument, `${file}: ${details.length} problem${details.length === 1 ? '' : 's'}`, { details });
  }
  const c = parsed.data;
  const [from, to] = c.quietHours?.split('-') ?? [];
  return {
    groupSeconds: c.groupSeconds ?? DEFAULT_NOTIFY_CONFIG.groupSeconds,
    maxPerMinute: c.maxPerMinute ?? DEFAULT_NOTIFY_CONFIG.maxPerMinute,
    quietHours: from && to ? { from: minutes(from), to: minutes(to) } : undefined,
    mute: c.mute ?? [],
    allowScope: c.allowScope ?? DEFAULT_NOTIFY_CONFIG.allowScope,
  };
}

export function inQuietHours(quiet: NotifyConfig['quietHours'], at: Date): boolean {
  if (!quiet) return false;
  const m = at.getHours() * 60 + at.getMinutes();
  return quiet.from <= quiet.to ? m >= quiet.from && m < quiet.to : m >= quiet.from || m < quiet.to;
}

/** One desktop notification, as org.freedesktop.Notifications.Notify takes it. */
export interface Notification {
  /** 0: a new one; else the one it updates. */
  readonly replacesId: number;
  readonly summary: string;
  readonly body: string;
  /** Action keys and labels, flattened as the spec wants: ["allow", "Allow for 1h"]. */
  readonly actions: readonly string[];
}

export interface NotifierDeps {
  readonly config: NotifyConfig;
  /** Shows a notification; resolves with its id. Absent: no desktop, terminal only. */
  readonly desktop?: (n: Notification) => Promise<number>;
  /** One line for the terminal (--follow, or no desktop). */
  readonly terminal?: (line: string) => void;
  readonly allow: (recordId: number, scope: string) => Promise<{ to: string; until: string }>;
  readonly now?: () => number;
}

export function who(r: DenialRecord): string {
  return r.app ?? (r.domain ? `system domain ${r.domain}` : r.uid !== undefined ? `uid ${r.uid}` : 'an orphaned socket');
}

export function destination(r: DenialRecord): string {
  return r.name ?? r.address;
}

export function ruleText(r: DenialRecord): string {
  return `rule ${r.ruleId ?? r.shortId}${r.file ? ` at ${r.file}:${r.line ?? '?'}` : ''}`;
}

/** The terminal's line for one record. */
export function terminalLine(r: DenialRecord, id: number): string {
  const time = new Date(r.lastSeen).toISOString().slice(11, 19);
  const where = `${destination(r)}${r.name ? ` (${r.address})` : ''} ${r.protocol}${r.port !== undefined ? `/${r.port}` : ''}`;
  return terminalSafe(`${time} ${who(r)} → ${where} blocked ${r.count}× ${ruleText(r)}${id > 0 ? ` [record ${id}]` : ''}`);
}

interface Group {
  notificationId: number;
  count: number;
  until: number;
  recordId: number;
  record: DenialRecord;
}

export interface Notifier {
  denied(record: DenialRecord, id: number): Promise<void>;
  /** org.freedesktop.Notifications.ActionInvoked for one of ours. */
  actionInvoked(notificationId: number, key: string): Promise<void>;
  closed(notificationId: number): void;
  stats(): { shown: number; updated: number; heldBack: number; muted: number; quiet: number };
}

export function createNotifier(deps: NotifierDeps): Notifier {
  const { config } = deps;
  const now = deps.now ?? Date.now;
  const groups = new Map<string, Group>();
  const byNotification = new Map<number, Group>();
  const sent: number[] = [];
  let heldBack = 0;
  const stats = { shown: 0, updated: 0, heldBack: 0, muted: 0, quiet: 0 };

  // Port and protocol too: "Allow" allows its group's record, so a group must never hold two destinations the allow would tell apart.
  const keyOf = (r: DenialRecord) => `${r.app ?? r.domain ?? r.uid ?? '-'}|${destination(r)}|${r.protocol}/${r.port ?? '-'}|${r.shortId}`;
  const allowable = (r: DenialRecord, id: number) => id > 0 && r.app !== undefined && (r.kind === undefined || ALLOWABLE.has(r.kind));
  const scopeText = config.allowScope === 'always' ? 'always' : `for ${config.allowScope}`;

  function render(g: Group, replacesId: number, extra = ''): Notification {
    const r = g.record;
    return {
      replacesId,
      summary: terminalSafe(`${who(r)} tried to reach ${destination(r)}`),
      body: markupSafe(`blocked ${g.count}×, ${ruleText(r)}${extra}`),
      actions: allowable(r, g.recordId) ? ['allow', `Allow ${scopeText}`] : [],
    };
  }

  // One record at a time: a group is known only once its Notify has answered with an id, and records come in bursts.
  let queue: Promise<unknown> = Promise.resolve();
  const serial = (work: () => Promise<void>): Promise<void> => {
    const next = queue.then(work, work);
    queue = next.catch(() => undefined);
    return next;
  };

  return {
    stats: () => ({ ...stats }),
    denied: (record, id) => serial(() => denied(record, id)),
    actionInvoked: (notificationId, key) => serial(() => actionInvoked(notificationId, key)),
    closed(notificationId) {
      const group = byNotification.get(notificationId);
      byNotification.delete(notificationId);
      // A closed notification starts a new group: the next denial shows again (within the rate limit).
      if (group) groups.delete(keyOf(group.record));
    },
  };

  async function denied(record: DenialRecord, id: number): Promise<void> {
    if ((record.app !== undefined && config.mute.includes(record.app)) || (record.domain !== undefined && config.mute.includes(record.domain))) {
      stats.muted += 1;
      return;
    }
    deps.terminal?.(terminalLine(record, id));
    if (!deps.desktop) return;
    const t = now();
    if (inQuietHours(config.quietHours, new Date(t))) {
      stats.quiet += 1;
      return;
    }
    const key = keyOf(record);
    const open = groups.get(key);
    if (open && open.until > t) {
      open.count += record.count;
      open.record = record;
      if (id > 0) open.recordId = id;
      open.until = t + config.groupSeconds * 1000;
      open.notificationId = await deps.desktop(render(open, open.notificationId));
      byNotification.set(open.notificationId, open);
      stats.updated += 1;
      return;
    }
    while (sent.length > 0 && sent[0]! <= t - 60_000) sent.shift();
    if (sent.length >= config.maxPerMinute) {
      heldBack += 1;
      stats.heldBack += 1;
      return;
    }
    sent.push(t);
    const group: Group = { notificationId: 0, count: record.count, until: t + config.groupSeconds * 1000, recordId: id, record };
    const extra = heldBack > 0 ? ` (${heldBack} more held back: at most ${config.maxPerMinute} a minute)` : '';
    heldBack = 0;
    group.notificationId = await deps.desktop(render(group, 0, extra));
    groups.set(key, group);
    byNotification.set(group.notificationId, group);
    stats.shown += 1;
  }

  async function actionInvoked(notificationId: number, key: string): Promise<void> {
    const group = byNotification.get(notificationId);
    if (!group || key !== 'allow' || !allowable(group.record, group.recordId)) return;
    const r = group.record;
    let summary: string;
    let body: string;
    try {
      const result = await deps.allow(group.recordId, config.allowScope);
      summary = `Allowed ${who(r)} → ${destination(r)}`;
      body = result.until === 'always' ? 'always' : `until ${result.until}`;
    } catch (error) {
      summary = `Not allowed: ${who(r)} → ${destination(r)}`;
      body = (error as Error).message;
    }
    deps.terminal?.(terminalSafe(`${summary} (${body})`));
    if (deps.desktop) await deps.desktop({ replacesId: notificationId, summary: terminalSafe(summary), body: markupSafe(body), actions: [] });
    groups.delete(keyOf(r));
    byNotification.delete(notificationId);
  }
}
