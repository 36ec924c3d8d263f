/**
 * What the last apply left in the kernel, kept in the state directory
 * (applied.json) so that the next apply need not read the live table whole.
 *
 * Reading the table is what made apply slow: nft fetches every set element
 * into its cache for any listing of rules, even a terse one (~1 s at 100,000
 * interval elements), while the names of chains, sets and maps list in
 * milliseconds. The record is trusted only when the live names are exactly
 * the ones it lists, its apply's marker chain among them: then the table is
 * the one that apply left (the resolver and the app tracker change elements
 * of dynamic sets, never names). Anything else — an interrupted apply,
 * chains or sets added or removed by hand, another state directory, a
 * damaged file — and apply reads the table whole, as before. The record
 * vouches for names, not elements: elements of static sets changed by hand
 * are seen by `plan` and `status`, which read the table, and repaired by
 * `apply --reread`.
 */
import { z } from 'zod';
import { removeFileDurably } from '../state/files.js';
import { readStateFile } from '../state/read.js';
import { idsOfComment, type TableSummary } from './summary.js';
import type { Generation } from './swap.js';

export const RECORD_FILE = 'applied.json';

export interface AppliedRecord {
  readonly generation: Generation;
  /** Every chain, set and map the apply left, as swap.ts's nameList writes them. */
  readonly names: readonly string[];
  /** The summary of the compiled ruleset that apply switched in. */
  readonly summary: TableSummary;
}

const ruleSummary = z.object({ comment: z.string(), id: z.string(), drops: z.boolean() }).strict();
const setSummary = z.object({ kind: z.enum(['set', 'map']), dynamic: z.boolean(), size: z.number().int().nonnegative(), contents: z.string() }).strict();
const recordSchema = z
  .object({
    version: z.literal(1),
    generation: z.enum(['a', 'b']),
    names: z.array(z.string()),
    summary: z
      .object({
        digest: z.string().optional(),
        lockdown: z.boolean(),
        chains: z.array(z.tuple([z.string(), z.array(ruleSummary)])),
        sets: z.array(z.tuple([z.string(), setSummary])),
      })
      .strict(),
  })
  .strict();

export function recordText(record: AppliedRecord): string {
  const { summary } = record;
  return `${JSON.stringify({
    version: 1,
    generation: record.generation,
    names: record.names,
    summary: {
      ...(summary.digest === undefined ? {} : { digest: summary.digest }),
      lockdown: summary.lockdown,
      chains: [...summary.chains].map(([name, rules]) => [name, rules.map((r) => ({ comment: r.comment, id: r.id, drops: r.drops }))]),
      sets: [...summary.sets],
    },
  })}\n`;
}

/** The record, or undefined when there is none or it cannot be trusted to be ours (then apply reads the table). */
export function readRecord(stateDir: string): AppliedRecord | undefined {
  // Absent or damaged alike: the record only spares apply a read of the table, which it then does.
  const read = readStateFile(stateDir, RECORD_FILE, recordSchema);
  if (read.state !== 'ok') return undefined;
  const parsed = read.value;
  const { summary } = parsed;
  return {
    generation: parsed.generation,
    names: parsed.names,
    summary: {
      digest: summary.digest,
      lockdown: summary.lockdown,
      chains: new Map(
        summary.chains.map(([name, rules]) => [
          name,
          rules.map((r) => ({ ...r, shortId: idsOfComment(r.comment).shortId, packets: undefined, bytes: undefined })),
        ]),
      ),
      sets: new Map(summary.sets),
    },
  };
}

/** After an apply that could not finish its clean-up: the table holds more than any record says. */
export function forgetRecord(stateDir: string): void {
  removeFileDurably(stateDir, RECORD_FILE);
}
