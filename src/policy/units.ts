/**
 * Where systemd runs a unit, as a cgroup path relative to the cgroup2 root:
 * the one place the compiler's `unit:` and `slice:` selectors, `explain
 * --app unit:NAME` and the schema's hints take it from. Pure: no I/O.
 */

/** systemd nests slices by name: "a-b.slice" lives in "a.slice". */
export function slicePath(slice: string): string {
  if (slice === '-.slice') return '';
  const parts = slice.replace(/\.slice$/, '').split('-');
  return parts.map((_, i) => `${parts.slice(0, i + 1).join('-')}.slice`).join('/');
}

/**
 * The cgroup a system unit runs in. With `slice`, there (what the unit's
 * `Slice=` says). Without, where systemd puts a unit whose file sets no
 * `Slice=` (unit_set_default_slice, src/core/unit.c): an instance of a
 * template in its template's own slice, `system-PREFIX.slice` with the
 * part before "@" escaped as a slice name (`getty@tty1.service` →
 * `system.slice/system-getty.slice/getty@tty1.service`); any other unit in
 * `system.slice`.
 */
export function unitCgroup(unit: string, slice?: string): string {
  const at = unit.indexOf('@');
  const parent = slicePath(slice ?? (at > 0 ? `system-${unitNameEscape(unit.slice(0, at))}.slice` : 'system.slice'));
  return parent ? `${parent}/${unit}` : unit;
}

/**
 * systemd's unit_name_escape (src/basic/unit-name.c): "/" becomes "-", and
 * every byte but [A-Za-z0-9:_.] — a leading "." too — becomes `\xNN`, so a
 * "-", which would nest the slice, is `\x2d`.
 */
export function unitNameEscape(text: string): string {
  let escaped = '';
  for (const [i, byte] of new TextEncoder().encode(text).entries()) {
    const char = String.fromCharCode(byte);
    if (char === '/') escaped += '-';
    else if ((i === 0 && char === '.') || !/^[A-Za-z0-9:_.]$/.test(char)) escaped += `\\x${byte.toString(16).padStart(2, '0')}`;
    else escaped += char;
  }
  return escaped;
}

/**
 * Why a unit name, well-formed as NAME.service or NAME.scope, can never
 * name a running unit, or undefined when it can: a template (`foo@.service`)
 * never runs, only its instances do; a scope has no instances (systemd
 * refuses "@" in its name); and an instance needs the template's name
 * before its "@". Such a member would match nothing and be let out.
 */
export function unitNameProblem(unit: string): { message: string; hint: string } | undefined {
  const at = unit.indexOf('@');
  if (at < 0) return undefined;
  const type = unit.slice(unit.lastIndexOf('.') + 1);
  if (type === 'scope')
    return { message: `"${unit}" can never run: a scope has no instances, and systemd refuses "@" in its name`, hint: 'name the scope as it runs' };
  if (at === 0) return { message: `"${unit}" names no template before its "@"`, hint: 'an instance is TEMPLATE@INSTANCE.service' };
  if (unit.slice(at) === `@.${type}`) {
    const prefix = unit.slice(0, at);
    const glob = unitCgroup(`${prefix}@*.${type}`);
    // YAML reads \xNN itself inside double quotes: a glob with systemd's escapes goes in single quotes.
    const every = glob.includes('\\') ? `'${glob}' (single quotes keep its backslashes)` : `"${glob}"`;
    return {
      message: `"${unit}" is a template, which never runs: only its instances do`,
      hint: `name an instance, e.g. ${prefix}@NAME.${type}, or match every instance by cgroup: cgroup: ${every}`,
    };
  }
  return undefined;
}
