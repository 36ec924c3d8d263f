import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join, posix } from 'node:path';

/**
 * What `egressctl tor enable` writes, as text, and how it reads what is
 * there already (apt's configuration, Tor's). Pure but for the reads: the
 * switch (switch.ts) decides when to write.
 */

/** Every file egressd writes starts with this: a file without it is someone else's. */
export const MARK = 'Written by egressd ("egressctl tor enable")';

export const POLICY_DROP_IN = '90-tor.yaml';
export const APT_CONF_DIR = '/etc/apt/apt.conf.d';
export const APT_DROP_IN = `${APT_CONF_DIR}/80egressd-tor`;
export const APT_MAIN = '/etc/apt/apt.conf';
export const SYSTEMD_DROP_IN_NAME = 'egressd-tor.conf';
export const TORRC = '/etc/tor/torrc';
/** Debian's tor.service reads these defaults before torrc. */
export const TOR_DEFAULTS = '/usr/share/tor/tor-service-defaults-torrc';
export const TOR_SNIPPET_NAME = 'egressd-tor.conf';
export const TOR_BINARIES: readonly string[] = ['/usr/bin/tor', '/usr/sbin/tor'];
/** Any password: Tor isolates by the pair (IsolateSOCKSAuth), and the username says whose circuit it is. */
const SOCKS_PASSWORD = 'tor';

/**
 * The updaters `--updaters` names, how each is reached, and the policy
 * identity (policies/50-tor-updates.yaml) that confinement applies to.
 * apt's front-ends read apt's configuration; the others get the proxy
 * through their units' environment.
 */
export interface Updater {
  readonly name: string;
  /** The identity in the shipped policy. */
  readonly identity: string;
  /** Reads apt's configuration (apt.conf.d): its downloads go through apt's methods as _apt. */
  readonly viaApt: boolean;
  /** Units whose environment carries the proxy (libcurl, GLib and most HTTP clients read it). */
  readonly units: readonly string[];
}

export const UPDATERS: readonly Updater[] = [
  { name: 'apt', identity: 'apt', viaApt: true, units: [] },
  { name: 'packagekit', identity: 'packagekit', viaApt: true, units: ['packagekit.service'] },
  { name: 'unattended-upgrades', identity: 'unattended-upgrades', viaApt: true, units: [] },
  { name: 'fwupd', identity: 'fwupd', viaApt: false, units: ['fwupd.service', 'fwupd-refresh.service'] },
  { name: 'flatpak', identity: 'flatpak-system', viaApt: false, units: ['flatpak-system-helper.service'] },
];
export const DEFAULT_UPDATERS: readonly string[] = UPDATERS.map((u) => u.name);

export interface Socks {
  readonly host: string;
  readonly port: number;
  readonly family: 4 | 6;
}

/** "127.0.0.1:9050" or "[::1]:9050" as written in the policy. */
export function socksText(socks: Socks): string {
  return socks.family === 6 ? `[${socks.host}]:${socks.port}` : `${socks.host}:${socks.port}`;
}

/** socks5h: names are resolved by Tor at the exit, never by this machine's resolver. */
export function proxyUrl(socks: Socks, who: string): string {
  return `socks5h://egressd-${who}:${SOCKS_PASSWORD}@${socksText(socks)}`;
}

export function policyDropInText(socks: Socks, updaters: readonly Updater[]): string {
  return [
    `# ${MARK}: updates over Tor.`,
    '# The updaters below may reach only Tor\'s SOCKS port; "egressctl tor disable"',
    '# puts back what was here before.',
    'tor:',
    '  enabled: true',
    `  socks: "${socksText(socks)}"`,
    `  updaters: [${updaters.map((u) => u.identity).join(', ')}]`,
    '',
  ].join('\n');
}

/**
 * apt's configuration, read by every front-end (apt, apt-get, PackageKit's
 * apt back-end, unattended-upgrades, apt-daily): http and https through
 * Tor, and no SRV lookups, which would ask this machine's resolver before
 * connecting. apt's own command-line programs get credentials of their own
 * (apt's Binary:: scope); the library front-ends share one, since apt reads
 * nothing per process that a drop-in could key on.
 */
