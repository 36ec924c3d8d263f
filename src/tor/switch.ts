import { createHash } from 'node:crypto';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, rmdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { isIP } from 'node:net';
import { join, posix } from 'node:path';
import { z } from 'zod';
import { EgressError, ErrorCode, isEgressError } from '../errors.js';
import { loadPolicyOrThrow } from '../policy/load.js';
import { removeFileDurably, writeFileAtomic } from '../state/files.js';
import { readStateFile } from '../state/read.js';
import { fileState, identical, putState, recordedContent, sameState, snapshot, type FileState } from '../system/resolv-conf.js';
import { lineDiff } from './diff.js';
import { isTorsListener } from './listener.js';
import {
  APT_DROP_IN,
  aptDropInText,
  DEBIAN_CONTROL,
  existingAptProxies,
  isolatesBySocksAuth,
  MARK,
  policyDropInText,
  POLICY_DROP_IN,
  readTorConfig,
  socksPortAddress,
  socksText,
  SYSTEMD_DROP_IN_NAME,
  systemdDropInText,
  TOR_BINARIES,
  TORRC,
  torSnippetText,
  UPDATERS,
  type Socks,
  type Updater,
} from './files.js';

/**
 * `egressctl tor enable|disable`: the files that send updaters through Tor,
 * then the policy that confines them to Tor's SOCKS port — and back.
 *
 * Like `egressctl dns enable` (src/system/resolv-conf.ts), what was at each
 * path is recorded in the state directory (tor-enable.json) before anything
 * changes, so that disable puts back exactly that: the same bytes, mode and
 * owner, a file that was not there removed, a directory enable made removed
 * once empty. Every path is a path of the target system, taken under `root`.
 *
 * Order, and why no updater ever goes direct while the switch says "on":
 * enabling writes the proxy configuration (Tor's snippet, apt's drop-in,
 * the units' drop-ins) first and the policy's `tor` drop-in, then applies,
 * last. Before the apply, the switch is off and updaters go direct as they
 * did (the proxy files already send those that start now through Tor);
 * once the apply's one transaction confines them, every updater that starts
 * has its proxy configuration already, and any that does not use it is
 * dropped by the kernel — it fails, it does not leak. Disabling lifts the
 * confinement first (the policy drop-in put back and applied), while the
 * proxy files still send updaters through Tor, and removes those files
 * last: at no moment is an updater confined without its proxy (it would
 * fail) or unconfined while the switch says on. If any step fails, the
 * steps before it are undone from the record, newest first, and the
 * record of the run is put back as it was.
 */

export const TOR_RECORD_FILE = 'tor-enable.json';

const recordSchema = z
  .object({
    version: z.literal(1),
    enabledAt: z.iso.datetime(),
    socks: z.string().min(1),
    updaters: z.array(z.string().min(1)),
    /** The policy directory of the target system. */
    policyDir: z.string().min(1),
    /** Tor's user as the policy names it, for `tor status` to tell Tor's listener on the SOCKS port from another's; absent in older records (Debian's debian-tor then). */
    torUser: z.union([z.string().min(1), z.number().int().nonnegative()]).optional(),
    /** Tor's control socket or port and cookie, for `tor status`; null when Tor's configuration has none with cookie authentication. */
    control: z
      .object({ socket: z.string().optional(), host: z.string().optional(), port: z.number().int().optional(), cookieFile: z.string() })
      .strict()
      .nullable(),
    /** In the order written: undone in reverse. */
    files: z.array(z.object({ path: z.string().min(1), before: fileState, after: fileState, dirsCreated: z.array(z.string()) }).strict()),
  })
  .strict();
export type TorRecord = z.infer<typeof recordSchema>;
type RecordedFile = TorRecord['files'][number];

export function readTorRecord(stateDir: string): TorRecord | undefined {
  const read = readStateFile(stateDir, TOR_RECORD_FILE, recordSchema);
  if (read.state === 'absent') return undefined;
  if (read.state === 'damaged')
    throw new EgressError(ErrorCode.Io, `the record of what "egressctl tor enable" changed is damaged: ${read.problem}`, {
      details: [`it is ${join(stateDir, TOR_RECORD_FILE)}; nothing was changed`],
    });
  return read.value;
}

