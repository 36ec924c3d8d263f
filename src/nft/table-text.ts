/**
 * Whole-table replace as nft text.
 *
 * Tables go in as text, not JSON, because nft 1.0.6's JSON parser rejects
 * `socket cgroupv2` ("Invalid socket key value") while its text parser takes
 * it. The replace is ONE transaction:
 *
 *     add table F N        (so the delete below cannot fail on a fresh host)
 *     delete table F N     (the old table, its sets and chains)
 *     table F N { … }      (the new one)
 *
 * so the kernel swaps the table atomically with no window in between, and
 * nothing else in the ruleset is touched — never `flush ruleset`.
 */
import { EgressError, ErrorCode } from '../errors.js';
import type { NftFamily } from './types.js';

const FAMILIES: readonly NftFamily[] = ['ip', 'ip6', 'inet', 'arp', 'bridge', 'netdev'];
/** nft's identifier grammar (scanner.l), minus backslashes. */
const IDENTIFIER = /^[A-Za-z][A-Za-z0-9/_.-]*$/;

function refuse(message: string, details: readonly string[] = []): EgressError {
  return new EgressError(ErrorCode.NftApply, `${message} (nothing was sent to nft)`, { details });
}

export function checkFamily(family: string): asserts family is NftFamily {
  if (!(FAMILIES as readonly string[]).includes(family)) {
    throw refuse(`unknown nftables family ${JSON.stringify(family)}`);
  }
}

export function checkName(kind: string, name: string): void {
  if (!IDENTIFIER.test(name)) {
    throw refuse(`${kind} name ${JSON.stringify(name)} is not a plain nft identifier`);
  }
}

type Token = { readonly kind: 'word' | 'string' | 'punct'; readonly text: string; readonly line: number };

/** Just enough of nft's lexer to find the top-level structure: words, strings, braces, comments. */
function* tokens(text: string): Generator<Token> {
  let i = 0;
  let line = 1;
  while (i < text.length) {
    const c = text[i] as string;
    if (c === '\n') {
      line += 1;
      i += 1;
    } else if (c === ' ' || c === '\t' || c === '\r') {
      i += 1;
    } else if (c === '#') {
      while (i < text.length && text[i] !== '\n') i += 1;
    } else if (c === '"') {
      const end = text.indexOf('"', i + 1);
      const stop = end === -1 ? text.length : end + 1;
      const body = text.slice(i, stop);
      yield { kind: 'string', text: body, line };
      line += body.split('\n').length - 1;
      i = stop;
    } else if (c === '{' || c === '}' || c === ';') {
      yield { kind: 'punct', text: c, line };
      i += 1;
    } else if (c === '\\' && text[i + 1] === '\n') {
      line += 1;
      i += 2;
    } else {
      let j = i;
      while (j < text.length && !' \t\r\n#"{};'.includes(text[j] as string)) j += 1;
      yield { kind: 'word', text: text.slice(i, j), line };
      i = j;
    }
  }
}

/**
 * Checks that `tableText` is exactly one `table FAMILY NAME { … }` block for
 * the given table (comments and blank lines around it are fine), so that a
 * replace can never reach another table.
 */
export function checkTableText(family: NftFamily, name: string, tableText: string): void {
  const it = tokens(tableText);
  let depth = 0;
  const next = (): Token | undefined => {
    for (;;) {
      const r = it.next();
      if (r.done === true) return undefined;
      if (!(r.value.kind === 'punct' && r.value.text === ';' && depth === 0)) return r.value;
    }
  };
  const head = [next(), next(), next(), next()];
  const [kw, fam, nm, open] = head;
  const unquote = (t: Token | undefined) => (t?.kind === 'string' ? t.text.slice(1, -1) : t?.text);
  if (kw?.text !== 'table' || fam?.text !== family || unquote(nm) !== name || open?.text !== '{') {
    const seen = head
      .filter((t): t is Token => t !== undefined)
      .map((t) => t.text)
      .join(' ');
    throw refuse(`table text must start with "table ${family} ${name} {"`, [`it starts with: ${seen}`]);
  }
  depth = 1;
  for (let t = next(); t !== undefined; t = next()) {
    if (depth === 0) {
      throw refuse(`table text must hold only table ${family} ${name}`, [
        `line ${t.line}: "${t.text}" after the table's closing brace`,
      ]);
    }
    if (t.kind === 'punct' && t.text === '{') depth += 1;
    if (t.kind === 'punct' && t.text === '}') depth -= 1;
  }
  if (depth !== 0) throw refuse(`table text for ${family} ${name} has unbalanced braces`);
}

/**
 * The single-transaction text that replaces table F N with `tableText`. The
 * add and delete share the first line with the caller's text, so nft's error
 * line numbers are the caller's line numbers.
 */
export function replaceTableText(family: NftFamily, name: string, tableText: string): string {
  checkFamily(family);
  checkName('table', name);
  checkTableText(family, name, tableText);
  return `add table ${family} ${name}; delete table ${family} ${name}; ${tableText}\n`;
}
