import { isMap, isScalar, isSeq, LineCounter, parseDocument, type Node } from 'yaml';
import { clip, type PolicyIssue } from './issues.js';
import type { Origin } from './model.js';

/** A parsed YAML file that can say where any value in it was written. */
export interface SourceFile {
  readonly file: string;
  readonly data: unknown;
  /** Where the value at `path` is; falls back to the nearest ancestor that exists. */
  locate(path: readonly PropertyKey[]): Origin;
  /** Where the key (not the value) at the end of `path` is written. */
  locateKey(path: readonly PropertyKey[]): Origin;
}

export const MAX_POLICY_FILE_BYTES = 1024 * 1024;

export function oversizeIssue(file: string, size: number): PolicyIssue {
  return {
    severity: 'error',
    at: { file, line: 1, col: 1 },
    message: `file is ${size} bytes; a policy file is at most ${MAX_POLICY_FILE_BYTES} bytes`,
    hint: 'put long name lists in a list file (lists: NAME: {file: ...})',
  };
}

/**
 * Parses one policy file's text. Binary content and invalid UTF-8 are errors
 * before any YAML parsing, so a stray binary never reaches the parser.
 */
export function parsePolicySource(file: string, bytes: Uint8Array): { source?: SourceFile; issues: PolicyIssue[] } {
  const top: Origin = { file, line: 1, col: 1 };
  if (bytes.length > MAX_POLICY_FILE_BYTES) return { issues: [oversizeIssue(file, bytes.length)] };
  const nul = bytes.indexOf(0);
  if (nul >= 0) {
    return { issues: [{ severity: 'error', at: offsetOrigin(file, bytes, nul), message: 'file is binary (it contains a NUL byte), not YAML' }] };
  }
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  } catch {
    return { issues: [{ severity: 'error', at: top, message: 'file is not valid UTF-8 text' }] };
  }

  const lineCounter = new LineCounter();
  const doc = parseDocument(text, { lineCounter, prettyErrors: false, uniqueKeys: true, strict: true });
  const at = (offset: number): Origin => {
    const pos = lineCounter.linePos(offset);
    return { file, line: pos.line, col: pos.col };
  };
  if (doc.errors.length > 0) {
    return {
      issues: doc.errors.map((error) => ({
        severity: 'error' as const,
        at: at(error.pos[0]),
        message: `YAML: ${clip(error.message.split('\n')[0]!, 200)}`,
      })),
    };
  }

  let data: unknown;
  try {
    data = doc.toJS({ maxAliasCount: 100 });
  } catch (error) {
    return { issues: [{ severity: 'error', at: top, message: `YAML: ${clip((error as Error).message.split('\n')[0]!, 200)}` }] };
  }

  const nodeAt = (path: readonly PropertyKey[]): Node | undefined => {
    for (let depth = path.length; depth >= 0; depth--) {
      const node = depth === 0 ? doc.contents : doc.getIn(path.slice(0, depth) as unknown[], true);
      if (node && typeof node === 'object' && 'range' in node && (node as Node).range) return node as Node;
    }
    return undefined;
  };
  const locate = (path: readonly PropertyKey[]): Origin => {
    const node = nodeAt(path);
    return node?.range ? at(node.range[0]) : top;
  };
  const locateKey = (path: readonly PropertyKey[]): Origin => {
    const parent = path.length > 1 ? doc.getIn(path.slice(0, -1) as unknown[], true) : doc.contents;
    const last = path[path.length - 1];
    if (isMap(parent)) {
      const pair = parent.items.find((item) => isScalar(item.key) && item.key.value === last);
      if (pair && isScalar(pair.key) && pair.key.range) return at(pair.key.range[0]);
    }
    if (isSeq(parent) && typeof last === 'number') return locate(path);
    return locate(path.slice(0, -1));
  };
  return { source: { file, data, locate, locateKey }, issues: [] };
}

function offsetOrigin(file: string, bytes: Uint8Array, offset: number): Origin {
  let line = 1;
  let lineStart = 0;
  for (let i = 0; i < offset; i++) {
    if (bytes[i] === 0x0a) {
      line++;
      lineStart = i + 1;
    }
  }
  return { file, line, col: offset - lineStart + 1 };
}
