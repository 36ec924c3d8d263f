import { describe, expect, it } from 'vitest';
import { explain, type ExplainQuery } from '../../src/compile/explain.js';
import { FACTS, policyFrom } from '../support/compile-text.js';

/**
 * One policy in which every precedence level has something to say about the
 * same destinations, so each test shows a level winning over the next.
 */
const policy = policyFrom(
  `
defaults: {egress: deny}
identities:
  vault: {user: vault}
  apt: {user: _apt}
  web: [{user: alice}, {flatpak: org.example.Web}]
lists:
  trackers: {names: [tracker.example.com, "*.ads.example.net"]}
apps:
  web:
    identity: web
    default: allow
    rules:
      - allow: [tracker.example.com]
        ports: [443]
      - deny: [198.51.100.0/24]
  vault-sync:
    identity: vault
    rules: [{allow: any}]
  apt-direct:
    identity: apt
    rules: [{allow: any}]
deny:
  - to: ["@trackers", 203.0.113.0/24]
    why: trackers
systemDomains:
  offline: {members: [vault]}
tor:
  enabled: true
  updaters: [apt]
`,
);

const ask = (who: ExplainQuery['who'], host: string, extra: Partial<ExplainQuery> = {}, lockdown = false) => {
  const answer = explain(policy, { who, host, ...extra }, FACTS, { lockdown });
  if ('error' in answer) throw new Error(answer.error);
  return answer;
};

describe('explain: each precedence level against the next', () => {
  it('loopback is allowed even for a system domain', () => {
    expect(ask({ kind: 'name', name: 'vault' }, '127.0.0.1')).toMatchObject({ verdict: 'allow', level: 'loopback' });
    expect(ask({ kind: 'user', user: 'vault' }, '::1')).toMatchObject({ verdict: 'allow', level: 'loopback' });
  });

  it('system domain beats the app rule that allows everything', () => {
    expect(ask({ kind: 'name', name: 'vault-sync' }, '192.0.2.9', { port: 443 })).toMatchObject({ verdict: 'deny', level: 'system-domain', ruleId: 'sd/offline' });
  });

  it('lockdown beats Tor confinement and apps, except for Tor itself', () => {
    expect(ask({ kind: 'user', user: 'alice' }, 'example.org', {}, true)).toMatchObject({ verdict: 'deny', level: 'lockdown' });
    expect(ask({ kind: 'user', user: 'debian-tor' }, '192.0.2.7', { port: 9001 }, true)).toMatchObject({ verdict: 'allow', level: 'lockdown' });
  });

  it('Tor confinement beats the app rule allowing the updater everything', () => {
    expect(ask({ kind: 'user', user: '_apt' }, 'deb.debian.org', { port: 443 })).toMatchObject({ verdict: 'deny', level: 'tor', ruleId: 'tor/updaters' });
    expect(ask({ kind: 'user', user: 42 }, '127.0.0.1', { port: 9050 })).toMatchObject({ verdict: 'allow', level: 'tor', ruleId: 'tor/socks' });
    // Not even loopback services: a local resolver or proxy would look up or fetch for the updater.
    expect(ask({ kind: 'user', user: '_apt' }, '127.0.0.53', { port: 53, proto: 'udp' })).toMatchObject({ verdict: 'deny', level: 'tor', ruleId: 'tor/updaters' });
    expect(ask({ kind: 'user', user: 'debian-tor' }, '192.0.2.7', { port: 9001 })).toMatchObject({ verdict: 'allow', level: 'tor', ruleId: 'tor/own' });
  });

  it('app rules beat the global deny list', () => {
    const answer = ask({ kind: 'name', name: 'web' }, 'tracker.example.com', { port: 443, proto: 'tcp' });
    expect(answer).toMatchObject({ verdict: 'allow', level: 'app', ruleId: 'app/web/0', at: { file: 'f.yaml', line: 14 } });
    expect(ask({ kind: 'name', name: 'web' }, '198.51.100.20')).toMatchObject({ verdict: 'deny', level: 'app', ruleId: 'app/web/1' });
  });

  it('the global deny list beats the app default when no app rule matches', () => {
    expect(ask({ kind: 'name', name: 'web' }, 'tracker.example.com', { port: 80 })).toMatchObject({ verdict: 'deny', level: 'global-deny', ruleId: 'deny/f.yaml/0', why: 'trackers' });
    expect(ask({ kind: 'name', name: 'web' }, 'x.ads.example.net')).toMatchObject({ verdict: 'deny', level: 'global-deny' });
    expect(ask({ kind: 'name', name: 'web' }, '203.0.113.4')).toMatchObject({ verdict: 'deny', level: 'global-deny' });
  });

  it('the default decides last: the app default, else the global one', () => {
    expect(ask({ kind: 'name', name: 'web' }, 'example.org', { port: 443 })).toMatchObject({ verdict: 'allow', level: 'default', ruleId: 'app/web/default' });
    expect(ask({ kind: 'user', user: 'bob' }, 'example.org', { port: 443 })).toMatchObject({ verdict: 'deny', level: 'default', ruleId: 'default' });
  });

  it('a cgroup below a selector matches it, as socket cgroupv2 level N does', () => {
    const scope = 'user.slice/user-1000.slice/user@1000.service/app.slice/app-flatpak-org.example.Web-99.scope';
    expect(ask({ kind: 'cgroup', path: `${scope}/sub` }, 'example.org')).toMatchObject({ verdict: 'allow', ruleId: 'app/web/default' });
    expect(ask({ kind: 'cgroup', path: 'user.slice' }, 'example.org')).toMatchObject({ verdict: 'deny', ruleId: 'default' });
  });

  it('says when the answer depends on a port or protocol that was not given', () => {
    const answer = ask({ kind: 'name', name: 'web' }, 'tracker.example.com');
    expect(answer).toMatchObject({ verdict: 'deny', level: 'global-deny' });
    expect(answer.notes).toContain('app/web/0 (allow) applies to tcp/udp port 443 only; give --to HOST:PORT/PROTO to see it');
  });

  it('says when an address could match a name rule through DNS', () => {
    const answer = ask({ kind: 'user', user: 'bob' }, '192.0.2.200');
    expect(answer.notes).toEqual(['deny/f.yaml/0 also matches 192.0.2.200 while it is a recent DNS answer for one of the rule\'s names']);
  });

  it('an unknown app name is an error listing the known ones', () => {
    expect(explain(policy, { who: { kind: 'name', name: 'nope' }, host: 'x' }, FACTS)).toMatchObject({ error: expect.stringContaining('known: web, vault-sync, apt-direct') });
  });
});
