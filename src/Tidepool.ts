import { Effect, Layer } from "effect"
import { AdminControl } from "./admin/index.ts"
import { ApiServer } from "./api/index.ts"
import { AuthQuery, CircuitBreaker, JitApi, SecretCache } from "./auth/index.ts"
import { clusterServices, workerInbox, workerServices, workerStore } from "./cluster/index.ts"
import type { AppConfig, Tenant } from "./config/index.ts"
import { Listeners } from "./listener/index.ts"
import { PoolRegistry } from "./pool/index.ts"
import { IdleSweep, SessionRegistry, TenantChanges } from "./session/index.ts"
import { EventCounters, MemoryReclaimLive, Metrics } from "./telemetry/index.ts"
import { type TenantStore, type TenantStoreError, Tenants, tenantStoreLayer } from "./tenants/index.ts"
import { DownstreamTls, UpstreamTls } from "./tls/index.ts"

export interface TidepoolLayerOptions {
  /** Where tenants live; default: what AppConfig says (DATABASE_URL, else SQLite in the data dir). */
  readonly store?: Layer.Layer<TenantStore, TenantStoreError, AppConfig>
  /** Serve the HTTP API on PORT (default true; tests that need no API leave it out). */
  readonly api?: boolean
  /** Worker mode (docs/scale-out.md): this process is worker `worker` of a supervisor. */
  readonly worker?: number
  /** Cluster mode (docs/scale-out.md#several-hosts): pool_size is shared with other hosts through the store. */
  readonly cluster?: boolean
}

/**
 * The config file's tenants, written to the store at start: the file wins over the store for the
 * tenants it lists (their configuration is replaced on every start), tenants only in the store are
 * kept, and the ban state stays the store's unless the file sets one.
 */
const seedLayer = (tenants: ReadonlyArray<Tenant>) =>
  Layer.effectDiscard(
    Tenants.use((t) =>
      Effect.forEach(tenants, (tenant) => (tenant.banned_at !== undefined ? t.replace(tenant) : t.put(tenant)), {
        discard: true
      })
    )
  )

/**
 * The whole node as one layer: listeners over sessions over pools, the tenant cache over its
 * store, metrics, and the HTTP API. Needs AppConfig. Building it binds the ports; releasing it is
 * the graceful shutdown (drain, then close every pool).
 */
export const tidepoolLayer = (tenants: ReadonlyArray<Tenant>, options: TidepoolLayerOptions = {}) => {
  const worker = options.worker
  const tenantsLayer = seedLayer(tenants).pipe(
    Layer.provideMerge(Tenants.layer),
    Layer.provideMerge(options.store ?? (worker === undefined ? tenantStoreLayer : workerStore))
  )
  const front =
    worker === undefined
      ? Layer.mergeAll(Listeners.layer, Metrics.layer, IdleSweep, MemoryReclaimLive)
      : Layer.mergeAll(Listeners.layer, Metrics.layer, IdleSweep, MemoryReclaimLive, workerInbox)
  const base =
    worker !== undefined
      ? Layer.merge(tenantsLayer, workerServices(worker, options.cluster === true))
      : options.cluster === true
        ? Layer.merge(tenantsLayer, clusterServices)
        : tenantsLayer
  const dataPlane = front.pipe(
    Layer.provideMerge(TenantChanges.layer),
    Layer.provideMerge(PoolRegistry.layer),
    Layer.provideMerge(AuthQuery.layer),
    Layer.provideMerge(EventCounters.layer),
    Layer.provideMerge(
      Layer.mergeAll(
        SessionRegistry.layer,
        AdminControl.layer,
        SecretCache.layer,
        CircuitBreaker.layer,
        JitApi.layer,
        DownstreamTls.layer,
        UpstreamTls.layer,
        Tenants.registry
      )
    ),
    Layer.provideMerge(base)
  )
  return options.api === false
    ? Layer.merge(dataPlane, Layer.succeed(ApiServer, { port: 0 }))
    : ApiServer.layer.pipe(Layer.provideMerge(dataPlane))
}
