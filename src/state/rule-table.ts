import { z } from 'zod';
import { RULE_KINDS, SHORT_ID, type RuleIdEntry } from '../compile/rule-ids.js';
import { writeFileAtomic } from './files.js';
import { readStateFile, type StateRead } from './read.js';

/**
 * The short-id table of the policy last applied (rules.json, beside
 * last-good.nft): how the denial reader, `status` and `explain` map a log
 * prefix or a counter's short id back to its rule, in any later process.
 */
export const RULES_FILE = 'rules.json';

const entrySchema = z
  .object({
    id: z.string().regex(SHORT_ID),
    ruleId: z.string().min(1),
    kind: z.enum(RULE_KINDS),
    verdict: z.enum(['allow', 'deny']),
    file: z.string().optional(),
    line: z.number().int().positive().optional(),
    app: z.string().optional(),
    domain: z.string().optional(),
  })
  .strict();

const tableSchema = z.object({ version: z.literal(1), digest: z.string(), rules: z.array(entrySchema) }).strict();

export interface RuleTable {
  /** The policy digest the table was compiled from. */
  readonly digest: string;
  readonly rules: readonly RuleIdEntry[];
}

export function ruleTableText(table: RuleTable): string {
  return `${JSON.stringify({ version: 1, digest: table.digest, rules: table.rules }, null, 1)}\n`;
}

export function readRuleTable(stateDir: string): StateRead<RuleTable & { byId: ReadonlyMap<string, RuleIdEntry> }> {
  const read = readStateFile(stateDir, RULES_FILE, tableSchema);
  if (read.state !== 'ok') return read;
  const rules = read.value.rules.map(({ file, line, app, domain, ...entry }): RuleIdEntry => ({
    ...entry,
    ...(file !== undefined && { file }),
    ...(line !== undefined && { line }),
    ...(app !== undefined && { app }),
    ...(domain !== undefined && { domain }),
  }));
  return { state: 'ok', value: { digest: read.value.digest, rules, byId: new Map(rules.map((entry) => [entry.id, entry])) } };
}

export function writeRuleTable(stateDir: string, table: RuleTable): void {
  writeFileAtomic(stateDir, RULES_FILE, ruleTableText(table));
}
