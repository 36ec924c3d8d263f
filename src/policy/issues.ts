import type { Origin } from './model.js';

/** One problem found in a policy, as data; `formatIssue` prints it. */
export interface PolicyIssue {
  readonly severity: 'error' | 'warning';
  readonly at: Origin;
  readonly message: string;
  readonly hint?: string;
}

/**
 * `dir/file:line:col: message (hint)` — the form editors and CI logs link to.
 * Warnings say so; errors are the plain form.
 */
export function formatIssue(issue: PolicyIssue, dir?: string): string {
  const file = dir === undefined || issue.at.file.startsWith('/') ? issue.at.file : `${dir.replace(/\/+$/, '')}/${issue.at.file}`;
  const severity = issue.severity === 'warning' ? 'warning: ' : '';
  const hint = issue.hint ? ` (${issue.hint})` : '';
  return `${file}:${issue.at.line}:${issue.at.col}: ${severity}${issue.message}${hint}`;
}

/** Issues in a stable order: by file, then line, then column, errors first on ties. */
export function sortIssues(issues: readonly PolicyIssue[]): PolicyIssue[] {
  return [...issues].sort(
    (a, b) =>
      a.at.file.localeCompare(b.at.file) || a.at.line - b.at.line || a.at.col - b.at.col || (a.severity === b.severity ? 0 : a.severity === 'error' ? -1 : 1),
  );
}

/** The most of the input an issue quotes: a 1 MB value must not make a 1 MB error line. */
export const MAX_QUOTED = 80;

/** A piece of the input as an issue quotes it: at most MAX_QUOTED characters, "…" where it was cut. */
export function clip(text: string, max = MAX_QUOTED): string {
  if (text.length <= max) return text;
  // Never split a surrogate pair: half of one is not text.
  const end = text.charCodeAt(max - 1) >= 0xd800 && text.charCodeAt(max - 1) <= 0xdbff ? max - 1 : max;
  return `${text.slice(0, end)}…`;
}

/**
 * The longest message or hint an issue carries. Messages quote input through
 * clip; this bounds what is built around the quotes too (a YAML parser's
 * message, a list of known names), whatever the source.
 */
export const MAX_ISSUE_TEXT = 400;

/** The issue with its message and hint cut to MAX_ISSUE_TEXT characters. */
export function boundIssue(issue: PolicyIssue): PolicyIssue {
  if (issue.message.length <= MAX_ISSUE_TEXT && (issue.hint === undefined || issue.hint.length <= MAX_ISSUE_TEXT)) return issue;
  return { ...issue, message: clip(issue.message, MAX_ISSUE_TEXT), ...(issue.hint === undefined ? {} : { hint: clip(issue.hint, MAX_ISSUE_TEXT) }) };
}
