import { readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { EgressError, ErrorCode } from '../../errors.js';
import { connectFirewall } from '../../dbus/client.js';
import { connectDesktop } from '../../dbus/desktop.js';
import { createNotifier, DEFAULT_NOTIFY_CONFIG, parseNotifyConfig, type NotifyConfig } from '../../dbus/notifier.js';
import { Exit, parseFlags, type Command } from '../deps.js';

export interface NotifyOptions {
  readonly follow: boolean;
  readonly desktop: boolean;
  readonly config: string;
}

export function defaultNotifyConfigPath(): string {
  return join(process.env['XDG_CONFIG_HOME'] || join(homedir(), '.config'), 'egressd', 'notify.yaml');
}

export function loadNotifyConfig(path: string): NotifyConfig {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return DEFAULT_NOTIFY_CONFIG;
    throw new EgressError(ErrorCode.Io, `cannot read ${path}: ${(error as Error).message}`);
  }
  return parseNotifyConfig(text, path);
}

export const notify: Command<NotifyOptions> = {
  name: 'notify',
  summary: 'tell this user when egressd blocks one of their apps (desktop notifications)',
  help: `Usage: egressctl notify [--follow] [--no-desktop] [--config FILE]

Runs until stopped (systemd user unit: egressd-notify.service), listening to
egressd's D-Bus service for denials of this user's own apps — egressd sends
each user only their own — and shows each as a desktop notification through
org.freedesktop.Notifications on the session bus:

  firefox tried to reach telemetry.example.org
  blocked 3×, rule deny/10-phone-home.yaml/0 at 10-phone-home.yaml:23   [Allow for 1h]

"Allow" asks egressd to allow this app → this name (AllowFromDenial): root,
or whom polkit allows (action org.egressd.allow-from-denial). Nothing is let through
while the notification is open: the kernel keeps denying until the new
policy is applied.

  --follow      print each denial on stdout too
  --no-desktop  no notifications: print on stdout only (also what happens
                when there is no session bus or no notification service)
  --config FILE default $XDG_CONFIG_HOME/egressd/notify.yaml
                (~/.config/egressd/notify.yaml); every key is optional:

    groupSeconds: 60       # one notification per app, destination and rule
                           # for this long, updated in place ("blocked 3×")
    maxPerMinute: 6        # new notifications at most; the next says how
                           # many were held back
    quietHours: "22:00-07:00"   # local time: no notifications (stdout still prints)
    mute: [firefox]        # apps (or system domains) never shown
    allowScope: 1h         # what "Allow" allows: 30m, 1h, 1d, 2w or always

Exit status: 0 stopped by a signal, 2 bad input (the config file), 3 egressd
or the bus went away (the unit restarts it).`,

  parse(argv) {
    const { values } = parseFlags('notify', argv, { follow: { type: 'boolean' }, 'no-desktop': { type: 'boolean' }, config: { type: 'string' } }, 0);
    return { follow: values.follow ?? false, desktop: !(values['no-desktop'] ?? false), config: values.config ?? defaultNotifyConfigPath() };
  },

  async run(options, deps) {
    const config = loadNotifyConfig(options.config);
    const client = await connectFirewall();
    const desktop = options.desktop ? await connectDesktop() : { unavailable: '--no-desktop' };
    const hasDesktop = !('unavailable' in desktop);
    if (!hasDesktop && options.desktop) deps.err(`egressctl notify: ${desktop.unavailable}; printing denials here`);
    const notifier = createNotifier({
      config,
      ...(hasDesktop ? { desktop: (n) => desktop.notify(n) } : {}),
      ...(options.follow || !hasDesktop ? { terminal: deps.out } : {}),
      allow: async (id, scope) => {
        const result = await client.allowFromDenial(id, scope);
        return { to: String(result['to']), until: String(result['until']) };
      },
    });
    const report = (error: unknown) => deps.err(`egressctl notify: ${(error as Error).message}`);
    if (hasDesktop) {
      desktop.onAction((id, key) => void notifier.actionInvoked(id, key).catch(report));
      desktop.onClosed((id) => notifier.closed(id));
    }
    let stop: (why: string) => void = () => undefined;
    const stopped = new Promise<string>((resolve) => (stop = resolve));
    const onSignal = () => stop('signal');
    process.once('SIGTERM', onSignal);
    process.once('SIGINT', onSignal);
    try {
      const sub = await client.subscribe((record, id) => void notifier.denied(record, id).catch(report));
      deps.err(`egressctl notify: listening for denials of uid ${sub.uid}${hasDesktop ? '' : ' (no desktop)'}`);
      void client.lost.then(() => stop('egressd or the system bus went away'));
      if (hasDesktop) void desktop.lost.then(() => stop('the session bus went away'));
      const why = await stopped;
      if (why === 'signal') return Exit.Ok;
      deps.err(`egressctl notify: ${why}`);
      return Exit.SystemError;
    } finally {
      process.removeListener('SIGTERM', onSignal);
      process.removeListener('SIGINT', onSignal);
      client.close();
      if (hasDesktop) desktop.close();
    }
  },
};
