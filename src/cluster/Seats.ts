/**
 * The host's client seats (docs/scale-out.md#max_clients-across-workers), kept by the supervisor:
 * per pool, how many seats (admitted clients or seats kept spare for the next ones) each worker
 * holds, never more than the pool's limit in all. Workers hold seats in blocks, so a login far from
 * the limit costs no IPC; at the limit the supervisor takes unused seats back from the other
 * workers before it says no. Pure and synchronous; it speaks through `send`.
 */

export type SeatsOut =
  | { readonly t: "seats"; readonly key: string; readonly n: number; readonly spare: number }
  | { readonly t: "seat-reclaim"; readonly key: string; readonly round: number }

interface Request {
  readonly worker: number
  readonly need: number
}

/**
 * Cluster mode with workers (docs/scale-out.md#max_clients-across-hosts): the host's seats are
 * those the store granted it, not the pool's limit.
 */
export interface SeatBound {
  /** Seats the store granted the host for the pool. */
  readonly granted: (key: string) => number
  /** Asks the store for `need` more seats; its answer comes through `SeatLedger.stored`. */
  readonly ask: (key: string, limit: number, need: number) => void
  /** After each pass with no request left: the workers hold `used` seats of those granted. */
  readonly settled: (key: string, used: number) => void
}

interface PoolSeats {
  limit: number
  /** Cluster mode: the head request asked the store for seats (`asked`), or heard back (`answered`). */
  store: "asked" | "answered" | undefined
  /** Cluster mode: the store asked this host for its unused seats; the workers asked, not answered yet. */
  storeAsked: Set<number> | undefined
  storeRound: number
  storeDone: (() => void) | undefined
  readonly held: Map<number, number>
  readonly queue: Array<Request>
  /** Workers asked to give back unused seats for the request at the head of the queue, not answered yet. */
  asked: Set<number> | undefined
  /**
   * The current reclaim's number: an answer to an earlier one (its request's worker died, and the
   * next request asked anew) is seats given back, not this round's answer — counted as one, it
   * could end the round before the worker's real answer, refusing a login a seat it was freeing.
   */
  round: number
}

export class SeatLedger {
  private readonly pools = new Map<string, PoolSeats>()
  private rounds = 0

  /**
   * @param workers how many workers share the host: a worker keeps about `limit / (4 × workers)`
   *   seats spare, so one cannot hoard a pool's limit while the others start.
   */
  constructor(
    private readonly workers: number,
    private readonly send: (worker: number, message: SeatsOut) => void,
    private readonly bound?: SeatBound
  ) {}

  /** Cluster mode: the store answered the host's request (its grant is in `bound.granted`). */
  stored(key: string): void {
    const pool = this.pools.get(key)
    if (pool?.store === "asked") pool.store = "answered"
    if (pool !== undefined) this.serve(key, pool)
    else this.bound?.settled(key, 0)
  }

  /**
   * Cluster mode: another host needs a seat and the store has none free: every worker holding seats
   * gives back its unused ones; `done` when each has answered (or died).
   */
  reclaimAll(key: string, done: () => void): void {
    const held = this.pools.get(key)?.held ?? new Map<number, number>()
    const asked = new Set([...held].filter(([, n]) => n > 0).map(([w]) => w))
    if (asked.size === 0) {
      // Not `pool(key)`: a record made only to find nobody to ask would be kept for ever.
      done()
      return
    }
    const pool = this.pool(key)
    pool.storeRound = ++this.rounds
    pool.storeAsked = asked
    pool.storeDone = done
    for (const worker of asked) this.send(worker, { t: "seat-reclaim", key, round: pool.storeRound })
  }

  private storeAnswered(pool: PoolSeats, worker: number): void {
    if (pool.storeAsked?.delete(worker) !== true || pool.storeAsked.size > 0) return
    const done = pool.storeDone
    pool.storeAsked = undefined
    pool.storeDone = undefined
    done?.()
  }

