import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, realpathSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/**
 * A real systemd as PID 1: the cached Debian 12 tree (image.ts) booted with
 * `systemd-nspawn --boot`, through an overlay of the test's own, so the tree
 * stays clean and a reboot keeps what the first boot wrote.
 *
 * - Its network is its own (--private-network: loopback only): every nft it
 *   runs is in the container's network namespace, never the host's.
 * - Node is the host's (/usr/bin/node bound read-only: the same Debian 12
 *   libc; Debian 12's own nodejs is 18, too old), and so are this checkout
 *   (at /src) and its node_modules (at their real path, since node_modules
 *   is a symlink), all read-only: scripts/install.sh copies from there.
 * - No machined or system bus on the host: --register=no --keep-unit.
 *   Commands run inside through nsenter into the container's init.
 */

export interface ExecResult {
  readonly code: number | null;
  readonly stdout: string;
  readonly stderr: string;
}

const PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

export class Machine {
  private readonly scratch: string;
  private readonly merged: string;
  private nspawn: ChildProcess | undefined;
  private exited: Promise<number | null> | undefined;
  private leader = 0;
  /** What the container's console printed, for a failure's message. */
  console = '';

  constructor(
    image: string,
    private readonly checkout: string,
    private readonly name = `egdboot${process.pid}`,
    private readonly extraArgs: readonly string[] = [],
  ) {
    this.scratch = mkdtempSync(join(tmpdir(), 'egressd-boot-'));
    this.merged = join(this.scratch, 'root');
    for (const d of ['upper', 'work', 'root']) mkdirSync(join(this.scratch, d));
    const mount = spawnSync(
      'mount',
      ['-t', 'overlay', 'overlay', '-o', `lowerdir=${image},upperdir=${join(this.scratch, 'upper')},workdir=${join(this.scratch, 'work')}`, this.merged],
      { encoding: 'utf8' },
    );
    if (mount.status !== 0) throw new Error(`overlay mount failed: ${mount.stderr}`);
  }

  /** Boots and waits until systemd says the boot is over; returns the seconds it took. */
  async boot(timeoutMs = 120_000): Promise<number> {
    const started = process.hrtime.bigint();
    const modules = realpathSync(join(this.checkout, 'node_modules'));
    this.console = '';
    const child = spawn(
      'systemd-nspawn',
      [
        `--directory=${this.merged}`,
        `--machine=${this.name}`,
        '--boot',
        '--private-network',
        '--register=no',
        '--keep-unit',
        '--console=pipe',
        '--bind-ro=/usr/bin/node',
        `--bind-ro=${this.checkout}:/src`,
        `--bind-ro=${modules}`,
        ...this.extraArgs,
      ],
      { stdio: ['ignore', 'pipe', 'pipe'], env: { PATH, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY: '1' } },
    );
    this.nspawn = child;
    child.stdout.on('data', (b: Buffer) => (this.console += b.toString()));
    child.stderr.on('data', (b: Buffer) => (this.console += b.toString()));
    this.exited = new Promise((resolve) => child.on('exit', (code) => resolve(code)));
    const deadline = Date.now() + timeoutMs;
    while (!this.leader) {
      if (child.exitCode !== null) throw new Error(`systemd-nspawn exited (${child.exitCode}):\n${this.console}`);
      if (Date.now() > deadline) throw new Error(`no container init after ${timeoutMs} ms:\n${this.console}`);
      this.leader = this.findLeader(child.pid!);
      if (!this.leader) await new Promise((r) => setTimeout(r, 50));
    }
    // "running" or "degraded" (a unit failed: the test says which); both mean the boot is over.
    for (;;) {
      const state = (await this.exec(['systemctl', 'is-system-running', '--wait'])).stdout.trim();
      if (state === 'running' || state === 'degraded') break;
      if (Date.now() > deadline) throw new Error(`systemd did not finish booting (${state}):\n${this.console}`);
      await new Promise((r) => setTimeout(r, 200));
    }
    return Number(process.hrtime.bigint() - started) / 1e9;
  }

  /** The container's init: nspawn's child whose command is systemd. */
  private findLeader(pid: number): number {
    let children: string;
    try {
      children = readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8');
    } catch {
      return 0;
    }
    for (const child of children.trim().split(/\s+/).filter(Boolean)) {
      try {
        if (readFileSync(`/proc/${child}/comm`, 'utf8').trim() === 'systemd') return Number(child);
      } catch {
        // Gone already.
      }
    }
    return 0;
  }

  /** Runs a command inside, in all of the container's namespaces, with a clean environment. */
  exec(argv: readonly string[], options: { input?: string; timeoutMs?: number } = {}): Promise<ExecResult> {
    if (!this.leader) throw new Error('the machine is not running');
    return new Promise((resolve) => {
      const child = spawn('nsenter', [`--target=${this.leader}`, '--all', '--', 'env', '-i', `PATH=${PATH}`, 'LANG=C.UTF-8', ...argv], {
        stdio: ['pipe', 'pipe', 'pipe'],
      });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (b: Buffer) => (stdout += b.toString()));
      child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
      const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? 60_000);
      child.on('close', (code) => {
        clearTimeout(timer);
        resolve({ code, stdout, stderr });
      });
      // A command that exits before reading its input (systemctl reboot) closes the pipe: not an error of the command's.
      child.stdin.on('error', () => undefined);
      child.stdin.end(options.input ?? '');
    });
  }

  async run(argv: readonly string[], options: { input?: string; timeoutMs?: number } = {}): Promise<string> {
    const r = await this.exec(argv, options);
    if (r.code !== 0) throw new Error(`${argv.join(' ')} exited ${r.code}:\n${r.stdout}${r.stderr}`);
    return r.stdout;
  }

  /** `systemctl reboot` inside: nspawn exits (it does not boot again by itself), and the same tree is booted again. Returns the boot's seconds. */
  async reboot(): Promise<number> {
    await this.exec(['systemctl', 'reboot']);
    await this.waitExit(60_000);
    return this.boot();
  }

  private async waitExit(timeoutMs: number): Promise<void> {
    if (!this.nspawn || !this.exited) return;
    const timer = setTimeout(() => this.nspawn?.kill('SIGKILL'), timeoutMs);
    await this.exited;
    clearTimeout(timer);
    this.nspawn = undefined;
    this.leader = 0;
  }

  /** Powers off (SIGTERM to nspawn is its "poweroff"), unmounts the overlay and removes the scratch folder. */
  async destroy(): Promise<void> {
    if (this.nspawn && this.nspawn.exitCode === null) {
      this.nspawn.kill('SIGTERM');
      await this.waitExit(30_000);
    }
    spawnSync('umount', [this.merged]);
    rmSync(this.scratch, { recursive: true, force: true });
  }
}
