import { EgressError, ErrorCode } from '../../errors.js';
import { DROP_IN, DropIn, manualAllowance, parseScope, type AllowProto } from '../../dbus/allow.js';
import { connectFirewall } from '../../dbus/client.js';
import { DEFAULT_POLICY_DIR, Exit, parseFlags, type Command } from '../deps.js';

export interface AllowOptions {
  readonly record: number | undefined;
  readonly app: string | undefined;
  readonly to: readonly string[];
  readonly ports: readonly number[];
  readonly proto: AllowProto | undefined;
  readonly scope: string;
  readonly dir: string;
}

export const allow: Command<AllowOptions> = {
  name: 'allow',
  summary: 'allow what a denial stopped (this app → this name), for a while or always',
  help: `Usage: egressctl allow --record ID [--for DURATION | --always]
       egressctl allow --app NAME --to DEST [--to DEST]… [--port N]… [--proto tcp|udp|icmp]
                       [--for DURATION | --always] [--dir DIR]

Adds an allow to the policy drop-in ${DROP_IN} in the policy directory
(default ${DEFAULT_POLICY_DIR}): the app may reach the destination, first of its
rules, so it outranks the app's own denies and the global deny list (never a
system domain, lockdown or Tor's confinement). The entry is commented with who
allowed it, when, and from which denial record. The whole policy is checked
with it before the file is replaced, and then applied; if either fails, the
drop-in stays as it was. The kernel keeps denying until the apply is done.

  --record ID      a denial record (egressctl denials shows the ids; desktop
                   alerts carry them): its app, and its name (or address),
                   port and protocol
  --app NAME       an app of the policy, with --to: names, *.suffix, IPs, CIDRs
  --for DURATION   30m, 1h, 1d, 2w (default 1h); from then on no apply
                   includes the entry, the daemon applies again then, and
                   removes it from the file
  --always         no expiry

Through egressd's D-Bus service (org.egressd.Firewall1) when the daemon runs:
root, or whom polkit allows (--record: action org.egressd.allow-from-denial;
--app: org.egressd.allow, asked each time). --record needs the
daemon (the denial store is its). With no daemon, --app writes the drop-in
(checked) and says to run "egressctl apply".

Exit status: 0 allowed, 1 refused (not authorized, or a denial no allow can
undo), 2 bad input, 3 system error.`,

  parse(argv) {
    const { values } = parseFlags(
      'allow',
      argv,
      {
        record: { type: 'string' },
        app: { type: 'string' },
        to: { type: 'string', multiple: true },
        port: { type: 'string', multiple: true },
        proto: { type: 'string' },
        for: { type: 'string' },
        always: { type: 'boolean' },
        dir: { type: 'string' },
      },
      0,
    );
    const usage = (message: string) => new EgressError(ErrorCode.Usage, `egressctl allow: ${message}`, { details: ['see: egressctl allow --help'] });
    if ((values.record === undefined) === (values.app === undefined)) throw usage('give --record ID, or --app NAME with --to DEST');
    if (values.record !== undefined && (values.to || values.port || values.proto))
      throw usage('--record takes its destination from the record; --to, --port and --proto go with --app');
    if (values.app !== undefined && !values.to?.length) throw usage('--app needs --to DEST');
    if (values.for !== undefined && values.always) throw usage('--for and --always exclude each other');
    const record = values.record === undefined ? undefined : Number(values.record);
    if (record !== undefined && (!Number.isSafeInteger(record) || record < 1)) throw usage(`--record: "${values.record}" is not a record id`);
    const ports = (values.port ?? []).map((p) => {
      const n = Number(p);
      if (!Number.isInteger(n) || n < 1 || n > 65535) throw usage(`--port: "${p}" is not a port (1–65535)`);
      return n;
    });
    const proto = values.proto;
    if (proto !== undefined && proto !== 'tcp' && proto !== 'udp' && proto !== 'icmp') throw usage('--proto is tcp, udp or icmp');
    const scope = values.always ? 'always' : (values.for ?? '1h');
    try {
      parseScope(scope);
    } catch (error) {
      throw usage((error as Error).message);
    }
    return { record, app: values.app, to: values.to ?? [], ports, proto, scope, dir: values.dir ?? DEFAULT_POLICY_DIR };
  },

  async run(options, deps) {
    let client: Awaited<ReturnType<typeof connectFirewall>> | undefined;
    try {
      client = await connectFirewall({ timeoutMs: 3000 });
      const extra = { ...(options.ports.length ? { ports: options.ports } : {}), ...(options.proto ? { proto: options.proto } : {}) };
      const result =
        options.record !== undefined
          ? await client.allowFromDenial(options.record, options.scope)
          : await client.allow(options.app!, options.to, extra, options.scope);
      deps.err(
        `allowed ${String(result['app'])} → ${String(result['to'])} ${result['until'] === 'always' ? 'always' : `until ${String(result['until'])}`} (${DROP_IN}; policy ${String(result['digest']).slice(0, 12)} in force)`,
      );
      return Exit.Ok;
    } catch (error) {
      if (!(error instanceof EgressError) || error.code !== ErrorCode.DaemonUnavailable || options.app === undefined) throw error;
    } finally {
      client?.close();
    }
    // No daemon: the drop-in is written and checked here; the person applies it.
    const uid = process.getuid?.() ?? -1;
    const entry = manualAllowance(
      options.app,
      options.to,
      { ...(options.ports.length ? { ports: options.ports } : {}), ...(options.proto ? { proto: options.proto } : {}) },
      { uid, name: process.env['USER'] },
      Date.now(),
      parseScope(options.scope),
    );
    // Nothing to reload: the file is checked with the whole policy, and `apply` is the person's to run.
    await new DropIn(options.dir, () => Promise.resolve({ applied: true, digest: 'not applied' })).add(entry);
    deps.err(`egressd is not running: the allow is written to ${options.dir}/${DROP_IN} and checked; run "egressctl apply" to put it in force`);
    return Exit.Ok;
  },
};