const recordText = (record: TorRecord) => `${JSON.stringify(recordSchema.parse(record), null, 2)}\n`;

/** What the switch needs from the machine, passed in: tests give a staging root and fakes for what runs. */
export interface TorSwitchDeps {
  /** Every system path is taken under this ("/" on the machine itself). */
  readonly root: string;
  readonly stateDir: string;
  /** The policy directory, a path of the target system (default /etc/egressd). */
  readonly policyDir: string;
  /**
   * Applies the policy in a directory (a path on this machine) with the
   * table's lock, as `egressctl apply` does; returns lines for people.
   * Undefined: the target is not this machine's table (an image), nothing is applied.
   */
  readonly apply?: (dir: string) => Promise<readonly string[]>;
  /** What applying the policy in `dir` would change (plan), for --dry-run. */
  readonly plan?: (dir: string) => Promise<readonly string[]>;
  /** What listens on the SOCKS address now, in this network namespace: its owner's uid, or null for nothing. Undefined: not looked at (an image). */
  readonly socksListener?: (socks: Socks) => { uid: number } | null;
  /** A user's uid through NSS, or undefined. */
  readonly uidOf: (name: string | number) => number | undefined;
  /** systemd and Tor on the target, when it is this machine: reloads after the files change. */
  readonly services?: {
    /** `systemctl daemon-reload`; undefined when done, else why not. */
    daemonReload(): string | undefined;
    /** Tor re-reads its configuration; undefined when done, else why not. */
    reloadTor(): string | undefined;
  };
  readonly now: () => Date;
}

export interface TorEnableOptions {
  readonly socks: string;
  readonly updaters: readonly string[];
  readonly dryRun: boolean;
}

export interface FileChange {
  readonly path: string;
  /** "write" a new or changed file, "restore" what was there, "keep" as it is. */
  readonly action: 'write' | 'restore' | 'keep';
  /** --dry-run: the new file, or a diff of the old one. */
  readonly shown?: readonly string[];
}

export interface TorOutcome {
  readonly changed: boolean;
  readonly files: readonly FileChange[];
  readonly applied: boolean;
  /** What was done, for people. */
  readonly said: readonly string[];
  /** What is not right and was not fatal (Tor not running, a torrc without drop-ins: do this by hand). */
  readonly warnings: readonly string[];
  /** --dry-run: the table's change, as plan says it. */
  readonly plan?: readonly string[];
}

export function parseSocks(text: string): Socks {
  const match = /^(?:\[([0-9a-fA-F:.]+)\]|([0-9.]+)):(\d{1,5})$/.exec(text);
  const host = match?.[1] ?? match?.[2];
  const port = Number(match?.[3]);
  const family = host === undefined ? 0 : isIP(host);
  if (!match || family === 0 || (match[1] !== undefined && family !== 6) || port < 1 || port > 65535)
    throw new EgressError(ErrorCode.Usage, `--socks "${text}" is not ADDR:PORT (e.g. 127.0.0.1:9050 or [::1]:9050)`);
  return { host: host!, port, family: family as 4 | 6 };
}

export function parseUpdaters(names: readonly string[]): Updater[] {
  if (names.length === 0) throw new EgressError(ErrorCode.Usage, '--updaters names none');
  return names.map((name) => {
    const updater = UPDATERS.find((u) => u.name === name);
    if (!updater) throw new EgressError(ErrorCode.Usage, `--updaters: "${name}" is not one of ${UPDATERS.map((u) => u.name).join(', ')}`);
    return updater;
  });
}

const under = (root: string, path: string) => join(root, path);
const isOurs = (state: FileState) => state.kind === 'file' && (recordedContent(state) ?? '').includes(MARK);

/** The file egressd writes at `path`: a file it replaces keeps its mode and owner; a new one is root's 0644. */
function fileFor(text: string, like: FileState): FileState {
  const bytes = Buffer.from(text, 'utf8');
  const { mode, uid, gid } = like.kind === 'file' ? like : { mode: 0o644, uid: 0, gid: 0 };
  return { kind: 'file', content: bytes.toString('base64'), sha256: sha256(bytes), mode, uid, gid };
}

