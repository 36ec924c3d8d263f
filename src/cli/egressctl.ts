import { isEgressError } from '../errors.js';
import { check } from './commands/check.js';
import { compile } from './commands/compile.js';
import { apply, lockdown, plan, release, status } from './commands/enforce.js';
import { explain } from './commands/explain.js';
import { schema } from './commands/schema.js';
import { Exit, exitCodeFor, type Command, type Deps } from './deps.js';

const commands: readonly Command<never>[] = [check, compile, explain, apply, plan, status, lockdown, release, schema] as unknown as Command<never>[];

const usage = `Usage: egressctl COMMAND [ARGS] [--help]

egressd stops software from phoning home: per-app and per-domain egress
policies, compiled into one nftables table.

Commands:
${commands.map((c) => `  ${c.name.padEnd(10)} ${c.summary}`).join('\n')}

Exit status: 0 ok, 1 a "no" answer (denied, differs), 2 bad input, 3 system error.
Run "egressctl COMMAND --help" for each command's options.`;

export async function main(argv: readonly string[], deps: Deps): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    deps.err(usage);
    return name === undefined ? Exit.BadInput : Exit.Ok;
  }
  const command = commands.find((c) => c.name === name);
  if (!command) {
    deps.err(`egressctl: unknown command "${name}"\n\n${usage}`);
    return Exit.BadInput;
  }
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
