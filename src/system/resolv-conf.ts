import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  closeSync,
  fchmodSync,
  fchownSync,
  fsyncSync,
  ftruncateSync,
  lchownSync,
  lstatSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  renameSync,
  rmdirSync,
  rmSync,
  statSync,
  symlinkSync,
  writeSync,
} from 'node:fs';
import { isIP } from 'node:net';
import { dirname, join, posix } from 'node:path';
import { z } from 'zod';
import { EgressError, ErrorCode } from '../errors.js';
import { removeFileDurably, syncDirectory, tempName, writeFileAtomic } from '../state/files.js';
import { readStateFile } from '../state/read.js';

/**
 * Pointing the machine at egressd's resolver, and back: /etc/resolv.conf, or
 * with systemd-resolved in charge a drop-in that makes resolved forward every
 * name (`Domains=~.`) to egressd. What was there is recorded in the state
 * directory before anything changes, so that `disable` puts back exactly
 * that: the same bytes, mode and owner, a symlink as the same symlink, a
 * drop-in that was not there gone. Every path is taken under `root`, so that
 * tests (and installers preparing an image) work on a directory tree.
 */

export const RESOLV_CONF = '/etc/resolv.conf';
export const DROP_IN = '/etc/systemd/resolved.conf.d/egressd.conf';
/** systemd-resolved's own files: a resolv.conf linked in here is resolved's. */
export const RESOLVED_RUN_DIR = '/run/systemd/resolve';
/** The upstream servers resolved uses, as it publishes them (never its stub). */
export const RESOLVED_UPSTREAMS = '/run/systemd/resolve/resolv.conf';
/** resolved's stub listeners: a resolv.conf naming only these is resolved's too. */
export const RESOLVED_STUBS: readonly string[] = ['127.0.0.53', '127.0.0.54'];
/** Where the resolver listens unless the policy's `dns.listen` says otherwise (BRIEF18 DnsSettings). */
export const DEFAULT_LISTEN: readonly string[] = ['127.0.0.153', '::1'];
export const DNS_RECORD_FILE = 'dns-enable.json';

const STATIC_STUBS = ['/usr/lib/systemd/resolv.conf', '/lib/systemd/resolv.conf'];

// ---------------------------------------------------------------------------
// resolv.conf, read

/** One `nameserver` as "ADDR" or "ADDR#PORT" (scope id kept: "fe80::1%eth0"), the form DnsSettings.upstreams takes. */
export interface Nameserver {
  readonly address: string;
  readonly port: number;
  /** "ADDR" for port 53, else "ADDR#PORT". */
  readonly text: string;
}

export interface ParsedResolvConf {
  readonly nameservers: readonly Nameserver[];
  /** `search`, `domain`, `options` and `sortlist` lines as written: carried into the resolv.conf egressd writes. */
  readonly keep: readonly string[];
  /** Lines that were ignored, and why ("line 4: …"). */
  readonly notes: readonly string[];
}

const KNOWN_KEYWORDS = new Set(['search', 'domain', 'options', 'sortlist']);

/**
 * glibc's reading of resolv.conf, plus the forms other resolvers write:
 * a port as "ADDR#PORT" (systemd-resolved's DNS=) or "[ADDR]:PORT", and
 * IPv6 scope ids ("fe80::1%eth0"). A comment starts a line with # or ;.
 */
export function parseResolvConf(text: string): ParsedResolvConf {
  const nameservers: Nameserver[] = [];
  const keep: string[] = [];
  const notes: string[] = [];
  text.split('\n').forEach((raw, index) => {
    const line = raw.replace(/\r$/, '').trim();
    if (line === '' || line.startsWith('#') || line.startsWith(';')) return;
    const [keyword, ...args] = line.split(/\s+/);
    if (keyword === 'nameserver') {
      const parsed = args[0] === undefined ? undefined : parseNameserver(args[0]);
      if (!parsed) notes.push(`line ${index + 1}: ignored: ${JSON.stringify(raw.slice(0, 120))} (not an address, "ADDR#PORT" or "[ADDR]:PORT")`);
      else nameservers.push(parsed);
      return;
    }
    if (keyword !== undefined && KNOWN_KEYWORDS.has(keyword)) keep.push(line);
    else notes.push(`line ${index + 1}: ignored: ${JSON.stringify(raw.slice(0, 120))} (not a resolv.conf keyword)`);
  });
  return { nameservers, keep, notes };
}

