import { formatIssue, sortIssues } from '../../policy/issues.js';
import { loadPolicyDir } from '../../policy/load.js';
import { compile, factsNeeded } from '../../compile/compile.js';
import { expiredIssues, policyAt } from '../../policy/expiry.js';
import { capabilityCheck, printCapabilityCheck } from '../capability-warnings.js';
import { DEFAULT_POLICY_DIR, Exit, parseFlags, printIssues, type Command, type Deps } from '../deps.js';

export interface CheckOptions {
  readonly dir: string;
  readonly json: boolean;
}

export const check: Command<CheckOptions> = {
  name: 'check',
  summary: 'validate a policy directory',
  help: `Usage: egressctl check [DIR] [--json]

Validates every *.yaml file in DIR (default ${DEFAULT_POLICY_DIR}) and the list
files they name, then compiles the result, without changing the system.
Every problem is printed as FILE:LINE:COL: message (hint), all at once.
User and group names are looked up through NSS: a system domain member or
Tor's user (while updates over Tor are on) that does not exist on this
machine is an error unless its policy says optional: true. An allowed
entry whose \`until\` has passed is a warning: apply leaves it out.

A system domain member, or an updater while updates go over Tor, that holds
CAP_NET_RAW or CAP_NET_ADMIN is not confined by the table (AF_PACKET frames
never meet it; CAP_NET_ADMIN can change it): check warns, at the member's
line, for each running process of it that holds either (read from /proc),
and for each unit: member whose configuration gives it either, as systemd
reports it over the system bus (without one, it says so in one line).

  --json   print {"ok", "errors", "warnings", "summary", "capabilities"} on stdout

Exit status: 0 valid (warnings allowed), 2 invalid, 3 a user or group name
could not be looked up (the name service failed).
Use it in CI to check policies before they are distributed.`,

  parse(argv) {
    const { values, positionals } = parseFlags('check', argv, { json: { type: 'boolean', default: false } }, 1);
    return { dir: positionals[0] ?? DEFAULT_POLICY_DIR, json: values.json };
  },

  run(options, deps: Deps) {
    const result = loadPolicyDir(options.dir);
    const toJson = (issues: readonly Parameters<typeof formatIssue>[0][]) =>
      sortIssues(issues).map((i) => ({
        file: i.at.file,
        line: i.at.line,
        col: i.at.col,
        message: i.message,
        ...(i.hint ? { hint: i.hint } : {}),
        text: formatIssue(i, options.dir),
      }));
    if (!result.ok) {
      if (options.json) deps.out(JSON.stringify({ ok: false, errors: toJson(result.errors), warnings: toJson(result.warnings) }, null, 2));
      else {
        printIssues(deps, options.dir, [...result.errors, ...result.warnings]);
        deps.err(`${options.dir}: ${result.errors.length} ${result.errors.length === 1 ? 'error' : 'errors'}`);
      }
      return Exit.BadInput;
    }
    const { policy } = result;
    const facts = deps.facts(factsNeeded(policy));
    const compiled = compile(policy, facts);
    // Checked whole (an expired entry must still be valid to stay in the file), and said which entries apply no more.
    const warnings = [...result.warnings, ...compiled.warnings, ...expiredIssues(policyAt(policy, (deps.now ?? Date.now)()).expired)];
    if (compiled.errors.length > 0) {
      if (options.json) deps.out(JSON.stringify({ ok: false, errors: toJson(compiled.errors), warnings: toJson(warnings) }, null, 2));
      else {
        printIssues(deps, options.dir, [...compiled.errors, ...warnings]);
        deps.err(`${options.dir}: ${compiled.errors.length} ${compiled.errors.length === 1 ? 'error' : 'errors'} on this machine`);
      }
      // A name service that failed is the machine's fault, not the policy's.
      return compiled.lookupFailed ? Exit.SystemError : Exit.BadInput;
    }
    const summary = {
      files: policy.files.length,
      apps: policy.apps.length,
      systemDomains: policy.systemDomains.length,
      globalDenyRules: policy.globalDeny.length,
      listNames: [...policy.lists.values()].reduce((n, l) => n + l.names.size + l.suffixes.size, 0),
      catalogueEntries: policy.catalogue.size,
      defaultEgress: policy.defaults.egress,
      torUpdates: policy.tor.enabled,
      nftRules: compiled.ruleset.chains.reduce((n, c) => n + c.rules.length, 0),
      nftSets: compiled.ruleset.sets.length,
    };
    const capabilities = capabilityCheck(policy, deps, facts);
    warnings.push(...capabilities.warnings);
    if (options.json) {
      const { problems, notes } = capabilities;
      deps.out(JSON.stringify({ ok: true, errors: [], warnings: toJson(warnings), summary, capabilities: { problems, notes } }, null, 2));
    } else {
      printIssues(deps, options.dir, warnings);
      printCapabilityCheck(deps, options.dir, { warnings: [], problems: capabilities.problems, notes: capabilities.notes });
      deps.err(
        `${options.dir}: valid — ${summary.files} files, ${summary.apps} apps, ${summary.systemDomains} system domains, ` +
          `${summary.globalDenyRules} global deny rules over ${summary.listNames} listed names, default ${summary.defaultEgress}, ` +
          `updates over Tor ${summary.torUpdates ? 'on' : 'off'}; ${summary.nftRules} nft rules in ${summary.nftSets} sets/maps` +
          (warnings.length ? `; ${warnings.length} warnings` : ''),
      );
    }
    return Exit.Ok;
  },
};
