/**
 * What one pool knows of the server-side statements its transaction-mode clients share (named
 * prepared statements, see docs/prepared-statements.md), by server-side name:
 *
 * - which statements parsed successfully at least once, so that a client's Parse of one can be
 *   answered without a server (a client that prepares synchronously while every server is lent to
 *   clients it is itself blocking — pgbench `-M prepared` — would otherwise deadlock);
 * - when each statement last went stale (a server reported `cached plan must not change result
 *   type`), so that copies prepared before that are prepared again before their next use.
 *
 * Every prepare and every stale report takes the next tick of one clock: "this copy was prepared
 * after the statement went stale", "this client used the statement before it went stale" and "this
 * copy is older than this client's Parse" are each one comparison. Both tables are bounded: the
 * least recently used name is forgotten beyond `capacity`. Forgetting a parse only costs a server
 * round trip at that statement's next Parse; forgetting when a statement went stale moves `floor`
 * to now, which makes every copy in the pool count as stale (each is prepared once more).
 */
export class StatementRegistry {
  private clock = 0
  /** Copies prepared at or before this tick are stale whatever their name. */
  private floor = 0
  private readonly parsed = new Map<string, true>()
  private readonly staleAt = new Map<string, number>()

  constructor(private readonly capacity = 10_000) {}

  /** The current tick, without advancing. */
  get now(): number {
    return this.clock
  }

  /** Advances the clock; a copy of a statement prepared now is stamped with the result. */
  tick(): number {
    return ++this.clock
  }

  /** Names the registry knows right now (both tables), for tests and the admin console. */
  get size(): number {
    return this.parsed.size + this.staleAt.size
  }

  isParsed(name: string): boolean {
    if (!this.parsed.has(name)) return false
    this.parsed.delete(name)
    this.parsed.set(name, true)
    return true
  }

  markParsed(name: string): void {
    this.parsed.delete(name)
    this.parsed.set(name, true)
    if (this.parsed.size > this.capacity) this.parsed.delete(this.parsed.keys().next().value as string)
  }

  /** A Parse of it failed (the objects it names changed): its next Parse goes to a server again. */
  forgetParsed(name: string): void {
    this.parsed.delete(name)
  }

  /** Whether a copy stamped `stamp` is still good (prepared after the statement last went stale). */
  isCurrent(name: string, stamp: number): boolean {
    return stamp > this.floor && stamp > (this.staleAt.get(name) ?? 0)
  }

  /** A server reported the statement's plan stale: every copy prepared until now is. */
  markStale(name: string): void {
    const at = this.tick()
    this.staleAt.delete(name)
    this.staleAt.set(name, at)
    if (this.staleAt.size > this.capacity) {
      this.staleAt.delete(this.staleAt.keys().next().value as string)
      this.floor = at
    }
  }
}