export function parseNameserver(text: string): Nameserver | undefined {
  let host = text;
  let portText: string | undefined;
  const bracketed = /^\[([^\]]+)\](?::(\d+))?$/.exec(text);
  const hashed = /^(.+)#(\d+)$/.exec(text);
  if (bracketed) {
    host = bracketed[1]!;
    portText = bracketed[2];
  } else if (hashed) {
    host = hashed[1]!;
    portText = hashed[2];
  } else if (/^[\d.]+:\d+$/.test(text)) {
    [host, portText] = text.split(':') as [string, string];
  }
  const percent = host.indexOf('%');
  const bare = percent >= 0 ? host.slice(0, percent) : host;
  const scope = percent >= 0 ? host.slice(percent + 1) : undefined;
  const family = isIP(bare);
  if (family === 0) return undefined;
  if (scope !== undefined && (family !== 6 || !/^[\w.-]{1,15}$/.test(scope))) return undefined;
  const port = portText === undefined ? 53 : Number(portText);
  if (!Number.isInteger(port) || port < 1 || port > 65535) return undefined;
  const address = scope === undefined ? bare : `${bare}%${scope}`;
  return { address, port, text: port === 53 ? address : `${address}#${port}` };
}

// ---------------------------------------------------------------------------
// What is there: snapshots of a path

export const fileState = z.discriminatedUnion('kind', [
  z.object({ kind: z.literal('absent') }).strict(),
  z
    .object({
      kind: z.literal('file'),
      /** The bytes, base64: restored exactly, whatever the encoding. */
      content: z.string(),
      sha256: z.string().regex(/^[0-9a-f]{64}$/),
      mode: z.number().int().min(0).max(0o7777),
      uid: z.number().int().min(0),
      gid: z.number().int().min(0),
    })
    .strict(),
  z
    .object({
      kind: z.literal('symlink'),
      target: z.string().min(1),
      uid: z.number().int().min(0),
      gid: z.number().int().min(0),
      /** What the link led to when it was recorded (base64), or null: the upstreams' fallback once the target is gone. */
      through: z.string().nullable(),
    })
    .strict(),
]);
export type FileState = z.infer<typeof fileState>;

const recordSchema = z
  .object({
    version: z.literal(1),
    /** Who answers the machine's lookups and so what egressd changed: resolv.conf itself, or a resolved drop-in. */
    manager: z.enum(['resolv.conf', 'systemd-resolved']),
    listen: z.array(z.string().min(1)).min(1),
    enabledAt: z.iso.datetime(),
    resolvConf: z.object({ before: fileState, after: fileState }).strict(),
    /** Only with systemd-resolved; `dirCreated`: the drop-in directory was made by enable and goes with it. */
    dropIn: z.object({ before: fileState, after: fileState, dirCreated: z.boolean() }).strict().nullable(),
  })
  .strict();
export type DnsRecord = z.infer<typeof recordSchema>;

export interface Paths {
  /** Every system path is taken under this ("/" on the machine itself). */
  readonly root: string;
  /** Where the record of what was there is kept (default /var/lib/egressd). */
  readonly stateDir: string;
}

const under = (root: string, path: string) => join(root, path);

/** Reads the record `enable` left; damaged records are errors, never guessed around. */
export function readDnsRecord(stateDir: string): DnsRecord | undefined {
  const read = readStateFile(stateDir, DNS_RECORD_FILE, recordSchema);
  if (read.state === 'absent') return undefined;
  if (read.state === 'damaged')
    throw new EgressError(ErrorCode.Io, `the record of what "egressctl dns enable" changed is damaged: ${read.problem}`, {
      details: [`it is ${join(stateDir, DNS_RECORD_FILE)}; nothing was changed`],
    });
  return read.value;
}

