/**
 * Debian's dnsmasq as tests and benchmarks run it: answering only from its
 * command line, in the foreground, on one address and port. No config file
 * (a machine's /etc/dnsmasq.conf would otherwise be read), no resolv.conf,
 * no hosts file, no polling, no pid file. Callers add what it answers, its
 * user and its log.
 */
export function dnsmasqOnly(address: string, port = 53): string[] {
  return [
    '--keep-in-foreground',
    '--conf-file=/dev/null',
    '--pid-file=',
    '--no-resolv',
    '--no-hosts',
    '--no-poll',
    '--bind-interfaces',
    `--listen-address=${address}`,
    `--port=${port}`,
  ];
}
