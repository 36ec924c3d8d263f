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
