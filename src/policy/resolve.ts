import { createHash } from 'node:crypto';
import type { z } from 'zod';
import { addressGroups, groupsKey, maskGroups, parseDestination, parseNetwork, type Destination } from './destination.js';
import { parseNameList } from './lists.js';
import { NameTableBuilder } from './name-table.js';
import { boundIssue, clip, type PolicyIssue } from './issues.js';
import {
  DEFAULT_LOG_GROUP,
  DNS_DEFAULTS,
  DNS_PORTS,
  type App,
  type CatalogueEntry,
  type DestinationSet,
  type DnsSettings,
  type Identity,
  type NameList,
  type Network,
  type Policy,
  type PortRange,
  type Protocol,
  type Rule,
  type Selector,
  type SystemDomain,
  type TorSettings,
  type Verdict,
} from './model.js';
import { CATALOGUE_CATEGORIES, policyFileSchema, type IdentityRef, type PolicyFile, type Selector as SelectorInput } from './schema.js';
import { parsePolicySource, type SourceFile } from './source.js';
import { slicePath, unitCgroup } from './units.js';

/** One policy file's bytes, named relative to the policy directory. */
export interface PolicyFileInput {
  readonly file: string;
  readonly bytes: Uint8Array;
}

/** Reads a list file named in a policy; relative paths are relative to the policy directory. */
export type ListReader = (path: string) => { bytes: Uint8Array } | { error: string };

export type ResolveResult = { ok: true; policy: Policy; warnings: PolicyIssue[] } | { ok: false; errors: PolicyIssue[]; warnings: PolicyIssue[] };

/** Rejected list lines reported one by one, per list; the rest are counted. */
const MAX_LIST_WARNINGS = 5;

/**
 * Turns policy files into one Policy, or into every problem found. Pure: all
 * reading goes through `readList`, so the same code runs on disk files and on
 * generated input in tests.
 */
export function resolvePolicy(files: readonly PolicyFileInput[], readList: ListReader): ResolveResult {
  const result = resolveUnbounded(files, readList);
  const warnings = result.warnings.map(boundIssue);
  return result.ok ? { ...result, warnings } : { ok: false, errors: result.errors.map(boundIssue), warnings };
}

function resolveUnbounded(files: readonly PolicyFileInput[], readList: ListReader): ResolveResult {
  const errors: PolicyIssue[] = [];
  const warnings: PolicyIssue[] = [];
  const parsed: { source: SourceFile; data: PolicyFile }[] = [];

  if (files.length === 0) {
    errors.push({
      severity: 'error',
      at: { file: '.', line: 1, col: 1 },
      message: 'no policy files (*.yaml) in the directory',
      hint: 'start from the shipped policies/ directory',
    });
  }
  for (const input of files) {
    const { source, issues } = parsePolicySource(input.file, input.bytes);
    errors.push(...issues);
    if (!source) continue;
    const result = policyFileSchema.safeParse(source.data ?? {});
    if (!result.success) {
      errors.push(...result.error.issues.map((issue) => schemaIssue(source, issue)));
      continue;
    }
    parsed.push({ source, data: result.data });
  }
  if (errors.length > 0) return { ok: false, errors, warnings };

  const merged = new Merger(errors);
  for (const { source, data } of parsed) merged.add(source, data);
  if (errors.length > 0) return { ok: false, errors, warnings };

  // Every byte the policy depends on goes into its digest, list files included.
  const hash = createHash('sha256');
  for (const input of files) hash.update(`file ${input.file} ${input.bytes.length}\n`).update(input.bytes);
  const hashingReader: ListReader = (path) => {
    const read = readList(path);
    if ('bytes' in read) hash.update(`list ${path} ${read.bytes.length}\n`).update(read.bytes);
    return read;
  };
  const resolver = new Resolver(merged, hashingReader, errors, warnings);
  const built = resolver.build(files.map((f) => f.file));
  const policy = built && { ...built, digest: hash.digest('hex') };
  if (errors.length > 0 || !policy) return { ok: false, errors, warnings };
  return { ok: true, policy, warnings };
}