const sha256 = (bytes: Uint8Array) => createHash('sha256').update(bytes).digest('hex');

/** The directories missing above `path` (target paths, outermost first): enable makes them, disable removes them once empty. */
function missingDirs(root: string, path: string): string[] {
  const missing: string[] = [];
  for (let dir = posix.dirname(path); dir !== '/' && !existsSync(under(root, dir)); dir = posix.dirname(dir)) missing.unshift(dir);
  return missing;
}

interface Wanted {
  readonly path: string;
  readonly text: string;
  /** Why it is written, for the report. */
  readonly what: string;
}

/** Every file enable writes, in the order written: Tor's side, apt's, the units', and the policy's drop-in last. */
function wantedFiles(socks: Socks, updaters: readonly Updater[], policyDir: string, tor: ReturnType<typeof readTorConfig>): Wanted[] {
  const wanted: Wanted[] = [];
  if (tor.snippet !== undefined) {
    wanted.push({
      path: tor.snippet,
      text: torSnippetText(socks, DEBIAN_CONTROL),
      what: "Tor's SOCKS port with stream isolation, and its control socket",
    });
  }
  if (updaters.some((u) => u.viaApt)) wanted.push({ path: APT_DROP_IN, text: aptDropInText(socks), what: "apt's http and https through Tor" });
  for (const updater of updaters)
    for (const unit of updater.units)
      wanted.push({
        path: `/etc/systemd/system/${unit}.d/${SYSTEMD_DROP_IN_NAME}`,
        text: systemdDropInText(socks, updater, unit),
        what: `${unit}'s proxy environment`,
      });
  wanted.push({
    path: posix.join(policyDir, POLICY_DROP_IN),
    text: policyDropInText(socks, updaters),
    what: 'the policy: updaters confined to the SOCKS port',
  });
  return wanted;
}

/** The policy as it will be with `text` at its drop-in: loaded from a copy, so that a bad one changes nothing. */
function withDropIn<T>(policyDirOnHost: string, text: string | undefined, use: (dir: string) => T): T {
  const copy = mkdtempSync(join(tmpdir(), 'egd-tor-policy-'));
  try {
    if (existsSync(policyDirOnHost)) cpSync(policyDirOnHost, copy, { recursive: true, dereference: false });
    if (text === undefined) rmSync(join(copy, POLICY_DROP_IN), { force: true });
    else writeFileAtomic(copy, POLICY_DROP_IN, text, 0o644);
    return use(copy);
  } catch (error) {
    throw namedAsOriginal(error, copy, policyDirOnHost);
  } finally {
    rmSync(copy, { recursive: true, force: true });
  }
}

async function withDropInAsync<T>(policyDirOnHost: string, text: string, use: (dir: string) => Promise<T>): Promise<T> {
  const copy = mkdtempSync(join(tmpdir(), 'egd-tor-policy-'));
  try {
    if (existsSync(policyDirOnHost)) cpSync(policyDirOnHost, copy, { recursive: true, dereference: false });
    writeFileAtomic(copy, POLICY_DROP_IN, text, 0o644);
    return await use(copy);
  } catch (error) {
    throw namedAsOriginal(error, copy, policyDirOnHost);
  } finally {
    rmSync(copy, { recursive: true, force: true });
  }
}

/** An error about the copy, said of the policy directory it copies (with the drop-in as it would be). */
function namedAsOriginal(error: unknown, copy: string, original: string): unknown {
  if (!isEgressError(error)) return error;
  const fix = (text: string) => text.split(copy).join(original);
  return new EgressError(error.code, fix(error.message), {
    details: [...error.details.map(fix), `(with ${POLICY_DROP_IN} as "egressctl tor" would leave it)`],
    cause: error,
  });
}

function conflict(message: string, details: readonly string[]): EgressError {
  return new EgressError(ErrorCode.TorConflict, message, {
    details: [...details, 'nothing was changed; egressd does not overwrite configuration that is not its own'],
  });
}

