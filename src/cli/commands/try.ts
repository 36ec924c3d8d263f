import { EgressError, ErrorCode } from '../../errors.js';
import { harnessUnavailableReason } from '../../lab/index.js';
import { runTry, shippedPolicyDir, TryInterrupted, type SampleResult, type TryStep } from '../../lab/try.js';
import { Exit, parseFlags, type Command } from '../deps.js';

export interface TryOptions {
  readonly dir: string | undefined;
  readonly json: boolean;
  readonly color: boolean | undefined;
}

export const tryIt: Command<TryOptions> = {
  name: 'try',
  summary: 'a safe first run in a throwaway network: see what egressd blocks, and why',
  help: `Usage: egressctl try [--policy DIR] [--json] [--color|--no-color]

Shows egressd at work without touching this machine: builds a throwaway
network (two network namespaces: a "host" and a small "internet" with its
own DNS server, addresses from the documentation ranges), starts egressd
there on the shipped policies, and runs three sample apps:

  1. an app phoning home to metrics.ubuntu.com, which the shipped
     phone-home catalogue denies;
  2. an app reaching mirror.example.org, which nothing denies;
  3. a process in a system domain (no network at all), trying the same
     mirror by name and by address.

For each it says what happened (what the DNS lookup answered, whether the
connection reached the server in the small internet) and which rule
decided it, with its FILE:LINE. Then it removes everything it made —
namespaces, processes, cgroups, temporary files — also when interrupted
with Ctrl-C. Your ruleset, network, users and /etc/egressd are never
touched. Needs root (namespaces and nftables), like egressd itself.

  --policy DIR   the policies to try (default: the shipped ones,
                 ${shippedPolicyDir()}); a copy is used, with one drop-in
                 that adds the system domain and the lab's DNS server
  --json         print the outcome as JSON on stdout
  --color        colour the verdicts (default: when stderr is a terminal
                 and NO_COLOR is not set); --no-color never

Exit status: 0 every sample went as the policies say, 1 one did not,
2 bad usage, 3 this machine cannot build the throwaway network (the reason
is printed).`,

  parse(argv) {
    const { values } = parseFlags(
      'try',
      argv,
      { policy: { type: 'string' }, json: { type: 'boolean' }, color: { type: 'boolean' }, 'no-color': { type: 'boolean' } },
      0,
    );
    if (values.color && values['no-color']) throw new EgressError(ErrorCode.Usage, 'egressctl try: --color and --no-color contradict each other');
    return { dir: values.policy, json: values.json === true, color: values.color ? true : values['no-color'] ? false : undefined };
  },

  async run(options, deps) {
    const unavailable = harnessUnavailableReason();
    if (unavailable) throw new EgressError(ErrorCode.Io, `egressctl try: cannot build the throwaway network: ${unavailable}`);
    const color = options.color ?? (process.stderr.isTTY && !process.env['NO_COLOR']);
    const paint = (code: number, text: string): string => (color ? `\x1b[${code}m${text}\x1b[0m` : text);
    const say = (line: string): void => deps.err(line);
    const progress = (step: TryStep): void => {
      switch (step.kind) {
        case 'lab':
          say(`Built a throwaway network: ${step.host} (the host) and ${step.internet} (a small internet).`);
          return;
        case 'enforcing':
          say(`egressd is enforcing ${step.files.length} policy files (${step.rules} rules) in it.\n`);
          return;
        case 'sample':
          for (const line of describeSample(step.result, paint)) say(line);
          return;
        case 'removed':
          say('Removed the throwaway network, its processes, cgroups and files; this machine is as it was.');
          return;
      }
    };
    const abort = new AbortController();
    const interrupt = (): void => {
      say('\nInterrupted: removing everything …');
      abort.abort();
    };
    process.once('SIGINT', interrupt);
    process.once('SIGTERM', interrupt);
    say('egressctl try: a safe first run; nothing on this machine changes.');
    try {
      const result = await runTry({ policyDir: options.dir ?? shippedPolicyDir(), progress, signal: abort.signal });
      if (options.json) deps.out(JSON.stringify(result, null, 2));
      const unexpected = result.samples.filter((s) => !s.asExpected);
      if (unexpected.length > 0) {
        say(paint(31, `\n${unexpected.length} of ${result.samples.length} samples did not go as the policies say: see above.`));
        return Exit.Answer;
      }
      say('\nNext: ask why any connection is decided as it is (egressctl explain --help), then install egressd for real (README).');
      return Exit.Ok;
    } catch (error) {
      if (error instanceof TryInterrupted) return 130;
      throw error;
    } finally {
      process.off('SIGINT', interrupt);
      process.off('SIGTERM', interrupt);
    }
  },
};

function describeSample(s: SampleResult, paint: (code: number, text: string) => string): string[] {
  const lookup = 'addresses' in s.outcome.lookup ? `answered ${s.outcome.lookup.addresses.join(', ')}` : `answered ${dnsError(s.outcome.lookup.error)}`;
  const connection =
    s.outcome.address === undefined
      ? 'so it had nowhere to connect'
      : s.outcome.connect === 'connected'
        ? `it connected to ${s.outcome.address}:443 and the server saw it`
        : `its connection to ${s.outcome.address}:443 ${s.outcome.connect === 'ETIMEDOUT' ? 'was dropped in the kernel' : `failed (${s.outcome.connect ?? '?'})`}; the server saw ${s.serverSaw === 0 ? 'nothing' : `${s.serverSaw} connection(s)`}`;
  const verdict = s.blocked ? paint(31, 'BLOCKED') : paint(32, 'ALLOWED');
  const rule = `${s.rule.verdict === 'deny' ? 'denied' : 'allowed'} by ${s.rule.ruleId}${s.rule.shortId ? ` [${s.rule.shortId}]` : ''} at ${s.rule.at ?? '(built in)'}`;
  return [
    `${s.title} (${s.who}) looks up ${s.name}`,
    `  ${verdict}: egressd's resolver ${lookup}; ${connection}.`,
    `  rule: ${rule}${s.rule.why ? ` — ${s.rule.why}` : ''}`,
    ...(s.recorded
      ? [
          `  recorded by egressd's denial log (egressctl denials): ${s.recorded.protocol} to ${s.recorded.address}:${s.recorded.port ?? '-'} by uid ${s.recorded.uid ?? '?'}, rule ${s.recorded.ruleId ?? s.recorded.shortId}${s.recorded.file ? ` at ${s.recorded.file}:${s.recorded.line ?? '?'}` : ''}`,
        ]
      : []),
    ...(s.asExpected ? [] : [paint(31, '  this is not what the policy says should happen')]),
    '',
  ];
}

function dnsError(code: string): string {
  if (code === 'ENOTFOUND') return '"no such name" (NXDOMAIN)';
  if (code === 'EREFUSED') return '"refused" (REFUSED: a system domain gets no DNS)';
  // The table drops a system domain's DNS on loopback too, once the app tracker has its cgroup; the send then fails at once.
  if (code === 'ECONNREFUSED') return '"could not send" (ECONNREFUSED: the kernel dropped the query; a system domain gets no DNS)';
  return code;
}
