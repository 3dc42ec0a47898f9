import { Context, Effect, Exit, Layer, Option, Scope, Semaphore, Tracer } from "effect"
import { AppConfig } from "../config/index.ts"
import { type TidepoolError, tidepoolError } from "../errors/index.ts"
import { checkoutSpans } from "./CheckoutSpans.ts"
import { PermitGate } from "./PermitGate.ts"
import { SeatGate } from "./SeatGate.ts"
import { makeTenantPool, type PoolSettings, type TenantPool } from "./TenantPool.ts"

interface Entry {
  readonly pool: TenantPool
  readonly scope: Scope.Closeable
  /** Since when the pool has had no client and lent no server; also moved by every `get`. */
  emptySince: number
}

/** How often idle servers are reaped and warm minimums restored. */
const SWEEP_MS = 1000

/**
 * Supervises every pool on this node: starts one on first use, reaps idle servers on one coarse
 * timer, and shuts a pool down after it has had no clients for a grace period (keeping its warm
 * servers meanwhile avoids cold-start storms when clients reconnect). A pool with no client and no
 * server at all (its database missing or down) has nothing to keep warm: it shuts down at the next
 * sweep, so that logins naming databases that fail cannot fill the tenant's pool cap.
 */
export class PoolRegistry extends Context.Service<PoolRegistry>()("tidepool/PoolRegistry", {
  make: Effect.gen(function* () {
    const config = yield* AppConfig
    const registryScope = yield* Effect.scope
    const pools = new Map<string, Entry>()
    // Worker mode only (docs/scale-out.md): pool_size is shared with the host's other workers.
    const gate = yield* Effect.serviceOption(PermitGate)
    // … and so are max_clients and, in session mode, pool_size as a client limit.
    const seats = Option.getOrUndefined(yield* Effect.serviceOption(SeatGate))

    const closeEntry = (key: string, entry: Entry) =>
      Effect.suspend(() => {
        if (pools.get(key) === entry) pools.delete(key)
        return Scope.close(entry.scope, Exit.void)
      })

    // PAUSE targets, kept here so that pools started while paused start paused.
    let pausedAll = false
    const pausedNames = new Set<string>()
    const matches = (s: PoolSettings, name: string) => name === s.tenant || name === `${s.tenant}/${s.database}`
    const isPaused = (s: PoolSettings) =>
      pausedAll || pausedNames.has(s.tenant) || pausedNames.has(`${s.tenant}/${s.database}`)

    const poolsOf = (tenant: string): number => {
      let n = 0
      for (const entry of pools.values()) if (entry.pool.settings.tenant === tenant) n++
      return n
    }

    // Creating a pool yields (scope, fibers): one creation at a time, or two clients of a new pool
    // could each start one and double its cap.
    const creating = yield* Semaphore.make(1)

    /**
     * The pool a client joins. In worker mode it also holds the client's host-wide seat, which the
     * client's `admit` (next, synchronously) takes: the one step of a login that may wait for the
     * supervisor (docs/scale-out.md#max_clients-across-workers). A pool that closed meanwhile (the
     * sweep, its tenant stopped) lets its waiting logins go: they ask again, of the pool that serves
     * the key now, rather than join a closed one (a transaction-mode client whose settings the pool
     * knew would be greeted there and then fail every transaction).
     */
    const get = (settings: PoolSettings): Effect.Effect<TenantPool, TidepoolError> =>
      seats === undefined
        ? poolFor(settings)
        : Effect.flatMap(poolFor(settings), (pool) =>
            Effect.flatMap(pool.reserveSeat(), () => (pool.isClosed ? get(settings) : Effect.succeed(pool)))
          )

    const poolFor = (settings: PoolSettings): Effect.Effect<TenantPool, TidepoolError> =>
      Effect.suspend(() => {
        const existing = pools.get(settings.key)
        if (existing !== undefined && !existing.pool.isClosed) {
          // A client is on its way (it counts itself in a moment): no sweep may take the pool meanwhile.
          existing.emptySince = Date.now()
          return Effect.succeed(existing.pool)
        }
        return creating.withPermits(1)(create(settings))
      })

    const create = (settings: PoolSettings): Effect.Effect<TenantPool, TidepoolError> =>
      Effect.suspend(() => {
        const existing = pools.get(settings.key)
        if (existing !== undefined && !existing.pool.isClosed) return Effect.succeed(existing.pool)
        if (poolsOf(settings.tenant) >= config.maxPoolsPerTenant) return Effect.fail(tidepoolError("EMAXPOOLSREACHED"))
        return Effect.gen(function* () {
          const scope = yield* Scope.fork(registryScope, "sequential")
          const pool = yield* makeTenantPool(settings).pipe(Scope.provide(scope))
          if (isPaused(settings)) pool.pause()
          if (Option.isSome(gate)) pool.gate = gate.value.attach(pool)
          if (seats !== undefined) pool.seats = seats.attach(pool)
          const tracer = yield* Effect.tracer
          // Effect's built-in tracer exports nothing (no exporter configured, see telemetry/Tracing.ts):
          // spans made for it would be work for no one.
          if (tracer !== Tracer.nativeTracer) {
            pool.onWaitEnded = checkoutSpans(tracer, settings)
            pool.sampleEvery = config.traceCheckoutEvery
          }
          pools.set(settings.key, { pool, scope, emptySince: Date.now() })
          yield* Effect.logDebug("pool started").pipe(
            Effect.annotateLogs({ tenant: settings.tenant, user: settings.user, mode: settings.mode })
          )
          return pool
        })
      })

    const sweep = Effect.suspend(() => {
      const now = Date.now()
      const stale: Array<[string, Entry]> = []
      for (const [key, entry] of pools) {
        entry.pool.maintain(now)
        const s = entry.pool.stats
        const grace = entry.pool.total === 0 && s.waiting === 0 ? SWEEP_MS : config.poolShutdownAfterMs
        if (s.clients > 0 || s.busy > 0) entry.emptySince = now
        else if (now - entry.emptySince >= grace) stale.push([key, entry])
      }
      return Effect.forEach(stale, ([key, entry]) => closeEntry(key, entry), { discard: true })
    })

    yield* sweep.pipe(Effect.delay(SWEEP_MS), Effect.forever, Effect.interruptible, Effect.forkScoped)

    yield* Effect.addFinalizer(() =>
      Effect.forEach([...pools], ([key, entry]) => closeEntry(key, entry), { discard: true })
    )

    const ofTenant = (tenant: string) => [...pools].filter(([, e]) => e.pool.settings.tenant === tenant)

    return {
      get,
      /** A tenant's live pools. */
      poolsOf: (tenant: string): ReadonlyArray<TenantPool> => ofTenant(tenant).map(([, e]) => e.pool),
      /**
       * Applies a tenant's new configuration: `update` gives each of its pools new settings (drained
       * gracefully, see TenantPool.reconfigure), the same settings (left alone) or undefined (its
       * user is gone: the pool stops).
       */
      reconfigure: (tenant: string, update: (settings: PoolSettings) => PoolSettings | undefined) =>
        Effect.forEach(
          ofTenant(tenant),
          ([key, entry]) => {
            const next = update(entry.pool.settings)
            if (next === undefined) return closeEntry(key, entry)
            if (next !== entry.pool.settings) entry.pool.reconfigure(next)
            return Effect.void
          },
          { discard: true }
        ),
      /** Stops every pool of a tenant (deleted, terminated); their clients are ended by the caller. */
      stopTenant: (tenant: string) =>
        Effect.forEach(ofTenant(tenant), ([key, entry]) => closeEntry(key, entry), { discard: true }),
      /** Every live pool, for stats and admin views. */
      all: (): ReadonlyArray<TenantPool> => [...pools.values()].map((e) => e.pool),
      /**
       * Holds new checkouts of every pool, or of one tenant (`name` = external_id) or one tenant
       * database (`tenant/database`), including pools started later. Returns the pools paused now.
       */
      pause: (name?: string): ReadonlyArray<TenantPool> => {
        if (name === undefined) pausedAll = true
        else pausedNames.add(name)
        const paused: Array<TenantPool> = []
        for (const { pool } of pools.values()) {
          if (name === undefined || matches(pool.settings, name)) {
            pool.pause()
            paused.push(pool)
          }
        }
        return paused
      },
      /** Undoes `pause` (without a name: every pause); pools still covered by another PAUSE stay paused. */
      resume: (name?: string): void => {
        if (name === undefined) {
          pausedAll = false
          pausedNames.clear()
        } else {
          pausedNames.delete(name)
        }
        for (const { pool } of pools.values()) if (!isPaused(pool.settings)) pool.resume()
      }
    } as const
  })
}) {
  static readonly layer = Layer.effect(this, this.make)
}