export function snapshot(root: string, path: string): FileState {
  const full = under(root, path);
  let stat;
  try {
    stat = lstatSync(full);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return { kind: 'absent' };
    throw ioError(`cannot look at ${full}`, error);
  }
  if (stat.isSymbolicLink()) {
    const through = readThrough(root, path);
    return { kind: 'symlink', target: readlinkSync(full), uid: stat.uid, gid: stat.gid, through: through === undefined ? null : through.toString('base64') };
  }
  if (!stat.isFile()) throw new EgressError(ErrorCode.Io, `${full} is neither a file nor a symlink; egressd leaves it alone`);
  const bytes = readFileSync(full);
  return { kind: 'file', content: bytes.toString('base64'), sha256: sha256(bytes), mode: stat.mode & 0o7777, uid: stat.uid, gid: stat.gid };
}

/** The bytes a path leads to, following symlinks within `root` (an absolute target means root's, not this machine's). */
export function readThrough(root: string, path: string): Buffer | undefined {
  let at = path;
  for (let hops = 0; hops < 16; hops++) {
    let stat;
    try {
      stat = lstatSync(under(root, at));
    } catch {
      return undefined;
    }
    if (!stat.isSymbolicLink()) {
      try {
        return stat.isFile() ? readFileSync(under(root, at)) : undefined;
      } catch {
        return undefined;
      }
    }
    const target = readlinkSync(under(root, at));
    at = posix.resolve(posix.dirname(at), target);
  }
  return undefined;
}

/** Where a symlink at `path` leads, as an absolute path inside root. */
function linkDestination(path: string, target: string): string {
  return posix.resolve(posix.dirname(path), target);
}

/** The same thing, as far as someone else changing it goes: a file by its bytes, a link by its target (mode and owner are restored, not compared). */
export function sameState(a: FileState, b: FileState): boolean {
  if (a.kind === 'file' && b.kind === 'file') return a.sha256 === b.sha256;
  if (a.kind === 'symlink' && b.kind === 'symlink') return a.target === b.target;
  return a.kind === b.kind;
}

/** The same in every way disable restores: bytes or target, and mode and owner. */
export function identical(a: FileState, b: FileState): boolean {
  if (!sameState(a, b)) return false;
  if (a.kind === 'file' && b.kind === 'file') return a.mode === b.mode && a.uid === b.uid && a.gid === b.gid;
  if (a.kind === 'symlink' && b.kind === 'symlink') return a.uid === b.uid && a.gid === b.gid;
  return true;
}

const sha256 = (bytes: Uint8Array) => createHash('sha256').update(bytes).digest('hex');

function contentOf(state: FileState): Buffer | undefined {
  if (state.kind === 'file') return Buffer.from(state.content, 'base64');
  if (state.kind === 'symlink' && state.through !== null) return Buffer.from(state.through, 'base64');
  return undefined;
}

/** What a recorded resolv.conf said (through its link), for the upstreams' discovery. */
export function recordedContent(state: FileState): string | undefined {
  return contentOf(state)?.toString('utf8');
}

// ---------------------------------------------------------------------------
// Who is in charge

export interface ResolvedControl {
  /** Whether systemd-resolved runs on this machine. */
  running(): boolean;
  /** Makes a running resolved read its configuration again; undefined when it did, else why not. */
  reload(): string | undefined;
}

/** The machine's systemd-resolved, through systemctl (it is there wherever resolved is). */
export const systemResolved: ResolvedControl = {
  running: () => spawnSync('systemctl', ['is-active', '--quiet', 'systemd-resolved.service'], { stdio: 'ignore', timeout: 5_000 }).status === 0,
  reload() {
    // Reload where resolved can (systemd ≥ 253), else a restart: both re-read resolved.conf.d.
    const done = spawnSync('systemctl', ['try-reload-or-restart', 'systemd-resolved.service'], { encoding: 'utf8', timeout: 30_000 });
    if (done.error) return `systemctl could not be run: ${done.error.message}`;
    return done.status === 0 ? undefined : `systemctl try-reload-or-restart systemd-resolved.service failed: ${done.stderr.trim() || `exit ${done.status}`}`;
  },
};

