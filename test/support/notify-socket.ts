import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

/**
 * A systemd notify socket of the test's own: a unix datagram socket (Node
 * has none) held by a few lines of the system's python3, which prints each
 * datagram it receives as a JSON line. /usr/bin/python3 by path: test users
 * cannot run the pyenv one.
 */
const RECEIVER = `
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
address = sys.argv[1]
s.bind("\\0" + address[1:] if address.startswith("@") else address)
print(json.dumps({"listening": True}), flush=True)
while True:
    data = s.recv(65536)
    print(json.dumps({"message": data.decode()}), flush=True)
`;

export interface NotifyMessage {
  /** KEY → value, as systemd parses the datagram. */
  readonly fields: ReadonlyMap<string, string>;
  readonly text: string;
}

export interface NotifySocket {
  /** NOTIFY_SOCKET's value: a path, or "@name" for an abstract socket. */
  readonly address: string;
  readonly messages: NotifyMessage[];
  /** Resolves with the first message from the call on (or already received past `from`) that `match` accepts. */
  next(match: (m: NotifyMessage) => boolean, from?: number, timeoutMs?: number): Promise<NotifyMessage>;
  close(): void;
}

/** `wrap` runs the receiver inside something (nsenter into a namespace: abstract sockets belong to a network namespace). */
export async function openNotifySocket(options: { abstract?: boolean; wrap?: readonly string[] } = {}): Promise<NotifySocket> {
  const dir = options.abstract ? undefined : mkdtempSync(join(tmpdir(), 'egd-notify-'));
  const address = dir === undefined ? `@egd-notify-${randomBytes(6).toString('hex')}` : join(dir, 'notify');
  const command = [...(options.wrap ?? []), '/usr/bin/python3', '-c', RECEIVER, address];
  const child: ChildProcess = spawn(command[0]!, command.slice(1), { stdio: ['ignore', 'pipe', 'inherit'] });
  const messages: NotifyMessage[] = [];
  const waiters = new Set<() => void>();
  const listening = new Promise<void>((resolve, reject) => {
    child.once('exit', (code) => reject(new Error(`the notify receiver exited (${code}) before listening`)));
    createInterface({ input: child.stdout! }).on('line', (line) => {
      const parsed = JSON.parse(line) as { listening?: true; message?: string };
      if (parsed.listening) resolve();
      if (parsed.message === undefined) return;
      const fields = new Map(
        parsed.message
          .split('\n')
          .filter((l) => l.includes('='))
          .map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)] as const),
      );
      messages.push({ fields, text: parsed.message });
      for (const wake of waiters) wake();
    });
  });
  await listening;
  return {
    address,
    messages,
    next(match, from = messages.length, timeoutMs = 20_000) {
      return new Promise((resolve, reject) => {
        const check = () => {
          const found = messages.slice(from).find(match);
          if (!found) return;
          waiters.delete(check);
          clearTimeout(timer);
          resolve(found);
        };
        const timer = setTimeout(() => {
          waiters.delete(check);
          reject(new Error(`no such notify message; received ${JSON.stringify(messages.map((m) => m.text))}`));
        }, timeoutMs);
        waiters.add(check);
        check();
      });
    },
    close() {
      child.kill('SIGKILL');
      if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
    },
  };
}
