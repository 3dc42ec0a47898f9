import { Data, Effect, Option } from "effect"
import type { SqlClient } from "effect/sql"
import { AppConfig } from "../config/index.ts"
import { PeerWorkers } from "../session/SessionRegistry.ts"
import { TenantStore, withinDeadline } from "../tenants/TenantStore.ts"
import { NS as RUNNER_LOCK_NS, SLOT_SHIFT } from "./StoreRunner.ts"

/**
 * Cluster mode (docs/scale-out.md#several-hosts): what the store ledger says now, read from the
 * store at the time of asking, for the admin console (`SHOW RUNNERS`, `SHOW PERMITS`) and
 * `/metrics`. Nothing is cached: a view is one query on the tenant store's own client, bounded by
 * `VIEW_TIMEOUT_MS`, so a store outage answers a clear error instead of holding the console or
 * the scrape. Read-only: the ledger is StoreRunner's to write.
 */

/** The bound on one view's store read: past it the store counts as unreachable for that view. */
export const VIEW_TIMEOUT_MS = 2_000

export class StoreViewError extends Data.TaggedError("StoreViewError")<{ readonly message: string }> {}

/** One pool as the ledger names it: `tidepool_permits.pool_key` is the JSON array of its key's parts. */
export interface PoolName {
  readonly tenant: string
  /** The user name clients log in with; a JIT pool's has ` (jit)` after it. */
  readonly user: string
  readonly mode: string
  readonly database: string
}

export interface RunnerRow {
  readonly runnerId: string
  readonly slot: number
  readonly address: string
  /** `YYYY-MM-DD HH:MM:SS UTC`, the store's clock. */
  readonly started: string
  /** Since the runner last renewed its lease, by the store's clock. */
  readonly leaseAgeMs: number
  /** Its store session is alive: it holds its runner lock (a reclaim needs it gone). */
  readonly connected: boolean
  readonly held: number
  readonly want: number
  readonly pools: number
  /** The runner of the process answering. */
  readonly local: boolean
}

export interface PermitRow extends PoolName {
  readonly runnerId: string
  readonly slot: number
  readonly held: number
  readonly want: number
  /** The runner's directive: its share while some want is unmet; null when none is in force. */
  readonly keep: number | null
  readonly press: boolean
}

/** This process's runner as the store has it: its row (none once reclaimed) and its pools' rows. */
export interface OwnView {
  readonly registered: boolean
  readonly leaseAgeMs: number | undefined
  /** The runner's own store session holds its lock, as the store sees it. */
  readonly connected: boolean
  readonly permits: ReadonlyArray<PermitRow>
}

export interface StoreViewsShape {
  readonly runners: Effect.Effect<ReadonlyArray<RunnerRow>, StoreViewError>
  readonly permits: Effect.Effect<ReadonlyArray<PermitRow>, StoreViewError>
  readonly own: Effect.Effect<OwnView, StoreViewError>
}

export const poolName = (stored: string): PoolName => {
  let parts: Array<string> = []
  try {
    const parsed: unknown = JSON.parse(stored)
    if (Array.isArray(parsed)) parts = parsed.map(String)
  } catch {
    // Not written by a runner: shown as it is, under its tenant.
  }
  if (parts.length < 4) return { tenant: stored, user: "", mode: "", database: "" }
  // A JIT pool's user part is `alias, "jit", token digest` (see ClientSession): the digest is not shown.
  const user = parts.length > 4 ? `${parts[1]} (jit)` : parts[1]!
  return { tenant: parts[0]!, user, mode: parts[parts.length - 2]!, database: parts[parts.length - 1]! }
}

const num = (v: unknown): number => Number(v ?? 0)

const bounded = <A>(what: string, effect: Effect.Effect<A, unknown>): Effect.Effect<A, StoreViewError> =>
  withinDeadline(
    Effect.mapError(
      effect,
      (e) =>
        new StoreViewError({
          message: `the tenant store could not be read (${what}): ${e instanceof Error ? e.message : String(e)}`
        })
    ),
    VIEW_TIMEOUT_MS,
    () =>
      Effect.fail(
        new StoreViewError({
          message: `the tenant store did not answer within ${VIEW_TIMEOUT_MS / 1000} s (${what})`
        })
      )
  )

interface PermitDbRow {
  readonly pool_key: string
  readonly runner_id: string
  readonly slot: number
  readonly held: number
  readonly want: number
  readonly keep: number | null
  readonly press: boolean
}

