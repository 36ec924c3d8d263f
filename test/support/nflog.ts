/** One record of a pcap of an nflog interface (DLT_NFLOG): its prefix, the sender's uid, and the packet it logged. */
export interface NflogRecord {
  readonly prefix: string | undefined;
  readonly uid: number | undefined;
  readonly payload: Buffer | undefined;
}

const NFULA_PAYLOAD = 9;
const NFULA_PREFIX = 10;
const NFULA_UID = 11;

/** Every record of a pcap of an nflog interface: TLVs with little-endian lengths and types, values in network order. */
export function nflogRecords(pcap: Buffer): NflogRecord[] {
  const records: NflogRecord[] = [];
  let offset = 24;
  while (offset + 16 <= pcap.length) {
    const captured = pcap.readUInt32LE(offset + 8);
    const record = pcap.subarray(offset + 16, offset + 16 + captured);
    offset += 16 + captured;
    let prefix: string | undefined;
    let uid: number | undefined;
    let payload: Buffer | undefined;
    for (let at = 4; at + 4 <= record.length;) {
      const length = record.readUInt16LE(at);
      const type = record.readUInt16LE(at + 2);
      if (length < 4) break;
      const value = record.subarray(at + 4, at + length);
      if (type === NFULA_PREFIX) prefix = value.toString('utf8').replace(/\0+$/, '');
      else if (type === NFULA_UID && value.length >= 4) uid = value.readUInt32BE(0);
      else if (type === NFULA_PAYLOAD) payload = value;
      at += (length + 3) & ~3;
    }
    records.push({ prefix, uid, payload });
  }
  return records;
}

/** The NFULA_PREFIX of every record in a pcap of an nflog interface (DLT_NFLOG). */
export function nflogPrefixes(pcap: Buffer): string[] {
  return nflogRecords(pcap).flatMap((record) => (record.prefix === undefined ? [] : [record.prefix]));
}

/** One line per record, for a failure message: uid, the destination, and for TCP over IPv6 or IPv4 the ports, flags and sequence number. */
export function describeNflog(records: readonly NflogRecord[]): string {
  return records
    .map((record, i) => {
      const p = record.payload;
      const version = p && p.length > 0 ? p[0]! >> 4 : undefined;
      const tcpAt = version === 6 && p!.length >= 60 && p![6] === 6 ? 40 : version === 4 && p!.length >= 40 && p![9] === 6 ? (p![0]! & 15) * 4 : undefined;
      const to =
        version === 4 && p!.length >= 20
          ? [...p!.subarray(16, 20)].join('.')
          : version === 6 && p!.length >= 40
            ? Array.from({ length: 8 }, (_, g) => p!.readUInt16BE(24 + g * 2).toString(16)).join(':')
            : '?';
      const tcp =
        tcpAt === undefined
          ? `not TCP, to ${to}`
          : `tcp ${p!.readUInt16BE(tcpAt)} → ${to} ${p!.readUInt16BE(tcpAt + 2)} seq ${p!.readUInt32BE(tcpAt + 4)} flags 0x${p![tcpAt + 13]!.toString(16)}`;
      return `#${i} prefix "${record.prefix ?? ''}" uid ${record.uid ?? '?'} ${tcp}`;
    })
    .join('\n');
}
