/** The NFULA_PREFIX of every record in a pcap of an nflog interface (DLT_NFLOG, little-endian TLVs). */
export function nflogPrefixes(pcap: Buffer): string[] {
  const prefixes: string[] = [];
  let offset = 24;
  while (offset + 16 <= pcap.length) {
    const captured = pcap.readUInt32LE(offset + 8);
    const record = pcap.subarray(offset + 16, offset + 16 + captured);
    offset += 16 + captured;
    for (let at = 4; at + 4 <= record.length;) {
      const length = record.readUInt16LE(at);
      const type = record.readUInt16LE(at + 2);
      if (length < 4) break;
      if (type === 10)
        prefixes.push(
          record
            .subarray(at + 4, at + length)
            .toString('utf8')
            .replace(/\0+$/, ''),
        );
      at += (length + 3) & ~3;
    }
  }
  return prefixes;
}
