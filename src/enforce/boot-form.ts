import { compile, refuseCompileErrors } from '../compile/compile.js';
import { renderText, type Ruleset, type SetDecl } from '../compile/ruleset.js';
import type { Policy } from '../policy/model.js';
import type { RuleIdEntry } from '../compile/rule-ids.js';

/**
 * The ruleset egressd-early loads at boot (systemd/egressd-early.sh), kept
 * beside last-good.nft by every apply.
 *
 * nft resolves a `socket cgroupv2` element's path to the cgroup's id when it
 * loads it, and refuses the whole file when one path does not exist. At boot,
 * before network-pre.target, the cgroups of most units a policy names do not
 * exist yet, so last-good.nft itself would be refused whole and nothing would
 * be enforced until egressd's first apply (measured: test/boot/boot-form.test.ts).
 * The boot form is last-good with the elements of its cgroup sets and maps
 * left out, and nothing else changed: the default verdict, the uid and gid
 * identities (system domains by user included), the address lists, lockdown
 * and the Tor rules all hold from boot. What a cgroup identity would have
 * decided falls to the default verdict until egressd applies and its app
 * tracker adds the cgroups as they appear — under a default deny, denied.
 * Allows that end at a time (`allowed:` with `until`) are left out too.
 */
export const BOOT_FORM_FILE = 'last-good-boot.nft';

function withoutCgroups(set: SetDecl): SetDecl {
  if (typeof set.key === 'string' || set.elements.length === 0) return set;
  return { ...set, elements: [], ...(set.verdicts && { verdicts: [] }) };
}

/**
 * The short ids of the policy's rules that end at a time (`allowed:` entries
 * with `until`): the boot form leaves them out. Nothing takes a rule out of
 * the kernel but an apply, and at boot (or after a stop) the allow may have
 * ended long ago; without them the boot form only allows less, and
 * egressd's first apply puts back those still in time.
 */
export function timeLimitedRules(policy: Policy, ruleIds: readonly RuleIdEntry[]): Set<string> {
  const ending = new Set(policy.apps.flatMap((app) => app.rules.filter((rule) => rule.until !== undefined).map((rule) => rule.id)));
  return new Set(ruleIds.filter((entry) => ending.has(entry.ruleId)).map((entry) => entry.id));
}

/** `leaveOut`: short ids (timeLimitedRules) whose rules the boot form drops; a rule's comment starts with its short id. */
export function bootForm(ruleset: Ruleset, leaveOut: ReadonlySet<string> = new Set()): Ruleset {
  const chains =
    leaveOut.size === 0
      ? ruleset.chains
      : ruleset.chains.map((chain) => ({ ...chain, rules: chain.rules.filter((rule) => !leaveOut.has(rule.comment?.split(' ', 1)[0] ?? '')) }));
  return { ...ruleset, sets: ruleset.sets.map(withoutCgroups), chains };
}

export function bootFormText(ruleset: Ruleset, leaveOut?: ReadonlySet<string>): string {
  return renderText(bootForm(ruleset, leaveOut));
}

/**
 * What egressd-early loads when there is no last good ruleset (egressd never
 * applied on this machine): the shipped policy compiled with no facts of any
 * machine — no user, group or cgroup looked up — so it names nothing that
 * could be another machine's, and can be built once and shipped
 * (systemd/egressd-failsafe.nft). Throws where the policy needs a fact (a
 * system domain member that must exist): such a policy has no fail-safe form.
 */
export function failsafeText(policy: Policy): string {
  const compiled = compile(policy, { users: new Map(), groups: new Map(), cgroups: [] }, { lockdown: false });
  refuseCompileErrors(compiled, 'the shipped policy (fail-safe form)');
  return bootFormText(compiled.ruleset);
}
