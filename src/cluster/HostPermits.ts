import { Ledger, type LedgerOut } from "./Ledger.ts"
import type { BackendRef, LinePermits, PermitHolder } from "./StoreRunner.ts"

interface HostPool {
  readonly holder: PermitHolder & { settings: { key: string; size: number }; isClosed: boolean }
  /** Undefined only while it is being attached. */
  line: LinePermits | undefined
  /** Permits the store granted this host for the pool (the runner line's `held`). */
  granted: number
  /** The store's directive for this host: hold at most `keep`; `press`: another host waits. */
  keep: number
  press: boolean
  /** The want last told to the store (less what it granted since, as the runner counts it). */
  wantSent: number
  /**
   * Workers' servers open (reported `opened`, not yet `closed`): their close must still reach the
   * store's record of backends. By cancel key too: a new server may reuse a closed one's pid and
   * be reported (by another worker) before the old one's close.
   */
  readonly backends: Set<string>
}

const backendId = (b: BackendRef): string => `${b.host}:${b.port}:${b.pid}:${b.secret}`

/**
 * Several workers on each of several hosts (docs/scale-out.md#several-workers-on-each-of-several-hosts):
 * the supervisor is the host's runner of the store ledger, and its host Ledger shares out among the
 * workers what the store granted the host — not `pool_size`. The store sees one holder per host and
 * pool: it hears the sum of what the workers still want, gets back at once every permit no worker
 * holds (a permit idle in the supervisor is one another host may be waiting for), and its directive
 * `keep k` becomes the host Ledger's size k (workers above their share close servers, as on one
 * host), `press` presses every worker. Pure and synchronous; the store is behind `attach`.
 *
 * A pool's record lives while the host has anything of it: a worker holding or wanting permits (the
 * Ledger's record), a permit granted by the store, a want told to it, a server open. It goes with
 * the last of them, at once (the workers' own pools already wait out their idle timeouts before
 * giving their last permit back, and a record is made again without a store round trip), and its
 * holder is closed, so the runner drops its line and gives back any grant still on its way
 * (StoreRunner). A pool key used once (a JIT token, a deleted tenant) thus leaves nothing behind.
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
    // A worker holds the permit, so the record is there; made again should a report come late.
    const pool = this.pools.get(key) ?? this.pool(key, 0)
    pool.backends.add(backendId(backend))
    pool.line?.opened(backend)
  }

  closed(key: string, backend: BackendRef): void {
    const pool = this.pools.get(key)
    if (pool === undefined) return
    pool.backends.delete(backendId(backend))
    pool.line?.closed(backend)
    this.removeIfUnused(key, pool)
  }

  /** Permits the store granted this host (tests, views). */
  grantedTo(key: string): number {
    return this.pools.get(key)?.granted ?? 0
  }

  /** Pool keys this host keeps a record of (tests, views). */
  get keys(): number {
    return this.pools.size
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
    this.removeIfUnused(key, pool)
  }

  private removeIfUnused(key: string, pool: HostPool): void {
    if (pool.granted > 0 || pool.wantSent > 0 || pool.backends.size > 0 || this.ledger.has(key)) return
    if (this.pools.get(key) !== pool) return
    this.pools.delete(key)
    // A grant or directive the runner has on its way for this holder is not ours any more: the
    // runner gives a grant back (a closed holder's), and a record made again for the key gets
    // the line's directive at its attach.
    pool.holder.isClosed = true
  }

  private pool(key: string, size: number): HostPool {
    const holder = {
      settings: { key, size },
      // Until the record goes (removeIfUnused): then the runner drops its line.
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
      wantSent: 0,
      backends: new Set()
    }
    this.pools.set(key, pool)
    pool.line = this.attach(holder)
    return pool
  }
}
