/**
 * nfnetlink_log (NFLOG) over egressd's own netlink socket (src/system/netlink.ts):
 * the config messages that bind one log group to this socket, and the
 * listening socket itself. No libnetfilter_log: its callbacks would run
 * inside a blocking nflog_handle_packet on a C thread and hand each packet
 * over one FFI call at a time; the config is four attributes, and the
 * packets' attributes are parsed in TypeScript (parse.ts), where a fuzz test
 * can reach them.
 */
import {
  encodeMessage,
  errorCodeOf,
  errnoName,
  NetlinkError,
  NetlinkFamily,
  NlmFlag,
  NlmsgType,
  openNetlinkTransport,
  parseMessages,
} from '../system/netlink.js';
import type { ListeningNetlinkTransport } from '../system/netlink.js';

/** NFNL_SUBSYS_ULOG in the high byte of the message type. */
export const NFNL_SUBSYS_ULOG = 4;
export const NfulnlMsg = { Packet: 0, Config: 1 } as const;
export const NFULNL_MSG_PACKET = (NFNL_SUBSYS_ULOG << 8) | NfulnlMsg.Packet;
const NFULNL_MSG_CONFIG = (NFNL_SUBSYS_ULOG << 8) | NfulnlMsg.Config;

const NfulaCfg = { Cmd: 1, Mode: 2, NlBufSiz: 3, Timeout: 4, QThresh: 5, Flags: 6 } as const;
const NfulnlCmd = { Bind: 1, Unbind: 2 } as const;
const NFULNL_COPY_PACKET = 2;
/**
 * Per-instance sequence numbers (a gap is packets the kernel logged that
 * never reached us) and the global ones. There is no uid flag: the kernel
 * adds NFULA_UID/GID to every packet whose socket has an owner.
 */
const NFULNL_CFG_F_SEQ = 0x1;
const NFULNL_CFG_F_SEQ_GLOBAL = 0x2;

/**
 * Bytes of each packet copied: an IPv4 header with options (60) and the
 * ports, or an IPv6 header with a few extension headers and the ports.
 * Nothing past the transport header's ports is ever read or kept.
 */
export const COPY_RANGE = 96;

export interface NflogOptions {
  /** SO_RCVBUFFORCE: what a burst may queue before the kernel drops (counted as ENOBUFS and sequence gaps). Default 8 MiB. */
  readonly receiveBufferBytes?: number;
  /** The kernel batches packets into datagrams of up to this size (NFULA_CFG_NLBUFSIZ). Default 64 KiB. */
  readonly batchBytes?: number;
  /** ... or of this many packets (NFULA_CFG_QTHRESH). Default 256. */
  readonly batchPackets?: number;
  /** ... or flushes after this long (NFULA_CFG_TIMEOUT, in 10 ms steps). Default 20 ms: an alert waits at most that. */
  readonly flushMs?: number;
}

const be32 = (value: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(value >>> 0, 0);
  return b;
};

function attribute(type: number, value: Uint8Array): Buffer {
  const out = Buffer.alloc((4 + value.length + 3) & ~3);
  out.writeUInt16LE(4 + value.length, 0);
  out.writeUInt16LE(type, 2);
  out.set(value, 4);
  return out;
}

/** struct nfgenmsg: family, version 0, the group (big-endian) as res_id. */
function nfgenmsg(group: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt8(0, 0); // AF_UNSPEC: the group, whatever the family of its packets
  b.writeUInt8(0, 1);
  b.writeUInt16BE(group, 2);
  return b;
}

/** One config message: bind (or unbind) `group` and, when binding, how it sends: copy range, flags, batching. */
export function configMessage(group: number, command: 'bind' | 'unbind', seq: number, options: NflogOptions = {}): Buffer {
  const parts = [nfgenmsg(group), attribute(NfulaCfg.Cmd, Buffer.from([command === 'bind' ? NfulnlCmd.Bind : NfulnlCmd.Unbind]))];
  if (command === 'bind') {
    // struct nfulnl_msg_config_mode { __be32 copy_range; __u8 copy_mode; __u8 _pad; }
    const mode = Buffer.alloc(6);
    mode.writeUInt32BE(COPY_RANGE, 0);
    mode.writeUInt8(NFULNL_COPY_PACKET, 4);
    const flags = Buffer.alloc(2);
    flags.writeUInt16BE(NFULNL_CFG_F_SEQ | NFULNL_CFG_F_SEQ_GLOBAL, 0);
    parts.push(
      attribute(NfulaCfg.Mode, mode),
      attribute(NfulaCfg.Flags, flags),
      attribute(NfulaCfg.NlBufSiz, be32(options.batchBytes ?? 64 * 1024)),
      attribute(NfulaCfg.QThresh, be32(options.batchPackets ?? 256)),
      attribute(NfulaCfg.Timeout, be32(Math.max(1, Math.round((options.flushMs ?? 20) / 10)))),
    );
  }
  return encodeMessage({ type: NFULNL_MSG_CONFIG, flags: NlmFlag.Request | NlmFlag.Ack, seq, payload: Buffer.concat(parts) });
}

/** A socket bound to one NFLOG group; what arrived before the bind's acknowledgement is kept for the first reads. */
export interface NflogSocket {
  readonly group: number;
  readonly transport: ListeningNetlinkTransport;
  /** Datagrams that came in while the bind waited for its acknowledgement. */
  readonly early: Buffer[];
  close(): void;
}

/**
 * Opens a netlink socket in this network namespace and binds `group`. The
 * kernel refuses a group another socket holds (EBUSY: ulogd, a second
 * egressd): a NetlinkError with that errno.
 */
export function openNflog(group: number, options: NflogOptions = {}): NflogSocket {
  const batchBytes = options.batchBytes ?? 64 * 1024;
  const transport = openNetlinkTransport(NetlinkFamily.Netfilter, {
    receiveBufferBytes: options.receiveBufferBytes ?? 8 * 1024 * 1024,
    // Room for a whole batch and more: the kernel may overshoot nlbufsiz by one packet.
    datagramBytes: batchBytes * 2,
    receiveTimeoutMs: 2000,
  });
  const early: Buffer[] = [];
  try {
    const seq = 1;
    transport.send(configMessage(group, 'bind', seq, options));
    for (;;) {
      const datagram = transport.receive();
      let acked = false;
      for (const message of parseMessages(datagram)) {
        if (message.type !== NlmsgType.Error || message.seq !== seq) continue;
        const code = errorCodeOf(message);
        if (code !== 0) throw new NetlinkError(`nflog: the kernel refused to bind log group ${group}: ${errnoName(-code)}`, { errno: -code });
        acked = true;
      }
      if (acked) break;
      early.push(datagram);
    }
  } catch (error) {
    transport.close();
    throw error;
  }
  let open = true;
  return {
    group,
    transport,
    early,
    close() {
      if (!open) return;
      open = false;
      try {
        // Frees the group at once for another reader; closing the socket would too, a moment later.
        transport.send(configMessage(group, 'unbind', 2));
      } catch {
        /* closing anyway */
      }
      transport.close();
    },
  };
}
