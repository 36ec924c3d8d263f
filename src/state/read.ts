import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { z } from 'zod';

/** A state file read back: missing, or damaged (said how, never trusted), or its content. */
export type StateRead<T> = { readonly state: 'absent' } | { readonly state: 'damaged'; readonly problem: string } | { readonly state: 'ok'; readonly value: T };

/** Reads and validates one JSON state file; only a file that is not there is "absent". */
export function readStateFile<S extends z.ZodType>(dir: string, name: string, schema: S): StateRead<z.infer<S>> {
  let text: string;
  try {
    text = readFileSync(join(dir, name), 'utf8');
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return { state: 'absent' };
    return { state: 'damaged', problem: `cannot read ${name}: ${(error as Error).message}` };
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (error) {
    return { state: 'damaged', problem: `${name} is not JSON: ${(error as Error).message}` };
  }
  const parsed = schema.safeParse(json);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    return {
      state: 'damaged',
      problem: `${name} is not as egressd writes it: ${issue ? `${issue.message}${issue.path.length ? ` at ${issue.path.join('.')}` : ''}` : 'invalid'}`,
    };
  }
  return { state: 'ok', value: parsed.data };
}
