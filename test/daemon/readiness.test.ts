import { describe, expect, it } from 'vitest';
import { enforcingStatus, failedStatus, readiness } from '../../src/daemon/readiness.js';
import { ErrorCode } from '../../src/errors.js';
import { notifyMessage, type Notifier } from '../../src/system/sd-notify.js';

const DIGEST = 'abcdef0123456789'.repeat(4);
const enforcing = { digest: DIGEST, rules: 12, lockdown: false, resolver: [{ transport: 'udp' as const, address: '127.0.0.153', port: 53 }] };

function recorder(): { notifier: Notifier; sent: string[] } {
  const sent: string[] = [];
  return { sent, notifier: { enabled: true, send: (fields) => sent.push(notifyMessage(fields)), startWatchdog: () => undefined, close: () => undefined } };
}

describe('STATUS texts', () => {
  it('say what is enforced and where the resolver answers', () => {
    expect(enforcingStatus(enforcing)).toBe('enforcing policy sha256:abcdef012345… (12 rules), resolver on 127.0.0.153');
    const both = [
      ...enforcing.resolver,
      { transport: 'tcp' as const, address: '127.0.0.153', port: 53 },
      { transport: 'udp' as const, address: '::1', port: 53 },
    ];
    expect(enforcingStatus({ ...enforcing, rules: 1, lockdown: true, resolver: both })).toBe(
      'lockdown, enforcing policy sha256:abcdef012345… (1 rule), resolver on 127.0.0.153, ::1',
    );
    expect(enforcingStatus({ ...enforcing, resolver: undefined })).toBe('enforcing policy sha256:abcdef012345… (12 rules), resolver not running');
  });

  it('count the policy errors of a failed apply, or name the code of another failure', () => {
    expect(failedStatus(ErrorCode.PolicyInvalid, ['a', 'b', 'c'], true)).toBe('apply failed: 3 errors in the policy (a; b; c); previous table stays in force');
    expect(failedStatus(ErrorCode.PolicyInvalid, ['a'], false)).toBe('apply failed: 1 error in the policy (a); no egressd table in force');
    expect(failedStatus(ErrorCode.NftApply, ['nft said no'], true)).toBe('apply failed: EGD_NFT_APPLY (nft said no); previous table stays in force');
  });
});

describe('readiness', () => {
  it('is READY only after the first apply, then RELOADING … READY around each re-apply, then STOPPING', () => {
    const { notifier, sent } = recorder();
    const service = readiness(notifier, () => 42n);
    service.applying('start');
    expect(sent).toEqual([]);
    service.enforcing(enforcing);
    service.applying('SIGHUP');
    service.failed(ErrorCode.PolicyInvalid, ['x', 'y'], true);
    service.applying('SIGHUP');
    service.enforcing(enforcing);
    service.stopping('SIGTERM');
    expect(sent).toEqual([
      `READY=1\nSTATUS=${enforcingStatus(enforcing)}`,
      'RELOADING=1\nMONOTONIC_USEC=42\nSTATUS=re-applying: SIGHUP',
      'READY=1\nSTATUS=apply failed: 2 errors in the policy (x; y); previous table stays in force',
      'RELOADING=1\nMONOTONIC_USEC=42\nSTATUS=re-applying: SIGHUP',
      `READY=1\nSTATUS=${enforcingStatus(enforcing)}`,
      'STOPPING=1\nSTATUS=stopping (SIGTERM); the rules stay in force',
    ]);
  });

  it('a failed first apply is READY when a table from before is in force, and not when none is', () => {
    const kept = recorder();
    readiness(kept.notifier).failed(ErrorCode.PolicyInvalid, ['x'], true);
    expect(kept.sent).toEqual(['READY=1\nSTATUS=apply failed: 1 error in the policy (x); previous table stays in force']);
    const none = recorder();
    readiness(none.notifier).failed(ErrorCode.PolicyInvalid, ['x'], false);
    expect(none.sent).toEqual(['STATUS=apply failed: 1 error in the policy (x); no egressd table in force']);
  });
});