function schemaIssue(source: SourceFile, issue: z.core.$ZodIssue): PolicyIssue {
  const path = issue.path;
  if (issue.code === 'unrecognized_keys') {
    const keys = issue.keys;
    const where = keys.length === 1 ? source.locateKey([...path, keys[0]!]) : source.locate(path);
    const plural = keys.length === 1 ? 'key' : 'keys';
    return {
      severity: 'error',
      at: where,
      message: `unknown ${plural} ${keys.map((k) => `"${clip(k)}"`).join(', ')}${describePath(path)}`,
      hint: 'see `egressctl schema` for the keys each section takes',
    };
  }
  if (issue.code === 'invalid_key') {
    // Zod says only "Invalid key in record": the key check's own issues say the rule, as they do for a value.
    const key = String(path[path.length - 1]);
    const rule = issue.issues.map((inner) => inner.message).join('; ');
    return { severity: 'error', at: source.locateKey(path), message: `"${clip(key)}" is not a valid name: ${rule}${describePath(path.slice(0, -1))}` };
  }
  const hint = issue.code === 'custom' ? (issue.params as { hint?: string } | undefined)?.hint : undefined;
  let message = issue.message;
  if (issue.code === 'invalid_union') {
    // Zod reports every branch of a union; the most useful one is the branch that got furthest.
    const branches = issue.errors;
    const deepest = branches.flat().sort((a, b) => b.path.length - a.path.length)[0];
    if (deepest) return schemaIssue(source, { ...deepest, path: [...path, ...deepest.path] });
    message = 'value does not have any of the accepted forms';
  }
  return { severity: 'error', at: source.locate(path), message: `${message}${describePath(path)}`, ...(hint ? { hint } : {}) };
}

function describePath(path: readonly PropertyKey[]): string {
  if (path.length === 0) return '';
  return ` (at ${path
    .map((part) => (typeof part === 'number' ? `[${part}]` : `.${clip(String(part))}`))
    .join('')
    .replace(/^\./, '')})`;
}

interface Placed<T> {
  readonly value: T;
  readonly source: SourceFile;
  readonly path: readonly PropertyKey[];
}

type RecordSection = 'lists' | 'catalogue' | 'identities' | 'apps' | 'systemDomains';

/** Merges files in order: named entries must be unique; `defaults`, `tor` and `dns` fields are overridden by later files, like drop-ins. */
class Merger {
  readonly records: { [K in RecordSection]: Map<string, Placed<NonNullable<PolicyFile[K]>[string]>> } = {
    lists: new Map(),
    catalogue: new Map(),
    identities: new Map(),
    apps: new Map(),
    systemDomains: new Map(),
  };
  readonly deny: Placed<NonNullable<PolicyFile['deny']>[number]>[] = [];
  readonly allowed: Placed<NonNullable<PolicyFile['allowed']>[number]>[] = [];
  readonly defaults: { [K in keyof NonNullable<PolicyFile['defaults']>]?: Placed<NonNullable<NonNullable<PolicyFile['defaults']>[K]>> } = {};
  readonly log: { [K in keyof NonNullable<NonNullable<PolicyFile['defaults']>['log']>]?: Placed<unknown> } = {};
  readonly tor: { [K in keyof NonNullable<PolicyFile['tor']>]?: Placed<NonNullable<NonNullable<PolicyFile['tor']>[K]>> } = {};
  readonly dns: { [K in keyof NonNullable<PolicyFile['dns']>]?: Placed<NonNullable<NonNullable<PolicyFile['dns']>[K]>> } = {};

  constructor(private readonly errors: PolicyIssue[]) {}