const permitRow = (r: PermitDbRow): PermitRow => ({
  ...poolName(r.pool_key),
  runnerId: r.runner_id,
  slot: num(r.slot),
  held: num(r.held),
  want: num(r.want),
  keep: r.keep === null ? null : num(r.keep),
  press: r.press === true
})

/** The views over `sql`; `slot()` is this process's runner slot (its row's key). */
export const makeStoreViews = (sql: SqlClient.SqlClient, slot: () => number): StoreViewsShape => {
  // A runner's store session holds (RUNNER_LOCK_NS, runner_id) while it lives. pg_locks shows a
  // two-int4 advisory lock as (classid, objid) with objsubid 2.
  const connected = sql.literal(`EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.objsubid = 2
    AND l.classid = ${RUNNER_LOCK_NS} AND l.objid = r.runner_id::int::oid AND l.granted)`)
  return {
    runners: bounded(
      "tidepool_runners",
      sql<{
        runner_id: string
        slot: number
        address: string
        started: string
        lease_age_ms: number
        connected: boolean
        held: number
        want: number
        pools: number
      }>`SELECT r.runner_id::text AS runner_id, r.slot, r.address,
        to_char(r.started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC' AS started,
        (extract(epoch FROM now() - r.renewed_at) * 1000)::float8 AS lease_age_ms,
        ${connected} AS connected,
        coalesce(sum(p.held), 0)::int AS held, coalesce(sum(p.want), 0)::int AS want,
        count(p.pool_key)::int AS pools
      FROM tidepool_runners r LEFT JOIN tidepool_permits p ON p.runner_id = r.runner_id
      GROUP BY r.runner_id ORDER BY r.slot`
    ).pipe(
      Effect.map((rows) =>
        rows.map((r) => ({
          runnerId: r.runner_id,
          slot: num(r.slot),
          address: r.address,
          started: r.started,
          leaseAgeMs: Math.max(0, Math.round(num(r.lease_age_ms))),
          connected: r.connected === true,
          held: num(r.held),
          want: num(r.want),
          pools: num(r.pools),
          local: num(r.slot) === slot()
        }))
      )
    ),
    permits: bounded(
      "tidepool_permits",
      sql<PermitDbRow>`SELECT p.pool_key, p.runner_id::text AS runner_id, r.slot, p.held, p.want, p.keep, p.press
      FROM tidepool_permits p JOIN tidepool_runners r ON r.runner_id = p.runner_id
      ORDER BY p.pool_key, r.slot`
    ).pipe(Effect.map((rows) => rows.map(permitRow))),
    own: Effect.suspend(() =>
      bounded(
        "this runner's rows",
        sql<
          PermitDbRow & { lease_age_ms: number; connected: boolean }
        >`SELECT r.runner_id::text AS runner_id, r.slot, (extract(epoch FROM now() - r.renewed_at) * 1000)::float8 AS lease_age_ms,
          ${connected} AS connected,
          p.pool_key, p.held, p.want, p.keep, p.press
        FROM tidepool_runners r LEFT JOIN tidepool_permits p ON p.runner_id = r.runner_id
        WHERE r.slot = ${slot()}
        ORDER BY p.pool_key`
      )
    ).pipe(
      Effect.map((rows) => ({
        registered: rows.length > 0,
        leaseAgeMs: rows[0] === undefined ? undefined : Math.max(0, num(rows[0].lease_age_ms)),
        connected: rows[0]?.connected === true,
        permits: rows.filter((r) => r.pool_key !== null).map(permitRow)
      }))
    )
  }
}

/**
 * The store views of this process, or undefined outside cluster mode (`TIDEPOOL_CLUSTER` off: no
 * ledger in the store). Built from what the node already has: the PostgreSQL store's client, and the
 * runner's slot, which is the prefix of every client process id it issues (ClusterLink).
 */
export const storeViews: Effect.Effect<StoreViewsShape | undefined, never, AppConfig> = Effect.gen(function* () {
  const config = yield* AppConfig
  if (!config.cluster) return undefined
  const store = Option.getOrUndefined(yield* Effect.serviceOption(TenantStore))
  const ids = Option.getOrUndefined(yield* Effect.serviceOption(PeerWorkers))?.ids
  if (store?.sql === undefined || ids === undefined) return undefined
  // Bits 20–30 of every process id this process issues are the host runner's slot, with or without
  // workers (a worker's number sits below them).
  return makeStoreViews(store.sql, () => ids.prefix() >>> SLOT_SHIFT)
})
