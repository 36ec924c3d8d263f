/**
 * Subordinate ids: /etc/subuid and /etc/subgid, the ranges `newuidmap` and
 * `newgidmap` let a user map into a user namespace of its own (rootless
 * containers). A process there sends with the subordinate uid, so the
 * ranges belong to their owner's identity. Lines are `owner:start:count`,
 * the owner a user name or a uid; /etc/subgid's owners are users too.
 */
import type { PolicyIssue } from '../policy/issues.js';

/** uids and gids run to 2^32 - 2: (uid_t)-1 is "no id" and never mapped. */
const MAX_ID = 0xfffffffe;

/** One line of a subordinate-id file: the ids `from` to `to` (inclusive) belong to `owner`. */
export interface SubordinateLine {
  readonly owner: string;
  /** Its line number in its file (from 1). */
  readonly line: number;
  readonly from: number;
  readonly to: number;
}

/**
 * Parses one file. A bad line is skipped with a warning naming file:line
 * (never fatal: one typo must not stop every apply); blank lines and `#`
 * comments are skipped.
 */
export function parseSubordinate(text: string, file: string): { lines: SubordinateLine[]; warnings: PolicyIssue[] } {
  const lines: SubordinateLine[] = [];
  const warnings: PolicyIssue[] = [];
  text.split('\n').forEach((raw, index) => {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) return;
    const fields = line.split(':');
    const [owner = '', start = '', count = ''] = fields;
    const why =
      fields.length !== 3
        ? `${fields.length} field${fields.length === 1 ? '' : 's'}, not 3 (owner:start:count)`
        : owner === ''
          ? 'no owner'
          : !/^\d+$/.test(start) || !/^\d+$/.test(count)
            ? 'start and count must be decimal numbers'
            : Number(count) === 0
              ? 'a count of 0'
              : Number(start) + Number(count) - 1 > MAX_ID
                ? `the range passes ${MAX_ID}, the highest id`
                : undefined;
    if (why !== undefined) {
      warnings.push({ severity: 'warning', at: { file, line: index + 1, col: 1 }, message: `subordinate id line skipped: ${why}` });
      return;
    }
    lines.push({ owner, line: index + 1, from: Number(start), to: Number(start) + Number(count) - 1 });
  });
  return { lines, warnings };
}

/**
 * The lines of a user, as shadow's newuidmap finds them: written with its
 * name, with its uid, or with another name of the same uid (`uidOf` looks
 * such a name up; undefined for none). A name whose lookup failed may be
 * the user's: the answer is then that failure, naming the line.
 */
export function linesOf(
  lines: readonly SubordinateLine[],
  user: { name: string | undefined; uid: number },
  uidOf: (name: string) => number | undefined | { readonly error: string },
  file: string,
): SubordinateLine[] | { error: string } {
  const own: SubordinateLine[] = [];
  for (const line of lines) {
    if (line.owner === user.name) own.push(line);
    else if (/^\d+$/.test(line.owner)) {
      if (Number(line.owner) === user.uid) own.push(line);
    } else {
      const uid = uidOf(line.owner);
      if (typeof uid === 'object') return { error: `${file}:${line.line}: the owner ${line.owner} cannot be looked up: ${uid.error}` };
      if (uid === user.uid) own.push(line);
    }
  }
  return own;
}
