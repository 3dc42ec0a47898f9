import { Effect, FiberSet, Layer } from "effect"
import type { AppConfig } from "../config/index.ts"
import { PermitGate, type PoolPermits, type TenantPool } from "../pool/index.ts"
import { PeerWorkers, SessionRegistry, TenantChanges } from "../session/index.ts"
import { TenantStore, type TenantStoreError, Tenants, tenantStoreLayer } from "../tenants/index.ts"
import type { ToSupervisor, ToWorker } from "./messages.ts"

/**
 * A worker's side of the supervisor's IPC channel (docs/scale-out.md#one-host-workers). Nothing
 * here runs per message or per transaction: permits move when servers open or close.
 */
const send = (message: ToSupervisor): void => {
  if (process.connected) process.send!(message)
}

/** Listens for the supervisor's messages for as long as the layer's scope lives. */
const onMessage = (handler: (message: ToWorker) => void) =>
  Effect.acquireRelease(
    Effect.sync(() => {
      const listener = (message: unknown) => handler(message as ToWorker)
      process.on("message", listener)
      return listener
    }),
    (listener) => Effect.sync(() => process.off("message", listener))
  )

/** The ledger's side of each pool: permits asked for, granted, released; backends reported. */
const permitGate = Layer.effect(
  PermitGate,
  Effect.gen(function* () {
    // The newest pool of each key; an older one closing still returns its permits under the same key.
    const pools = new Map<string, TenantPool>()
    yield* onMessage((message) => {
      if (message.t !== "grant" && message.t !== "directive") return
      const pool = pools.get(message.key)
      if (message.t === "grant") {
        if (pool === undefined || pool.isClosed) send({ t: "release", key: message.key, n: message.n })
        else pool.grant(message.n)
      } else pool?.direct(message.keep ?? Number.POSITIVE_INFINITY, message.press)
    })
    return {
      attach: (pool: TenantPool): PoolPermits => {
        const key = pool.settings.key
        pools.set(key, pool)
        return {
          want: (size, n) => send({ t: "want", key, size, n }),
          release: (n) => send({ t: "release", key, n }),
          opened: (server) => {
            // A TLS upstream may refuse a plaintext cancel: the ledger then frees the permit without one.
            if (server.target.tls !== undefined) return
            send({
              t: "opened",
              key,
              backend: {
                pid: server.backendPid,
                secret: server.backendSecret.toString("hex"),
                host: server.target.host,
                port: server.target.port
              }
            })
          },
          closed: (server) => {
            if (server.target.tls === undefined) send({ t: "closed", key, pid: server.backendPid })
          }
        }
      }
    }
  })
)

/** What a worker tells the others through the supervisor: cancels it does not own, terminates. */
const peers = (self: number) =>
  Layer.succeed(PeerWorkers, {
    self,
    forwardCancel: (processId, secretKey) => send({ t: "cancel", processId, secret: secretKey.toString("hex") }),
    terminated: (id) => send({ t: "terminate", id })
  })

/** Provided under the data plane in worker mode: PoolRegistry and SessionRegistry pick them up. */
export const workerServices = (self: number): Layer.Layer<PermitGate | PeerWorkers> =>
  Layer.merge(permitGate, peers(self))

/**
 * What other workers ask of this one: cancel a query of a client it serves, reload a tenant another
 * worker wrote, terminate a tenant's pools. And: when the supervisor goes away, shut down gracefully.
 */
export const workerInbox = Layer.effectDiscard(
  Effect.gen(function* () {
    const sessions = yield* SessionRegistry
    const tenants = yield* Tenants
    const changes = yield* TenantChanges
    const run = yield* FiberSet.makeRuntime<never, unknown, unknown>()
    yield* onMessage((message) => {
      switch (message.t) {
        case "cancel":
          run(sessions.cancel(message.processId, Buffer.from(message.secret, "hex")))
          break
        case "tenant":
          run(tenants.reload(message.id).pipe(Effect.catch((e) => Effect.logWarning(e.message))))
          break
        case "terminate":
          run(changes.terminateHere(message.id))
          break
      }
    })
    // Workers must not outlive their supervisor (its ledger is what keeps pool_size): drain and exit.
    const onDisconnect = () => process.kill(process.pid, "SIGTERM")
    yield* Effect.acquireRelease(
      Effect.sync(() => process.once("disconnect", onDisconnect)),
      () => Effect.sync(() => process.off("disconnect", onDisconnect))
    )
  })
)

/** Tells the supervisor this worker listens (its layer is built): the next workers may start. */
export const workerReady = Effect.sync(() => send({ t: "ready" }))

/**
 * The tenant store of a worker: every write is announced to the other workers, which reload that
 * tenant (with SQLite there is no LISTEN/NOTIFY; with PostgreSQL this only makes it sooner).
 */
export const workerStore: Layer.Layer<TenantStore, TenantStoreError, AppConfig> = Layer.effect(
  TenantStore,
  Effect.map(TenantStore, (store) => ({
    ...store,
    upsert: (tenant) =>
      Effect.tap(store.upsert(tenant), () => Effect.sync(() => send({ t: "tenant", id: tenant.external_id }))),
    remove: (id) => Effect.tap(store.remove(id), () => Effect.sync(() => send({ t: "tenant", id })))
  }))
).pipe(Layer.provide(tenantStoreLayer))
