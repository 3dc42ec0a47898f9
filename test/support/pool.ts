import { Effect, Redacted, Scope } from "effect"
import { makeTenantPool, type PoolSettings, type TenantPool } from "../../src/pool/index.ts"
import type { UpstreamTarget } from "../../src/upstream/index.ts"

/** Role `app` on database `postgres` at `host:port`, as a pool's server connections reach it. */
export const appTarget = (host: string, port: number, password: string): UpstreamTarget => ({
  host,
  port,
  database: "postgres",
  user: "app",
  password: Redacted.make(password),
  connectTimeoutMs: 5_000
})

/**
 * A transaction-mode pool of its own, outside any registry, in `scope`: the tests that drive a
 * TenantPool directly against a real PostgreSQL. Nothing idles out or expires unless `settings` says so.
 */
export const standalonePool = (
  target: UpstreamTarget,
  scope: Scope.Scope,
  settings: Partial<PoolSettings> = {}
): Promise<TenantPool> =>
  Effect.runPromise(
    makeTenantPool({
      key: "acme/app/transaction/postgres",
      tenant: "acme",
      user: "app",
      database: "postgres",
      mode: "transaction",
      size: 1,
      maxClients: 10,
      checkoutTimeoutMs: 5_000,
      serverIdleTimeoutMs: 0,
      minSize: 0,
      serverLifetimeMs: 0,
      connectBackoffMs: 1_000,
      target,
      ...settings
    }).pipe(Scope.provide(scope))
  )