  add(source: SourceFile, data: PolicyFile): void {
    for (const section of ['lists', 'catalogue', 'identities', 'apps', 'systemDomains'] as const) {
      const entries = data[section];
      if (!entries) continue;
      const target = this.records[section] as Map<string, Placed<unknown>>;
      for (const [name, value] of Object.entries(entries)) {
        const earlier = target.get(name);
        const path = [section, name];
        if (earlier) {
          const first = earlier.source.locateKey(earlier.path);
          this.errors.push({
            severity: 'error',
            at: source.locateKey(path),
            message: `duplicate ${section} entry "${name}"; it is already defined at ${first.file}:${first.line}`,
            hint: 'names must be unique across all files of the directory',
          });
          continue;
        }
        target.set(name, { value, source, path });
      }
    }
    data.deny?.forEach((value, index) => this.deny.push({ value, source, path: ['deny', index] }));
    data.allowed?.forEach((value, index) => this.allowed.push({ value, source, path: ['allowed', index] }));
    for (const [key, value] of Object.entries(data.defaults ?? {})) {
      if (key === 'log') continue;
      if (value !== undefined) (this.defaults as Record<string, Placed<unknown>>)[key] = { value, source, path: ['defaults', key] };
    }
    for (const [key, value] of Object.entries(data.defaults?.log ?? {})) {
      if (value !== undefined) (this.log as Record<string, Placed<unknown>>)[key] = { value, source, path: ['defaults', 'log', key] };
    }
    for (const [key, value] of Object.entries(data.tor ?? {})) {
      if (value !== undefined) (this.tor as Record<string, Placed<unknown>>)[key] = { value, source, path: ['tor', key] };
    }
    for (const [key, value] of Object.entries(data.dns ?? {})) {
      if (value !== undefined) (this.dns as Record<string, Placed<unknown>>)[key] = { value, source, path: ['dns', key] };
    }
  }
}

class Resolver {
  private readonly lists = new Map<string, NameList>();
  private readonly catalogue = new Map<string, CatalogueEntry>();
  private readonly identities = new Map<string, Identity>();

  constructor(
    private readonly merged: Merger,
    private readonly readList: ListReader,
    private readonly errors: PolicyIssue[],
    private readonly warnings: PolicyIssue[],
  ) {}

  build(files: readonly string[]): Omit<Policy, 'digest'> | undefined {
    const { records } = this.merged;
    for (const [name, placed] of records.lists) this.loadList(name, placed);
    for (const [id, placed] of records.catalogue) this.addCatalogueEntry(id, placed);
    for (const [name, placed] of records.identities) {
      const inputs = Array.isArray(placed.value) ? placed.value : [placed.value];
      this.identities.set(name, { name, selectors: inputs.map(toSelector), at: placed.source.locateKey(placed.path) });
    }

    const egress = (this.merged.defaults.egress?.value ?? 'allow') as Verdict;
    const log = this.logSettings();
    const apps = this.withAllowed(
      [...records.apps].map(([name, placed]) => this.app(name, placed, egress, log.denials)),
      log.denials,
    );
    const globalDeny = this.merged.deny.map((placed, index) => this.globalDenyRule(placed, index, log.denials));
    const systemDomains = [...records.systemDomains].map(([name, placed]): SystemDomain => ({
      name,
      members: placed.value.members.map((ref, i) => this.identity(ref, `${name}#${i + 1}`, { ...placed, path: [...placed.path, 'members', i] })),
      why: placed.value.why,
      at: placed.source.locateKey(placed.path),
    }));
    const tor = this.torSettings();
    const dns = this.dnsSettings();
    this.warnShadowedApps(apps, systemDomains);
    if (this.errors.length > 0) return undefined;

    const defaultsAt = this.merged.defaults.egress;
    return {
      defaults: { egress, log, at: defaultsAt ? defaultsAt.source.locate(defaultsAt.path) : undefined },
      lists: this.lists,
      catalogue: this.catalogue,
      identities: this.identities,
      apps,
      globalDeny,
      systemDomains,
      tor,
      dns,
      files,
    };
  }