/** Reads what is in the way before anything is written; each problem is said, all at once. */
function checkConflicts(deps: TorSwitchDeps, wanted: readonly Wanted[], record: TorRecord | undefined, socks: Socks, torUser: string | number): string[] {
  const problems: string[] = [];
  for (const w of wanted) {
    const now = snapshot(deps.root, w.path);
    const recorded = record?.files.find((f) => f.path === w.path);
    if (recorded) {
      if (!sameState(now, recorded.after) && !sameState(now, recorded.before))
        problems.push(`${under(deps.root, w.path)} was changed by someone else since "egressctl tor enable" wrote it`);
    } else if (now.kind === 'symlink' || (now.kind === 'file' && !isOurs(now))) {
      problems.push(`${under(deps.root, w.path)} is there already and is not egressd's`);
    }
  }
  for (const setting of existingAptProxies(deps.root, APT_DROP_IN))
    problems.push(`${under(deps.root, setting.file)}:${setting.line}: apt already has a proxy: ${setting.key} "${setting.value}"`);
  const tor = readTorConfig(deps.root);
  if (tor.snippet !== undefined) {
    const ours = JSON.stringify(socksPortAddress(socksText(socks)));
    for (const line of tor.torrcSetsSocks)
      if (JSON.stringify(socksPortAddress(line.value)) === ours)
        problems.push(`${under(deps.root, line.file)}: SocksPort ${line.value} is the port egressd's snippet would open too (Tor would not start)`);
  }
  if (deps.socksListener) {
    const listener = deps.socksListener(socks);
    const torUid = deps.uidOf(torUser);
    if (listener && !isTorsListener(listener, torUid))
      problems.push(
        `${socksText(socks)} is taken by something that is not Tor: its socket belongs to uid ${listener.uid}, Tor's user ${JSON.stringify(torUser)} is ${torUid === undefined ? 'unknown here' : `uid ${torUid}`}`,
      );
  }
  return problems;
}

/** Warnings about Tor that do not stop enable: the kernel holds updates back until they are put right. */
function torWarnings(deps: TorSwitchDeps, socks: Socks): string[] {
  const warnings: string[] = [];
  const tor = readTorConfig(deps.root);
  if (tor.snippet === undefined) {
    const at = JSON.stringify(socksPortAddress(socksText(socks)));
    const port = tor.socksPorts.find((v) => JSON.stringify(socksPortAddress(v)) === at);
    if (!port || !isolatesBySocksAuth(port)) {
      warnings.push(
        `${under(deps.root, TORRC)} includes no drop-in directory, and Tor's configuration has ${port ? `SocksPort ${port} with NoIsolateSOCKSAuth` : `no SocksPort at ${socksText(socks)}`}: add these lines to ${TORRC} by hand and reload Tor:`,
        ...torSnippetText(socks, DEBIAN_CONTROL)
          .split('\n')
          .filter((l) => l !== '' && !l.startsWith('#'))
          .map((l) => `    ${l}`),
        `  (or add "%include /etc/tor/torrc.d/" to ${TORRC} and run "egressctl tor enable" again)`,
      );
    } else {
      warnings.push(
        `${under(deps.root, TORRC)} includes no drop-in directory; Tor's configuration already has SocksPort ${port} (isolating by SOCKS credentials), so nothing was added to it`,
      );
    }
  }
  // Every other way into Tor lets any local program out through it, system domains and lockdown included: the table
  // judges only the policy's SOCKS port as network, and a unix socket never meets netfilter.
  const ours = JSON.stringify(socksPortAddress(socksText(socks)));
  const others = tor.snippet === undefined ? tor.socksPorts : tor.torrcSetsSocks.map((line) => line.value);
  for (const value of others.filter((v) => JSON.stringify(socksPortAddress(v)) !== ours))
    warnings.push(
      `Tor's configuration also has SocksPort ${value}: every local program reaches Tor there, a system domain's members and anyone under lockdown included (egressd's table treats only ${socksText(socks)} as network); remove it from Tor's configuration`,
    );
  for (const port of tor.otherListeners)
    warnings.push(
      `Tor's configuration has ${port}: every local program reaches Tor there, a system domain's members and anyone under lockdown included; remove it from Tor's configuration`,
    );
  if (!tor.control)
    warnings.push('Tor\'s configuration has no control socket or port with cookie authentication: "egressctl tor status" cannot ask Tor how it is');
  if (deps.socksListener && deps.socksListener(socks) === null)
    warnings.push(`nothing listens on ${socksText(socks)} now: updates fail (they never go direct) until Tor runs`);
  return warnings;
}

