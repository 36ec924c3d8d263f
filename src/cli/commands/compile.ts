import { compile as compilePolicy, factsNeeded } from '../../compile/compile.js';
import { renderJson, renderText } from '../../compile/ruleset.js';
import { EgressError, ErrorCode } from '../../errors.js';
import { DEFAULT_POLICY_DIR, Exit, loadForCommand, parseFlags, printIssues, type Command } from '../deps.js';

export interface CompileOptions {
  readonly dir: string;
  readonly format: 'nft' | 'json';
  readonly lockdown: boolean;
}

export const compile: Command<CompileOptions> = {
  name: 'compile',
  summary: 'print the nftables table a policy compiles to',
  help: `Usage: egressctl compile [DIR] [--nft | --json] [--lockdown]

Compiles the policy in DIR (default ${DEFAULT_POLICY_DIR}) to the one nftables
table egressd applies, "table inet egressd", and prints it. Nothing is applied.

  --nft        nft text, as applied (default)
  --json       libnftables JSON (schema 1)
  --lockdown   as it would be with the kill switch on

Every rule that decides for a policy rule starts its comment with the rule's
short id (r and 8 hex digits: a digest of what the rule is, kept while the
rule stands, wherever it moves), then the policy file and line that made it
and its rule id; denials are logged with the short id ("egd r1a2b3c4d "). The output depends on this
machine's users, groups and cgroups (for identities given by name), and on
nothing else: the same input always prints the same bytes. Users and groups
are looked up through NSS; a system domain member or Tor's user that does
not exist is an error (unless marked optional) and no table is printed.

Note: nftables 1.0.6 cannot read "socket cgroupv2" in JSON, so tables with
cgroup-based identities are applied as text; the JSON form is for tools.

Exit status: 0 printed, 2 invalid policy or usage, 3 a user or group name
could not be looked up (the name service failed).`,

  parse(argv) {
    const { values, positionals } = parseFlags('compile', argv, { nft: { type: 'boolean' }, json: { type: 'boolean' }, lockdown: { type: 'boolean' } }, 1);
    if (values.nft && values.json) throw new EgressError(ErrorCode.Usage, 'egressctl compile: --nft and --json exclude each other');
    return { dir: positionals[0] ?? DEFAULT_POLICY_DIR, format: values.json ? 'json' : 'nft', lockdown: values.lockdown === true };
  },

  run(options, deps) {
    const loaded = loadForCommand(options.dir, deps);
    if (!loaded) return Exit.BadInput;
    const compiled = compilePolicy(loaded.policy, deps.facts(factsNeeded(loaded.policy)), { lockdown: options.lockdown });
    printIssues(deps, options.dir, [...compiled.errors, ...compiled.warnings]);
    if (compiled.errors.length > 0) {
      // Not printed: a table that would let a system domain out must not be one pipe away from `nft -f`.
      deps.err(`${options.dir}: ${compiled.errors.length} ${compiled.errors.length === 1 ? 'error' : 'errors'} on this machine; no table printed`);
      return compiled.lookupFailed ? Exit.SystemError : Exit.BadInput;
    }
    deps.out(options.format === 'json' ? JSON.stringify(renderJson(compiled.ruleset), null, 2) : renderText(compiled.ruleset).trimEnd());
    return Exit.Ok;
  },
};
