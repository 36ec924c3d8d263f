/**
 * egressd's typed nftables binding. Start with `openNft()`.
 *
 *   const nft = await openNft();               // libnftables, else `nft`
 *   await nft.replaceTable('inet', 'egressd', compiledText);
 *   await nft.addElements({ family: 'inet', table: 'egressd', name: 'dns4' },
 *                         ['192.0.2.7'], { timeout: 300 });
 */
export type { NftBackend, NftBackendKind, NftOutcome, NftRequest } from './backend.js';
export { createBinaryBackend, probeBinaryVersion, type BinaryBackendOptions } from './binary.js';
export { Nft, parseListing } from './client.js';
export type {
  NftClientInfo,
  NftElementsOptions,
  NftInput,
  NftRunOptions,
  NftRunResult,
} from './client.js';
export {
  batchDocument,
  cmd,
  describeCommand,
  elem,
  elementsOf,
  METAINFO,
  toElemJson,
  verdict,
  type NftElementInput,
  type NftElementOptions,
} from './commands.js';
export {
  createLibnftablesBackend,
  loadLibnftables,
  NftOutputFlag,
  type LibnftablesApi,
  type LibnftablesBackendOptions,
  type NftCtx,
} from './libnftables.js';
export { openNft, type OpenNftOptions } from './open.js';
export { checkTableText, replaceTableText } from './table-text.js';
export type * from './types.js';