/** Puts every file back to `before`, newest first, and removes the directories made for them; errors are collected, not thrown. */
function undo(root: string, files: readonly RecordedFile[]): string[] {
  const failures: string[] = [];
  for (const file of [...files].reverse()) {
    try {
      if (!identical(snapshot(root, file.path), file.before)) putState(root, file.path, file.before);
      for (const dir of [...file.dirsCreated].reverse()) removeIfEmpty(under(root, dir));
    } catch (error) {
      failures.push(`${under(root, file.path)}: ${(error as Error).message}`);
    }
  }
  return failures;
}

function removeIfEmpty(dir: string): void {
  if (existsSync(dir) && readdirSync(dir).length === 0) rmdirSync(dir);
}

function putRecord(stateDir: string, record: TorRecord | undefined): void {
  if (record) writeFileAtomic(stateDir, TOR_RECORD_FILE, recordText(record), 0o640);
  else removeFileDurably(stateDir, TOR_RECORD_FILE);
}

function shownChange(root: string, path: string, after: FileState): string[] {
  const now = snapshot(root, path);
  const text = recordedContent(after) ?? '';
  if (now.kind !== 'file') return text.split('\n').map((l) => `+ ${l}`);
  return lineDiff(recordedContent(now) ?? '', text);
}

export async function enableTor(options: TorEnableOptions, deps: TorSwitchDeps): Promise<TorOutcome> {
  const socks = parseSocks(options.socks);
  const updaters = parseUpdaters(options.updaters);
  const { root, stateDir } = deps;
  if (!TOR_BINARIES.some((path) => existsSync(under(root, path))))
    throw new EgressError(ErrorCode.TorMissing, `Tor is not installed${root === '/' ? '' : ` in ${root}`}: none of ${TOR_BINARIES.join(', ')} is there`, {
      details: ['install it first ("apt-get install tor"); nothing was changed'],
    });
  const record = readTorRecord(stateDir);
  const policyDirOnHost = under(root, deps.policyDir);
  const tor = readTorConfig(root);
  const wanted = wantedFiles(socks, updaters, deps.policyDir, tor);
  const dropIn = wanted[wanted.length - 1]!;

  // The policy as it will be: it must load, and no later file may take the switch back.
  const policy = withDropIn(policyDirOnHost, dropIn.text, (dir) => loadPolicyOrThrow(dir).policy);
  const overridden = !policy.tor.enabled || policy.tor.socks.port !== socks.port || policy.tor.socks.address !== socks.host;
  const problems = checkConflicts(deps, wanted, record, socks, policy.tor.user);
  if (overridden)
    problems.push(
      `a policy file after ${POLICY_DROP_IN} in ${policyDirOnHost} sets tor: ${policy.tor.at ? `${policy.tor.at.file}:${policy.tor.at.line}` : ''} (tor.enabled ${policy.tor.enabled}, socks ${policy.tor.socks.address}:${policy.tor.socks.port})`,
    );
  if (problems.length > 0) throw conflict("egressctl tor enable: configuration of someone else's is in the way; it was left as it is", problems);
  const warnings = torWarnings(deps, socks);
  for (const updater of updaters)
    if (updater.viaApt && updater.name !== 'apt' && !updaters.some((u) => u.name === 'apt'))
      warnings.push(
        `${updater.name} downloads through apt's methods, which run as _apt: without "apt" among the updaters, those downloads go through Tor but are not confined`,
      );

  // The files as they will be: a path the record has keeps its first "before"; one no longer wanted goes back to it.
  const files: RecordedFile[] = wanted.map((w) => {
    const recorded = record?.files.find((f) => f.path === w.path);
    const before = recorded?.before ?? snapshot(root, w.path);
    return {
      path: w.path,
      before,
      after: fileFor(w.text, recorded ? recorded.after : before),
      dirsCreated: recorded?.dirsCreated ?? missingDirs(root, w.path),
    };
  });
  const dropped = (record?.files ?? []).filter((f) => !files.some((w) => w.path === f.path));
  const control = tor.snippet !== undefined ? DEBIAN_CONTROL : (tor.control ?? null);
  const next: TorRecord = {
    version: 1,
    enabledAt: record?.enabledAt ?? deps.now().toISOString(),
    socks: socksText(socks),
    updaters: updaters.map((u) => u.name),
    policyDir: deps.policyDir,
    torUser: policy.tor.user,
    control: control && { ...control },
    files,
  };
  const pending = files.filter((f) => !identical(snapshot(root, f.path), f.after));
  const changes: FileChange[] = [
    ...files.map((f) => ({
      path: under(root, f.path),
      action: pending.includes(f) ? ('write' as const) : ('keep' as const),
      ...(options.dryRun && pending.includes(f) && { shown: shownChange(root, f.path, f.after) }),
    })),
    ...dropped.map((f) => ({ path: under(root, f.path), action: 'restore' as const })),
  ];

  if (options.dryRun) {
    const plan = deps.plan
      ? await withDropInAsync(policyDirOnHost, dropIn.text, (dir) => deps.plan!(dir))
      : ['(the table is not changed with --root: the image applies its policy when egressd starts there)'];
    return { changed: false, files: changes, applied: false, said: ['dry run: nothing was changed'], warnings, plan };
  }

  const said: string[] = [];
  const unchanged = record !== undefined && pending.length === 0 && dropped.length === 0 && recordText(record) === recordText(next);
  if (!unchanged) {
    // The record first: a crash after it leaves something disable can undo; one before it, nothing changed.
    putRecord(stateDir, { ...next, files: [...(record?.files.filter((f) => dropped.includes(f)) ?? []), ...files] });
    const written: RecordedFile[] = [];
    try {
      for (const file of files) {
        for (const dir of file.dirsCreated) if (!existsSync(under(root, dir))) mkdirSync(under(root, dir), { mode: 0o755 });
        written.push(file);
        if (!identical(snapshot(root, file.path), file.after)) {
          const note = putState(root, file.path, file.after);
          if (note) said.push(note);
        }
      }
      const failures = undo(root, dropped);
      if (failures.length > 0) throw new EgressError(ErrorCode.Io, 'could not put back files an earlier enable wrote', { details: failures });
      putRecord(stateDir, next);
    } catch (error) {
      throw rolledBack(error, undo(root, written), () => putRecord(stateDir, record));
    }
    for (const file of pending) said.push(`wrote ${under(root, file.path)}: ${wanted.find((w) => w.path === file.path)!.what}`);
    for (const file of dropped) said.push(`put back ${under(root, file.path)} (no longer wanted)`);
    reloadServices(deps, tor.snippet !== undefined && pending.some((f) => f.path === tor.snippet), said);
  } else {
    said.push(`already enabled since ${record.enabledAt}, every file as enable left it`);
  }

  if (!deps.apply) {
    said.push(`not applied: ${root} is an image; its egressd applies ${deps.policyDir} when it starts`);
    return { changed: !unchanged, files: changes, applied: false, said, warnings };
  }
  try {
    said.push(...(await deps.apply(policyDirOnHost)));
  } catch (error) {
    if (unchanged) throw error;
    throw rolledBack(error, undo(root, files), () => putRecord(stateDir, record));
  }
  said.push(`updates over Tor: on; updaters (${updaters.map((u) => u.name).join(', ')}) may reach only ${socksText(socks)}`);
  return { changed: !unchanged, files: changes, applied: true, said, warnings };
}

