import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestNet, harnessUnavailableReason, type TestNet } from '../harness/index.js';
import { startTorNetwork, torUnavailableReason, type TorNetwork } from '../support/tor/network.js';

const unavailable = harnessUnavailableReason() ?? torUnavailableReason();

describe.skipIf(unavailable)(`the private Tor network ${unavailable ? `(skipped: ${unavailable})` : ''}`, () => {
  let net: TestNet;
  let tor: TorNetwork;

  beforeAll(async () => {
    net = await createTestNet();
    tor = await startTorNetwork(net, { names: { 'mirror.egressd.test': '203.0.113.80' } });
  }, 120_000);

  afterAll(async () => {
    await tor?.stop();
    await net?.destroy();
  });

  it('bootstraps', async () => {
    console.log(JSON.stringify(tor.times), tor.rssKiB());
    expect(await tor.clientStatus()).toMatchObject({ reachable: true, bootstrap: 100, circuitEstablished: true });
  });
});
