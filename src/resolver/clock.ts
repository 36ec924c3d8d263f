/**
 * The resolver's clock for what it holds and for how long: milliseconds
 * that only go forward (CLOCK_MONOTONIC, as the kernel's set timeouts
 * count). The wall clock can be set back — NTP at boot, `date` — and an
 * expiry reckoned on it would then outlive the kernel's element by as much:
 * the filler would skip writing an element the kernel has already dropped
 * (a denied name's address let out again), and the cache would hand out an
 * answer past its TTL.
 */
export const steadyNow = (): number => performance.now();
