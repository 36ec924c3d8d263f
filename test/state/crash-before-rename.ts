/**
 * Writes a state file and dies (SIGKILL: no clean-up of any kind) after the
 * temporary file is written and synced, before the rename: the crash the
 * atomic writer must survive. Prints the temporary file's path first.
 * Usage: crash-before-rename.ts DIR NAME CONTENT
 */
import { writeFileAtomic } from '../../src/state/files.js';

const [dir = '', name = '', content = ''] = process.argv.slice(2);
writeFileAtomic(dir, name, content, 0o640, {
  beforeRename: (temp) => {
    process.stdout.write(`${temp}\n`);
    process.kill(process.pid, 'SIGKILL');
  },
});