export function aptDropInText(socks: Socks): string {
  const library = proxyUrl(socks, 'apt-frontends');
  const cli = proxyUrl(socks, 'apt');
  return [
    `// ${MARK}: apt's update checks and downloads go through`,
    "// Tor's SOCKS port; socks5h: names resolve inside Tor, never here. Each user name",
    '// (IsolateSOCKSAuth) gets a Tor circuit of its own. "egressctl tor disable" removes this file.',
    `Acquire::http::Proxy "${library}";`,
    `Acquire::https::Proxy "${library}";`,
    `Binary::apt::Acquire::http::Proxy "${cli}";`,
    `Binary::apt::Acquire::https::Proxy "${cli}";`,
    `Binary::apt-get::Acquire::http::Proxy "${cli}";`,
    `Binary::apt-get::Acquire::https::Proxy "${cli}";`,
    'Acquire::EnableSrvRecords "false";',
    '',
  ].join('\n');
}

/** The proxy in a unit's environment, under every name the common HTTP clients read (curl reads only lowercase http_proxy). */
export function systemdDropInText(socks: Socks, updater: Updater, unit: string): string {
  const url = proxyUrl(socks, updater.name);
  const names = ['ALL_PROXY', 'all_proxy', 'HTTPS_PROXY', 'https_proxy', 'HTTP_PROXY', 'http_proxy'];
  return [
    `# ${MARK}: ${unit} (${updater.name}) fetches`,
    "# through Tor's SOCKS port, names resolved inside Tor, on a circuit of its own.",
    '# "egressctl tor disable" removes this file.',
    '[Service]',
    `Environment=${names.map((n) => `"${n}=${url}"`).join(' ')}`,
    'Environment=NO_PROXY= no_proxy=',
    '',
  ].join('\n');
}

/**
 * Tor's side, for a torrc that includes drop-ins: a SOCKS port that gives
 * each SOCKS user name, client, protocol and destination its own circuit,
 * and a control socket with cookie authentication for `tor status`.
 *
 * Only that SOCKS port. A SocksPort in torrc replaces all of the defaults'
 * SocksPort lines, and they are not carried over: each is a way onto the
 * network for every local program, Debian's `unix:/run/tor/socks
 * WorldWritable` one that netfilter never sees, and egressd's table treats
 * only the policy's port as network (compile.ts, loopbackExceptions).
 */
export function torSnippetText(socks: Socks, control: ControlSettings): string {
  return [
    `# ${MARK}: the SOCKS port updaters use,`,
    '# one circuit per updater; the control socket `egressctl tor status` reads.',
    '# The only SOCKS port: any other would let every local program out through Tor.',
    '# "egressctl tor disable" removes this file.',
    `SocksPort ${socksText(socks)} IsolateClientAddr IsolateSOCKSAuth IsolateClientProtocol IsolateDestPort IsolateDestAddr`,
    `ControlSocket ${control.socket} GroupWritable RelaxDirModeCheck`,
    'CookieAuthentication 1',
    `CookieAuthFile ${control.cookieFile}`,
    'CookieAuthFileGroupReadable 1',
    '',
  ].join('\n');
}

export interface ControlSettings {
  readonly socket: string;
  readonly cookieFile: string;
}
/** Debian's tor.service defaults. */
export const DEBIAN_CONTROL: ControlSettings = { socket: '/run/tor/control', cookieFile: '/run/tor/control.authcookie' };

// ---------------------------------------------------------------------------
// apt's configuration, read

/** One setting: its full key, lower-cased (apt's keys are not case-sensitive), where it was written. */
export interface AptSetting {
  readonly key: string;
  readonly value: string;
  readonly file: string;
  readonly line: number;
}

/**
 * apt.conf syntax: `a::b "v";`, scopes `a { b "v"; };`, comments `//`,
 * `/* … *\/` and `#` (but for #include and #clear). Enough to find what
 * a file sets; values are not unescaped.
 */
export function parseAptConf(text: string, file: string): AptSetting[] {
  const settings: AptSetting[] = [];
  const scopes: string[] = [];
  let i = 0;
  let line = 1;
  let word = '';
  let wordLine = 1;
  const flushWord = () => {
    const w = word.trim();
    word = '';
    return w;
  };
  while (i < text.length) {
    const c = text[i]!;
    if (c === '\n') line++;
    if (c === '/' && text[i + 1] === '/') {
      while (i < text.length && text[i] !== '\n') i++;
      continue;
    }
    if (c === '/' && text[i + 1] === '*') {
      const end = text.indexOf('*/', i + 2);
      const stop = end < 0 ? text.length : end + 2;
      line += (text.slice(i, stop).match(/\n/g) ?? []).length;
      i = stop;
      continue;
    }
    if (c === '#' && word.trim() === '') {
      while (i < text.length && text[i] !== '\n') i++;
      continue;
    }
    if (c === '"') {
      const end = text.indexOf('"', i + 1);
      const stop = end < 0 ? text.length : end;
      const value = text.slice(i + 1, stop);
      const key = flushWord();
      const full = [...scopes, key].filter((k) => k !== '').join('::');
      if (full !== '') settings.push({ key: full.toLowerCase(), value, file, line: wordLine });
      line += (value.match(/\n/g) ?? []).length;
      i = stop + 1;
      continue;
    }
    if (c === '{') {
      scopes.push(flushWord());
      i++;
      continue;
    }
    if (c === '}') {
      flushWord();
      scopes.pop();
      i++;
      continue;
    }
    if (c === ';') {
      flushWord();
      i++;
      continue;
    }
    if (word.trim() === '' && !/\s/.test(c)) wordLine = line;
    word += c;
    i++;
  }
  return settings;
}

