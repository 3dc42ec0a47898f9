import { type ChildProcess, fork } from "node:child_process"
import { Console, Deferred, Effect, Redacted } from "effect"
import type { AppConfigShape } from "../config/index.ts"
import { advertisedHost } from "./ClusterLink.ts"
import { HostPermits } from "./HostPermits.ts"
import { HostSeats } from "./HostSeats.ts"
import { Ledger } from "./Ledger.ts"
import {
  type BackendRef,
  BEAT_ENV,
  clusterOwnerOf,
  type GatheredPart,
  ownerOf,
  SLOT_ENV,
  type ToSupervisor,
  type ToWorker,
  WORKER_ENV,
  type WorkerInfo
} from "./messages.ts"
import { SeatLedger } from "./Seats.ts"
import { StoreRunner, sendCancelRequest, slotOf } from "./StoreRunner.ts"

/** A crashed worker is restarted after this long, doubled while it keeps crashing, up to RESTART_MAX_MS. */
const RESTART_FIRST_MS = 500
const RESTART_MAX_MS = 30_000
/** A worker that lived this long is no longer "crashing": its next restart comes quickly again. */
const STABLE_MS = 60_000

interface Slot {
  readonly index: number
  child: ChildProcess | undefined
  /**
   * The ledger's name for the current process in this slot: a restarted worker is a new holder, so
   * the dead one's permits stay counted until its backends are cancelled, whatever the new one does.
   */
  instance: number
  ready: boolean
  /** Reached "ready" at least once: a worker that dies before is a failed start, not a crash. */
  everReady: boolean
  startedAt: number
  restartDelayMs: number
  /** Backends its pools opened (plaintext upstreams), by pool key and backend pid. */
  readonly backends: Map<string, { readonly key: string; readonly backend: BackendRef }>
  /** When its last heartbeat came (epoch ms); 0 before it is ready. */
  lastBeat: number
  /** Killed as hung: its exit is a crash, not a second hang. */
  killedAsHung: boolean
  restarts: number
  hangs: number
}

interface Gather {
  readonly asker: Slot
  readonly askerId: number
  readonly asked: ReadonlyArray<Slot>
  readonly answers: Map<number, unknown>
  readonly timer: NodeJS.Timeout | undefined
}

/** How long past its restart delay a dead worker's TLS cancels wait for a worker to send them, when none is up. */
const HELPER_WAIT_MS = 10_000

/**
 * `tidepool serve` with TIDEPOOL_WORKERS > 1 (docs/scale-out.md#one-host-workers): starts the
 * workers (worker 0 first, alone: it seeds the store and serves the HTTP API), keeps the permit
 * ledger, routes cancels and tenant changes between workers, restarts a worker that dies, and on
 * SIGTERM/SIGINT has every worker drain, then returns. It never touches a client's socket.
 */