/** The error of a failed step, with the undoing of the steps before it said. */
function rolledBack(error: unknown, failures: readonly string[], restoreRecord: () => void): EgressError {
  try {
    if (failures.length === 0) restoreRecord();
  } catch (recordError) {
    failures = [...failures, `the record: ${(recordError as Error).message}`];
  }
  const base = isEgressError(error) ? error : new EgressError(ErrorCode.Io, (error as Error).message, { cause: error });
  const undone =
    failures.length === 0
      ? ['every file written before it was put back as it was; nothing is changed']
      : ['NOT everything could be put back (the record of what was there is kept; "egressctl tor disable" retries):', ...failures.map((f) => `  ${f}`)];
  return new EgressError(base.code, base.message, { details: [...base.details, ...undone], cause: error });
}

function reloadServices(deps: TorSwitchDeps, torChanged: boolean, said: string[]): void {
  if (!deps.services) return;
  const reload = deps.services.daemonReload();
  said.push(
    reload === undefined ? 'systemd re-read its units (running updaters use the proxy once restarted)' : `systemd did NOT re-read its units: ${reload}`,
  );
  if (torChanged) {
    const tor = deps.services.reloadTor();
    said.push(tor === undefined ? 'Tor re-read its configuration' : `Tor did NOT re-read its configuration: ${tor}`);
  }
}