  private loadList(name: string, placed: Placed<NonNullable<PolicyFile['lists']>[string]>): void {
    const at = placed.source.locateKey(placed.path);
    const spec = placed.value;
    const file = 'file' in spec ? clip(spec.file) : undefined;
    if ('names' in spec) {
      const names = new NameTableBuilder();
      const suffixes = new NameTableBuilder();
      spec.names.forEach((raw, i) => {
        const dest = parseDestination(raw);
        if (dest.ok && dest.value.kind === 'name') names.add(dest.value.name);
        else if (dest.ok && dest.value.kind === 'suffix') suffixes.add(dest.value.suffix);
        else this.error(placed, ['names', i], `"${clip(raw)}" is not a name; an inline list holds names and *.suffixes (addresses go in a list file)`);
      });
      this.lists.set(name, { name, names: names.build(), suffixes: suffixes.build(), networks: [], file: undefined, at });
      return;
    }
    const read = this.readList(spec.file);
    if ('error' in read) {
      this.error(placed, ['file'], `list "${name}": cannot read ${file}: ${read.error}`);
      return;
    }
    if (read.bytes.indexOf(0) >= 0) {
      this.error(placed, ['file'], `list "${name}": ${file} is binary (it contains a NUL byte)`);
      return;
    }
    let text: string;
    try {
      text = new TextDecoder('utf-8', { fatal: true }).decode(read.bytes);
    } catch {
      this.error(placed, ['file'], `list "${name}": ${file} is not valid UTF-8 text`);
      return;
    }
    const parsed = parseNameList(text, spec.format ?? 'auto');
    parsed.rejected.slice(0, MAX_LIST_WARNINGS).forEach((line) =>
      this.warnings.push({
        severity: 'warning',
        at: { file: spec.file, line: line.line, col: line.col },
        message: `skipped "${clip(line.text)}": ${line.reason}`,
      }),
    );
    if (parsed.rejected.length > MAX_LIST_WARNINGS) {
      this.warnings.push({
        severity: 'warning',
        at,
        message: `list "${name}": ${parsed.rejected.length - MAX_LIST_WARNINGS} more lines of ${file} skipped`,
      });
    }
    if (parsed.names.size + parsed.suffixes.size + parsed.networks.length === 0) {
      this.warnings.push({ severity: 'warning', at, message: `list "${name}" (${file}) holds no names or addresses` });
    }
    this.lists.set(name, { name, names: parsed.names, suffixes: parsed.suffixes, networks: parsed.networks, file: spec.file, at });
  }

  private addCatalogueEntry(id: string, placed: Placed<NonNullable<PolicyFile['catalogue']>[string]>): void {
    const names: string[] = [];
    const suffixes: string[] = [];
    placed.value.names.forEach((raw, i) => {
      const dest = parseDestination(raw);
      if (dest.ok && dest.value.kind === 'name') names.push(dest.value.name);
      else if (dest.ok && dest.value.kind === 'suffix') suffixes.push(dest.value.suffix);
      else this.error(placed, ['names', i], `catalogue entry "${id}": "${clip(raw)}" is not a name or *.suffix`);
    });
    const { software, reports, category, source } = placed.value;
    this.catalogue.set(id, { id, software, reports, category, names, suffixes, source, at: placed.source.locateKey(placed.path) });
  }

  /** Resolves a reference by name, or builds an inline identity named after its owner. */
  private identity(ref: IdentityRef, inlineName: string, placed: Placed<unknown>): Identity {
    if (typeof ref === 'string') {
      const found = this.identities.get(ref);
      if (found) return found;
      this.error(placed, [], `unknown identity "${ref}"`, suggest(ref, this.identities.keys(), 'identities'));
      return { name: ref, selectors: [], at: placed.source.locate(placed.path) };
    }
    return { name: inlineName, selectors: [toSelector(ref)], at: placed.source.locate(placed.path) };
  }

  private app(name: string, placed: Placed<NonNullable<PolicyFile['apps']>[string]>, egress: Verdict, logDenials: boolean): App {
    const spec = placed.value;
    const refs = Array.isArray(spec.identity) ? spec.identity : [spec.identity];
    const identities = refs.map((ref, i) =>
      this.identity(ref, refs.length === 1 ? name : `${name}#${i + 1}`, {
        ...placed,
        path: [...placed.path, 'identity', ...(Array.isArray(spec.identity) ? [i] : [])],
      }),
    );
    const rules = (spec.rules ?? []).map((rule, index) => {
      const verdict: Verdict = 'allow' in rule ? 'allow' : 'deny';
      const to = 'allow' in rule ? rule.allow : rule.deny;
      return this.rule(`app/${name}/${index}`, verdict, to, verdict, rule, { ...placed, path: [...placed.path, 'rules', index] }, logDenials);
    });
    return { name, identities, defaultVerdict: spec.default ?? egress, rules, why: spec.why, at: placed.source.locateKey(placed.path) };
  }

