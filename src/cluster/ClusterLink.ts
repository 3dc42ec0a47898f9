import { hostname } from "node:os"
import { Context, Effect, Layer, Redacted } from "effect"
import { AppConfig } from "../config/index.ts"
import { PermitGate } from "../pool/index.ts"
import { SeatGate } from "../pool/SeatGate.ts"
import { PeerWorkers } from "../session/index.ts"
import { TenantStoreError } from "../tenants/index.ts"
import { SLOT_SHIFT, StoreRunner } from "./StoreRunner.ts"

/** `TIDEPOOL_ADVERTISE_HOST`, or the listen address unless it is a wildcard, then the host name. */
export const advertisedHost = (advertise: string, listenAddr: string): string =>
  advertise !== "" ? advertise : listenAddr === "0.0.0.0" || listenAddr === "::" ? hostname() : listenAddr

/**
 * Cluster mode (`TIDEPOOL_CLUSTER=on`, docs/scale-out.md#several-hosts): this process is a runner of
 * the permit ledger in the PostgreSQL store. Its pools ask the store for permits (PermitGate), its
 * clients' process ids carry its runner slot, and a CancelRequest for another runner's client goes
 * to that runner's advertised address (PeerWorkers). Registering is part of start-up: a runner that
 * cannot reach the store does not start.
 */
export const clusterServices: Layer.Layer<PermitGate | SeatGate | PeerWorkers, TenantStoreError, AppConfig> =
  Layer.effectContext(
    Effect.gen(function* () {
      const config = yield* AppConfig
      const context = yield* Effect.context<never>()
      const log = (level: "debug" | "info" | "warning", message: string) =>
        Effect.runSyncWith(context)(
          level === "debug"
            ? Effect.logDebug(message)
            : level === "info"
              ? Effect.logInfo(message)
              : Effect.logWarning(message)
        )
      const host = advertisedHost(config.advertiseHost, config.listenAddr)
      const address = `${host.includes(":") ? `[${host}]` : host}:${config.transactionPort}`
      const runner = yield* Effect.acquireRelease(
        Effect.tryPromise({
          try: () =>
            StoreRunner.start({
              url: Redacted.value(config.databaseUrl!),
              leaseMs: config.leaseMs,
              address,
              timeoutMs: config.upstreamConnectTimeoutMs,
              log,
              upstreamCaPath: config.upstreamCaPath
            }),
          catch: (e) =>
            new TenantStoreError({
              message: `cluster mode: registering with the permit ledger in the tenant store failed: ${e instanceof Error ? e.message : String(e)}`
            })
        }).pipe(Effect.withSpan("cluster.register", { attributes: { address } })),
        (runner) =>
          Effect.promise(() => runner.stop(config.shutdownTimeoutMs)).pipe(
            Effect.withSpan("cluster.leave", { attributes: { address } })
          )
      )
      return Context.make(PermitGate, { attach: (pool) => runner.attach(pool) }).pipe(
        // max_clients (and session-mode pool_size as a client limit) across hosts, in the store.
        Context.add(SeatGate, { attach: (pool) => runner.attachSeats(pool) }),
        Context.add(PeerWorkers, {
          self: 0,
          ids: { shift: SLOT_SHIFT, prefix: runner.prefix },
          forwardCancel: (processId, secret) => runner.forwardCancel(processId, secret),
          // Across hosts, tenant changes (bans, deletes) travel by the store's LISTEN/NOTIFY.
          terminated: () => undefined
        })
      )
    })
  )
