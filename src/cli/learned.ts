import { askResolver } from '../resolver/control.js';

/**
 * What the running resolver remembers of an address, for `explain --to
 * ADDRESS` and `status`: which names it was learned from, and whether those
 * names are judged alike. A resolver that is not running is said, not an error.
 */

export interface LearnedReport {
  readonly running: boolean;
  /** Why the resolver could not be asked, when it could not. */
  readonly why: string | null;
  /** Each name as a lookup of it alone would be judged. */
  readonly names: readonly { name: string; expiresAt: number; expiresInSeconds: number; verdict: 'allow' | 'deny' | null; ruleId: string | null }[];
  /**
   * Each chain of lookups that led to the address (question first), judged
   * as the resolver does: a name anywhere in the chain that is denied denies
   * it. More than one chain: the address is shared (a CDN).
   */
  readonly chains: readonly { names: readonly string[]; verdict: 'allow' | 'deny' | null; ruleId: string | null }[];
  /** Some chains are allowed and some denied for the identity asked about. */
  readonly differentVerdicts: boolean;
}

export type VerdictOf = (name: string) => { verdict: 'allow' | 'deny'; ruleId: string } | undefined;

export async function learnedFrom(address: string, socket: string, verdictOf: VerdictOf): Promise<LearnedReport> {
  const asked = await askResolver({ op: 'names', address }, { path: socket });
  if (!asked.running) return { running: false, why: asked.why, names: [], chains: [], differentVerdicts: false };
  const reply = asked.reply;
  if (!reply.ok || reply.op !== 'names')
    return { running: true, why: reply.ok ? 'unexpected reply' : reply.error, names: [], chains: [], differentVerdicts: false };
  const names = reply.names.map((n) => {
    const judged = verdictOf(n.name);
    return {
      ...n,
      expiresInSeconds: Math.max(0, Math.round((n.expiresAt - reply.now) / 1000)),
      verdict: judged?.verdict ?? null,
      ruleId: judged?.ruleId ?? null,
    };
  });
  const judgedName = new Map(names.map((n) => [n.name, n]));
  const chains = reply.chains.map((chain) => {
    const judged = chain.map((name) => judgedName.get(name)).filter((n) => n !== undefined && n.verdict !== null);
    const decider = judged.find((n) => n!.verdict === 'deny') ?? judged[0];
    return { names: chain, verdict: decider?.verdict ?? null, ruleId: decider?.ruleId ?? null };
  });
  const verdicts = new Set(chains.map((c) => c.verdict).filter((v) => v !== null));
  return { running: true, why: null, names, chains, differentVerdicts: verdicts.size > 1 };
}

export function describeLearned(address: string, report: LearnedReport): string[] {
  if (!report.running) return [`  learned from: unknown (resolver ${report.why ?? 'not running'})`];
  if (report.why) return [`  learned from: unknown (the resolver answered: ${report.why})`];
  if (report.names.length === 0) return [`  learned from: no name (the resolver holds no unexpired answer with ${address})`];
  const lines = [`  learned from: ${report.names.map((n) => `${n.name} (expires in ${duration(n.expiresInSeconds)})`).join(', ')}`];
  const chain = (c: LearnedReport['chains'][number]) => c.names.join(' → ');
  if (report.chains.length > 1) lines.push(`  shared: ${address} answers ${report.chains.length} separate lookups: ${report.chains.map(chain).join('; ')}`);
  if (report.differentVerdicts) {
    const by = (verdict: 'allow' | 'deny') =>
      report.chains
        .filter((c) => c.verdict === verdict)
        .map((c) => `${chain(c)} (${verdict === 'allow' ? 'ALLOWED' : 'DENIED'} by ${c.ruleId})`)
        .join(', ');
    lines.push(
      `  note: ${address} answers names with different verdicts: ${by('deny')} and ${by('allow')}; the kernel sees only the address, and by default the deny holds for all of them`,
    );
  }
  return lines;
}

export async function resolverStatusLine(socket: string): Promise<{ line: string; json: Record<string, unknown> }> {
  const asked = await askResolver({ op: 'status' }, { path: socket });
  if (!asked.running) return { line: `resolver: ${asked.why}`, json: { running: false, why: asked.why } };
  const reply = asked.reply;
  if (!reply.ok || reply.op !== 'status')
    return { line: `resolver: running, but its status could not be read`, json: { running: true, why: reply.ok ? 'unexpected reply' : reply.error } };
  const { names, entries } = reply.memory;
  const shared = reply.shared.map((s) => `\n  shared: ${s.address} answers ${s.chains.map((chain) => chain.join(' > ')).join(' and ')}`).join('');
  return {
    line: `resolver: running, ${names} ${names === 1 ? 'name' : 'names'} remembered for ${entries} ${entries === 1 ? 'address' : 'addresses'}${shared}`,
    json: { running: true, memory: reply.memory, shared: reply.shared, counters: reply.resolver },
  };
}

function duration(seconds: number): string {
  if (seconds < 120) return `${seconds} s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
  return `${Math.round(seconds / 3600)} h`;
}
