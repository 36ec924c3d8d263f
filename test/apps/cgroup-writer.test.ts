import { describe, expect, it } from 'vitest';
import { SetWriteRefusedError } from '../../src/errors.js';
import { cgroupKey, createCgroupMapWriter, type LibnftnlApi } from '../../src/nft/set-elements.js';
import type { NetlinkTransport } from '../../src/system/netlink.js';

/** What is refused before anything reaches libnftnl or the kernel (the kernel's side is test/apps/tracker-kernel.test.ts). */
describe('cgroup map writes refused before sending', () => {
  const untouchable = new Proxy({}, { get: () => () => expect.fail('nothing may be built or sent') }) as unknown as LibnftnlApi & NetlinkTransport;
  const writer = createCgroupMapWriter(untouchable, untouchable, 'egressd');
  const refusal = (write: () => void): SetWriteRefusedError => {
    try {
      write();
    } catch (error) {
      expect(error).toBeInstanceOf(SetWriteRefusedError);
      return error as SetWriteRefusedError;
    }
    return expect.fail('not refused');
  };

  it('the key is the id as the CPU holds it (socket cgroupv2 loads it into a register)', () => {
    const key = cgroupKey(0x0102030405060708n);
    expect(key).toHaveLength(8);
    expect(key.readBigUInt64LE() === 0x0102030405060708n || key.readBigUInt64BE() === 0x0102030405060708n).toBe(true);
    expect(refusal(() => cgroupKey(-1n)).reason).toBe('invalid');
    expect(refusal(() => cgroupKey(1n << 64n)).reason).toBe('invalid');
  });

  it("a map or chain name the guard refuses, or a chain too long for an element's bound, sends nothing", () => {
    expect(refusal(() => writer.add([{ map: 'm; flush ruleset', id: 1n, verdict: { kind: 'drop' } }])).reason).toBe('invalid');
    expect(refusal(() => writer.add([{ map: 'app_cg_l2', id: 1n, verdict: { kind: 'goto', chain: 'x y' } }])).reason).toBe('invalid');
    expect(refusal(() => writer.add([{ map: 'app_cg_l2', id: 1n, verdict: { kind: 'jump', chain: 'c'.repeat(201) } }])).reason).toBe('invalid');
    expect(refusal(() => writer.remove([{ map: '', id: 1n }])).reason).toBe('invalid');
  });

  it('nothing to write is no transaction', () => {
    writer.add([]);
    writer.remove([]);
  });
});
