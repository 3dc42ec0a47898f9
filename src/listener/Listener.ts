import * as net from "node:net"
import { Data, Effect, FiberSet } from "effect"
import { AdminControl } from "../admin/index.ts"
import { AppConfig } from "../config/index.ts"
import type { PoolMode } from "../pool/index.ts"
import { clientSession, SessionRegistry } from "../session/index.ts"

export class ListenError extends Data.TaggedError("ListenError")<{ readonly message: string }> {}

/** Binds a TCP server; a taken port fails start-up naming the variable that moves it. */
export const listen = (options: {
  readonly host: string
  readonly port: number
  readonly envVar: string
  readonly onConnection: (socket: net.Socket) => void
}) =>
  Effect.acquireRelease(
    Effect.async<net.Server, ListenError>((resume) => {
      const server = net.createServer({ noDelay: true, keepAlive: true }, options.onConnection)
      server.once("error", (err: NodeJS.ErrnoException) => {
        const reason =
          err.code === "EADDRINUSE"
            ? `port ${options.port} on ${options.host} is already in use; set ${options.envVar} to another port`
            : `cannot listen on ${options.host}:${options.port} (${options.envVar}): ${err.message}`
        resume(Effect.fail(new ListenError({ message: reason })))
      })
      server.listen({ host: options.host, port: options.port }, () => resume(Effect.succeed(server)))
    }),
    (server) => Effect.sync(() => server.close())
  )

export const boundPort = (server: net.Server): number => (server.address() as net.AddressInfo).port

/**
 * The client-facing front doors. Each accepted socket runs a ClientSession fiber in one FiberSet.
 * Closing the scope is the graceful shutdown (DESIGN §5): stop accepting, let every session reach
 * its next transaction boundary up to the drain timeout, then interrupt whoever is left (they get
 * 57P01).
 */
export class Listeners extends Effect.Service<Listeners>()("tidepool/Listeners", {
  scoped: Effect.gen(function* () {
    const config = yield* AppConfig
    const sessions = yield* SessionRegistry
    const fibers = yield* FiberSet.make()
    const run = yield* FiberSet.runtime(fibers)<Effect.Effect.Context<ReturnType<typeof clientSession>>>()

    const servers: Array<net.Server> = []
    /**
     * Stop accepting, then give sessions until their next transaction boundary (bounded by the drain
     * timeout). Idempotent; run on SIGTERM before anything else is torn down, and again as a finalizer.
     */
    let drained = false
    const shutdown = Effect.gen(function* () {
      for (const server of servers.splice(0)) server.close()
      if (drained) return
      drained = true
      const left = yield* FiberSet.size(fibers)
      if (left === 0) return
      yield* Effect.logInfo(`draining ${left} client session(s)`)
      sessions.drainAll()
      // This runs from finalizers and interruption handlers, which are uninterruptible: the wait
      // must opt in to interruption, or the drain timeout could never cut it short.
      yield* FiberSet.awaitEmpty(fibers).pipe(
        Effect.interruptible,
        Effect.timeout(config.shutdownTimeoutMs),
        Effect.ignore
      )
    })
    yield* Effect.addFinalizer(() => shutdown)
    // The admin console's SHUTDOWN: stop accepting at once; `tidepool serve` then returns, and
    // releasing this layer drains the sessions exactly as on SIGTERM.
    const control = yield* AdminControl
    yield* control.shutdownRequested.pipe(
      Effect.zipRight(
        Effect.sync(() => {
          for (const server of servers) server.close()
        })
      ),
      Effect.forkScoped
    )

    const door = (mode: PoolMode, port: number, envVar: string) =>
      listen({
        host: config.listenAddr,
        port,
        envVar,
        onConnection: (socket) => {
          run(clientSession(socket, mode))
        }
      })

    const transaction = yield* door("transaction", config.transactionPort, "PROXY_PORT_TRANSACTION")
    const session = yield* door("session", config.sessionPort, "PROXY_PORT_SESSION")
    servers.push(transaction, session)
    return {
      transactionPort: boundPort(transaction),
      sessionPort: boundPort(session),
      shutdown
    } as const
  })
}) {}
