import * as net from "node:net"
import { Context, Data, Effect, FiberSet, Layer, References } from "effect"
import { AdminControl } from "../admin/index.ts"
import { AppConfig } from "../config/index.ts"
import { type ErrorCode, renderErrorResponse, tidepoolError } from "../errors/index.ts"
import type { PoolMode } from "../pool/index.ts"
import { GSSENC_REQUEST_CODE, SSL_REQUEST_CODE, TxStatus } from "../protocol/index.ts"
import {
  clientSession,
  type LiveSession,
  type LoginTicket,
  type RegisteredSession,
  SessionRegistry,
  type SessionSupervisor
} from "../session/index.ts"
import { EventCounters } from "../telemetry/index.ts"
import { DownstreamTls } from "../tls/index.ts"

export class ListenError extends Data.TaggedError("ListenError")<{ readonly message: string }> {}

/**
 * Connections the kernel may hold completed before they are accepted (capped by
 * net.core.somaxconn). Node's default, 511, overflows in a login storm while the event loop is busy
 * with logins: the kernel then drops the handshake's last ACK, and clients see their connection
 * reset or stall for seconds of SYN retries, with no error from us. A deeper queue lets the storm
 * wait in the kernel, at no cost to us, until it is accepted and admitted or refused with a code.
 */
const LISTEN_BACKLOG = 4096

/** Binds a TCP server; a taken port fails start-up naming the variable that moves it. */
export const listen = (options: {
  readonly host: string
  readonly port: number
  readonly envVar: string
  /** Worker mode: every worker binds the port and the kernel spreads connections (docs/scale-out.md). */
  readonly reusePort?: boolean
  readonly onConnection: (socket: net.Socket) => void
}) =>
  Effect.acquireRelease(
    Effect.callback<net.Server, ListenError>((resume) => {
      const server = net.createServer({ noDelay: true, keepAlive: true }, options.onConnection)
      server.once("error", (err: NodeJS.ErrnoException) => {
        const reason =
          err.code === "EADDRINUSE"
            ? `port ${options.port} on ${options.host} is already in use; set ${options.envVar} to another port`
            : `cannot listen on ${options.host}:${options.port} (${options.envVar}): ${err.message}`
        resume(Effect.fail(new ListenError({ message: reason })))
      })
      server.listen(
        { host: options.host, port: options.port, backlog: LISTEN_BACKLOG, reusePort: options.reusePort === true },
        () => resume(Effect.succeed(server))
      )
    }),
    (server) => Effect.sync(() => server.close())
  )

export const boundPort = (server: net.Server): number => (server.address() as net.AddressInfo).port

const { InTransaction: T, Failed: E } = TxStatus

/**
 * What keeps a session from ending at once when drained, or undefined when nothing does. A client
 * idle in a transaction is named as such: only its client can end it early, else it holds the
 * shutdown for the whole drain timeout.
 */
const holding = (
  session: RegisteredSession
): { readonly idleInTransaction: boolean; readonly text: string } | undefined => {
  const info = session.handle.info
  if (info === undefined) return undefined
  const server = info.server()
  const state =
    server !== undefined && !server.closed
      ? server.pending > 0
        ? "running a query"
        : server.txStatus === T
          ? "idle in transaction"
          : server.txStatus === E
            ? "idle in a failed transaction"
            : undefined
      : info.state() === "waiting"
        ? "waiting for a server"
        : undefined
  if (state === undefined) return undefined
  return {
    idleInTransaction: state.startsWith("idle in"),
    text: `${session.handle.tenant}/${info.user} ${info.address}:${info.port} (${info.pool.settings.mode} mode, ${info.applicationName === "" ? "" : `application_name ${info.applicationName}, `}${state})`
  }
}

/**
 * How long a refused connection may stay open after its error was written: long enough for the
 * client to read it and close first (so the close is a FIN, not a reset that could overtake the
 * error), short enough that refused connections cannot pile up.
 */
const REFUSED_LINGER_MS = 1000

/** At most one warning per limit in this interval while it refuses; the rest are counted. */
const REFUSAL_LOG_INTERVAL_MS = 10_000

const ignore = () => {}

/**
 * One connection's login: its handshake slot, its count in the node's connection cap, and whether
 * its session outlives its fiber (the session then gives the count back, `SessionSupervisor.left`).
 */
class Ticket implements LoginTicket {
  handshaking = true
  counted = true
  handedOn = false
  constructor(
    private readonly admission: { handshaking: number; open: number },
    private readonly live: Set<LiveSession>
  ) {}
  authenticated(): void {
    if (!this.handshaking) return
    this.handshaking = false
    this.admission.handshaking--
  }
  over(): void {
    this.authenticated()
    if (this.handedOn || !this.counted) return
    this.counted = false
    this.admission.open--
  }
  adopt(session: LiveSession): void {
    this.handedOn = true
    this.live.add(session)
  }
}

const NO = Buffer.from("N")

/** At most this many sessions are named in one log line; the rest are counted. */
const NAMED = 20

