/**
 * The parts egressd runs beside enforcement, in start order: the one place a
 * new part is added. Each can be turned off on the command line with
 * `--no-NAME` (run.ts), so a unit drop-in or `egressd --no-resolver` by hand
 * says which run on this host.
 */
import { appsPart } from '../apps/part.js';
import { firewallServicePart } from '../dbus/part.js';
import { denialParts } from '../denials/part.js';
import { resolverPart } from '../resolver/part.js';
import { torStatusPart } from '../tor/part.js';
import type { PartSpec } from './part.js';

export function defaultParts(): PartSpec[] {
  const denials = denialParts();
  return [resolverPart(), appsPart(), denials.reader, denials.keeper, firewallServicePart({ store: denials.store, feed: denials.feed }), torStatusPart()];
}
