import { randomBytes } from "node:crypto"
import { Effect, Layer, Logger, ManagedRuntime, Redacted, References, Schema } from "effect"
import type { AdminControl } from "../../src/admin/index.ts"
import { ApiServer } from "../../src/api/index.ts"
import type { AuthQuery, CircuitBreaker } from "../../src/auth/index.ts"
import { AppConfig, type AppConfigShape, Tenant } from "../../src/config/index.ts"
import { Listeners } from "../../src/listener/index.ts"
import type { PoolRegistry } from "../../src/pool/index.ts"
import type { SessionRegistry } from "../../src/session/index.ts"
import { tidepoolLayer } from "../../src/Tidepool.ts"
import { type EventCounters, loggerLayer, type Metrics, tracingLayer } from "../../src/telemetry/index.ts"
import { sqliteStore, type TenantRegistry, type Tenants, Vault } from "../../src/tenants/index.ts"

export interface TidepoolOptions {
  /** Tenants in the config file / API shape; decoded with the real schema. */
  readonly tenants: ReadonlyArray<unknown>
  readonly config?: Partial<AppConfigShape>
  /**
   * Where tenants live: `memory` (default) is a fresh in-memory SQLite store with a random vault
   * key; `config` is what AppConfig says (TIDEPOOL_DATA_DIR's SQLite file, or DATABASE_URL).
   */
  readonly store?: "memory" | "config"
  /** Serve the HTTP API (on a free port, see `apiPort`). */
  readonly api?: boolean
  /** Keep every log line (debug and up) in `logs` instead of printing them. */
  readonly captureLogs?: boolean
  /** OTEL_* variables for the trace exporter (none: no export, as in production). */
  readonly tracing?: Readonly<Record<string, string>>
}

export interface CapturedLog {
  readonly level: string
  readonly message: string
  readonly code: string | undefined
}

/** A test's API secret: tokens in tests are signed with it (see test/support/api.ts). */
export const TEST_JWT_SECRET = "test-api-jwt-secret-0123456789abcdef"

export interface RunningTidepool {
  readonly host: "127.0.0.1"
  readonly sessionPort: number
  readonly transactionPort: number
  /** The HTTP API's port (0 unless started with `api: true`). */
  readonly apiPort: number
  readonly runtime: ManagedRuntime.ManagedRuntime<
    | Listeners
    | PoolRegistry
    | AppConfig
    | Tenants
    | TenantRegistry
    | SessionRegistry
    | AuthQuery
    | CircuitBreaker
    | ApiServer
    | AdminControl
    | EventCounters
    | Metrics,
    unknown
  >
  /** Log lines so far, with `captureLogs`. */
  readonly logs: ReadonlyArray<CapturedLog>
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
    apiJwtSecret: Redacted.make(TEST_JWT_SECRET),
    ...options.config
  })
  const logs: Array<CapturedLog> = []
  const capture = Logger.make(({ logLevel, message, fiber }) => {
    const code = fiber.getRef(References.CurrentLogAnnotations).code
    logs.push({
      // "INFO", "WARN", …: the labels the tests match on.
      level: logLevel.toUpperCase(),
      message: (Array.isArray(message) ? message : [message]).map(String).join(" "),
      code: code === undefined ? undefined : String(code)
    })
  })
  const store = options.store === "config" ? undefined : sqliteStore(":memory:", new Vault(randomBytes(32)))
  const layer = tidepoolLayer(tenants, {
    api: options.api ?? false,
    ...(store !== undefined ? { store } : {})
  }).pipe(
    Layer.provideMerge(Layer.succeed(AppConfig, config)),
    // Merged, not only provided: effects the tests run through `runtime` log where the node's own do.
    Layer.provideMerge(
      options.captureLogs === true
        ? Layer.merge(Logger.layer([capture]), Layer.succeed(References.MinimumLogLevel, "Debug"))
        : loggerLayer(config.logFormat, config.logLevel)
    ),
    Layer.provide(tracingLayer(options.tracing ?? {}))
  )
  const runtime = ManagedRuntime.make(layer)
  const { listeners, api } = await runtime
    .runPromise(Effect.all({ listeners: Listeners, api: ApiServer }))
    .catch(async (error: unknown) => {
      // Whatever did start (ports, pools) must not outlive a failed start.
      await runtime.dispose()
      throw error
    })
  let stopped: Promise<void> | undefined
  return {
    host: "127.0.0.1",
    sessionPort: listeners.sessionPort,
    transactionPort: listeners.transactionPort,
    apiPort: api.port,
    runtime,
    logs,
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
