/** Statistics the benchmarks share. (bench/run.ts runs only the files directly in bench/.) */

/** The middle value; for an even count, the mean of the two middle values. */
export function median(xs: readonly number[]): number {
  if (xs.length === 0) throw new Error('median of no values');
  const sorted = [...xs].sort((x, y) => x - y);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

/**
 * The median and a 90 % interval for it, from 2,000 resamples with
 * replacement. The generator is seeded, so the same values always print the
 * same interval.
 */
export function medianWithInterval(xs: readonly number[]): { median: number; low: number; high: number } {
  let seed = 0x9e3779b9;
  const random = () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const medians = Array.from({ length: 2000 }, () => median(Array.from(xs, () => xs[Math.floor(random() * xs.length)]!))).sort((x, y) => x - y);
  // 100 resamples below the interval and 100 above it.
  return { median: median(xs), low: medians[100]!, high: medians[1899]! };
}

/** The nearest-rank percentile of values sorted ascending; NaN for none. */
export function percentile(sorted: readonly number[], p: number): number {
  const index = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[index] ?? Number.NaN;
}

/** One scenario's latencies, in ms. */
export interface LatencyRow {
  readonly scenario: string;
  readonly samples: readonly number[];
}

/** scenario, n, p50, p99 and max of each row, as a fixed-width text table. */
export function latencyTable(rows: readonly LatencyRow[]): string {
  const head = ['scenario', 'n', 'p50 ms', 'p99 ms', 'max ms'];
  const body = rows.map((row) => {
    const sorted = [...row.samples].sort((a, b) => a - b);
    return [
      row.scenario,
      String(sorted.length),
      percentile(sorted, 50).toFixed(3),
      percentile(sorted, 99).toFixed(3),
      (sorted[sorted.length - 1] ?? Number.NaN).toFixed(3),
    ];
  });
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((r) => (r[i] ?? '').length)));
  const line = (cells: readonly string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i] ?? 0) : c.padStart(widths[i] ?? 0))).join('  ');
  return [line(head), widths.map((w) => '-'.repeat(w)).join('  '), ...body.map(line)].join('\n');
}
