/**
 * A list's names in two flat buffers: their bytes one after another, each
 * ended by '\n' (so the bytes are the names joined, as a digest hashes
 * them), and an open-addressing hash table of their positions. A 143,876-name
 * list is ~6 MB here against ~16 MB as an array of strings plus a Map
 * over them, and none of it is a JavaScript object the garbage collector
 * walks: the resolver's heap stays small, and so its collections and peak.
 *
 * Names are DNS names as the policy keeps them (ASCII, lower case, no
 * trailing dot): one byte a character.
 */
export class NameTable implements Iterable<string> {
  /** The number of names. */
  readonly size: number;
  private readonly bytes: Uint8Array;
  /** Where name i starts; ends[i] = starts[i + 1] - 1 (the '\n'). */
  private readonly starts: Uint32Array;
  /** Index + 1 of the name hashed there; 0: empty. Length a power of two. */
  private readonly slots: Uint32Array;

  /** Every name, in order, duplicates kept (a table built by NameTableBuilder.addNew has none). */
  static of(names: Iterable<string>): NameTable {
    const builder = new NameTableBuilder();
    for (const name of names) builder.add(name);
    return builder.build();
  }

  /** @internal NameTableBuilder's. */
  constructor(bytes: Uint8Array, starts: Uint32Array, size: number) {
    this.bytes = bytes;
    this.starts = starts;
    this.size = size;
    this.slots = new Uint32Array(slotCount(size));
    const mask = this.slots.length - 1;
    for (let i = 0; i < size; i++) {
      let slot = hashBytes(bytes, starts[i]!, starts[i + 1]! - 1) & mask;
      while (this.slots[slot] !== 0) slot = (slot + 1) & mask;
      this.slots[slot] = i + 1;
    }
  }

  /** Whether `name`, or with `from`, its tail name.slice(from), is in the table (no substring is made). */
  has(name: string, from = 0): boolean {
    return this.indexOf(name, from) >= 0;
  }

  /** Where `name` (or its tail from `from`) was added first, or -1. */
  indexOf(name: string, from = 0): number {
    const mask = this.slots.length - 1;
    const length = name.length - from;
    for (let slot = hashString(name, from) & mask; ; slot = (slot + 1) & mask) {
      const entry = this.slots[slot]!;
      if (entry === 0) return -1;
      const start = this.starts[entry - 1]!;
      if (this.starts[entry]! - 1 - start === length && sameChars(this.bytes, start, name, from, length)) return entry - 1;
    }
  }

  /** The name at `index` (in the order added). */
  at(index: number): string {
    return latin1(this.bytes, this.starts[index]!, this.starts[index + 1]! - 1);
  }

  /** The names joined by '\n', as bytes: what `names.join('\n')` encodes to. */
  joined(): Uint8Array {
    return this.bytes.subarray(0, Math.max(0, this.size === 0 ? 0 : this.starts[this.size]! - 1));
  }

  /** Bytes held (names, positions, hash slots). */
  get byteLength(): number {
    return this.bytes.byteLength + this.starts.byteLength + this.slots.byteLength;
  }

  *[Symbol.iterator](): Iterator<string> {
    for (let i = 0; i < this.size; i++) yield this.at(i);
  }
}

/**
 * Builds a NameTable name by name without keeping a string for any of them:
 * a list file's lines are short-lived strings, collected young.
 */
export class NameTableBuilder {
  private bytes = new Uint8Array(1 << 16);
  private starts = new Uint32Array(1 << 12);
  private slots = new Uint32Array(1 << 13);
  private end = 0;
  private count = 0;

  get size(): number {
    return this.count;
  }

  /** Adds `name` unless it is there already; false when it was. */
  addNew(name: string): boolean {
    if (this.find(name) >= 0) return false;
    this.add(name);
    return true;
  }

  /** Adds `name`, even when it is there already. */
  add(name: string): void {
    const length = name.length;
    while (this.end + length + 1 > this.bytes.length) this.bytes = grown(this.bytes, this.bytes.length * 2);
    if (this.count + 2 > this.starts.length) this.starts = grown(this.starts, this.starts.length * 2);
    const bytes = this.bytes;
    const at = this.end;
    for (let i = 0; i < length; i++) {
      const c = name.charCodeAt(i);
      // DNS names as the policy keeps them are ASCII; a wider character would be stored wrong.
      if (c > 0x7f) throw new Error(`internal: a name table holds ASCII names only, not "${name}"`);
      bytes[at + i] = c;
    }
    bytes[at + length] = 0x0a;
    this.starts[this.count] = at;
    this.count++;
    this.end = at + length + 1;
    this.starts[this.count] = this.end;
    if (this.count * 2 > this.slots.length) this.rehash();
    else this.place(this.count - 1);
  }

  /** The table; the builder is not used again. */
  build(): NameTable {
    // Copies at their exact size: the growth's slack is not kept for the table's lifetime.
    return new NameTable(this.bytes.slice(0, this.end), this.starts.slice(0, this.count + 1), this.count);
  }

  private find(name: string): number {
    const mask = this.slots.length - 1;
    for (let slot = hashString(name, 0) & mask; ; slot = (slot + 1) & mask) {
      const entry = this.slots[slot]!;
      if (entry === 0) return -1;
      const start = this.starts[entry - 1]!;
      if (this.starts[entry]! - 1 - start === name.length && sameChars(this.bytes, start, name, 0, name.length)) return entry - 1;
    }
  }

  private place(index: number): void {
    const mask = this.slots.length - 1;
    let slot = hashBytes(this.bytes, this.starts[index]!, this.starts[index + 1]! - 1) & mask;
    while (this.slots[slot] !== 0) slot = (slot + 1) & mask;
    this.slots[slot] = index + 1;
  }

  private rehash(): void {
    this.slots = new Uint32Array(this.slots.length * 2);
    for (let i = 0; i < this.count; i++) this.place(i);
  }
}

/** At most half full: a miss (most lookups) ends after one or two probes. */
function slotCount(size: number): number {
  let count = 2;
  while (count < size * 2) count *= 2;
  return count;
}

function grown<T extends Uint8Array | Uint32Array>(array: T, length: number): T {
  const next = new (array.constructor as new (length: number) => T)(length);
  next.set(array);
  return next;
}

// FNV-1a, 32 bits: the same value over a name's characters and over its bytes.
function hashString(name: string, from: number): number {
  let hash = 0x811c9dc5;
  for (let i = from; i < name.length; i++) hash = Math.imul(hash ^ name.charCodeAt(i), 0x01000193);
  return hash >>> 0;
}

function hashBytes(bytes: Uint8Array, start: number, end: number): number {
  let hash = 0x811c9dc5;
  for (let i = start; i < end; i++) hash = Math.imul(hash ^ bytes[i]!, 0x01000193);
  return hash >>> 0;
}

function sameChars(bytes: Uint8Array, start: number, name: string, from: number, length: number): boolean {
  for (let i = 0; i < length; i++) if (bytes[start + i] !== name.charCodeAt(from + i)) return false;
  return true;
}

function latin1(bytes: Uint8Array, start: number, end: number): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset + start, end - start).toString('latin1');
}