/** A tree that is not this machine's (an image being prepared): nothing runs there. */
export const notRunning: ResolvedControl = { running: () => false, reload: () => 'systemd-resolved does not run there' };

export interface Manager {
  readonly manager: DnsRecord['manager'];
  readonly why: string;
}

/**
 * resolved is in charge when resolv.conf is its (a link to its stub in
 * /run/systemd/resolve or to its static stub file), or when it runs and
 * resolv.conf names only its stub. When it runs but resolv.conf is someone
 * else's file naming other servers, programs never ask resolved: a drop-in
 * would change nothing, so resolv.conf is what egressd changes.
 */
export function whoIsInCharge(resolvConf: FileState, resolved: ResolvedControl): Manager {
  if (resolvConf.kind === 'symlink') {
    const destination = linkDestination(RESOLV_CONF, resolvConf.target);
    // resolved's upstream list (its "uplink" mode): programs ask those servers directly, past resolved, so a drop-in would not hold.
    if (destination === RESOLVED_UPSTREAMS)
      return { manager: 'resolv.conf', why: `${RESOLV_CONF} is a link to ${destination}: programs ask its servers directly, not systemd-resolved` };
    if (destination.startsWith(`${RESOLVED_RUN_DIR}/`) || STATIC_STUBS.includes(destination))
      return { manager: 'systemd-resolved', why: `${RESOLV_CONF} is a link to ${destination}, systemd-resolved's` };
  }
  if (resolved.running()) {
    const text = recordedContent(resolvConf);
    const servers = text === undefined ? [] : parseResolvConf(text).nameservers;
    if (servers.length > 0 && servers.every((s) => RESOLVED_STUBS.includes(s.address)))
      return { manager: 'systemd-resolved', why: `systemd-resolved runs and ${RESOLV_CONF} names only its stub` };
    return { manager: 'resolv.conf', why: `systemd-resolved runs, but ${RESOLV_CONF} does not send lookups to it` };
  }
  return {
    manager: 'resolv.conf',
    why: `${RESOLV_CONF} is ${resolvConf.kind === 'symlink' ? `a link to ${resolvConf.target}` : resolvConf.kind === 'file' ? 'a file' : 'not there'} and systemd-resolved is not in charge`,
  };
}

// ---------------------------------------------------------------------------
// What egressd writes

export function resolvConfText(listen: readonly string[], keep: readonly string[]): string {
  return [
    '# Written by egressd ("egressctl dns enable"): every lookup goes through its resolver,',
    '# which fills the firewall\'s name sets. "egressctl dns disable" puts back what was here.',
    ...listen.map((address) => `nameserver ${address}`),
    ...keep,
    '',
  ].join('\n');
}

export function dropInText(listen: readonly string[]): string {
  return [
    '# Written by egressd ("egressctl dns enable"): systemd-resolved sends every name (~.)',
    '# to egressd\'s resolver. "egressctl dns disable" removes this file.',
    '[Resolve]',
    `DNS=${listen.join(' ')}`,
    'Domains=~.',
    '',
  ].join('\n');
}

function fileFor(text: string, like: FileState, dirOwner: { uid: number; gid: number }): FileState {
  const bytes = Buffer.from(text, 'utf8');
  // A file keeps its mode and owner; one that replaces a link or nothing is root's usual 0644.
  const { mode, uid, gid } = like.kind === 'file' ? like : { mode: 0o644, ...dirOwner };
  return { kind: 'file', content: bytes.toString('base64'), sha256: sha256(bytes), mode, uid, gid };
}

function ownerOf(path: string): { uid: number; gid: number } {
  try {
    const stat = statSync(path);
    return { uid: stat.uid, gid: stat.gid };
  } catch {
    return { uid: 0, gid: 0 };
  }
}

/**
 * Makes `path` what `state` says, atomically (a rename within its directory).
 * A resolv.conf that is itself a mount point (a container's, bound in by its
 * runtime) cannot be renamed over: its bytes are written in place instead,
 * and the returned note says so.
 */
