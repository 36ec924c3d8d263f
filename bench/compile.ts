/**
 * Policy → ruleset time for the shipped policies (with the 143,876-name
 * tracking list) and for the same plus 200 apps, side by side: load (read,
 * parse, validate, read lists), compile, the resolver's name index, and the
 * two renderings. Target: load + compile under 1 s.
 *
 *   npx tsx bench/compile.ts [--runs 7]
 */
import { cpSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { compile, type Facts } from '../src/compile/compile.js';
import { buildNameIndex } from '../src/compile/names.js';
import { renderJson, renderText } from '../src/compile/ruleset.js';
import { loadPolicyOrThrow } from '../src/policy/load.js';
import { median } from './lib/stats.js';

const { values } = parseArgs({ options: { runs: { type: 'string', default: '7' } } });
const runs = Number(values.runs);
const SHIPPED = join(import.meta.dirname, '..', 'policies');

function withApps(count: number): string {
  const dir = mkdtempSync(join(tmpdir(), 'egd-bench-'));
  cpSync(SHIPPED, dir, { recursive: true });
  const apps = Array.from({ length: count }, (_, i) => {
    const kind = i % 3 === 0 ? `{user: ${20000 + i}}` : i % 3 === 1 ? `{unit: app${i}.service}` : `{flatpak: org.example.App${i}}`;
    return [
      `  app${i}:`,
      `    identity: ${kind}`,
      `    default: ${i % 2 ? 'deny' : 'allow'}`,
      '    rules:',
      `      - allow: ["api${i}.example.org", "*.cdn${i}.example.net", 198.51.100.${i % 250}, "2001:db8:${i.toString(16)}::/48"]`,
      '        ports: [443]',
      '        proto: tcp',
      `      - deny: ["catalogue:telemetry", "@tracking"]`,
    ].join('\n');
  });
  writeFileSync(join(dir, '60-bench-apps.yaml'), `apps:\n${apps.join('\n')}\n`);
  return dir;
}

const facts: Facts = {
  users: new Map([
    ['_apt', 42],
    ['debian-tor', 110],
  ]),
  groups: new Map(),
  cgroups: [],
};

interface Sample {
  load: number;
  compile: number;
  index: number;
  text: number;
  json: number;
}

function measure(dir: string): { samples: Sample[]; rules: number; names: number } {
  const samples: Sample[] = [];
  let rules = 0;
  let names = 0;
  for (let i = 0; i < runs; i++) {
    const t0 = performance.now();
    const { policy } = loadPolicyOrThrow(dir);
    const t1 = performance.now();
    const compiled = compile(policy, facts);
    const t2 = performance.now();
    const index = buildNameIndex(policy, compiled.dnsBindings);
    const t3 = performance.now();
    renderText(compiled.ruleset);
    const t4 = performance.now();
    JSON.stringify(renderJson(compiled.ruleset));
    const t5 = performance.now();
    samples.push({ load: t1 - t0, compile: t2 - t1, index: t3 - t2, text: t4 - t3, json: t5 - t4 });
    rules = compiled.ruleset.chains.reduce((n, c) => n + c.rules.length, 0);
    names = index.size.names;
  }
  return { samples, rules, names };
}

const ms = (x: number) => `${x.toFixed(1)} ms`;

const appsDir = withApps(200);
try {
  const cases = [
    { name: 'shipped policies (143,876-name list)', ...measure(SHIPPED) },
    { name: 'shipped + 200 apps', ...measure(appsDir) },
  ];
  const header = ['scenario', 'load+validate', 'compile', 'load+compile', 'name index', 'render nft', 'render JSON', 'nft rules', 'indexed names'];
  const rows = cases.map((c) => {
    const m = (k: keyof Sample) => median(c.samples.map((s) => s[k]));
    return [
      c.name,
      ms(m('load')),
      ms(m('compile')),
      ms(median(c.samples.map((s) => s.load + s.compile))),
      ms(m('index')),
      ms(m('text')),
      ms(m('json')),
      String(c.rules),
      c.names.toLocaleString('en'),
    ];
  });
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: string[]) => `| ${cells.map((cell, i) => cell.padEnd(widths[i]!)).join(' | ')} |`;
  console.log(`Policy compile, median of ${runs} runs (node ${process.version}); target: load+compile < 1000 ms\n`);
  console.log(line(header));
  console.log(`|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`);
  for (const row of rows) console.log(line(row));
} finally {
  rmSync(appsDir, { recursive: true, force: true });
}
