import { Ledger, type LedgerOut } from "./Ledger.ts"
import type { BackendRef, LinePermits, PermitHolder } from "./StoreRunner.ts"

interface HostPool {
  readonly holder: PermitHolder & { settings: { key: string; size: number } }
  /** Undefined only while it is being attached. */
  line: LinePermits | undefined
  /** Permits the store granted this host for the pool (the runner line's `held`). */
  granted: number
  /** The store's directive for this host: hold at most `keep`; `press`: another host waits. */
  keep: number
  press: boolean
  /** The want last told to the store (less what it granted since, as the runner counts it). */
  wantSent: number
}

/**
 * Several workers on each of several hosts (docs/scale-out.md#several-workers-on-each-of-several-hosts):
 * the supervisor is the host's runner of the store ledger, and its host Ledger shares out among the
 * workers what the store granted the host — not `pool_size`. The store sees one holder per host and
 * pool: it hears the sum of what the workers still want, gets back at once every permit no worker
 * holds (a permit idle in the supervisor is one another host may be waiting for), and its directive
 * `keep k` becomes the host Ledger's size k (workers above their share close servers, as on one
 * host), `press` presses every worker. Pure and synchronous; the store is behind `attach`.
 */
export class HostPermits {
  readonly ledger: Ledger
  private readonly pools = new Map<string, HostPool>()

  constructor(
    private readonly attach: (holder: PermitHolder) => LinePermits,
    send: (worker: number, message: LedgerOut) => void
  ) {
    this.ledger = new Ledger(send, {
      granted: (key) => this.pools.get(key)?.granted ?? 0,
      keep: (key) => this.pools.get(key)?.keep ?? Number.POSITIVE_INFINITY,
      pressed: (key) => this.pools.get(key)?.press ?? false,
      settled: (key, size, used, want) => this.settled(key, size, used, want)
    })
  }

  /** A worker's server logged in / closed: recorded in the store, for a reclaim after this host dies. */
  opened(key: string, backend: BackendRef): void {
    this.pools.get(key)?.line?.opened(backend)
  }

  closed(key: string, backend: BackendRef): void {
    this.pools.get(key)?.line?.closed(backend)
  }

  /** Permits the store granted this host (tests, views). */
  grantedTo(key: string): number {
    return this.pools.get(key)?.granted ?? 0
  }

  private settled(key: string, size: number, used: number, want: number): void {
    let pool = this.pools.get(key)
    if (pool === undefined) {
      if (want === 0) return
      pool = this.pool(key, size)
    }
    if (size > 0) pool.holder.settings.size = size
    const line = pool.line
    if (line === undefined) return
    // What no worker holds goes back: after a settle, a free permit within the host's size would
    // have gone to a worker that wants it, so every one left over is the store's.
    const surplus = pool.granted - used
    if (surplus > 0) {
      pool.granted -= surplus
      line.release(surplus)
    }
    if (want !== pool.wantSent) {
      pool.wantSent = want
      line.want(pool.holder.settings.size, want)
    }
  }

  private pool(key: string, size: number): HostPool {
    const holder = {
      settings: { key, size },
      // Never closed: the line lives as long as the supervisor (one per pool key ever used).
      isClosed: false,
      grant: (n: number) => {
        pool.granted += n
        pool.wantSent = Math.max(0, pool.wantSent - n)
        this.ledger.refresh(key)
      },
      direct: (keep: number, press: boolean) => {
        pool.keep = keep
        pool.press = press
        this.ledger.refresh(key)
      }
    }
    const pool: HostPool = {
      holder,
      line: undefined,
      granted: 0,
      keep: Number.POSITIVE_INFINITY,
      press: false,
      wantSent: 0
    }
    this.pools.set(key, pool)
    pool.line = this.attach(holder)
    return pool
  }
}
