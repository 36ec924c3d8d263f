/**
 * What each owner holds of something bounded (query slots, TCP
 * connections), each within a cap: what one owner takes, the others keep.
 * Owners holding nothing are not kept, so many owners cost nothing once
 * they are done.
 */
export class Shares {
  private readonly held = new Map<string, number>();

  constructor(private readonly cap: number) {}

  /** One more for `owner`, if it holds fewer than the cap: true when taken (give it back once). */
  take(owner: string): boolean {
    const holds = this.held.get(owner) ?? 0;
    if (holds >= this.cap) return false;
    this.held.set(owner, holds + 1);
    return true;
  }

  give(owner: string): void {
    const left = (this.held.get(owner) ?? 1) - 1;
    if (left > 0) this.held.set(owner, left);
    else this.held.delete(owner);
  }
}
