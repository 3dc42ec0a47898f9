import type { PoolSeats } from "../pool/SeatGate.ts"
import { SeatLedger, type SeatsOut } from "./Seats.ts"
import type { SeatHolder } from "./StoreRunner.ts"

interface HostPool {
  readonly holder: SeatHolder & { isClosed: boolean }
  /** Undefined only while it is being attached. */
  line: PoolSeats | undefined
  /** Seats the store granted this host (the runner's seat line's `held`). */
  granted: number
  /** The store's block: the host keeps about this many unused seats, no more than twice it. */
  spare: number
}

/**
 * max_clients across hosts of several workers (docs/scale-out.md#max_clients-across-hosts): the
 * supervisor is the host's seat holder in the store, and its SeatLedger shares out among the workers
 * the seats the store granted the host. A login short of a seat is refused only after the host's
 * own workers, then (through the store) the other hosts, have given back their unused seats; a
 * reclaim the store asks of this host is passed to every worker holding seats, and answered once
 * each has. Pure and synchronous; the store is behind `attach`.
 *
 * A pool's record lives while the SeatLedger keeps one (a worker holds seats, a login waits, a
 * reclaim is under way); when it goes — every worker's pool of the key closed, each having given its
 * seats back — the host gives the store back every seat it kept spare (a closed pool keeps none, as
 * on a worker), and the record goes at once, its holder closed so the runner drops its seat line.
 */
export class HostSeats {
  readonly ledger: SeatLedger
  private readonly pools = new Map<string, HostPool>()

  constructor(
    private readonly attach: (holder: SeatHolder) => PoolSeats,
    workers: number,
    send: (worker: number, message: SeatsOut) => void
  ) {
    this.ledger = new SeatLedger(workers, send, {
      granted: (key) => this.pools.get(key)?.granted ?? 0,
      ask: (key, limit, need) => this.pool(key).line?.want(limit, need),
      settled: (key, used) => {
        const pool = this.pools.get(key)
        const line = pool?.line
        if (pool === undefined || line === undefined) return
        if (!this.ledger.has(key)) {
          // No worker has the pool open any more: nothing to keep spare for.
          if (pool.granted > 0) line.release(pool.granted, false)
          pool.granted = 0
          this.remove(key, pool)
          return
        }
        // Hysteresis, as a worker's: a client leaving and the next arriving cost no store transaction.
        const unused = pool.granted - used
        if (unused > 2 * pool.spare) {
          pool.granted -= unused - pool.spare
          line.release(unused - pool.spare, false)
        }
      }
    })
  }

  /** Pool keys this host keeps a record of (tests, views). */
  get keys(): number {
    return this.pools.size
  }

  private remove(key: string, pool: HostPool): void {
    if (this.pools.get(key) !== pool) return
    this.pools.delete(key)
    // Seats the runner has on their way for this holder go back (a closed holder's); a reclaim
    // asked of it is answered by the runner; a record made again for the key attaches anew.
    pool.holder.isClosed = true
  }

  /** Seats the store granted this host (tests, views). */
  grantedTo(key: string): number {
    return this.pools.get(key)?.granted ?? 0
  }

  private pool(key: string): HostPool {
    let pool = this.pools.get(key)
    if (pool !== undefined) return pool
    const holder: HostPool["holder"] = {
      settings: { key },
      // Until the record goes (`remove`): then the runner drops its seat line.
      isClosed: false,
      seatsGranted: (n, spare) => {
        fresh.granted += n
        fresh.spare = spare
        this.ledger.stored(key)
      },
      reclaimSeats: () =>
        this.ledger.reclaimAll(key, () => {
          let used = 0
          for (const n of this.ledger.heldBy(key).values()) used += n
          const unused = Math.max(0, fresh.granted - used)
          fresh.granted -= unused
          fresh.line?.release(unused, true)
          if (fresh.granted === 0 && !this.ledger.has(key)) this.remove(key, fresh)
        })
    }
    const fresh: HostPool = { holder, line: undefined, granted: 0, spare: 0 }
    pool = fresh
    this.pools.set(key, fresh)
    fresh.line = this.attach(holder)
    return fresh
  }
}