/** Keys that decide where apt's http and https methods connect. */
const PROXY_KEY = /^(?:binary::[^:]+::)?acquire::(?:https?|ftp|socks)::(?:proxy(?:::.*)?|proxy-auto-detect|proxyautodetect)$/;

/** Proxy settings apt already has, in apt.conf and apt.conf.d (but for `skip`, egressd's own file). */
export function existingAptProxies(root: string, skip: string): AptSetting[] {
  const files: string[] = [APT_MAIN];
  try {
    for (const name of readdirSync(join(root, APT_CONF_DIR)).sort()) {
      // What apt reads (apt.conf(5)): names of these characters with no extension or ".conf"; "01proxy.dpkg-old" it ignores.
      if (!/^[\w.-]+$/.test(name)) continue;
      const dot = name.lastIndexOf('.');
      if (dot >= 0 && name.slice(dot) !== '.conf') continue;
      files.push(posix.join(APT_CONF_DIR, name));
    }
  } catch {
    // No apt.conf.d: nothing there.
  }
  const found: AptSetting[] = [];
  for (const file of files) {
    if (file === skip) continue;
    let text: string;
    try {
      if (!statSync(join(root, file)).isFile()) continue;
      text = readFileSync(join(root, file), 'utf8');
    } catch {
      continue;
    }
    for (const setting of parseAptConf(text, file)) if (PROXY_KEY.test(setting.key)) found.push(setting);
  }
  return found;
}

// ---------------------------------------------------------------------------
// Tor's configuration, read

export interface TorrcLine {
  readonly key: string;
  readonly value: string;
  readonly file: string;
}