export async function disableTor(options: { force: boolean }, deps: TorSwitchDeps): Promise<TorOutcome> {
  const { root, stateDir } = deps;
  const record = readTorRecord(stateDir);
  if (!record)
    return {
      changed: false,
      files: [],
      applied: false,
      said: ['not enabled (no record of "egressctl tor enable"): nothing to restore, nothing changed'],
      warnings: [],
    };
  const changedElsewhere = record.files.filter((f) => {
    const now = snapshot(root, f.path);
    return !sameState(now, f.after) && !sameState(now, f.before);
  });
  if (changedElsewhere.length > 0 && !options.force)
    throw new EgressError(
      ErrorCode.TorConflict,
      'egressctl tor disable: someone else changed what enable wrote; it was left as it is, so as not to undo their change',
      {
        details: [
          ...changedElsewhere.map((f) => `${under(root, f.path)} is neither what enable wrote nor what was there before`),
          'nothing was changed; "egressctl tor disable --force" restores what was there before enable anyway',
        ],
      },
    );
  const policyFile = posix.join(record.policyDir, POLICY_DROP_IN);
  const policy = record.files.find((f) => f.path === policyFile);
  const rest = record.files.filter((f) => f !== policy);
  const said: string[] = [];
  const files: FileChange[] = [];
  // Confinement first: the proxy files stay until the kernel no longer holds updaters to Tor.
  if (policy) {
    const text = recordedContent(policy.before);
    const policyDirOnHost = under(root, record.policyDir);
    withDropIn(policyDirOnHost, policy.before.kind === 'file' ? text : undefined, (dir) => loadPolicyOrThrow(dir));
    const failures = undo(root, [policy]);
    if (failures.length > 0)
      throw new EgressError(ErrorCode.Io, 'egressctl tor disable: could not put back the policy drop-in; nothing else was changed', { details: failures });
    files.push({ path: under(root, policyFile), action: 'restore' });
    if (deps.apply) {
      try {
        said.push(...(await deps.apply(policyDirOnHost)));
      } catch (error) {
        // Enable's drop-in back, so that what is on disk says what is in force.
        for (const dir of policy.dirsCreated) if (!existsSync(under(root, dir))) mkdirSync(under(root, dir), { mode: 0o755 });
        putState(root, policy.path, policy.after);
        throw new EgressError(isEgressError(error) ? error.code : ErrorCode.Io, (error as Error).message, {
          details: [...(isEgressError(error) ? error.details : []), 'updates over Tor stay on; nothing was changed'],
          cause: error,
        });
      }
    }
  }
  const failures = undo(root, rest);
  for (const f of rest) files.push({ path: under(root, f.path), action: 'restore' });
  if (failures.length > 0) {
    putRecord(stateDir, { ...record, files: rest });
    throw new EgressError(
      ErrorCode.Io,
      'egressctl tor disable: confinement is lifted, but not every file could be put back; the record is kept, run it again',
      {
        details: failures,
      },
    );
  }
  for (const f of record.files) said.push(`put back ${under(root, f.path)}: ${f.before.kind === 'absent' ? 'removed (it was not there)' : 'as it was'}`);
  if (changedElsewhere.length > 0) said.push('(--force: over what someone else had changed)');
  const torrcSnippet = rest.some((f) => f.path.startsWith('/etc/tor/'));
  reloadServices(deps, torrcSnippet, said);
  removeFileDurably(stateDir, TOR_RECORD_FILE);
  said.push(
    deps.apply ? 'updates over Tor: off; updaters go direct again' : `not applied: ${root} is an image; its egressd applies ${record.policyDir} when it starts`,
  );
  return { changed: true, files, applied: deps.apply !== undefined, said, warnings: [] };
}
