/**
 * The host's permit ledger (docs/scale-out.md#the-permit-model), kept by the supervisor: per pool,
 * how many permits each worker holds and how many more it wants. Pure and synchronous; it speaks
 * through `send`.
 */

export type LedgerOut =
  | { readonly t: "grant"; readonly key: string; readonly n: number }
  | { readonly t: "directive"; readonly key: string; readonly keep: number | null; readonly press: boolean }

interface Want {
  n: number
  since: number
}

interface Directive {
  readonly keep: number | null
  readonly press: boolean
}

interface PoolLedger {
  size: number
  readonly held: Map<number, number>
  readonly want: Map<number, Want>
  readonly directives: Map<number, Directive>
}

/**
 * Cluster mode with several workers (docs/scale-out.md#several-workers-on-each-of-several-hosts): the
 * host's ledger shares out what the store granted the host, not `pool_size`.
 */
export interface LedgerBound {
  /** Permits the store granted the host for the pool: the most its workers may hold. */
  readonly granted: (key: string) => number
  /**
   * The store's directive for the host (Infinity: none): the workers' shares are of this (or of
   * `pool_size`), not of what is granted so far, so a worker is never told to give up a permit
   * just because the host is still waiting for the store.
   */
  readonly keep: (key: string) => number
  /** The store pressed the host: another host waits, so no worker keeps a spare idle server. */
  readonly pressed: (key: string) => boolean
  /** After each settle: the workers hold `used` permits and still want `want` more. */
  readonly settled: (key: string, size: number, used: number, want: number) => void
}

export class Ledger {
  private readonly pools = new Map<string, PoolLedger>()
  /** Orders wants that arrive in the same millisecond. */
  private tick = 0

  constructor(
    private readonly send: (worker: number, message: LedgerOut) => void,
    private readonly bound?: LedgerBound
  ) {}

  /** The bound changed (a grant from the store, its directive): settle the pool again. */
  refresh(key: string): void {
    const pool = this.pools.get(key)
    if (pool !== undefined) this.settle(key, pool)
    else this.bound?.settled(key, 0, 0, 0)
  }

  want(worker: number, key: string, size: number, n: number): void {
    const pool = this.pool(key)
    pool.size = size
    if (n <= 0) pool.want.delete(worker)
    else {
      const current = pool.want.get(worker)
      if (current === undefined) pool.want.set(worker, { n, since: ++this.tick })
      else current.n = n
    }
    this.settle(key, pool)
  }

  release(worker: number, key: string, n: number): void {
    const pool = this.pool(key)
    const held = (pool.held.get(worker) ?? 0) - n
    if (held > 0) pool.held.set(worker, held)
    else pool.held.delete(worker)
    this.settle(key, pool)
  }

  /** A worker is gone and none of its servers can be running any more: its permits are free. */
  forget(worker: number): void {
    for (const [key, pool] of this.pools) {
      const held = pool.held.delete(worker)
      const wanted = pool.want.delete(worker)
      const had = held || wanted
      pool.directives.delete(worker)
      if (had) this.settle(key, pool)
    }
  }

  /** Permits held per worker (tests, views). */
  heldBy(key: string): ReadonlyMap<number, number> {
    return this.pools.get(key)?.held ?? new Map()
  }

  /**
   * Whether the ledger keeps a record of the pool: a worker holds or wants permits for it, or has a
   * directive in force. The record goes with the last of them (see `divide`), so a pool key used
   * once (a JIT token, a deleted tenant) leaves nothing behind.
   */
  has(key: string): boolean {
    return this.pools.has(key)
  }

  total(key: string): number {
    let sum = 0
    for (const n of this.heldBy(key).values()) sum += n
    return sum
  }

  private pool(key: string): PoolLedger {
    let pool = this.pools.get(key)
    if (pool === undefined) {
      pool = { size: 0, held: new Map(), want: new Map(), directives: new Map() }
      this.pools.set(key, pool)
    }
    return pool
  }

  /**
   * Splits the pool among every worker that holds or wants permits (water-filling: none gets more
   * than it holds plus wants, none more than an equal share of what is left), grants free permits up
   * to those shares, and — while some want stays unmet — tells each worker its share (`keep`) and
   * presses those that want nothing to give up idle servers.
   */
  private settle(key: string, pool: PoolLedger): void {
    this.divide(key, pool)
    if (this.bound === undefined) return
    let used = 0
    let want = 0
    for (const n of pool.held.values()) used += n
    for (const w of pool.want.values()) want += w.n
    this.bound.settled(key, pool.size, used, want)
  }

