import { spawn, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { removeFileDurably, stageFileAtomic, tempName, writeFileAtomic } from '../../src/state/files.js';

const dirs: string[] = [];
const newDir = () => {
  const dir = mkdtempSync(join(tmpdir(), 'egd-files-'));
  dirs.push(dir);
  return dir;
};
afterEach(() => {
  for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
});

const CRASH = join(import.meta.dirname, 'crash-before-rename.ts');

describe('writeFileAtomic', () => {
  it('writes the file whole with its mode, creating the directory, and leaves no temporary file', () => {
    const dir = join(newDir(), 'state');
    writeFileAtomic(dir, 'a.json', '{"a":1}\n', 0o640);
    expect(readFileSync(join(dir, 'a.json'), 'utf8')).toBe('{"a":1}\n');
    expect(statSync(join(dir, 'a.json')).mode & 0o777).toBe(0o640);
    expect(statSync(dir).mode & 0o777).toBe(0o750);
    writeFileAtomic(dir, 'a.json', new Uint8Array([0x78, 0x0a]));
    expect(readFileSync(join(dir, 'a.json'), 'utf8')).toBe('x\n');
    expect(readdirSync(dir)).toEqual(['a.json']);
  });

  it('a writer killed between the temporary write and the rename leaves the old file whole; the next write removes its temporary file', () => {
    const dir = newDir();
    writeFileAtomic(dir, 'last-good.nft', 'old\n');
    const crashed = spawnSync(process.execPath, ['--import', 'tsx', CRASH, dir, 'last-good.nft', 'new\n'], { encoding: 'utf8', timeout: 30_000 });
    expect(crashed.signal).toBe('SIGKILL');
    const temp = crashed.stdout.trim();
    // The crash happened with the new content written in full and synced, under a name no reader opens.
    expect(readFileSync(temp, 'utf8')).toBe('new\n');
    expect(readdirSync(dir).sort()).toEqual([temp.slice(dir.length + 1), 'last-good.nft'].sort());
    expect(readFileSync(join(dir, 'last-good.nft'), 'utf8')).toBe('old\n');
    // Its writer is dead: the next write of the same file clears it away.
    writeFileAtomic(dir, 'last-good.nft', 'newer\n');
    expect(readdirSync(dir)).toEqual(['last-good.nft']);
    expect(readFileSync(join(dir, 'last-good.nft'), 'utf8')).toBe('newer\n');
  });

  it("leaves the temporary file of a writer that is still running, and other files' temporary files, alone", async () => {
    const dir = newDir();
    const sleeper = spawn('sleep', ['30']);
    try {
      const pid = sleeper.pid!;
      const running = `.a.json.tmp-${pid}-0123abcd`;
      const other = `.b.json.tmp-${pid + 1_000_000}-0123abcd`;
      writeFileSync(join(dir, running), 'in progress');
      writeFileSync(join(dir, other), 'another file');
      writeFileAtomic(dir, 'a.json', 'x');
      expect(readdirSync(dir).sort()).toEqual([running, other, 'a.json'].sort());
    } finally {
      sleeper.kill();
    }
  });

  it('a failed rename removes its temporary file and throws; the old file stays', () => {
    const dir = newDir();
    mkdirSync(join(dir, 'taken'));
    writeFileSync(join(dir, 'taken', 'x'), '');
    expect(() => writeFileAtomic(dir, 'taken', 'content')).toThrow(/EISDIR|ENOTEMPTY|EEXIST/);
    expect(readdirSync(dir)).toEqual(['taken']);
    writeFileAtomic(dir, 'kept', 'old');
    expect(() =>
      writeFileAtomic(dir, 'kept', 'new', 0o640, {
        beforeRename: () => {
          throw new Error('disk gone');
        },
      }),
    ).toThrow('disk gone');
    expect(readdirSync(dir).sort()).toEqual(['kept', 'taken']);
    expect(readFileSync(join(dir, 'kept'), 'utf8')).toBe('old');
  });

  it('a staged file is written whole under its temporary name and leaves the old file alone until commit; discard removes it', () => {
    const dir = newDir();
    writeFileAtomic(dir, 'last-good.nft', 'old\n');
    const staged = stageFileAtomic(dir, 'last-good.nft', 'new\n');
    expect(readFileSync(staged.tempPath, 'utf8')).toBe('new\n');
    expect(readFileSync(join(dir, 'last-good.nft'), 'utf8')).toBe('old\n');
    staged.commit();
    expect(readdirSync(dir)).toEqual(['last-good.nft']);
    expect(readFileSync(join(dir, 'last-good.nft'), 'utf8')).toBe('new\n');
    expect(() => staged.commit()).toThrow(/internal/);

    const dropped = stageFileAtomic(dir, 'last-good.nft', 'never\n');
    dropped.discard();
    dropped.discard();
    expect(readdirSync(dir)).toEqual(['last-good.nft']);
    expect(readFileSync(join(dir, 'last-good.nft'), 'utf8')).toBe('new\n');
    expect(() => dropped.commit()).toThrow(/internal/);
    expect(readFileSync(join(dir, 'last-good.nft'), 'utf8')).toBe('new\n');
  });

  it('takes only plain names: a path or a hidden name would escape the directory or look like a temporary file', () => {
    const dir = newDir();
    expect(() => writeFileAtomic(dir, '../x', '')).toThrow(/internal/);
    expect(() => writeFileAtomic(dir, '.x', '')).toThrow(/internal/);
    expect(tempName('a.json')).toMatch(new RegExp(`^\\.a\\.json\\.tmp-${process.pid}-[0-9a-f]{8}$`));
  });

  it('removeFileDurably removes a file, and is quiet about one that is not there or a directory that is not there', () => {
    const dir = newDir();
    writeFileAtomic(dir, 'applied.json', '{}');
    removeFileDurably(dir, 'applied.json');
    expect(readdirSync(dir)).toEqual([]);
    removeFileDurably(dir, 'applied.json');
    removeFileDurably(join(dir, 'missing'), 'applied.json');
  });
});