export function putState(root: string, path: string, state: FileState): string | undefined {
  const full = under(root, path);
  const dir = dirname(full);
  const name = posix.basename(path);
  if (state.kind === 'absent') {
    removeFileDurably(dir, name);
    return undefined;
  }
  if (state.kind === 'symlink') {
    const temp = join(dir, tempName(name));
    try {
      symlinkSync(state.target, temp);
      lchownSync(temp, state.uid, state.gid);
      renameSync(temp, full);
    } catch (error) {
      rmSync(temp, { force: true });
      throw ioError(`cannot put back the link ${full} → ${state.target}`, error);
    }
    syncDirectory(dir);
    return undefined;
  }
  const bytes = Buffer.from(state.content, 'base64');
  try {
    writeFileAtomic(dir, name, bytes, state.mode, {}, { uid: state.uid, gid: state.gid });
    return undefined;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'EBUSY') throw ioError(`cannot write ${full}`, error);
  }
  writeInPlace(full, bytes, state);
  return `${full} is a mount point (bound in by a container runtime?): written in place, not atomically`;
}

function writeInPlace(full: string, bytes: Buffer, state: { mode: number; uid: number; gid: number }): void {
  try {
    const fd = openSync(full, 'r+');
    try {
      ftruncateSync(fd, 0);
      for (let done = 0; done < bytes.length;) done += writeSync(fd, bytes, done, bytes.length - done, done);
      fchownSync(fd, state.uid, state.gid);
      fchmodSync(fd, state.mode);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
  } catch (error) {
    throw ioError(`cannot write ${full}`, error);
  }
}

const ioError = (what: string, error: unknown) => new EgressError(ErrorCode.Io, `${what}: ${(error as Error).message}`, { cause: error });

// ---------------------------------------------------------------------------
// enable, disable, status

export interface DnsSwitchDeps extends Paths {
  readonly resolved: ResolvedControl;
  readonly now: () => Date;
}

export interface Outcome {
  /** Whether anything on disk changed. */
  readonly changed: boolean;
  readonly manager: DnsRecord['manager'] | null;
  /** What was done, or why nothing was, for people. */
  readonly said: readonly string[];
  /** The paths written or removed (under root). */
  readonly touched: readonly string[];
}

/** Paths whose current state is neither what enable left nor what was there before. */
function changedElsewhere(record: DnsRecord, root: string): { path: string; now: FileState; left: FileState }[] {
  const changed: { path: string; now: FileState; left: FileState }[] = [];
  const pairs: [string, { before: FileState; after: FileState }][] = [[RESOLV_CONF, record.resolvConf]];
  if (record.dropIn) pairs.push([DROP_IN, record.dropIn]);
  for (const [path, { before, after }] of pairs) {
    const now = snapshot(root, path);
    if (!sameState(now, after) && !sameState(now, before)) changed.push({ path, now, left: after });
  }
  return changed;
}

function describeState(state: FileState): string {
  if (state.kind === 'absent') return 'not there';
  if (state.kind === 'symlink') return `a link to ${state.target}`;
  const servers = parseResolvConf(Buffer.from(state.content, 'base64').toString('utf8')).nameservers.map((s) => s.text);
  return `a file${servers.length ? ` naming ${servers.join(', ')}` : ''}`;
}

function changedDetails(changes: ReturnType<typeof changedElsewhere>, root: string): string[] {
  return changes.map((c) => `${under(root, c.path)} is now ${describeState(c.now)}; enable left ${describeState(c.left)}`);
}

function checkListen(listen: readonly string[]): void {
  if (listen.length === 0) throw new EgressError(ErrorCode.Usage, 'no address for the resolver to listen on');
  for (const address of listen) {
    if (isIP(address) === 0) throw new EgressError(ErrorCode.Usage, `"${address}" is not an IP address for the resolver to listen on`);
  }
}

function reloadResolved(deps: DnsSwitchDeps, said: string[]): void {
  if (!deps.resolved.running()) {
    said.push('systemd-resolved is not running: the drop-in takes effect when it starts');
    return;
  }
  const failed = deps.resolved.reload();
  said.push(failed === undefined ? 'systemd-resolved re-read its configuration' : `systemd-resolved did NOT re-read its configuration: ${failed}`);
}

export function enableDns(listen: readonly string[], options: { force: boolean }, deps: DnsSwitchDeps): Outcome {
  checkListen(listen);
  const { root, stateDir } = deps;
  const record = readDnsRecord(stateDir);
  const said: string[] = [];
  let next: DnsRecord;
  if (record) {
    const changed = changedElsewhere(record, root);
    const sameListen = record.listen.join(' ') === listen.join(' ');
    if (changed.length === 0 && sameListen && !writesPending(record, root)) {
      return { changed: false, manager: record.manager, said: [`already enabled (${record.manager}) since ${record.enabledAt}; nothing changed`], touched: [] };
    }
    if (changed.length > 0 && !options.force) {
      throw new EgressError(ErrorCode.DnsConfigChanged, 'egressctl dns enable: someone else changed what enable wrote; it was left as it is', {
        details: [
          ...changedDetails(changed, root),
          '"egressctl dns enable --force" points it at egressd again (disable then restores what was there before the first enable);',
          '"egressctl dns disable --force" restores what was there before the first enable',
        ],
      });
    }
    const keep = parseResolvConf(recordedContent(record.resolvConf.before) ?? '').keep;
    next = {
      ...record,
      listen: [...listen],
      resolvConf:
        record.manager === 'resolv.conf'
          ? { before: record.resolvConf.before, after: fileFor(resolvConfText(listen, keep), record.resolvConf.before, ownerOf(under(root, '/etc'))) }
          : record.resolvConf,
      dropIn: record.dropIn && { ...record.dropIn, after: fileFor(dropInText(listen), record.dropIn.before, ownerOf(under(root, '/etc'))) },
    };
    said.push(changed.length > 0 ? 'pointed at egressd again (--force), over what someone else had changed:' : `listen addresses now ${listen.join(', ')}`);
    said.push(...(changed.length > 0 ? changedDetails(changed, root).map((l) => `  ${l}`) : []));
  } else {
    const resolvConf = snapshot(root, RESOLV_CONF);
    const { manager, why } = whoIsInCharge(resolvConf, deps.resolved);
    said.push(`${manager === 'systemd-resolved' ? 'systemd-resolved is in charge' : 'resolv.conf is in charge'}: ${why}`);
    const dirOwner = ownerOf(under(root, '/etc'));
    if (manager === 'resolv.conf') {
      const keep = parseResolvConf(recordedContent(resolvConf) ?? '').keep;
      next = {
        version: 1,
        manager,
        listen: [...listen],
        enabledAt: deps.now().toISOString(),
        resolvConf: { before: resolvConf, after: fileFor(resolvConfText(listen, keep), resolvConf, dirOwner) },
        dropIn: null,
      };
    } else {
      const dropIn = snapshot(root, DROP_IN);
      next = {
        version: 1,
        manager,
        listen: [...listen],
        enabledAt: deps.now().toISOString(),
        resolvConf: { before: resolvConf, after: resolvConf },
        dropIn: { before: dropIn, after: fileFor(dropInText(listen), dropIn, dirOwner), dirCreated: !exists(dirname(under(root, DROP_IN))) },
      };
    }
  }
  // The record first: a crash after it leaves something disable can undo; one before it, nothing changed.
  writeFileAtomic(stateDir, DNS_RECORD_FILE, `${JSON.stringify(recordSchema.parse(next), null, 2)}\n`, 0o640);
  const touched: string[] = [];
  if (next.manager === 'resolv.conf') {
    const note = putState(root, RESOLV_CONF, next.resolvConf.after);
    if (note) said.push(note);
    touched.push(under(root, RESOLV_CONF));
    said.push(`${under(root, RESOLV_CONF)} now names ${listen.join(', ')} (egressd's resolver)`);
  } else if (next.dropIn) {
    if (next.dropIn.dirCreated) mkdirSync(dirname(under(root, DROP_IN)), { recursive: true, mode: 0o755 });
    putState(root, DROP_IN, next.dropIn.after);
    touched.push(under(root, DROP_IN));
    said.push(`${under(root, DROP_IN)} sends every name to ${listen.join(', ')} (egressd's resolver)`);
    reloadResolved(deps, said);
  }
  return { changed: true, manager: next.manager, said, touched };
}

/** A record whose writes did not all happen (a crash right after it was written). */
function writesPending(record: DnsRecord, root: string): boolean {
  if (!sameState(snapshot(root, RESOLV_CONF), record.resolvConf.after)) return true;
  return record.dropIn !== null && !sameState(snapshot(root, DROP_IN), record.dropIn.after);
}

export function disableDns(options: { force: boolean }, deps: DnsSwitchDeps): Outcome {
  const { root, stateDir } = deps;
  const record = readDnsRecord(stateDir);
  if (!record)
    return { changed: false, manager: null, said: ['not enabled (no record of "egressctl dns enable"): nothing to restore, nothing changed'], touched: [] };
  const changed = changedElsewhere(record, root);
  if (changed.length > 0 && !options.force) {
    throw new EgressError(
      ErrorCode.DnsConfigChanged,
      'egressctl dns disable: someone else changed what enable wrote; it was left as it is, so as not to undo their change',
      {
        details: [...changedDetails(changed, root), '"egressctl dns disable --force" restores what was there before enable anyway'],
      },
    );
  }
  const said: string[] = [];
  const touched: string[] = [];
  const restore = (path: string, states: { before: FileState; after: FileState }) => {
    const now = snapshot(root, path);
    if (identical(now, states.before)) return;
    const note = putState(root, path, states.before);
    if (note) said.push(note);
    touched.push(under(root, path));
    said.push(`${under(root, path)} restored: ${describeState(states.before)}`);
  };
  if (record.manager === 'resolv.conf') restore(RESOLV_CONF, record.resolvConf);
  if (record.dropIn) {
    restore(DROP_IN, record.dropIn);
    const dir = dirname(under(root, DROP_IN));
    if (record.dropIn.dirCreated && exists(dir) && readdirSync(dir).length === 0) {
      rmdirSync(dir);
      touched.push(dir);
    }
  }
  if (changed.length > 0) said.push('(--force: over what someone else had changed)');
  if (record.dropIn && touched.length > 0) reloadResolved(deps, said);
  removeFileDurably(stateDir, DNS_RECORD_FILE);
  if (touched.length === 0) said.push('everything was already as before enable; the record of it is removed');
  return { changed: touched.length > 0, manager: record.manager, said, touched };
}

export interface DnsStatus {
  readonly enabled: boolean;
  readonly manager: DnsRecord['manager'] | null;
  readonly listen: readonly string[];
  readonly enabledAt: string | null;
  /** What someone else changed since enable; empty when all is as enable left it. */
  readonly changedElsewhere: readonly string[];
  /** Whether the machine's lookups reach egressd now. */
  readonly pointsAtEgressd: boolean;
  /** The nameservers resolv.conf names now (through its link). */
  readonly nameservers: readonly string[];
  readonly resolvedRunning: boolean;
}

export function dnsStatus(deps: DnsSwitchDeps): DnsStatus {
  const { root } = deps;
  const record = readDnsRecord(deps.stateDir);
  const text = readThrough(root, RESOLV_CONF)?.toString('utf8');
  const nameservers = text === undefined ? [] : parseResolvConf(text).nameservers.map((n) => n.text);
  const resolvedRunning = deps.resolved.running();
  const changes = record ? changedElsewhere(record, root) : [];
  const listen = record?.listen ?? [];
  let pointsAtEgressd = nameservers.length > 0 && nameservers.every((n) => listen.includes(n));
  if (record?.manager === 'systemd-resolved') pointsAtEgressd = changes.length === 0 && !writesPending(record, root);
  return {
    enabled: record !== undefined,
    manager: record?.manager ?? null,
    listen,
    enabledAt: record?.enabledAt ?? null,
    changedElsewhere: record ? changedDetails(changes, root) : [],
    pointsAtEgressd: record !== undefined && pointsAtEgressd,
    nameservers,
    resolvedRunning,
  };
}

function exists(path: string): boolean {
  try {
    lstatSync(path);
    return true;
  } catch {
    return false;
  }
}
