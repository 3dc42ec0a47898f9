import { Effect, FiberSet, Layer, Option } from "effect"
import { POOL_COMMANDS, type PoolCommand, runPoolCommand } from "../admin/AdminCommands.ts"
import {
  type AdminSnapshot,
  type ResultSet,
  showClients,
  showDatabases,
  showLists,
  showPools,
  showServers,
  showStats,
  showUsers
} from "../admin/AdminViews.ts"
import { AppConfig } from "../config/index.ts"
import { PermitGate, type PoolPermits, PoolRegistry, type TenantPool } from "../pool/index.ts"
import { type PoolSeats, SeatGate } from "../pool/SeatGate.ts"
import { PeerWorkers, SessionRegistry, TenantChanges } from "../session/index.ts"
import { TenantRegistry, TenantStore, type TenantStoreError, Tenants, tenantStoreLayer } from "../tenants/index.ts"
import { UpstreamTls } from "../tls/index.ts"
import { sendCancel } from "../upstream/index.ts"
import { type Gathered, HostViews } from "./HostViews.ts"
import {
  type BackendRef,
  BEAT_ENV,
  CLUSTER_WORKER_SHIFT,
  SLOT_ENV,
  type ToSupervisor,
  type ToWorker
} from "./messages.ts"
import { backendRef, cancelTargetOf, SLOT_SHIFT } from "./StoreRunner.ts"

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
          // TLS backends too, with how they were reached: a cluster host's runner records them in the
          // store, so that a host reclaiming this one's permits cancels them over TLS.
          opened: (server) => send({ t: "opened", key, backend: backendRef(server) }),
          closed: (server) => send({ t: "closed", key, pid: server.backendPid })
        }
      }
    }
  })
)

/** The supervisor's side of each pool's client seats (global max_clients). */
const seatGate = Layer.effect(
  SeatGate,
  Effect.gen(function* () {
    // The newest pool of each key: seats belong to the worker and the key, not to one pool object.
    const pools = new Map<string, TenantPool>()
    // The reclaim being answered: `reclaimSeats` answers at once, through `release` below.
    let round: number | undefined
    yield* onMessage((message) => {
      if (message.t !== "seats" && message.t !== "seat-reclaim") return
      const pool = pools.get(message.key)
      const live = pool !== undefined && !pool.isClosed ? pool : undefined
      if (message.t === "seats") {
        if (live === undefined) {
          if (message.n > 0) send({ t: "seat-release", key: message.key, n: message.n, reclaimed: false })
        } else live.seatsGranted(message.n, message.spare)
      } else if (live === undefined)
        send({ t: "seat-release", key: message.key, n: 0, reclaimed: true, round: message.round })
      else {
        round = message.round
        try {
          live.reclaimSeats()
        } finally {
          round = undefined
        }
      }
    })
    return {
      attach: (pool: TenantPool): PoolSeats => {
        const key = pool.settings.key
        pools.set(key, pool)
        return {
          want: (limit, need) => send({ t: "seat-want", key, limit, need }),
          release: (n, reclaimed) =>
            send(
              reclaimed && round !== undefined
                ? { t: "seat-release", key, n, reclaimed, round }
                : { t: "seat-release", key, n, reclaimed }
            )
        }
      }
    }
  })
)

/** How long a view waits for every worker, by default (the supervisor's deadline). */
const GATHER_MS = 2000
/** A gather whose supervisor never answers (it is going away) gives up this long after its deadline. */
const GATHER_GIVE_UP_MS = 3000

/** Views of the whole host: gathers through the supervisor, answers to other workers' gathers. */
const hostViews = (self: number) =>
  Layer.effect(
    HostViews,
    Effect.gen(function* () {
      const producers = new Map<string, (arg: string) => unknown>()
      const waiting = new Map<number, (gathered: Gathered) => void>()
      let nextId = 0
      yield* onMessage((message) => {
        if (message.t === "collect") {
          const colon = message.what.indexOf(":")
          const name = colon < 0 ? message.what : message.what.slice(0, colon)
          const producer = producers.get(name)
          const id = message.id
          const arg = colon < 0 ? "" : message.what.slice(colon + 1)
          Promise.resolve()
            .then(() => producer?.(arg) ?? null)
            .then(
              (data) => send({ t: "collected", id, data }),
              (e) => send({ t: "collected", id, data: { error: String(e) } })
            )
        } else if (message.t === "gathered") {
          waiting.get(message.id)?.({ parts: message.parts, workers: message.workers })
        }
      })
      return {
        worker: self + 1,
        provide: (name: string, producer: (arg: string) => unknown) => {
          producers.set(name, producer)
        },
        gather: (what: string, timeoutMs = GATHER_MS) =>
          Effect.callback<Gathered>((resume) => {
            const id = nextId++
            // Only for a supervisor going away: it answers by its own deadline otherwise.
            const timer =
              timeoutMs === 0
                ? undefined
                : setTimeout(() => finish({ parts: [], workers: [] }), timeoutMs + GATHER_GIVE_UP_MS)
            const finish = (gathered: Gathered) => {
              clearTimeout(timer)
              waiting.delete(id)
              resume(Effect.succeed(gathered))
            }
            waiting.set(id, finish)
            send({ t: "gather", id, what, timeoutMs })
            return Effect.sync(() => {
              clearTimeout(timer)
              waiting.delete(id)
            })
          })
      }
    })
  )

