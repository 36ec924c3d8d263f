import { describe, expect, it } from 'vitest';
import { NameTable, NameTableBuilder } from '../../src/policy/name-table.js';

describe('name tables', () => {
  it('answers has and indexOf for names and their tails, without a substring', () => {
    const table = NameTable.of(['example.org', 'ads.example.com', 'a.b.c.d', 'x']);
    expect(table.size).toBe(4);
    expect(table.has('example.org')).toBe(true);
    expect(table.has('example.or')).toBe(false);
    expect(table.has('example.orgg')).toBe(false);
    expect(table.has('www.example.org', 4)).toBe(true);
    expect(table.has('www.example.org', 3)).toBe(false);
    expect(table.indexOf('q.a.b.c.d', 2)).toBe(2);
    expect(table.indexOf('x')).toBe(3);
    expect(table.indexOf('y')).toBe(-1);
    expect(table.has('')).toBe(false);
    expect([...table]).toEqual(['example.org', 'ads.example.com', 'a.b.c.d', 'x']);
    expect(table.at(1)).toBe('ads.example.com');
  });

  it("holds the names joined by '\\n' as bytes, so a digest over them is the array's", () => {
    const names = ['one.example', 'two.example', 'one.example'];
    expect(Buffer.from(NameTable.of(names).joined()).toString()).toBe(names.join('\n'));
    expect(NameTable.of([]).joined().length).toBe(0);
    expect(NameTable.of([]).has('a')).toBe(false);
  });

  it('keeps the first of duplicates with addNew, and grows past its first buffers', () => {
    const builder = new NameTableBuilder();
    const names = Array.from({ length: 20_000 }, (_, i) => `host-${i}.s${i % 97}.example`);
    for (const name of names) expect(builder.addNew(name)).toBe(true);
    for (const name of names.slice(0, 100)) expect(builder.addNew(name)).toBe(false);
    const table = builder.build();
    expect(table.size).toBe(20_000);
    for (let i = 0; i < names.length; i += 7) expect(table.indexOf(names[i]!)).toBe(i);
    expect(table.has('host-20000.s19.example')).toBe(false);
    expect([...table]).toEqual(names);
    // Exact sizes, no growth slack: the bytes and a position per name, hash slots at most 4 per name.
    expect(table.byteLength).toBeLessThanOrEqual(Buffer.byteLength(names.join('\n')) + 1 + 4 * 20_001 + 4 * 4 * 20_000);
  });

  it('refuses a name that is not ASCII (DNS names are kept in their IDNA form)', () => {
    expect(() => NameTable.of(['münchen.example'])).toThrow(/ASCII/);
  });
});