  /** `allowed` entries go first in their app's rules, in file order: an allow from an alert outranks the app's own denies and the global deny list. */
  private withAllowed(apps: App[], logDenials: boolean): App[] {
    const added = new Map<string, Rule[]>();
    for (const placed of this.merged.allowed) {
      const name = placed.value.app;
      if (!apps.some((app) => app.name === name)) {
        this.error(
          placed,
          ['app'],
          `allowed: unknown app "${name}"`,
          suggest(
            name,
            apps.map((app) => app.name),
            'apps',
          ),
        );
        continue;
      }
      const rules = added.get(name) ?? [];
      const rule = this.rule(`app/${name}/allowed/${rules.length}`, 'allow', placed.value.allow, 'allow', placed.value, placed, logDenials);
      const until = placed.value.until === undefined ? NaN : Date.parse(placed.value.until);
      rules.push(Number.isNaN(until) ? rule : { ...rule, until });
      added.set(name, rules);
    }
    return apps.map((app) => (added.has(app.name) ? { ...app, rules: [...added.get(app.name)!, ...app.rules] } : app));
  }

  private globalDenyRule(placed: Placed<NonNullable<PolicyFile['deny']>[number]>, index: number, logDenials: boolean): Rule {
    // The file's whole name: stems alone would make a.yaml and a.yml share ids.
    const sameFileIndex = this.merged.deny.filter((p, i) => i < index && p.source === placed.source).length;
    return this.rule(`deny/${placed.source.file}/${sameFileIndex}`, 'deny', placed.value.to, 'to', placed.value, placed, logDenials);
  }

  private rule(
    id: string,
    verdict: Verdict,
    to: 'any' | string[],
    toKey: string,
    fields: {
      ports?: (number | string)[] | undefined;
      proto?: Protocol | Protocol[] | undefined;
      log?: boolean | undefined;
      why?: string | undefined;
      sharedAddresses?: 'deny' | 'spare' | undefined;
    },
    placed: Placed<unknown>,
    logDenials: boolean,
  ): Rule {
    const protocols = fields.proto === undefined ? undefined : [...new Set(Array.isArray(fields.proto) ? fields.proto : [fields.proto])].sort();
    const ports = fields.ports?.map(toPortRange);
    if (ports && protocols?.includes('icmp')) {
      this.error(placed, ['proto'], 'icmp has no ports', 'split the rule: one for tcp/udp with ports, one for icmp');
    }
    const destinations = this.destinations(to, placed, [toKey]);
    const named = destinations.names.length + destinations.suffixes.length + destinations.lists.length > 0;
    if (fields.sharedAddresses !== undefined && verdict !== 'deny') {
      this.error(placed, ['sharedAddresses'], 'sharedAddresses applies to deny rules only', 'an allow rule takes every address its names answer');
    } else if (fields.sharedAddresses !== undefined && !named) {
      this.error(
        placed,
        ['sharedAddresses'],
        'sharedAddresses applies to deny rules with names only',
        'the addresses a rule writes are denied as written; only addresses learned from names can be shared with another name',
      );
    }
    return {
      id,
      verdict,
      to: destinations,
      ports,
      protocols: ports && protocols === undefined ? ['tcp', 'udp'] : protocols,
      log: fields.log ?? logDenials,
      why: fields.why,
      at: placed.source.locate(placed.path),
      ...(verdict === 'deny' && named ? { sharedAddresses: fields.sharedAddresses ?? 'deny' } : {}),
    };
  }