/**
 * What a worker tells the others through the supervisor: cancels it does not own, terminates. In
 * cluster mode its clients' process ids carry the host's runner slot and its number
 * (docs/scale-out.md#cancelrequest-across-hosts); a cancel for any other goes to the supervisor,
 * which routes it to the worker or sends it on to the owner host.
 */
const peers = (self: number, cluster: boolean) =>
  cluster
    ? Layer.effect(
        PeerWorkers,
        Effect.gen(function* () {
          let slot = Number(process.env[SLOT_ENV] ?? 0)
          yield* onMessage((message) => {
            if (message.t === "slot") slot = message.slot
          })
          return {
            self,
            ids: {
              shift: CLUSTER_WORKER_SHIFT,
              prefix: () => (slot << SLOT_SHIFT) | ((self + 1) << CLUSTER_WORKER_SHIFT)
            },
            forwardCancel: (processId: number, secretKey: Buffer) =>
              send({ t: "cancel", processId, secret: secretKey.toString("hex") }),
            terminated: (id: string) => send({ t: "terminate", id })
          }
        })
      )
    : Layer.succeed(PeerWorkers, {
        self,
        forwardCancel: (processId, secretKey) => send({ t: "cancel", processId, secret: secretKey.toString("hex") }),
        terminated: (id) => send({ t: "terminate", id })
      })

/** Provided under the data plane in worker mode: PoolRegistry and SessionRegistry pick them up. */
export const workerServices = (
  self: number,
  cluster = false
): Layer.Layer<PermitGate | SeatGate | PeerWorkers | HostViews> =>
  Layer.mergeAll(permitGate, seatGate, peers(self, cluster), hostViews(self))

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
    // Provided with workerServices; optional here so that the layer's type needs nothing extra.
    const views = Option.getOrUndefined(yield* Effect.serviceOption(HostViews))
    const config = yield* AppConfig
    const pools = yield* PoolRegistry
    const registry = yield* TenantRegistry
    const snapshot = (): AdminSnapshot => ({
      config,
      tenants: registry.all(),
      pools: pools.all(),
      sessions: sessions.all(),
      now: Date.now()
    })
    const adminViews: Record<string, (s: AdminSnapshot) => ResultSet> = {
      POOLS: showPools,
      CLIENTS: showClients,
      SERVERS: showServers,
      STATS: showStats,
      DATABASES: showDatabases,
      USERS: showUsers,
      LISTS: showLists
    }
    // The admin console's SHOW and pool commands of another worker (docs/admin-console.md#worker-mode).
    views?.provide("admin", (what) => adminViews[what]?.(snapshot()).rows ?? null)
    const context = yield* Effect.context<never>()
    const runPromise = Effect.runPromiseWith(context)
    views?.provide("admin-command", (text) => {
      const [command = "", name] = text.split(" ", 2)
      if (!POOL_COMMANDS.has(command)) return null
      return runPromise(
        Effect.andThen(
          runPoolCommand(pools, sessions, command as PoolCommand, name === "" ? undefined : name),
          Effect.succeed("done")
        )
      )
    })
    // A dead worker's backend on a TLS upstream (one host, docs/scale-out.md#one-host-workers): the
    // supervisor keeps no tenant records, so it asks a live worker to cancel it the way the dead one
    // reached it — over TLS, with its server name and verification, and the tenant's CA.
    const upstreamTls = yield* UpstreamTls
    views?.provide("cancel-backend", (arg) => {
      const { key, backend } = JSON.parse(arg) as { key: string; backend: BackendRef }
      const tenant = registry.get(key.split("\u0000")[0] ?? "")
      const ca = tenant === undefined ? undefined : upstreamTls.optionsFor(tenant)?.ca
      const target = cancelTargetOf(backend, ca ?? undefined, config.upstreamConnectTimeoutMs)
      return runPromise(
        sendCancel(target, backend.pid, Buffer.from(backend.secret, "hex")).pipe(
          Effect.as(true),
          Effect.catch((e) =>
            Effect.as(
              Effect.logWarning(
                `the CancelRequest for a dead worker's backend ${backend.pid} at ${backend.host}:${backend.port} (TLS, server name ${target.serverName}) failed (${e.message}); its permit is freed anyway`
              ),
              false
            )
          )
        )
      )
    })
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
    // In cluster mode the supervisor was also the host's runner: its store session ended with it, so
    // after the lease other hosts are given its permits (after cancelling its recorded backends'
    // statements). A worker still draining then would hold servers beyond pool_size: it stops at
    // once instead, as if the whole host had died (docs/scale-out.md#failure-table).
    const onDisconnect = () => {
      if (!config.cluster) {
        process.kill(process.pid, "SIGTERM")
        return
      }
      Effect.runSyncWith(context)(
        Effect.logError(
          `worker ${views?.worker ?? "?"}: the supervisor (this host's runner of the permit ledger) is gone; exiting at once, its clients disconnected`
        )
      )
      process.exit(1)
    }
    yield* Effect.acquireRelease(
      Effect.sync(() => process.once("disconnect", onDisconnect)),
      () => Effect.sync(() => process.off("disconnect", onDisconnect))
    )
  })
)

/**
 * Tells the supervisor this worker listens (its layer is built): the next workers may start. From
 * now on it beats: a worker whose event loop stops beating is killed as hung (docs/scale-out.md).
 */
export const workerReady = Effect.sync(() => {
  send({ t: "ready" })
  const beatMs = Number(process.env[BEAT_ENV] ?? 0)
  if (beatMs > 0) setInterval(() => send({ t: "beat" }), beatMs).unref()
})

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
