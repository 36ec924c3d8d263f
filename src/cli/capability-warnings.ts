import { factsNeeded } from '../compile/compile.js';
import { formatIssue, sortIssues } from '../policy/issues.js';
import type { Policy } from '../policy/model.js';
import { checkCapabilities, type CapabilityCheck, type MemberFacts } from '../system/capabilities.js';
import { printIssues, type Deps } from './deps.js';

/**
 * Where a confined member still holds CAP_NET_RAW or CAP_NET_ADMIN
 * (system/capabilities.ts), for `check` and `status`: warnings, never a
 * change of exit status. Without `ids`, only the policy's user and group
 * names are looked up (no cgroup walk: the check reads each process's cgroup).
 */
export function capabilityCheck(policy: Policy, deps: Deps, ids?: MemberFacts): CapabilityCheck {
  if (!deps.capabilities) return { warnings: [], problems: [], notes: [] };
  return checkCapabilities(policy, ids ?? deps.facts({ ...factsNeeded(policy), cgroupDepth: 0 }), deps.capabilities);
}

/** A capability check for people: its warnings at file:line, then what it could not read, then what it did not look at. */
export function printCapabilityCheck(deps: Deps, dir: string, check: CapabilityCheck): void {
  printIssues(deps, dir, check.warnings);
  for (const problem of check.problems) deps.err(`warning: ${problem}`);
  for (const note of check.notes) deps.err(note);
}

/** The check as --json carries it: warnings in check's issue form, then problems and notes. */
export function capabilityCheckJson(dir: string, check: CapabilityCheck) {
  return {
    warnings: sortIssues(check.warnings).map((i) => ({
      file: i.at.file,
      line: i.at.line,
      col: i.at.col,
      message: i.message,
      ...(i.hint ? { hint: i.hint } : {}),
      text: formatIssue(i, dir),
    })),
    problems: check.problems,
    notes: check.notes,
  };
}