const named = (texts: ReadonlyArray<string>): string =>
  texts.length <= NAMED ? texts.join("; ") : `${texts.slice(0, NAMED).join("; ")}; and ${texts.length - NAMED} more`

/**
 * The client-facing front doors. Each accepted socket's login runs as one fiber in a FiberSet; a
 * logged-in session then lives on without it, as a LiveSession the listener supervises
 * (docs/login-path.md). Closing the scope is the graceful shutdown (docs/architecture.md#shutdown):
 * stop accepting, let every session reach its next transaction boundary up to the drain timeout,
 * then interrupt the logins and close the sessions still left (they get 57P01).
 */
export class Listeners extends Context.Service<Listeners>()("tidepool/Listeners", {
  make: Effect.gen(function* () {
    const config = yield* AppConfig
    const sessions = yield* SessionRegistry
    const fibers = yield* FiberSet.make()
    const run = yield* FiberSet.runtime(fibers)<Effect.Services<ReturnType<typeof clientSession>>>()
    const events = yield* EventCounters

    const servers: Array<net.Server> = []
    /**
     * Stop accepting, then give sessions until their next transaction boundary (bounded by the drain
     * timeout). Idempotent; run on SIGTERM before anything else is torn down, and again as a finalizer.
     */
    let drained = false
    /**
     * Sessions past their login, each held by its LiveSession rather than a fiber: the drain waits
     * for them as it waits for the logins' fibers, and closes whoever is left at its timeout.
     */
    const live = new Set<LiveSession>()
    let whenNoneLive: Array<() => void> = []
    const noneLive = Effect.callback<void>((resume) => {
      if (live.size === 0) {
        resume(Effect.void)
        return
      }
      const wake = () => resume(Effect.void)
      whenNoneLive.push(wake)
      return Effect.sync(() => {
        whenNoneLive = whenNoneLive.filter((w) => w !== wake)
      })
    })
    /** Until every login's fiber and every session has ended (new logins are refused meanwhile). */
    const allEnded = Effect.gen(function* () {
      while (live.size > 0 || (yield* FiberSet.size(fibers)) > 0) {
        yield* FiberSet.awaitEmpty(fibers)
        yield* noneLive
      }
    })
    const shutdown = Effect.gen(function* () {
      for (const server of servers.splice(0)) server.close()
      if (drained) return
      drained = true
      const left = (yield* FiberSet.size(fibers)) + live.size
      if (left === 0) return
      const timeoutMs = config.shutdownTimeoutMs
      const registered = sessions.all()
      const holders = registered.flatMap((s) => holding(s) ?? [])
      const loggingIn = Math.max(0, left - registered.length)
      yield* Effect.logInfo(
        `shutdown: stopped accepting connections; draining ${left} client session(s), each closed at its next transaction boundary, for at most ${timeoutMs} ms${loggingIn > 0 ? ` (${loggingIn} still logging in)` : ""}`
      )
      const idle = holders.filter((h) => h.idleInTransaction)
      if (idle.length > 0) {
        yield* Effect.logWarning(
          `shutdown: ${idle.length} session(s) idle in a transaction hold the shutdown until their client ends the transaction, at most for the whole drain timeout (${timeoutMs} ms): ${named(idle.map((h) => h.text))}`
        )
      }
      const busy = holders.filter((h) => !h.idleInTransaction)
      if (busy.length > 0) {
        yield* Effect.logInfo(
          `shutdown: waiting for ${busy.length} session(s) to reach a transaction boundary: ${named(busy.map((h) => h.text))}`
        )
      }
      const startedAt = Date.now()
      sessions.drainAll()
      // This runs from finalizers and interruption handlers, which are uninterruptible: the wait
      // must opt in to interruption, or the drain timeout could never cut it short.
      const ended = yield* allEnded.pipe(Effect.interruptible, Effect.timeoutOption(timeoutMs))
      if (ended._tag === "Some") {
        yield* Effect.logInfo(`shutdown: every client session ended within ${Date.now() - startedAt} ms`)
        return
      }
      const remaining = sessions.all()
      const stillHolding = remaining.flatMap((s) => holding(s)?.text ?? [])
      const still = (yield* FiberSet.size(fibers)) + live.size
      const stillLoggingIn = Math.max(0, still - remaining.length)
      yield* Effect.logWarning(
        `shutdown: drain timeout (${timeoutMs} ms) reached; force-closing ${still} client session(s) with 57P01${stillHolding.length > 0 ? `: ${named(stillHolding)}` : ""}${stillLoggingIn > 0 ? `${stillHolding.length > 0 ? ";" : ":"} ${stillLoggingIn} still logging in` : ""}`
      ).pipe(Effect.annotateLogs({ code: "EADMINSHUTDOWN" }))
      // Logins are interrupted when the FiberSet closes, right after this; sessions are closed now,
      // and their teardown (a session-mode server's reset, bounded) is waited for.
      for (const session of [...live]) session.close()
      yield* noneLive
    })
    yield* Effect.addFinalizer(() => shutdown)
    // The admin console's SHUTDOWN: stop accepting at once; `tidepool serve` then returns, and
    // releasing this layer drains the sessions exactly as on SIGTERM.
    const control = yield* AdminControl
    yield* control.shutdownRequested.pipe(
      Effect.andThen(
        Effect.sync(() => {
          for (const server of servers) server.close()
        })
      ),
      Effect.forkScoped
    )

    const downstreamTls = yield* DownstreamTls
    const { admission } = events
    const services = yield* Effect.context<never>()
    const fork = Effect.runForkWith(services)

    /**
     * A limit's refusal: the ErrorResponse is rendered once, and a warning is logged at most once per
     * interval with the count since, so a storm costs neither allocations nor a log line per refusal.
     */
    const refusal = (code: ErrorCode & ("EMAXCLIENTCONNS" | "EMAXHANDSHAKES"), limit: number, setting: string) => {
      const response = renderErrorResponse(tidepoolError(code, limit))
      let loggedAt = 0
      let unlogged = 0
      return (socket: net.Socket): void => {
        socket.on("error", ignore)
        socket.setTimeout(REFUSED_LINGER_MS, () => socket.destroy())
        // Answered on the client's first bytes, never parsed further: libpq (15.10, 16.6, 17.2 and
        // later) shows no server text that answers its SSLRequest, and sslmode=prefer is its
        // default. So a TLS or GSS request is declined as a normal connection's would be, and the
        // error answers the next packet, the StartupMessage (libpq rejects bytes that come with
        // the `N`). With client TLS configured an SSLRequest gets the error at once: a TLS
        // handshake per refusal would cost what the limit protects, and `N` would mislead
        // sslmode=require.
        const answer = (first: Buffer) => {
          const request = first.length >= 8 && first.readInt32BE(0) === 8 ? first.readInt32BE(4) : 0
          if (
            request === GSSENC_REQUEST_CODE ||
            (request === SSL_REQUEST_CODE && downstreamTls.context() === undefined)
          ) {
            socket.write(NO)
            socket.once("data", answer)
            return
          }
          socket.end(response)
          // Whatever else arrives is dropped until the client closes (see REFUSED_LINGER_MS).
          socket.resume()
        }
        socket.once("data", answer)
        events.error(undefined, code)
        unlogged++
        const now = Date.now()
        if (now - loggedAt < REFUSAL_LOG_INTERVAL_MS) return
        loggedAt = now
        const count = unlogged
        unlogged = 0
        fork(
          Effect.logWarning(
            `refusing new connections: ${setting} (${limit}) reached; ${count} refused since the last warning (at most one every ${REFUSAL_LOG_INTERVAL_MS / 1000} s)`
          ).pipe(Effect.annotateLogs({ code }))
        )
      }
    }
    const refuseClients = refusal("EMAXCLIENTCONNS", config.maxClientConnections, "TIDEPOOL_MAX_CLIENT_CONNECTIONS")
    const refuseHandshakes = refusal("EMAXHANDSHAKES", config.maxHandshakes, "TIDEPOOL_MAX_HANDSHAKES")

    const supervisor: SessionSupervisor = {
      draining: () => drained,
      left: () => {
        admission.open--
      },
      ended: (session) => {
        if (!live.delete(session)) return
        if (live.size === 0 && whenNoneLive.length > 0) {
          const waiting = whenNoneLive
          whenNoneLive = []
          for (const wake of waiting) wake()
        }
      },
      run: (teardown) => {
        fork(teardown)
      },
      logLevel: yield* References.MinimumLogLevel,
      events
    }

    /**
     * The front door's limits, checked before the connection costs anything more than its socket:
     * a refused one gets no fiber and no session state. A connection counts from accept to its
     * end (its login's refusal or fiber's end, or its session's relay's end, `supervisor.left`),
     * freed before the client hears why it ended; a handshake until the
     * login succeeds (`LoginTicket.authenticated`, for tenant and admin logins alike) or the fiber ends.
     */
    const admit = (socket: net.Socket, mode: PoolMode): void => {
      if (admission.open >= config.maxClientConnections) {
        admission.refusedClients++
        refuseClients(socket)
        return
      }
      if (admission.handshaking >= config.maxHandshakes) {
        admission.refusedHandshakes++
        refuseHandshakes(socket)
        return
      }
      admission.open++
      admission.handshaking++
      const ticket = new Ticket(admission, live)
      // A session its login handed on counts until its relay ends; anything else ends here at the
      // latest (a refused login stops counting before its client is told, `LoginTicket.over`).
      run(clientSession(socket, mode, supervisor, ticket)).addObserver(() => ticket.over())
    }

    const door = (mode: PoolMode, port: number, envVar: string) =>
      listen({
        host: config.listenAddr,
        port,
        envVar,
        reusePort: config.workers > 1,
        onConnection: (socket) => admit(socket, mode)
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
}) {
  static readonly layer = Layer.effect(this, this.make)
}