  private destinations(to: 'any' | string[], placed: Placed<unknown>, key: PropertyKey[]): DestinationSet {
    if (to === 'any') return { any: true, names: [], suffixes: [], lists: [], networks: [], catalogueEntries: [], written: [] };
    const names = new Set<string>();
    const suffixes = new Set<string>();
    const lists = new Set<string>();
    const networks: Network[] = [];
    const entries = new Set<string>();
    const written = new Set<string>();
    to.forEach((raw, index) => {
      const parsed = parseDestination(raw);
      if (!parsed.ok) return; // the schema reported it already
      const dest: Destination = parsed.value;
      written.add(writtenForm(dest));
      switch (dest.kind) {
        case 'name':
          names.add(dest.name);
          break;
        case 'suffix':
          suffixes.add(dest.suffix);
          break;
        case 'net':
          networks.push({ family: dest.family, address: dest.address, prefix: dest.prefix });
          break;
        case 'list': {
          const list = this.lists.get(dest.list);
          if (list) {
            if (list.names.size + list.suffixes.size > 0) lists.add(dest.list);
            for (const net of list.networks) networks.push(net);
          } else if (!this.merged.records.lists.has(dest.list))
            this.error(placed, [...key, index], `unknown list "@${dest.list}"`, suggest(dest.list, this.merged.records.lists.keys(), 'lists', '@'));
          break;
        }
        case 'catalogue': {
          const matched = [...this.catalogue.values()].filter((entry) => entry.id === dest.selector || entry.category === dest.selector);
          if (matched.length === 0) {
            const known = (CATALOGUE_CATEGORIES as readonly string[]).includes(dest.selector);
            this.error(
              placed,
              [...key, index],
              known ? `catalogue category "${dest.selector}" has no entries` : `unknown catalogue category or entry "${dest.selector}"`,
              known ? undefined : `categories: ${CATALOGUE_CATEGORIES.join(', ')}`,
            );
          }
          for (const entry of matched) {
            entries.add(entry.id);
            entry.names.forEach((n) => names.add(n));
            entry.suffixes.forEach((s) => suffixes.add(s));
          }
          break;
        }
      }
    });
    return {
      any: false,
      names: [...names].sort(),
      suffixes: [...suffixes].sort(),
      lists: [...lists].sort(),
      networks: dedupeNetworks(networks),
      catalogueEntries: [...entries].sort(),
      written: [...written].sort(),
    };
  }

  private logSettings(): Policy['defaults']['log'] {
    const value = <T>(key: string, fallback: T): T => ((this.merged.log as Record<string, Placed<unknown>>)[key]?.value as T | undefined) ?? fallback;
    const [count, per] = value('rate', '10/second').split('/');
    return {
      denials: value('denials', true),
      group: value('group', DEFAULT_LOG_GROUP),
      rate: { count: Number(count), per: per as 'second' | 'minute' | 'hour' },
      burst: value('burst', 20),
    };
  }

  private torSettings(): TorSettings {
    const tor = this.merged.tor;
    const socksText = tor.socks?.value ?? '127.0.0.1:9050';
    const match = /^(?:\[(.+)\]|([^:]+)):(\d+)$/.exec(socksText);
    const host = parseNetwork(match?.[1] ?? match?.[2] ?? '127.0.0.1');
    const socks = host.ok
      ? { family: host.value.family, address: host.value.address, port: Number(match?.[3] ?? 9050) }
      : { family: 4 as const, address: '127.0.0.1', port: 9050 };
    const updaters = tor.updaters
      ? tor.updaters.value.map((ref, i) => this.identity(ref, `tor-updater#${i + 1}`, { ...tor.updaters!, path: [...tor.updaters!.path, i] }))
      : [];
    const first = tor.enabled ?? tor.socks ?? tor.user ?? tor.updaters;
    const user = tor.user?.value ?? 'debian-tor';
    return {
      enabled: tor.enabled?.value ?? false,
      socks,
      user: typeof user === 'object' ? user.user : user,
      userOptional: typeof user === 'object' && user.optional === true,
      userAt: tor.user ? tor.user.source.locate(tor.user.path) : undefined,
      updaters,
      at: first ? first.source.locate(first.path) : undefined,
    };
  }

