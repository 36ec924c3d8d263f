/**
 * What the tattle-tale shows comes partly from others: names the resolver
 * learned for anyone's question, app and rule names from policy files, a
 * daemon's error text. Each goes out escaped for where it is shown.
 */

/** Control characters (C0, DEL, C1) would move a terminal's cursor or start an escape sequence: shown as \xNN. */
export function terminalSafe(text: string): string {
  // eslint-disable-next-line no-control-regex
  return text.replace(/[\u0000-\u001f\u007f-\u009f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}

const MARKUP: Readonly<Record<string, string>> = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };

/**
 * A notification's body may hold markup (the Desktop Notifications
 * specification: <b>, <a href>, <img>…, when the server has the "body-markup"
 * capability), so text in it is escaped as XML; control characters too.
 */
export function markupSafe(text: string): string {
  return terminalSafe(text).replace(/[&<>"']/g, (c) => MARKUP[c]!);
}
