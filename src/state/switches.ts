import { z } from 'zod';
import { writeFileAtomic } from './files.js';
import { readStateFile, type StateRead } from './read.js';

/**
 * The switches as the last apply set them, kept in the state directory
 * (switches.json) so that what starts before any table is in the kernel
 * (egressd-early at boot) and `status` can read them without inferring them
 * from chain names. The live table stays the authority on what is enforced:
 * readers that can see it compare, and say when the two disagree.
 */
export const SWITCHES_FILE = 'switches.json';

const switchSchema = z.object({ on: z.boolean(), since: z.iso.datetime() }).strict();
const switchesSchema = z
  .object({
    version: z.literal(1),
    lockdown: switchSchema,
    torUpdates: switchSchema,
    /** The apply that wrote the record: its marker chain's name (enforce/swap.ts) in the table it left. */
    apply: z.string().min(1),
  })
  .strict();

export type Switches = z.infer<typeof switchesSchema>;
export type Switch = z.infer<typeof switchSchema>;

export function readSwitches(stateDir: string): StateRead<Switches> {
  return readStateFile(stateDir, SWITCHES_FILE, switchesSchema);
}

/**
 * The record after an apply: a switch that kept its position keeps its
 * `since` from the record before (a damaged one counts as none).
 */
export function nextSwitches(previous: StateRead<Switches>, now: { lockdown: boolean; torUpdates: boolean }, apply: string, at: Date): Switches {
  const before = previous.state === 'ok' ? previous.value : undefined;
  const next = (on: boolean, was: Switch | undefined): Switch => (was && was.on === on ? was : { on, since: at.toISOString() });
  return { version: 1, lockdown: next(now.lockdown, before?.lockdown), torUpdates: next(now.torUpdates, before?.torUpdates), apply };
}

export function switchesText(switches: Switches): string {
  return `${JSON.stringify(switchesSchema.parse(switches), null, 2)}\n`;
}

export function writeSwitches(stateDir: string, switches: Switches): void {
  writeFileAtomic(stateDir, SWITCHES_FILE, switchesText(switches));
}
