import { isEgressError } from '../errors.js';
import { Exit, exitCodeFor, type Command, type Deps } from './deps.js';

/**
 * Each command's module, loaded when that command runs: `compile` then loads
 * no nftables binding and no enforcement code, `apply` no explainer. A fresh
 * process pays for every module it loads (issue 16, bench/cli-apply.ts).
 */
const commandLoaders: readonly (readonly [string, () => Promise<Command<never>>])[] = [
  ['check', async () => (await import('./commands/check.js')).check],
  ['compile', async () => (await import('./commands/compile.js')).compile],
  ['explain', async () => (await import('./commands/explain.js')).explain],
  ['apply', async () => (await import('./commands/enforce.js')).apply],
  ['plan', async () => (await import('./commands/enforce.js')).plan],
  ['status', async () => (await import('./commands/enforce.js')).status],
  ['lockdown', async () => (await import('./commands/enforce.js')).lockdown],
  ['release', async () => (await import('./commands/enforce.js')).release],
  ['schema', async () => (await import('./commands/schema.js')).schema],
  ['dns', async () => (await import('./commands/dns.js')).dns],
  ['tor', async () => (await import('./commands/tor.js')).tor],
  ['try', async () => (await import('./commands/try.js')).tryIt],
  ['denials', async () => (await import('./commands/denials.js')).denials],
  ['allow', async () => (await import('./commands/allow.js')).allow],
  ['notify', async () => (await import('./commands/notify.js')).notify],
] as unknown as (readonly [string, () => Promise<Command<never>>])[];

/** The usage text names every command with its summary: only it loads them all. */
async function usage(): Promise<string> {
  const commands = await Promise.all(commandLoaders.map(([, load]) => load()));
  return `Usage: egressctl COMMAND [ARGS] [--help]

egressd stops software from phoning home: per-app and per-domain egress
policies, compiled into one nftables table.

Commands:
${commands.map((c) => `  ${c.name.padEnd(10)} ${c.summary}`).join('\n')}

Exit status: 0 ok, 1 a "no" answer (denied, differs), 2 bad input, 3 system error.
Run "egressctl COMMAND --help" for each command's options.`;
}

export async function main(argv: readonly string[], deps: Deps): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    deps.err(await usage());
    return name === undefined ? Exit.BadInput : Exit.Ok;
  }
  const load = commandLoaders.find(([known]) => known === name)?.[1];
  if (!load) {
    deps.err(`egressctl: unknown command "${name}"\n\n${await usage()}`);
    return Exit.BadInput;
  }
  const command = await load();
  if (rest.includes('--help') || rest.includes('-h')) {
    deps.err(command.help);
    return Exit.Ok;
  }
  try {
    return await command.run(command.parse(rest), deps);
  } catch (error) {
    if (isEgressError(error)) {
      deps.err(error.message);
      for (const line of error.details) deps.err(line);
    } else {
      deps.err(`egressctl: internal error: ${(error as Error).stack ?? String(error)}`);
    }
    return exitCodeFor(error);
  }
}