  private divide(key: string, pool: PoolLedger): void {
    const size = this.bound === undefined ? pool.size : Math.min(pool.size, this.bound.keep(key))
    const capacity = this.bound === undefined ? size : Math.min(size, this.bound.granted(key))
    const hostPressed = this.bound?.pressed(key) ?? false
    const held = (w: number) => pool.held.get(w) ?? 0
    const wanted = (w: number) => pool.want.get(w)?.n ?? 0
    let used = 0
    for (const n of pool.held.values()) used += n
    if (pool.want.size === 0) {
      if (used > size || hostPressed) {
        // Cluster mode: the store took permits back (keep) or another host waits (press): workers
        // close idle servers, and those above their share of what the host may keep close busy
        // ones at release, even though none of this host's workers waits.
        const holders = [...pool.held.keys()]
        const shares =
          used > size
            ? fairShares(
                size,
                holders.map(held),
                holders.map((_, i) => i)
              )
            : undefined
        for (const [i, worker] of holders.entries())
          this.direct(key, pool, worker, { keep: shares?.[i] ?? null, press: hostPressed })
        for (const worker of [...pool.directives.keys()]) if (!pool.held.has(worker)) this.direct(key, pool, worker)
      } else this.lift(key, pool)
      if (pool.held.size === 0 && pool.directives.size === 0) this.pools.delete(key)
      return
    }
    const workers = [...new Set([...pool.held.keys(), ...pool.want.keys()])]
    const demands = workers.map((w) => held(w) + wanted(w))
    // Who gets the remainder of the division: first a worker that waits with nothing (so a pool
    // smaller than the number of busy workers rotates), then whoever already holds it (so shares
    // do not flap), then the longest waiting.
    const since = (w: number) => pool.want.get(w)?.since ?? Number.POSITIVE_INFINITY
    const rank = (i: number) => {
      const w = workers[i]!
      if (held(w) === 0 && wanted(w) > 0) return 0
      if (held(w) > Math.floor(size / workers.length)) return 1
      return 2
    }
    const priority = workers
      .map((_, i) => i)
      .sort((a, b) => rank(a) - rank(b) || since(workers[a]!) - since(workers[b]!))
    const shares = fairShares(size, demands, priority)
    let free = Math.max(0, capacity - used)
    for (const i of priority) {
      const worker = workers[i]!
      const want = pool.want.get(worker)
      if (want === undefined) continue
      const g = Math.min(free, want.n, Math.max(0, shares[i]! - held(worker)))
      if (g > 0) {
        free -= g
        want.n -= g
        used += g
        pool.held.set(worker, held(worker) + g)
        this.send(worker, { t: "grant", key, n: g })
      }
      if (want.n === 0) pool.want.delete(worker)
    }
    if (pool.want.size === 0 && used <= size && !hostPressed) {
      this.lift(key, pool)
      return
    }
    workers.forEach((worker, i) => {
      this.direct(key, pool, worker, {
        keep: pool.want.size === 0 && used <= size ? null : shares[i]!,
        press: !pool.want.has(worker) || hostPressed
      })
    })
  }

  /** Tells `worker` its directive if it changed (none: lifted). */
  private direct(key: string, pool: PoolLedger, worker: number, d: Directive = { keep: null, press: false }): void {
    const before = pool.directives.get(worker) ?? { keep: null, press: false }
    if (before.keep === d.keep && before.press === d.press) return
    if (d.keep === null && !d.press) pool.directives.delete(worker)
    else pool.directives.set(worker, d)
    this.send(worker, { t: "directive", key, ...d })
  }

  /** Nobody waits: every worker may keep what it holds again. */
  private lift(key: string, pool: PoolLedger): void {
    for (const [worker, d] of pool.directives) {
      if (d.keep !== null || d.press) this.send(worker, { t: "directive", key, keep: null, press: false })
    }
    pool.directives.clear()
  }
}

/**
 * Integer max-min fair shares of `capacity` among `demands`: each gets at most its demand and at
 * most an equal share of what the smaller demands left; the remainder of the rounding goes one by
 * one in `priority` order (indices into `demands`).
 */
export const fairShares = (
  capacity: number,
  demands: ReadonlyArray<number>,
  priority: ReadonlyArray<number>
): Array<number> => {
  const order = demands.map((d, i) => [d, i] as const).sort((a, b) => a[0] - b[0] || a[1] - b[1])
  const exact = new Array<number>(demands.length).fill(0)
  let left = capacity
  order.forEach(([demand, i], k) => {
    const a = Math.min(demand, left / (order.length - k))
    exact[i] = a
    left -= a
  })
  const shares = exact.map((a) => Math.floor(a + 1e-9))
  let rest =
    Math.min(
      capacity,
      demands.reduce((s, d) => s + d, 0)
    ) - shares.reduce((s, a) => s + a, 0)
  for (const i of priority) {
    if (rest <= 0) break
    if (shares[i]! < demands[i]!) {
      shares[i]!++
      rest--
    }
  }
  return shares
}
