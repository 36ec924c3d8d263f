/**
 * The resolver's clock for what it holds and for how long (the cache's
 * TTLs, the set filler's record of the kernel's elements, kept replies,
 * upstream deadlines): milliseconds that never go back and never fall
 * behind real time.
 *
 * Neither clock Node offers is that. The wall clock can be set back (NTP at
 * boot, `date`): an expiry reckoned on it then outlives the kernel's element
 * by as much, so the filler would skip writing an element the kernel has
 * already dropped (a denied name's address let out again) and the cache
 * would answer past a TTL. The steady clock (CLOCK_MONOTONIC) stops while
 * the machine is suspended, where DNS TTLs run on: after a night asleep
 * the cache would go on answering for hours what expired. So this clock
 * runs on the steady one and takes up every step the wall clock makes
 * ahead of it (a suspend, or the clock set forward), but none back. Running
 * ahead of the kernel's own timeouts (which stop in suspend too) is the
 * safe side: the filler writes an element again that the kernel still
 * held, and the cache asks upstream sooner. It starts at the wall clock's
 * time, so its values read as times while the wall clock is not set back.
 */

/** Beyond this, a step of the wall clock ahead of the steady one is taken up: a suspend, or the clock set forward (not NTP's slewing, nor Date.now's whole milliseconds). */
const STEP_MS = 1000;

let lastWall = Date.now();
let lastSteady = performance.now();
let current = lastWall;

export function resolverNow(): number {
  const steady = performance.now();
  const wall = Date.now();
  // Never back, whatever the clocks say (a test's stand-ins can).
  const passed = Math.max(0, steady - lastSteady);
  const wallPassed = wall - lastWall;
  current += wallPassed - passed > STEP_MS ? wallPassed : passed;
  lastSteady = steady;
  lastWall = wall;
  return current;
}