/** torrc's lines (keyword, value; keywords are not case-sensitive), with `%include` kept as key "%include". */
export function parseTorrc(text: string, file: string): TorrcLine[] {
  const lines: TorrcLine[] = [];
  for (const raw of text.split('\n')) {
    const line = raw.replace(/#.*$/, '').trim();
    if (line === '') continue;
    const match = /^(\S+)\s*(.*)$/.exec(line);
    if (match) lines.push({ key: match[1]!.toLowerCase(), value: match[2]!.trim(), file });
  }
  return lines;
}

export interface TorConfig {
  /** The directory torrc includes (`%include DIR` or `%include DIR/*.conf`), where a snippet takes effect; undefined when none. */
  readonly dropInDir: string | undefined;
  /** The snippet's path there. */
  readonly snippet: string | undefined;
  /** The effective SocksPort values (torrc and what it includes replace the defaults' list). */
  readonly socksPorts: readonly string[];
  /** The SocksPort lines torrc itself (not a snippet of ours) sets. */
  readonly torrcSetsSocks: readonly TorrcLine[];
  /** Tor's other listeners that carry a local program's traffic or names out (TransPort, NATDPort, HTTPTunnelPort, DNSPort), as "Key value". */
  readonly otherListeners: readonly string[];
  readonly control: ControlSettings | { readonly host: string; readonly port: number; readonly cookieFile: string } | undefined;
}

function readText(root: string, path: string): string | undefined {
  try {
    return readFileSync(join(root, path), 'utf8');
  } catch {
    return undefined;
  }
}

/** Files an `%include` names: a directory's files (not dot files), a glob's matches, or the file. */
function included(root: string, value: string): { files: string[]; dir: string | undefined; pattern: RegExp | undefined } {
  const path = value.replace(/^"|"$/g, '');
  const star = path.lastIndexOf('*');
  if (star >= 0) {
    const dir = posix.dirname(path);
    const pattern = new RegExp(
      `^${posix
        .basename(path)
        .replace(/[.+?^${}()|[\]\\]/g, '\\$&')
        .replace(/\*/g, '.*')}$`,
    );
    return {
      files: listDir(root, dir)
        .filter((n) => pattern.test(n))
        .map((n) => posix.join(dir, n)),
      dir,
      pattern,
    };
  }
  try {
    if (statSync(join(root, path)).isDirectory()) return { files: listDir(root, path).map((n) => posix.join(path, n)), dir: path, pattern: undefined };
  } catch {
    // A file that is not there yet, or a path that is no directory: a plain include.
  }
  if (path.endsWith('/')) return { files: [], dir: path.replace(/\/+$/, ''), pattern: undefined };
  return { files: [path], dir: undefined, pattern: undefined };
}

function listDir(root: string, dir: string): string[] {
  try {
    return readdirSync(join(root, dir))
      .filter((n) => !n.startsWith('.'))
      .sort();
  } catch {
    return [];
  }
}

/**
 * What Tor will use, as far as the switch needs it: torrc (and what it
 * includes) over Debian's service defaults, where an option set in torrc
 * replaces all of the defaults' lines for it.
 */
export function readTorConfig(root: string): TorConfig {
  const defaults = parseTorrc(readText(root, TOR_DEFAULTS) ?? '', TOR_DEFAULTS);
  const main = parseTorrc(readText(root, TORRC) ?? '', TORRC);
  let dropInDir: string | undefined;
  let snippet: string | undefined;
  const all: TorrcLine[] = [];
  for (const line of main) {
    if (line.key !== '%include') {
      all.push(line);
      continue;
    }
    const inc = included(root, line.value);
    if (inc.dir !== undefined && dropInDir === undefined && (inc.pattern === undefined || inc.pattern.test(TOR_SNIPPET_NAME))) {
      dropInDir = inc.dir;
      snippet = posix.join(inc.dir, TOR_SNIPPET_NAME);
    }
    for (const file of inc.files) all.push(...parseTorrc(readText(root, file) ?? '', file));
  }
  const pick = (key: string) => {
    const set = all.filter((l) => l.key === key);
    return set.length > 0 ? set : defaults.filter((l) => l.key === key);
  };
  const socksPorts = pick('socksport').map((l) => l.value);
  const cookieFile = pick('cookieauthfile')[0]?.value ?? '/var/lib/tor/control_auth_cookie';
  const cookieOn = pick('cookieauthentication')[0]?.value === '1';
  const socket = pick('controlsocket')[0]
    ?.value.split(/\s+/)[0]
    ?.replace(/^unix:/, '');
  const port = pick('controlport')[0]?.value.split(/\s+/)[0];
  let control: TorConfig['control'];
  if (cookieOn && socket && socket !== '0') control = { socket, cookieFile };
  else if (cookieOn && port && port !== '0') {
    const m = /^(?:(.+):)?(\d+)$/.exec(port);
    if (m) control = { host: m[1] ?? '127.0.0.1', port: Number(m[2]), cookieFile };
  }
  return {
    dropInDir,
    snippet,
    socksPorts,
    torrcSetsSocks: all.filter((l) => l.key === 'socksport' && l.file !== snippet),
    otherListeners: OTHER_LISTENERS.flatMap(([key, name]) =>
      pick(key)
        .map((l) => l.value)
        .filter((value) => !/^0(\s|$)/.test(value))
        .map((value) => `${name} ${value}`),
    ),
    control,
  };
}

/** Tor's listeners besides SocksPort through which a local program's traffic or lookups leave, by lower-cased key. */
const OTHER_LISTENERS: readonly (readonly [string, string])[] = [
  ['transport', 'TransPort'],
  ['natdport', 'NATDPort'],
  ['httptunnelport', 'HTTPTunnelPort'],
  ['dnsport', 'DNSPort'],
];

/** The address:port a SocksPort value listens on (Tor's defaults: 127.0.0.1 for a bare port), or undefined for unix sockets and "0". */
export function socksPortAddress(value: string): { host: string; port: number } | undefined {
  const first = value.split(/\s+/)[0] ?? '';
  if (first.startsWith('unix:') || first === '0' || first.toLowerCase() === 'auto') return undefined;
  if (/^\d+$/.test(first)) return { host: '127.0.0.1', port: Number(first) };
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(first);
  if (!m) return undefined;
  const host = m[1] ?? m[2]!;
  return { host: host === 'localhost' ? '127.0.0.1' : host, port: Number(m[3]) };
}

/** Whether a SocksPort value turns stream isolation by SOCKS credentials off. */
export function isolatesBySocksAuth(value: string): boolean {
  return !/\bNoIsolateSOCKSAuth\b/i.test(value);
}