  private dnsSettings(): DnsSettings {
    const dns = this.merged.dns;
    const listen = [...new Set((dns.listen?.value ?? DNS_DEFAULTS.listen).map((text) => canonical(text)))];
    dns.listen?.value.forEach((text, i) => {
      const parsed = parseNetwork(text);
      const loopback = parsed.ok && (parsed.value.family === 4 ? parsed.value.address.startsWith('127.') : parsed.value.address === '::1');
      // Only loopback: the resolver tells clients apart by their local sockets, and answers this machine alone.
      if (!loopback) this.error(dns.listen!, [i], `the resolver listens on loopback only, not on "${clip(text)}"`, 'an address in 127.0.0.0/8, or ::1');
    });
    const upstreams = dns.upstreams?.value.map((text) => {
      const [host = '', port] = text.split('#');
      return port === undefined ? canonical(host) : `${canonical(host)}#${Number(port)}`;
    });
    upstreams?.forEach((upstream, i) => {
      const [host = '', portText] = upstream.split('#');
      const port = portText === undefined ? 53 : Number(portText);
      if (port === 53 && listen.includes(host)) {
        this.error(dns.upstreams!, [i], `upstream ${upstream} is where the resolver itself listens: it would ask itself`, 'name the server it should ask');
      } else if (!DNS_PORTS.includes(port) && !isLoopback(host)) {
        this.warnings.push({
          severity: 'warning',
          at: dns.upstreams!.source.locate([...dns.upstreams!.path, i]),
          message: `upstream ${upstream}: only the resolver's packets to port ${DNS_PORTS.join(' and ')} pass whatever the policy says; to port ${port} they meet the rules like any other packet of egressd's`,
        });
      }
    });
    const ttlFloor = dns.ttlFloor?.value ?? DNS_DEFAULTS.ttlFloor;
    const ttlCap = dns.ttlCap?.value ?? DNS_DEFAULTS.ttlCap;
    if (ttlFloor > ttlCap) {
      // Point at whichever of the two was written last (or at all): that is the one that made them cross.
      const floorAt = dns.ttlFloor ? dns.ttlFloor.source.locate(dns.ttlFloor.path) : undefined;
      const capAt = dns.ttlCap ? dns.ttlCap.source.locate(dns.ttlCap.path) : undefined;
      const later =
        !capAt || (floorAt && (floorAt.file > capAt.file || (floorAt.file === capAt.file && floorAt.line > capAt.line))) ? dns.ttlFloor! : dns.ttlCap!;
      this.error(later, [], `dns.ttlFloor ${ttlFloor} is above dns.ttlCap ${ttlCap}`, 'the floor is the least time a learned address stays, the cap the most');
    }
    return {
      listen,
      upstreams,
      ttlFloor,
      ttlCap,
      deniedAnswer: dns.deniedAnswer?.value ?? DNS_DEFAULTS.deniedAnswer,
      exclusive: dns.exclusive?.value ?? DNS_DEFAULTS.exclusive,
      mark: dns.mark?.value ?? DNS_DEFAULTS.mark,
    };
  }

  /** A member of a system domain is offline whatever its app rules say; say so, since the rules would look effective. */
  private warnShadowedApps(apps: readonly App[], domains: readonly SystemDomain[]): void {
    for (const app of apps) {
      for (const domain of domains) {
        const shared = app.identities.find((identity) => domain.members.some((member) => identitiesOverlap(member, identity)));
        if (shared) {
          this.warnings.push({
            severity: 'warning',
            at: app.at,
            message: `app "${app.name}" shares identity "${shared.name}" with system domain "${domain.name}"; the system domain wins and keeps it offline`,
          });
        }
      }
    }
  }

  private error(placed: Placed<unknown>, sub: readonly PropertyKey[], message: string, hint?: string): void {
    this.errors.push({ severity: 'error', at: placed.source.locate([...placed.path, ...sub]), message, ...(hint ? { hint } : {}) });
  }
}

export function identitiesOverlap(a: Identity, b: Identity): boolean {
  return a === b || a.selectors.some((x) => b.selectors.some((y) => sameSelector(x, y)));
}

function sameSelector(a: Selector, b: Selector): boolean {
  if (a.kind === 'cgroup' && b.kind === 'cgroup') return a.glob === b.glob;
  if (a.kind === 'user' && b.kind === 'user') return a.user === b.user;
  if (a.kind === 'group' && b.kind === 'group') return a.group === b.group;
  return false;
}

