import { Layer } from "effect"
import { AdminControl } from "./admin/index.ts"
import { AuthQuery, CircuitBreaker, SecretCache } from "./auth/index.ts"
import type { Tenant } from "./config/index.ts"
import { Listeners } from "./listener/index.ts"
import { PoolRegistry } from "./pool/index.ts"
import { SessionRegistry } from "./session/index.ts"
import { EventCounters, Metrics } from "./telemetry/index.ts"
import { TenantRegistry } from "./tenants/index.ts"

/**
 * The whole data plane as one layer: listeners over sessions over pools. Needs AppConfig. Building it
 * binds the ports; releasing it is the graceful shutdown (drain, then close every pool).
 */
export const tidepoolLayer = (tenants: ReadonlyArray<Tenant>) =>
  Layer.merge(Listeners.Default, Metrics.Default).pipe(
    Layer.provideMerge(PoolRegistry.Default),
    Layer.provideMerge(AuthQuery.Default),
    Layer.provideMerge(EventCounters.Default),
    Layer.provideMerge(
      Layer.mergeAll(
        SessionRegistry.Default,
        AdminControl.Default,
        SecretCache.Default,
        CircuitBreaker.Default,
        TenantRegistry.fromTenants(tenants)
      )
    )
  )
