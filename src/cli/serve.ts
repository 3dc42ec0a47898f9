import { Cause, ConfigProvider, Console, Context, Effect, Exit, Layer } from "effect"
import { AdminControl } from "../admin/index.ts"
import { ApiServer } from "../api/index.ts"
import { supervise, WORKER_ENV, workerReady } from "../cluster/index.ts"
import { AppConfig, type ConfigFileContents, environment, loadConfigFile } from "../config/index.ts"
import { Listeners } from "../listener/index.ts"
import { tidepoolLayer } from "../Tidepool.ts"
import { loggerLayer, tracingLayer } from "../telemetry/index.ts"

/** AppConfig (defaults < config file `server:` < environment) plus the logger it configures. */
export const runtimeLayer = (file: ConfigFileContents | undefined) =>
  Layer.unwrap(
    // `environment()`: an empty variable (`PORT=`) is reported, not read as unset.
    Effect.map(
      AppConfig.pipe(
        Effect.provide(AppConfig.layerFromFile(file).pipe(Layer.provide(ConfigProvider.layer(environment()))))
      ),
      (config) =>
        Layer.mergeAll(Layer.succeed(AppConfig, config), loggerLayer(config.logFormat, config.logLevel), tracingLayer())
    )
  )

/**
 * The first SIGTERM/SIGINT starts the graceful shutdown (Effect's runMain interrupts the main fiber);
 * a second one means "now", and says so: the sessions still draining are cut without 57P01.
 */
export const installSignals = (log: (level: "info" | "warning", message: string) => void = () => undefined): void => {
  let signals = 0
  const onSignal = (signal: NodeJS.Signals) => {
    if (++signals === 1) {
      log("info", `${signal} received: shutting down gracefully (a second signal exits at once)`)
      return
    }
    log("warning", `second signal (${signal}): exiting now with status 1, without waiting for the drain`)
    process.exit(1)
  }
  process.on("SIGTERM", onSignal)
  process.on("SIGINT", onSignal)
}

/** `tidepool serve`: the production command. */
export const serve = (configFile: string | undefined) =>
  Effect.gen(function* () {
    const file = configFile === undefined ? undefined : yield* loadConfigFile(configFile)
    const workerEnv = process.env[WORKER_ENV]
    const worker = workerEnv === undefined ? undefined : Number(workerEnv)
    return yield* Effect.gen(function* () {
      const config = yield* AppConfig
      if (config.workers > 1 && worker === undefined) return yield* supervise(config)
      // Worker mode: worker 0 writes the config file's tenants; the others start once it has
      // (docs/scale-out.md#one-host-workers). Every worker serves the proxy ports and the HTTP API.
      const node = yield* Layer.build(
        tidepoolLayer(worker === undefined || worker === 0 ? (file?.tenants ?? []) : [], {
          ...(worker === undefined ? {} : { worker }),
          ...(config.cluster ? { cluster: true } : {})
        })
      )
      const { sessionPort, transactionPort, shutdown } = Context.get(node, Listeners)
      const api = Context.get(node, ApiServer)
      yield* Effect.logInfo(
        `${worker === undefined ? "" : `worker ${worker + 1}: `}tidepool listening on ${config.listenAddr}: transaction mode port ${transactionPort}, session mode port ${sessionPort}, HTTP API port ${api.port}; ${file?.tenants.length ?? 0} tenant(s) from the config file`
      )
      if (worker !== undefined) yield* workerReady
      const context = yield* Effect.context<never>()
      installSignals((level, message) =>
        Effect.runSyncWith(context)(level === "info" ? Effect.logInfo(message) : Effect.logWarning(message))
      )
      // Runs until SIGTERM/SIGINT (interruption) or the admin console's SHUTDOWN.
      yield* Context.get(node, AdminControl).shutdownRequested.pipe(Effect.onInterrupt(() => shutdown))
      yield* Effect.logInfo("shutdown requested from the admin console")
    }).pipe(
      Effect.scoped,
      // After the scope: sessions drained or closed, servers closed, listeners and the API stopped.
      Effect.onExit((exit) =>
        Exit.isSuccess(exit) || Cause.hasInterruptsOnly(exit.cause)
          ? Effect.logInfo(`tidepool stopped: exiting with status 0 after ${Math.round(process.uptime())} s`)
          : Effect.void
      ),
      Effect.provide(runtimeLayer(file))
    )
  }).pipe(
    Effect.catchTags({
      ConfigError: (e) =>
        Effect.andThen(
          Console.error(e.message),
          Effect.sync(() => process.exit(1))
        ),
      ListenError: (e) =>
        Effect.andThen(
          Console.error(`tidepool: ${e.message}`),
          Effect.sync(() => process.exit(1))
        ),
      ApiListenError: (e) =>
        Effect.andThen(
          Console.error(`tidepool: ${e.message}`),
          Effect.sync(() => process.exit(1))
        ),
      TenantStoreError: (e) =>
        Effect.andThen(
          Console.error(`tidepool: ${e.message}`),
          Effect.sync(() => process.exit(1))
        )
    })
  )
