import { describe, expect, it } from 'vitest';
import { DUMP_INTERRUPTED_ERRNO, encodeMessage, NetlinkError, NetlinkSocket, NlmFlag, NlmsgType, type NetlinkTransport } from '../../src/system/netlink.js';

/** A transport answering each dump with one element message (flags as given) and NLMSG_DONE. */
function transport(flagsPerDump: number[]): NetlinkTransport & { dumps: number } {
  let seq = 0;
  const queue: Buffer[] = [];
  const fake = {
    dumps: 0,
    send(datagram: Buffer) {
      seq = datagram.readUInt32LE(8);
      const flags = flagsPerDump[fake.dumps++] ?? NlmFlag.Multi;
      queue.push(
        Buffer.concat([
          encodeMessage({ type: 0x0a0d, flags, seq, payload: Buffer.alloc(4) }),
          encodeMessage({ type: NlmsgType.Done, flags: NlmFlag.Multi, seq, payload: Buffer.alloc(4) }),
        ]),
      );
    },
    receive: () => queue.shift()!,
    close: () => undefined,
  };
  return fake;
}

describe('a netlink dump the kernel says was interrupted (NLM_F_DUMP_INTR)', () => {
  it('throws with the errno callers retry on, never returns the mixed answers', () => {
    const socket = new NetlinkSocket(transport([NlmFlag.Multi | NlmFlag.DumpIntr]), 1);
    let thrown: unknown;
    try {
      socket.request(0x0a0d, NlmFlag.Dump, Buffer.alloc(4));
    } catch (error) {
      thrown = error;
    }
    expect(thrown).toBeInstanceOf(NetlinkError);
    expect((thrown as NetlinkError).errno).toBe(DUMP_INTERRUPTED_ERRNO);
  });

  it('an uninterrupted dump answers as before', () => {
    const socket = new NetlinkSocket(transport([NlmFlag.Multi]), 1);
    expect(socket.request(0x0a0d, NlmFlag.Dump, Buffer.alloc(4))).toHaveLength(1);
  });
});
