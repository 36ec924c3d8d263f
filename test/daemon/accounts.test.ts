import { describe, expect, it } from 'vitest';
import type { Facts, IdLookup } from '../../src/compile/compile.js';
import { accountFactsDiffer } from '../../src/daemon/accounts.js';

const base: Facts = {
  users: new Map<string, number>([
    ['alice', 1000],
    ['bob', 1001],
  ]),
  groups: new Map([['staff', 50]]),
  cgroups: ['system.slice'],
  subordinate: new Map([[1000, { uids: [{ from: 100000, to: 165535 }], gids: [] }]]),
  members: new Map([[50, [1000]]]),
};

describe('accountFactsDiffer', () => {
  it('the same users, groups, ranges and members in another order, or other cgroups: no difference', () => {
    expect(
      accountFactsDiffer(base, {
        ...base,
        users: new Map<string, number>([
          ['bob', 1001],
          ['alice', 1000],
        ]),
        cgroups: [],
      }),
    ).toBe(false);
  });

  it('a user that now exists, another uid, a member added, a range given, members now maybe incomplete: a difference', () => {
    expect(accountFactsDiffer(base, { ...base, users: new Map<string, IdLookup>([...base.users, ['carol', 1002]]) })).toBe(true);
    expect(
      accountFactsDiffer(base, {
        ...base,
        users: new Map<string, number>([
          ['alice', 1000],
          ['bob', 1003],
        ]),
      }),
    ).toBe(true);
    expect(accountFactsDiffer(base, { ...base, members: new Map([[50, [1000, 1001]]]) })).toBe(true);
    expect(
      accountFactsDiffer(base, { ...base, subordinate: new Map([[1000, { uids: [{ from: 100000, to: 165535 }], gids: [{ from: 100000, to: 165535 }] }]]) }),
    ).toBe(true);
    expect(accountFactsDiffer(base, { ...base, membersIncomplete: 'sss' })).toBe(true);
  });
});
