import { Layer, ManagedRuntime, Schema } from "effect"
import type { AdminControl } from "../../src/admin/index.ts"
import type { AuthQuery, CircuitBreaker } from "../../src/auth/index.ts"
import { AppConfig, type AppConfigShape, Tenant } from "../../src/config/index.ts"
import { Listeners } from "../../src/listener/index.ts"
import type { PoolRegistry } from "../../src/pool/index.ts"
import type { SessionRegistry } from "../../src/session/index.ts"
import { tidepoolLayer } from "../../src/Tidepool.ts"
import { type EventCounters, loggerLayer, type Metrics, tracingLayer } from "../../src/telemetry/index.ts"
import type { TenantRegistry } from "../../src/tenants/index.ts"

export interface TidepoolOptions {
  /** Tenants in the config file / API shape; decoded with the real schema. */
  readonly tenants: ReadonlyArray<unknown>
  readonly config?: Partial<AppConfigShape>
  /** OTEL_* variables for the trace exporter (none: no export, as in production). */
  readonly tracing?: Readonly<Record<string, string>>
}

export interface RunningTidepool {
  readonly host: "127.0.0.1"
  readonly sessionPort: number
  readonly transactionPort: number
  readonly runtime: ManagedRuntime.ManagedRuntime<
    | Listeners
    | PoolRegistry
    | AppConfig
    | AuthQuery
    | CircuitBreaker
    | TenantRegistry
    | AdminControl
    | EventCounters
    | SessionRegistry
    | Metrics,
    unknown
  >
  /** A connection URL through the session port (or the transaction port with `mode: "transaction"`). */
  url(options: { user: string; password: string; database?: string; mode?: "session" | "transaction" }): string
  /** Graceful shutdown, as on SIGTERM. */
  stop(): Promise<void>
}

/** Tidepool in-process on free ports, with test-friendly defaults (no failure delay, quiet logs). */
export const startTidepool = async (options: TidepoolOptions): Promise<RunningTidepool> => {
  const tenants = Schema.decodeUnknownSync(Schema.Array(Tenant))(options.tenants)
  const config = AppConfig.make({
    listenAddr: "127.0.0.1",
    sessionPort: 0,
    transactionPort: 0,
    apiPort: 0,
    authFailureDelayMs: 0,
    shutdownTimeoutMs: 5_000,
    logLevel: (process.env.TIDEPOOL_TEST_LOG_LEVEL as AppConfigShape["logLevel"] | undefined) ?? "none",
    logFormat: "pretty",
    ...options.config
  })
  const layer = tidepoolLayer(tenants).pipe(
    Layer.provideMerge(Layer.succeed(AppConfig, config)),
    Layer.provide(loggerLayer(config.logFormat, config.logLevel)),
    Layer.provide(tracingLayer(options.tracing ?? {}))
  )
  const runtime = ManagedRuntime.make(layer)
  const listeners = await runtime.runPromise(Listeners)
  let stopped: Promise<void> | undefined
  return {
    host: "127.0.0.1",
    sessionPort: listeners.sessionPort,
    transactionPort: listeners.transactionPort,
    runtime,
    url: ({ user, password, database, mode }) =>
      `postgresql://${encodeURIComponent(user)}:${encodeURIComponent(password)}@127.0.0.1:${mode === "transaction" ? listeners.transactionPort : listeners.sessionPort}/${encodeURIComponent(database ?? "postgres")}`,
    stop: () => {
      stopped ??= runtime.dispose()
      return stopped
    }
  }
}

/** A tenant's upstream fields pointing at a test server's `postgres` database. */
export const upstreamOf = (db: { readonly host: string; readonly port: number }) => ({
  db_host: db.host,
  db_port: db.port,
  db_database: "postgres"
})
