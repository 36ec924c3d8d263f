/**
 * The one check every change passes before it reaches nft: each command
 * names the table this client owns (egressd's: `table inet egressd`), and
 * every set and chain a command declares or names has a plain identifier,
 * so no command — whoever built it — reaches another table. Jump targets and
 * `@set` references inside rules are not walked: they name the same
 * declared objects, which the compiler makes from policy names the schema
 * has already held to the naming rule. Also the element options nft JSON
 * cannot carry.
 */
import { describeCommand, namesOf, tableOf, type Command, type TableRef } from '../compile/ruleset.js';
import { EgressError, ErrorCode } from '../errors.js';

/** nft's identifier grammar (scanner.l), minus backslashes. */
const IDENTIFIER = /^[A-Za-z][A-Za-z0-9/_.-]*$/;

function refuse(message: string, details: readonly string[] = []): EgressError {
  return new EgressError(ErrorCode.NftApply, `${message} (nothing was sent to nft)`, { details });
}

export function checkName(kind: string, name: string): void {
  if (!IDENTIFIER.test(name)) throw refuse(`${kind} name ${JSON.stringify(name)} is not a plain nft identifier`);
}

/** nft JSON takes whole seconds; 0 would mean "no timeout", which a caller never means. */
export function checkTimeout(seconds: number): void {
  if (!Number.isSafeInteger(seconds) || seconds < 1) {
    throw refuse(`element timeout must be a whole number of seconds >= 1, got ${String(seconds)}`);
  }
}

/** Throws before anything is sent if one command names another table, a bad name or a bad timeout. */
export function guardTransaction(commands: readonly Command[], owner: TableRef): void {
  for (const c of commands) {
    const table = tableOf(c);
    // The types say inet; the guard checks what arrives, whatever a caller cast.
    // eslint-disable-next-line @typescript-eslint/no-unnecessary-condition
    if (table.family !== owner.family || table.name !== owner.name) {
      throw refuse(`a transaction may touch only table ${owner.family} ${owner.name}`, [`it holds: ${describeCommand(c)}`]);
    }
    checkName('table', table.name);
    for (const name of namesOf(c)) checkName('object', name);
    if ('elements' in c) for (const e of c.elements) if (e.timeout !== undefined) checkTimeout(e.timeout);
  }
}