export const supervise = (config: AppConfigShape) =>
  Effect.gen(function* () {
    if (config.transactionPort === 0 || config.sessionPort === 0 || config.apiPort === 0) {
      // Each worker would bind a port of its own: clients could not reach them all on one.
      yield* Console.error(
        "tidepool: TIDEPOOL_WORKERS > 1 needs fixed ports: PROXY_PORT_TRANSACTION, PROXY_PORT_SESSION and PORT cannot be 0"
      )
      return yield* Effect.sync(() => process.exit(1))
    }
    const hangMs = config.workerHangTimeoutMs
    // Several beats per bound: one late timer tick is no hang.
    const beatMs = hangMs === 0 ? 0 : Math.min(1000, Math.max(50, Math.floor(hangMs / 5)))
    const context = yield* Effect.context<never>()
    const log = (level: "info" | "warning" | "error", message: string) =>
      Effect.runSyncWith(context)(
        level === "info"
          ? Effect.logInfo(message)
          : level === "warning"
            ? Effect.logWarning(message)
            : Effect.logError(message)
      )
    const done = yield* Deferred.make<void>()
    const slots: Array<Slot> = Array.from({ length: config.workers }, (_, index) => ({
      index,
      child: undefined,
      instance: -1,
      ready: false,
      everReady: false,
      startedAt: 0,
      restartDelayMs: RESTART_FIRST_MS,
      backends: new Map(),
      lastBeat: 0,
      killedAsHung: false,
      restarts: 0,
      hangs: 0
    }))
    let stopping = false
    let failed = false
    let signals = 0
    const toWorker = (index: number, message: ToWorker) => {
      const child = slots[index]?.child
      if (child?.connected) child.send(message)
    }
    const instances = new Map<number, Slot>()
    let nextInstance = 0
    const toInstance = (instance: number, message: ToWorker) => {
      const slot = instances.get(instance)
      if (slot !== undefined && slot.instance === instance) toWorker(slot.index, message)
    }
    // Cluster mode (docs/scale-out.md#several-workers-on-each-of-several-hosts): the supervisor is
    // the host's runner of the store ledger, registered before any worker starts (a host that cannot
    // reach the store does not start), and its ledger shares out what the store granted the host.
    let runner: StoreRunner | undefined
    if (config.cluster) {
      const host = advertisedHost(config.advertiseHost, config.listenAddr)
      const address = `${host.includes(":") ? `[${host}]` : host}:${config.transactionPort}`
      let announced = 0
      runner = yield* Effect.tryPromise(() =>
        StoreRunner.start({
          url: Redacted.value(config.databaseUrl!),
          leaseMs: config.leaseMs,
          address,
          timeoutMs: config.upstreamConnectTimeoutMs,
          upstreamCaPath: config.upstreamCaPath,
          log: (level, message) =>
            Effect.runSyncWith(context)(
              level === "debug"
                ? Effect.logDebug(message)
                : level === "info"
                  ? Effect.logInfo(message)
                  : Effect.logWarning(message)
            ),
          onSlot: (slot) => {
            // Workers issue process ids under the slot: a new one after a re-registration reaches them.
            if (announced !== 0 && slot !== announced) for (const s of slots) toWorker(s.index, { t: "slot", slot })
            announced = slot
          }
        })
      ).pipe(
        Effect.withSpan("cluster.register", { attributes: { address } }),
        Effect.catch((e) =>
          Effect.andThen(
            Console.error(
              `tidepool: cluster mode: registering with the permit ledger in the tenant store failed: ${e.cause instanceof Error ? e.cause.message : String(e.cause)}`
            ),
            Effect.sync(() => process.exit(1))
          )
        )
      )
    }
    const store = runner
    const hostPermits = store === undefined ? undefined : new HostPermits((h) => store.attachHolder(h), toInstance)
    const ledger = hostPermits?.ledger ?? new Ledger(toInstance)
    // Cluster mode: max_clients across hosts, the host's seats held in the store (HostSeats).
    const seats =
      store === undefined
        ? new SeatLedger(config.workers, toInstance)
        : new HostSeats((h) => store.attachSeats(h), config.workers, toInstance).ledger
    // The admin console's PAUSEs in force, replayed to a worker that starts later (a restart).
    let pausedAll = false
    const pausedNames = new Set<string>()
    const notePause = (what: string) => {
      const [command, name = ""] = what.slice("admin-command:".length).split(" ", 2)
      if (command === "PAUSE" && name === "") pausedAll = true
      else if (command === "PAUSE") pausedNames.add(name)
      else if (command === "RESUME" && name === "") {
        pausedAll = false
        pausedNames.clear()
      } else if (command === "RESUME") pausedNames.delete(name)
    }
    const gathers = new Map<number, Gather>()
    let nextGather = 0
    const workerInfo = (now: number): Array<WorkerInfo> =>
      slots.map((s) => ({
        worker: s.index + 1,
        pid: s.child?.pid ?? null,
        ready: s.ready,
        startedAt: s.startedAt,
        restarts: s.restarts,
        hangs: s.hangs,
        beatAgeMs: s.lastBeat === 0 ? null : now - s.lastBeat
      }))
    const finishGather = (id: number) => {
      const g = gathers.get(id)
      if (g === undefined) return
      gathers.delete(id)
      clearTimeout(g.timer)
      const parts: Array<GatheredPart> = g.asked.map((s) => ({
        worker: s.index + 1,
        pid: s.child?.pid ?? 0,
        data: g.answers.get(s.index)
      }))
      if (g.asker.child !== undefined)
        toWorker(g.asker.index, { t: "gathered", id: g.askerId, parts, workers: workerInfo(Date.now()) })
    }
    /** Cancels a dead worker's TLS backend through a live worker (one host); resolves when it answered, or after the connect timeout. */
    const delegated = new Map<number, () => void>()
    /** Delegated cancels waiting for a worker to be ready (the dead one was the only one up). */
    let awaitingHelper: Array<(helper: Slot) => void> = []
    const delegateCancel = (dead: Slot, key: string, backend: BackendRef): Promise<void> =>
      new Promise((resolve) => {
        const id = nextGather++
        let sent = false
        const done = () => {
          clearTimeout(timer)
          delegated.delete(id)
          resolve()
        }
        // The helper bounds its cancel by the connect timeout; this covers a helper that dies
        // meanwhile, and the restart of the only worker (its delay, then its start).
        const timer = setTimeout(
          () => {
            if (!sent)
              log(
                "warning",
                `worker ${dead.index + 1}'s backend ${backend.pid} at ${backend.host}:${backend.port} (TLS) is freed without a CancelRequest: no worker came up to send it over TLS`
              )
            done()
          },
          config.upstreamConnectTimeoutMs + dead.restartDelayMs + HELPER_WAIT_MS
        )
        timer.unref()
        delegated.set(id, done)
        const send = (helper: Slot) => {
          sent = true
          toWorker(helper.index, { t: "collect", id, what: `cancel-backend:${JSON.stringify({ key, backend })}` })
        }
        const helper = slots.find((s) => s !== dead && s.child?.connected === true && s.ready)
        if (helper !== undefined) send(helper)
        else awaitingHelper.push(send)
      })
    const others = (from: number, message: ToWorker) => {
      for (const slot of slots) if (slot.index !== from) toWorker(slot.index, message)
    }
    let onAllReady: (() => void) | undefined

    const handle = (slot: Slot, message: ToSupervisor) => {
      switch (message.t) {
        case "ready": {
          slot.ready = true
          slot.everReady = true
          slot.lastBeat = Date.now()
          const waiting = awaitingHelper
          awaitingHelper = []
          for (const send of waiting) send(slot)
          // Its answers (id -1) match no gather: nobody waits for a replayed PAUSE.
          if (pausedAll) toWorker(slot.index, { t: "collect", id: -1, what: "admin-command:PAUSE " })
          for (const name of pausedNames)
            toWorker(slot.index, { t: "collect", id: -1, what: `admin-command:PAUSE ${name}` })
          if (slot.index === 0 && !started) startRest()
          if (slots.every((s) => s.ready)) onAllReady?.()
          break
        }
        case "beat":
          slot.lastBeat = Date.now()
          break
        case "seat-want":
          seats.want(slot.instance, message.key, message.limit, message.need)
          break
        case "seat-release":
          seats.release(slot.instance, message.key, message.n, message.reclaimed, message.round)
          break
        case "gather": {
          if (message.what.startsWith("admin-command:")) notePause(message.what)
          const id = nextGather++
          // Every worker that is up, the asker included; one starting or gone is shown as absent.
          const asked = slots.filter((s) => s.child?.connected === true && s.ready)
          // No deadline (commands): each worker answers or dies, and a hung one is killed.
          const timer = message.timeoutMs === 0 ? undefined : setTimeout(() => finishGather(id), message.timeoutMs)
          timer?.unref()
          gathers.set(id, { asker: slot, askerId: message.id, asked, answers: new Map(), timer })
          for (const s of asked) toWorker(s.index, { t: "collect", id, what: message.what })
          if (asked.length === 0) finishGather(id)
          break
        }
        case "collected": {
          const cancelled = delegated.get(message.id)
          if (cancelled !== undefined) {
            cancelled()
            break
          }
          const g = gathers.get(message.id)
          if (g === undefined) break
          g.answers.set(slot.index, message.data)
          if (g.asked.every((s) => g.answers.has(s.index))) finishGather(message.id)
          break
        }
        case "want":
          ledger.want(slot.instance, message.key, message.size, message.n)
          break
        case "release":
          ledger.release(slot.instance, message.key, message.n)
          break
        case "opened":
          slot.backends.set(`${message.key}\u0000${message.backend.pid}`, {
            key: message.key,
            backend: message.backend
          })
          hostPermits?.opened(message.key, message.backend)
          break
        case "closed": {
          const id = `${message.key}\u0000${message.pid}`
          const known = slot.backends.get(id)
          slot.backends.delete(id)
          if (known !== undefined) hostPermits?.closed(known.key, known.backend)
          break
        }
        case "cancel": {
          if (store !== undefined && slotOf(message.processId) !== store.slot) {
            // Another host's client: sent on to that host's address, as an ordinary CancelRequest.
            store.forwardCancel(message.processId, Buffer.from(message.secret, "hex"))
            break
          }
          const owner = store === undefined ? ownerOf(message.processId) : clusterOwnerOf(message.processId)
          if (owner >= 0 && owner < slots.length) {
            toWorker(owner, message)
            Effect.runSyncWith(context)(
              Effect.logDebug(`CancelRequest received by worker ${slot.index + 1} forwarded to worker ${owner + 1}`)
            )
          }
          break
        }
        case "tenant":
        case "terminate":
          others(slot.index, message)
          break
      }
    }

    const start = (slot: Slot) => {
      const child = fork(process.argv[1]!, process.argv.slice(2), {
        env: {
          ...process.env,
          [WORKER_ENV]: String(slot.index),
          [BEAT_ENV]: String(beatMs),
          ...(store === undefined ? {} : { [SLOT_ENV]: String(store.slot) })
        },
        // Its own process group: a terminal's Ctrl+C reaches the supervisor only, which drains the workers once.
        detached: true,
        stdio: ["ignore", "inherit", "inherit", "ipc"]
      })
      slot.child = child
      slot.instance = nextInstance++
      instances.set(slot.instance, slot)
      slot.ready = false
      slot.lastBeat = 0
      slot.killedAsHung = false
      slot.startedAt = Date.now()
      const instance = slot.instance
      child.on("message", (message) => {
        if (slot.instance === instance) handle(slot, message as ToSupervisor)
      })
      child.once("exit", (code, signal) => onExit(slot, child, code, signal))
      log("info", `worker ${slot.index + 1} started (pid ${child.pid})`)
    }

    const onExit = (slot: Slot, child: ChildProcess, code: number | null, signal: NodeJS.Signals | null) => {
      if (slot.child !== child) return
      slot.child = undefined
      slot.ready = false
      slot.lastBeat = 0
      // Its clients went with it: their seats are free at once.
      seats.forget(slot.instance)
      for (const [id, g] of gathers)
        if (g.asked.includes(slot) && !g.answers.has(slot.index)) {
          g.answers.set(slot.index, undefined)
          if (g.asked.every((s) => g.answers.has(s.index))) finishGather(id)
        }
      const backends = [...slot.backends.values()]
      slot.backends.clear()
      // Its servers' sockets are closed with the process, but a backend running a statement runs it to
      // the end unless cancelled: its permits are free only once nothing of it can be running.
      const instance = slot.instance
      void Promise.all(
        backends.map((b) =>
          b.backend.tls !== true
            ? sendCancelRequest(
                b.backend.host,
                b.backend.port,
                b.backend.pid,
                Buffer.from(b.backend.secret, "hex"),
                config.upstreamConnectTimeoutMs
              )
            : // Over TLS as the worker reached it, with its tenant's CA: from the store (cluster mode), or
              // sent by a live worker, which has the tenant's record (one host). Never in plaintext.
              store !== undefined
              ? store.cancelBackend(b.backend, b.key, `worker ${slot.index + 1}'s`)
              : delegateCancel(slot, b.key, b.backend)
        )
      ).then(() => {
        for (const b of backends) hostPermits?.closed(b.key, b.backend)
        instances.delete(instance)
        ledger.forget(instance)
      })
      if (!slot.everReady && !stopping) {
        // A configuration or port problem, which a restart would only repeat: the worker said why.
        log("error", `worker ${slot.index + 1} failed to start (${signal ?? `exit status ${code}`}); stopping`)
        failed = true
        stopping = true
        for (const s of slots) s.child?.kill("SIGTERM")
        onAllReady?.()
      }
      if (!stopping && code === 0) {
        // A worker that ends by itself with status 0 was told to (the admin console's SHUTDOWN): the
        // operator means the pooler, so every worker drains.
        log("info", `worker ${slot.index + 1} shut down on request; every worker drains`)
        stopping = true
        for (const s of slots) s.child?.kill("SIGTERM")
      }
      if (stopping) {
        // A stop during start-up: nobody waits for the rest to be ready any more.
        onAllReady?.()
        log("info", `worker ${slot.index + 1} exited (${signal ?? code})`)
        if (slots.every((s) => s.child === undefined)) Effect.runSyncWith(context)(Deferred.succeed(done, undefined))
        return
      }
      if (Date.now() - slot.startedAt >= STABLE_MS) slot.restartDelayMs = RESTART_FIRST_MS
      log(
        "error",
        `worker ${slot.index + 1} (pid ${child.pid}) died (${signal ?? `exit status ${code}`}); its clients were disconnected; restarting it in ${slot.restartDelayMs} ms`
      )
      slot.restarts++
      const delay = slot.restartDelayMs
      slot.restartDelayMs = Math.min(RESTART_MAX_MS, slot.restartDelayMs * 2)
      setTimeout(() => {
        if (!stopping) start(slot)
      }, delay).unref()
    }

    let started = false
    const startRest = () => {
      started = true
      for (const slot of slots.slice(1)) start(slot)
    }

    const allReady = new Promise<void>((resolve) => {
      onAllReady = () => {
        onAllReady = undefined
        resolve()
      }
    })

    const onSignal = (signal: NodeJS.Signals) => {
      if (++signals === 1) {
        stopping = true
        log("info", `${signal} received: every worker drains its clients (a second signal stops them at once)`)
      } else log("warning", `second signal (${signal}): stopping every worker now`)
      let alive = 0
      for (const slot of slots) {
        if (slot.child !== undefined) {
          alive++
          slot.child.kill("SIGTERM")
        }
      }
      if (alive === 0) Effect.runSyncWith(context)(Deferred.succeed(done, undefined))
    }
    process.on("SIGTERM", onSignal)
    process.on("SIGINT", onSignal)

    // Hang detection: a ready worker's event loop beats every beatMs; one silent for hangMs is stuck
    // (an endless loop, a blocking call, SIGSTOP) and can neither serve its clients nor return its
    // permits, so it is killed and handled like a crash: backends cancelled, permits freed, restarted.
    if (hangMs > 0) {
      const watchdog = setInterval(() => {
        const now = Date.now()
        for (const slot of slots) {
          const child = slot.child
          if (child === undefined || !slot.ready || slot.killedAsHung || slot.lastBeat === 0) continue
          const silent = now - slot.lastBeat
          if (silent <= hangMs) continue
          slot.killedAsHung = true
          slot.hangs++
          log(
            "error",
            `worker ${slot.index + 1} (pid ${child.pid}) hung: no heartbeat for ${silent} ms (TIDEPOOL_WORKER_HANG_TIMEOUT=${hangMs}); killing it with SIGKILL`
          )
          child.kill("SIGKILL")
        }
      }, beatMs)
      watchdog.unref()
    }

    start(slots[0]!)
    // A signal during start-up ends the wait too (`done`, once the workers started so far exited).
    // Uninterruptible, as the wait below: the runtime's own SIGTERM handling interrupts this fiber.
    yield* Effect.uninterruptible(
      Effect.promise(() => Promise.race([allReady, Effect.runPromise(Deferred.await(done))]))
    )
    // Cluster mode: once every worker is gone, the host's permits go back and its row leaves the store.
    const leave = Effect.promise(() => store?.stop(config.shutdownTimeoutMs) ?? Promise.resolve()).pipe(
      Effect.withSpan("cluster.leave"),
      Effect.uninterruptible
    )
    if (failed) {
      yield* Effect.uninterruptible(Effect.andThen(Deferred.await(done), leave))
      return yield* Effect.sync(() => process.exit(1))
    }
    if (!stopping)
      log(
        "info",
        `tidepool supervisor: ${config.workers} workers listening on ${config.listenAddr}: transaction mode port ${config.transactionPort}, session mode port ${config.sessionPort}, HTTP API port ${config.apiPort} (worker 1)`
      )
    // Uninterruptible: SIGTERM also interrupts this fiber (the runtime's own signal handling), and
    // a supervisor that returned then would exit while its workers still drain — a service manager
    // takes the main process's exit for the end of the service and kills what is left.
    // Leaving the store is in the same region: an interruption pending since the signal would
    // otherwise end the fiber right after the wait, before the host's row is deleted.
    yield* Effect.uninterruptible(
      Effect.andThen(Deferred.await(done), leave).pipe(
        Effect.andThen(
          Effect.sync(() =>
            log(
              "info",
              `tidepool stopped: every worker exited; supervisor exiting after ${Math.round(process.uptime())} s`
            )
          )
        )
      )
    )
  })