  want(worker: number, key: string, limit: number, need: number): void {
    const pool = this.pool(key)
    pool.limit = limit
    pool.queue.push({ worker, need })
    this.serve(key, pool)
  }

  release(worker: number, key: string, n: number, reclaimed: boolean, round?: number): void {
    const pool = this.pool(key)
    const held = (pool.held.get(worker) ?? 0) - n
    if (held > 0) pool.held.set(worker, held)
    else pool.held.delete(worker)
    if (reclaimed && (round === undefined || round === pool.round)) pool.asked?.delete(worker)
    if (reclaimed && round !== undefined && round === pool.storeRound) this.storeAnswered(pool, worker)
    this.serve(key, pool)
  }

  /** A worker is gone, and its clients with it: its seats are free. */
  forget(worker: number): void {
    for (const [key, pool] of this.pools) {
      pool.held.delete(worker)
      pool.asked?.delete(worker)
      this.storeAnswered(pool, worker)
      // Its request at the head had others asked for seats on its behalf: the next request asks anew.
      if (pool.queue[0]?.worker === worker) pool.asked = undefined
      for (let i = pool.queue.length - 1; i >= 0; i--) if (pool.queue[i]!.worker === worker) pool.queue.splice(i, 1)
      this.serve(key, pool)
    }
  }

  /**
   * Whether the ledger keeps a record of the pool: a worker holds seats, a request waits, or a
   * reclaim is under way. It goes with the last of them (`serve`).
   */
  has(key: string): boolean {
    return this.pools.has(key)
  }

  /** Seats held per worker (tests, views). */
  heldBy(key: string): ReadonlyMap<number, number> {
    return this.pools.get(key)?.held ?? new Map()
  }

  private pool(key: string): PoolSeats {
    let pool = this.pools.get(key)
    if (pool === undefined) {
      pool = {
        limit: 0,
        held: new Map(),
        queue: [],
        asked: undefined,
        round: this.rounds,
        store: undefined,
        storeAsked: undefined,
        storeRound: -1,
        storeDone: undefined
      }
      this.pools.set(key, pool)
    }
    return pool
  }

  private serve(key: string, pool: PoolSeats): void {
    const spare = Math.floor(pool.limit / (4 * this.workers))
    while (pool.queue.length > 0) {
      const request = pool.queue[0]!
      let used = 0
      for (const n of pool.held.values()) used += n
      const free = (this.bound === undefined ? pool.limit : Math.min(pool.limit, this.bound.granted(key))) - used
      if (request.need > 0 && free < request.need) {
        if (pool.asked === undefined) {
          // Seats another worker keeps spare are seats nobody uses: take them back before refusing.
          pool.asked = new Set()
          // Numbered across pools' lives too: a pool forgotten and made again starts a new count.
          pool.round = ++this.rounds
          for (const [worker, n] of pool.held) {
            if (worker !== request.worker && n > 0) {
              pool.asked.add(worker)
              this.send(worker, { t: "seat-reclaim", key, round: pool.round })
            }
          }
        }
        if (pool.asked.size > 0) return
        // Cluster mode: the host's own unused seats are back and still short: ask the store, which
        // asks the other hosts before it says no.
        if (this.bound !== undefined && pool.store !== "answered") {
          if (pool.store === undefined) {
            pool.store = "asked"
            this.bound.ask(key, pool.limit, request.need - free)
          }
          return
        }
      }
      // Enough, or everyone has given back what it could: what is free is all there is.
      pool.asked = undefined
      pool.store = undefined
      pool.queue.shift()
      const n = Math.max(0, Math.min(free, request.need + spare))
      if (n > 0) pool.held.set(request.worker, (pool.held.get(request.worker) ?? 0) + n)
      this.send(request.worker, { t: "seats", key, n, spare })
    }
    let used = 0
    for (const n of pool.held.values()) used += n
    // Before `settled`: the bound sees the record gone, and gives back what the host kept for it.
    if (pool.held.size === 0 && pool.asked === undefined && pool.storeAsked === undefined) this.pools.delete(key)
    this.bound?.settled(key, used)
  }
}