function toSelector(input: SelectorInput): Selector {
  const cgroup = (path: string, written: string): Extract<Selector, { kind: 'cgroup' }> => {
    const glob = path.replace(/^\/+|\/+$/g, '');
    return { kind: 'cgroup', glob, level: glob === '' ? 0 : glob.split('/').length, written };
  };
  if (input.unit !== undefined) return { ...cgroup(unitCgroup(input.unit, input.slice), `unit ${input.unit}`), unit: input.unit };
  if (input.slice !== undefined) return cgroup(slicePath(input.slice), `slice ${input.slice}`);
  if (input.cgroup !== undefined) return cgroup(input.cgroup, `cgroup ${input.cgroup}`);
  if (input.flatpak !== undefined) {
    return cgroup(`user.slice/user-*.slice/user@*.service/app.slice/app-flatpak-${input.flatpak}-#.scope`, `flatpak ${input.flatpak}`);
  }
  const optional = input.optional === true ? { optional: true as const } : {};
  if (input.user !== undefined) return { kind: 'user', user: input.user, ...optional };
  return { kind: 'group', group: input.group!, ...optional };
}

/** One destination in its canonical written form: two spellings of one destination are one. */
function writtenForm(dest: Destination): string {
  switch (dest.kind) {
    case 'name':
      return dest.name;
    case 'suffix':
      return `*.${dest.suffix}`;
    case 'list':
      return `@${dest.list}`;
    case 'catalogue':
      return `catalogue:${dest.selector}`;
    case 'net':
      return `${dest.address}/${dest.prefix}`;
  }
}

/** An address in the form the policy keeps (RFC 5952 for IPv6); the schema checked it already. */
function canonical(address: string): string {
  const parsed = parseNetwork(address);
  return parsed.ok ? parsed.value.address : address;
}

function isLoopback(address: string): boolean {
  return address === '::1' || address.startsWith('127.');
}

function toPortRange(port: number | string): PortRange {
  if (typeof port === 'number') return { from: port, to: port };
  const [from, to = from] = port.trim().split('-').map(Number) as [number, number?];
  return { from, to };
}

/**
 * Drops duplicates and networks inside another of the same rule: nft refuses
 * overlapping intervals in one set, and the wider network decides anyway.
 */
function dedupeNetworks(networks: readonly Network[]): Network[] {
  // Sorted by start, widest first on ties: a network is covered exactly when it ends before the last kept one does.
  const ranges = networks.map((net) => {
    const groups = addressGroups(net.family, net.address);
    const start = groupsKey(groups);
    // A single address (a blocklist's usual line) ends where it starts.
    return { net, start, end: net.prefix === (net.family === 4 ? 32 : 128) ? start : groupsKey(maskGroups(groups, net.prefix, true)) };
  });
  ranges.sort((a, b) => a.net.family - b.net.family || (a.start < b.start ? -1 : a.start > b.start ? 1 : a.net.prefix - b.net.prefix));
  const kept: typeof ranges = [];
  for (const range of ranges) {
    const last = kept[kept.length - 1];
    if (last && last.net.family === range.net.family && range.end <= last.end) continue;
    kept.push(range);
  }
  return kept.map((range) => range.net);
}

function suggest(wanted: string, known: Iterable<string>, what: string, prefix = ''): string {
  const names = [...known];
  const close = names
    .map((name) => ({ name, distance: editDistance(wanted, name) }))
    .filter((c) => c.distance <= 2)
    .sort((a, b) => a.distance - b.distance)[0];
  if (close) return `did you mean ${prefix}${close.name}?`;
  return names.length > 0
    ? `known ${what}: ${names
        .slice(0, 8)
        .map((n) => prefix + n)
        .join(', ')}${names.length > 8 ? ', …' : ''}`
    : `no ${what} are defined`;
}

function editDistance(a: string, b: string): number {
  const row = Array.from({ length: b.length + 1 }, (_, i) => i);
  for (let i = 1; i <= a.length; i++) {
    let diagonal = row[0]!;
    row[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const above = row[j]!;
      row[j] = Math.min(row[j]! + 1, row[j - 1]! + 1, diagonal + (a[i - 1] === b[j - 1] ? 0 : 1));
      diagonal = above;
    }
  }
  return row[b.length]!;
}
