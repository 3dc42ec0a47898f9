import type * as net from "node:net"
import type { BlockList } from "node:net"
import { Cause, type Context, Effect, Exit, type Fiber, References } from "effect"
import { adminConsole, authenticateAdmin, isAdminDatabase } from "../admin/index.ts"
import {
  ADDRESS_BLOCKED,
  AUTH_FAILURES,
  authenticateClient,
  CircuitBreaker,
  type ClientCredentials,
  inSpan,
  matchUsers
} from "../auth/index.ts"
import {
  AppConfig,
  allowListOf,
  isAllowed,
  type Tenant,
  type User,
  userMaxClients,
  userPoolSize
} from "../config/index.ts"
import { type TidepoolError, tidepoolError } from "../errors/index.ts"
import { type PoolMode, PoolRegistry, type TenantPool } from "../pool/index.ts"
import {
  authenticationOk,
  backendKeyData,
  negotiateProtocolVersion,
  parameterStatus,
  readyForQuery
} from "../protocol/index.ts"
import { clientTraceParent, EventCounters, tenantLogLevel } from "../telemetry/index.ts"
import { banOf, revokedSince, TenantRegistry } from "../tenants/index.ts"
import { channelBindingOf, DownstreamTls, UpstreamTls } from "../tls/index.ts"
import type { ServerConnection } from "../upstream/index.ts"
import { ClientSocket } from "./ClientSocket.ts"
import { type ClientIdentity, resolveIdentity } from "./identity.ts"
import { acceptDirectTls, answerSslRequest, tenantBySni } from "./negotiateTls.ts"
import { type IdleProbe, type SessionHandle, type SessionInfo, SessionRegistry } from "./SessionRegistry.ts"
import { type RelayEnd, SessionRelay } from "./SessionRelay.ts"
import { clientSettings, FORWARDED_PARAMETERS, reportedParameters, settingsChange } from "./settings.ts"
import { TransactionRelay } from "./TransactionRelay.ts"

/** Fields every log line of this session carries. */
interface LogContext {
  tenant?: string
  user?: string
  mode: PoolMode
  peer_ip: string
}

interface Authenticated {
  readonly tenant: Tenant
  readonly user: User
  readonly identity: ClientIdentity
  readonly credentials: ClientCredentials
  readonly database: string
  readonly settings: ReadonlyMap<string, string>
}

/** Gives a server the client's settings; a value the server rejects is the client's error. */
const applySettings = (server: ServerConnection, settings: ReadonlyMap<string, string>) => {
  const change = settingsChange(server, settings)
  return change.sql === ""
    ? Effect.void
    : server.simpleQuery(change.sql).pipe(Effect.tap(() => Effect.sync(change.commit)))
}

const ROOT = { root: true } as const

/**
 * A tenant's allow list as a BlockList, built once per list: the cached tenant keeps the same array
 * until it changes, so a login only checks its address.
 */
const allowLists = new WeakMap<ReadonlyArray<string>, BlockList>()
const allowListFor = (tenant: Tenant): BlockList => {
  let list = allowLists.get(tenant.allow_list)
  if (list === undefined) {
    list = allowListOf(tenant.allow_list)
    allowLists.set(tenant.allow_list, list)
  }
  return list
}

const poolKey = (tenant: string, user: string, mode: PoolMode, database: string) =>
  `${tenant}\u0000${user}\u0000${mode}\u0000${database}`

/**
 * One client connection, from its first byte to its close: handshake, tenant resolution, SCRAM,
 * attach to a server, then the relay. Its scope owns the server it holds: whatever way the session
 * ends, the server goes back reset or is closed, never leaked and never reused dirty.
 * `shuttingDown` says whether the listeners are draining: a login that completes then is refused
 * with 57P01, like the sessions the drain closes.
 */
export const clientSession = (socket: net.Socket, mode: PoolMode, shuttingDown: () => boolean = NOT_DRAINING) =>
  // Wrapped here, outside the generator, whose context lives as long as the session: the accepted
  // socket is replaced by another one at `takeOver` and must not be kept alive by it.
  serve(new ClientSocket(socket), mode, shuttingDown)

const NOT_DRAINING = () => false

const serve = (client: ClientSocket, mode: PoolMode, shuttingDown: () => boolean) =>
  Effect.gen(function* () {
    const config = yield* AppConfig
    const events = yield* EventCounters
    const log: LogContext = { mode, peer_ip: client.remoteAddress }
    const timedOut = () => Effect.fail(tidepoolError("EAUTHTIMEOUT"))
    const startedAt = Date.now()

    const fail = (error: TidepoolError) =>
      Effect.andThen(
        Effect.sync(() => {
          events.error(log.tenant, error.code)
          client.fail(error)
        }).pipe(
          Effect.tap(() =>
            Effect.annotateCurrentSpan({ "error.code": error.code, "tidepool.tenant": log.tenant ?? "" })
          )
        ),
        // Annotated here, not up front: tenant and user are learnt during the handshake. A blocked
        // address's refusals are a flood's: the block itself was logged once when it began.
        (error.code === "ECLIENTSOCKETCLOSED" ||
        (error.code === "ECIRCUITBREAKER" && error.message.endsWith(ADDRESS_BLOCKED))
          ? Effect.logDebug(error.message)
          : Effect.logWarning(error.message)
        ).pipe(Effect.annotateLogs({ ...log, code: error.code }))
      )

    // The handshake and attach run to completion and let go of everything they used; the fiber
    // then waits for its relay holding only the LiveSession (docs/login-path.md, "Idle clients").
    const session = (startup: Readonly<Record<string, string>>) =>
      Effect.gen(function* () {
        const auth = yield* handshake(client, log, startup).pipe(
          Effect.timeoutOrElse({
            duration: Math.max(0, config.handshakeTimeoutMs - (Date.now() - startedAt)),
            orElse: timedOut
          })
        )
        if ("admin" in auth) {
          yield* adminConsole(client, auth.admin)
          return undefined
        }
        const level = tenantLogLevel(auth.tenant.feature_flags)
        const attached = attach(client, auth, mode, startedAt, shuttingDown)
        const live = yield* level === undefined
          ? attached
          : Effect.provideService(attached, References.MinimumLogLevel, level)
        return { live, level }
      }).pipe(
        Effect.flatMap((attached) => {
          if (attached === undefined) return Effect.void
          const relay = runRelay(attached.live)
          return attached.level === undefined
            ? relay
            : Effect.provideService(relay, References.MinimumLogLevel, attached.level)
        }),
        // The session's own resources (its place in pool.clients, its registration, a session-mode
        // server) are given back before the client hears why it ended: a client that reconnects at
        // once after the error must find its slot free (EMAXCONNSESSION on a pool of one otherwise).
        Effect.scoped,
        Effect.catch(fail)
      )

    // The startup packet comes first, so that a client's W3C traceparent can parent the session span.
    yield* readStartup(client).pipe(
      Effect.timeoutOrElse({ duration: config.handshakeTimeoutMs, orElse: timedOut }),
      Effect.flatMap((startup) => {
        if (startup === undefined) return Effect.void // a CancelRequest, handled
        const parent = clientTraceParent(startup)
        return session(startup).pipe(inSpan("client.session", parent === undefined ? ROOT : { parent }))
      }),
      Effect.catch((error) => fail(error).pipe(inSpan("client.session", ROOT))),
      Effect.onInterrupt(() => Effect.sync(() => client.fail(tidepoolError("EADMINSHUTDOWN")))),
      Effect.ensuring(Effect.sync(() => client.socket.destroySoon()))
    )
  }).pipe(Effect.scoped)

/**
 * The startup phase: TLS negotiation (SSLRequest or direct TLS), CancelRequest (handled here; then
 * undefined), and the StartupMessage's parameters.
 */
const readStartup = (client: ClientSocket) =>
  Effect.gen(function* () {
    const sessions = yield* SessionRegistry
    const downstreamTls = yield* DownstreamTls

    yield* acceptDirectTls(client, downstreamTls)
    for (;;) {
      const packet = yield* client.readStartup
      switch (packet._tag) {
        case "SSLRequest":
          yield* answerSslRequest(client, downstreamTls)
          break
        case "GSSENCRequest":
          client.write(Buffer.from("N"))
          break
        case "CancelRequest":
          yield* sessions.cancel(packet.processId, packet.secretKey)
          client.socket.destroy()
          return undefined
        case "StartupMessage":
          if (packet.protocolMinor > 0 || packet.protocolOptions.length > 0) {
            client.write(negotiateProtocolVersion(0, packet.protocolOptions))
          }
          return packet.parameters
      }
    }
  })

/** Breaker key of logins naming a tenant that does not exist (tenant ids cannot contain NUL). */
const UNKNOWN_TENANTS = "\u0000unknown"

/** Once per block: the refusals that follow are logged at debug level only. */
const logBlocked = (log: LogContext, breakerKey: string) =>
  Effect.logWarning(
    `${log.peer_ip} blocked for ${AUTH_FAILURES.blockMs / 1000} s after ${AUTH_FAILURES.failures} failed logins${breakerKey === UNKNOWN_TENANTS ? " naming tenants that do not exist" : ""}`
  ).pipe(Effect.annotateLogs({ ...log, code: "ECIRCUITBREAKER" }))

const handshake = (client: ClientSocket, log: LogContext, startup: Readonly<Record<string, string>>) =>
  Effect.gen(function* () {
    const config = yield* AppConfig
    const tenants = yield* TenantRegistry
    const events = yield* EventCounters
    const breaker = yield* CircuitBreaker

    if (isAdminDatabase(startup.database)) {
      log.user = startup.user
      return { admin: yield* authenticateAdmin(client, startup, log.peer_ip) }
    }

    const resolved = resolveIdentity(startup)
    if ("_tag" in resolved) return yield* resolved
    const identity = resolved.tenant !== undefined ? resolved : { ...resolved, tenant: tenantBySni(client, tenants) }
    log.user = identity.user
    if (identity.tenant === undefined) return yield* tidepoolError("ENOIDENTIFIER")
    log.tenant = identity.tenant
    // Every refusal that depends on what exists is answered after the same delay, so timing tells a
    // prober nothing about which tenants and users exist, and guessing stays slow. Nothing more is
    // read from a refused client: its bytes stay in the kernel (and its sends block) meanwhile.
    const refuse = (error: TidepoolError) => {
      client.stopReading()
      events.loginFailed(identity.tenant, "none", error.code)
      return Effect.andThen(Effect.sleep(config.authFailureDelayMs), Effect.fail(error))
    }
    // A name that does not exist is a guess: it counts toward the address's breaker like a wrong
    // password (unknown tenants under one key per address, so made-up names cannot grow the state).
    const tenantName = identity.tenant
    const notFound = (breakerKey: string) =>
      Effect.gen(function* () {
        if (yield* breaker.isAddressBlocked(breakerKey, log.peer_ip)) {
          events.loginFailed(identity.tenant, "none", "ECIRCUITBREAKER")
          return yield* tidepoolError("ECIRCUITBREAKER", ADDRESS_BLOCKED)
        }
        if (yield* breaker.authFailed(breakerKey, log.peer_ip)) yield* logBlocked(log, breakerKey)
        return yield* refuse(tidepoolError("ENOTFOUND", identity.user, tenantName))
      })
    const tenant = tenants.get(identity.tenant)
    if (tenant === undefined) return yield* notFound(UNKNOWN_TENANTS)
    const ban = banOf(tenant)
    if (ban !== undefined) return yield* refuse(ban)
    // Before the user lookup, so an address outside the allow list learns nothing about the users.
    if (!isAllowed(allowListFor(tenant), log.peer_ip)) {
      return yield* refuse(tidepoolError("EADDRNOTALLOWED", log.peer_ip))
    }
    const users = matchUsers(tenant, identity.user)
    if (users.length > 1) return yield* refuse(tidepoolError("EMULTIPLEUSERS", identity.user, identity.tenant))
    const user = users[0]
    if (user === undefined) return yield* notFound(tenant.external_id)
    if (tenant.enforce_ssl && client.tls === undefined) {
      return yield* refuse(tidepoolError("ESSLREQUIRED", identity.user))
    }

    const tls = client.tls
    const method =
      tenant.use_jit && tls !== undefined ? "cleartext" : tenant.require_user ? "scram-sha-256" : "auth_query"
    const credentials = yield* authenticateClient(client, tenant, user, identity.user, log.peer_ip, {
      tls: tls !== undefined,
      channelBinding: tls === undefined ? undefined : channelBindingOf(tls),
      jit: identity.jit
    }).pipe(Effect.tapError((error) => Effect.sync(() => events.loginFailed(tenant.external_id, method, error.code))))
    events.loginSucceeded(tenant.external_id, identity.user, method)
    client.write(authenticationOk())

    const settings = new Map<string, string>()
    for (const [name, value] of identity.settings) if (FORWARDED_PARAMETERS.has(name)) settings.set(name, value)
    for (const [name, value] of Object.entries(startup)) {
      const lower = name.toLowerCase()
      if (FORWARDED_PARAMETERS.has(lower)) settings.set(lower, value)
    }
    return {
      tenant,
      user,
      identity,
      credentials,
      database: identity.database ?? tenant.db_database,
      settings
    } satisfies Authenticated
  })

/**
 * Lends a server for the current scope; `giveBack` runs when the scope closes. Waiting is
 * interruptible (shutdown, client gone); a server handed over in the same instant as an interruption
 * goes straight back to the pool instead of being lost.
 */
const lend = (pool: TenantPool, giveBack: (server: ServerConnection) => Effect.Effect<void>) =>
  Effect.uninterruptibleMask((restore) => {
    let delivered: ServerConnection | undefined
    const checkout = Effect.callback<ServerConnection, TidepoolError>((resume) => {
      const waiter = pool.checkout((error, server) => {
        delivered = server
        resume(server !== undefined ? Effect.succeed(server) : Effect.fail(error!))
      })
      return Effect.sync(() => {
        if (waiter !== undefined) pool.cancel(waiter)
      })
    })
    return restore(checkout).pipe(
      Effect.onInterrupt(() =>
        Effect.sync(() => {
          if (delivered !== undefined) pool.release(delivered)
        })
      ),
      Effect.tap((server) => Effect.addFinalizer(() => giveBack(server)))
    )
  })

/** Puts a session-mode server back: reset when its state is known and resettable, closed otherwise. */
const resetAndRelease = (pool: TenantPool) => (server: ServerConnection) =>
  Effect.gen(function* () {
    if (server.closed || server.pending > 0 || server.inBatch) {
      pool.discard(server, "client left mid-request")
      return
    }
    const reset = Effect.gen(function* () {
      if (server.txStatus !== 0x49) yield* server.simpleQuery("ROLLBACK")
      yield* server.simpleQuery("DISCARD ALL")
      server.resetSettings()
    })
    // Finalizers run uninterruptibly: the reset opts in, so that the timeout can stop it.
    const exit = yield* reset.pipe(Effect.interruptible, Effect.timeout(5000), Effect.exit)
    if (Exit.isSuccess(exit) && server.isIdle) pool.release(server)
    else pool.discard(server, "reset failed")
  })

/**
 * The wait for a server at login: bounded by the pool's checkout timeout (ECHECKOUTTIMEOUT), as every
 * wait for a server is, not by the handshake timeout, so a login in a busy moment waits as long as a
 * query would; and given up as soon as the client leaves, so a server is not lent to nobody.
 */
const lendToClient = (
  client: ClientSocket,
  pool: TenantPool,
  giveBack: (server: ServerConnection) => Effect.Effect<void>
) => Effect.raceFirst(lend(pool, giveBack), client.gone)

/**
 * Session mode: the client's server for life, given the client's startup settings (a value the
 * server rejects is the client's error, as on a direct connection).
 */
const attachSession = (client: ClientSocket, pool: TenantPool, startup: ReadonlyMap<string, string>) =>
  Effect.gen(function* () {
    const server = yield* lendToClient(client, pool, resetAndRelease(pool))
    yield* applySettings(server, startup)
    return { server, settings: undefined, reported: [...server.parameters] }
  })

/**
 * Transaction mode: no server is held between transactions, so connecting needs one only to learn
 * the pool's parameters (first client) or to check startup settings no server of the pool has
 * accepted yet. Everything else comes from the pool's pristine parameters.
 */
const attachTransaction = (client: ClientSocket, pool: TenantPool, startup: ReadonlyMap<string, string>) =>
  Effect.gen(function* () {
    const unchecked = [...startup].filter(([name, value]) => !pool.knownSettings.has(`${name}=${value}`))
    if (pool.parameters === undefined || unchecked.length > 0) {
      yield* Effect.scoped(
        Effect.flatMap(
          lendToClient(client, pool, (server) => Effect.sync(() => pool.release(server))),
          (server) => applySettings(server, startup)
        )
      )
      // Bounded: a pool seeing endless distinct application_names re-checks rather than grows.
      if (pool.knownSettings.size > 1000) pool.knownSettings.clear()
      for (const [name, value] of startup) pool.knownSettings.add(`${name}=${value}`)
    }
    const pristine = pool.parameters ?? new Map<string, string>()
    const settings = clientSettings(pristine, startup)
    return { server: undefined, settings, reported: reportedParameters(pristine, settings) }
  })

/**
 * A logged-in client, from its registration to its end: the registry's handle (cancel, drain, kick,
 * KILL), what the admin console and the idle sweep read, and what its relay is started with. One
 * object with methods rather than a handle of closures: an idle client keeps it for its whole life.
 */
class LiveSession implements SessionHandle, SessionInfo, IdleProbe {
  relay: SessionRelay | TransactionRelay | undefined = undefined
  drainRequested = false
  kicked: TidepoolError | undefined = undefined
  readonly connectedAt = Date.now()
  readonly address: string
  readonly port: number
  readonly tls: boolean

  constructor(
    readonly client: ClientSocket,
    readonly pool: TenantPool,
    readonly tenant: string,
    readonly user: string,
    readonly applicationName: string,
    /** Session mode: the server held for the session's life. */
    readonly held: ServerConnection | undefined,
    /** Transaction mode: the client's settings, which its relay keeps current. */
    readonly settings: Map<string, string> | undefined,
    readonly relayOptions: RelayOptions,
    private readonly fiber: Fiber.Fiber<unknown, unknown>
  ) {
    this.address = client.remoteAddress
    this.port = client.socket.remotePort ?? 0
    this.tls = client.tls !== undefined
  }

  get info(): SessionInfo {
    return this
  }
  get idle(): IdleProbe {
    return this
  }
  // Asked only by the admin console: not worth a getsockname per login.
  get localAddress(): string {
    return this.client.socket.localAddress ?? ""
  }
  get localPort(): number {
    return this.client.socket.localPort ?? 0
  }

  state(): "active" | "waiting" | "idle" {
    const relay = this.relay
    if (!(relay instanceof TransactionRelay)) return "active"
    return relay.server !== undefined ? "active" : relay.isWaiting ? "waiting" : "idle"
  }
  server(): ServerConnection | undefined {
    return this.relay instanceof TransactionRelay ? this.relay.server : this.held
  }
  pinnedBy(): string | undefined {
    return this.relay instanceof TransactionRelay ? this.relay.pinnedBy : undefined
  }
  cancel(): Effect.Effect<void> {
    // Only the query running for this client right now; a client between transactions holds no
    // server, and its cancel does nothing (no delayed cancel hitting someone else's query).
    const held = this.server()
    return held === undefined ? Effect.void : held.cancel
  }
  drain(): void {
    this.drainRequested = true
    this.relay?.drain()
  }
  kick(error: TidepoolError): void {
    this.kicked = error
    this.relay?.abort()
  }
  // Fire and forget: the console answers KILL without waiting for each session to close.
  kill(): Effect.Effect<void> {
    return Effect.sync(() => this.fiber.interruptUnsafe())
  }
  bytesRead(): number {
    return this.client.socket.bytesRead
  }
  quiet(): boolean {
    // A transaction-mode client between transactions holds no server; otherwise the server it
    // holds says whether a transaction or a query is open.
    const relay = this.relay
    if (relay instanceof TransactionRelay) return relay.server === undefined ? !relay.isWaiting : relay.server.isIdle
    return relay !== undefined && this.held?.isIdle === true
  }
}

interface RelayOptions {
  readonly maxMessageSize: number
  readonly rename: boolean
  readonly cacheSize: number
  readonly maxCount: number
  readonly maxMemory: number
}

// The session scope's finalizers are made out here, where they can close over nothing but their
// arguments: made inside `attach`, they would keep its whole context (the tenant, the credentials,
// the startup settings) alive for as long as the session lasts.

/** The client counts in `pool.clients` until the session's scope closes. */
const countClient = (pool: TenantPool, startedAt: number) =>
  Effect.acquireRelease(
    Effect.suspend(() => {
      const refused = pool.admit()
      return refused === undefined ? Effect.void : Effect.fail(refused)
    }),
    () =>
      Effect.sync(() => {
        pool.leave()
        pool.counters.clientLifetime.observe(Date.now() - startedAt)
      })
  )

/** The session is reachable by cancel requests, drains and kicks until its scope closes. */
const register = (sessions: Context.Service.Shape<typeof SessionRegistry>, live: LiveSession) =>
  Effect.acquireRelease(
    Effect.sync(() => sessions.register(live)),
    (key) => Effect.sync(() => sessions.unregister(key))
  )

/**
 * Attaches an authenticated client to its pool: counts it, lends or checks a server, registers it
 * and greets it. Returns the LiveSession whose relay the caller then runs; the count and the
 * registration are released when the session's scope closes.
 */
const attach = (
  client: ClientSocket,
  auth: Authenticated,
  mode: PoolMode,
  startedAt: number,
  shuttingDown: () => boolean
) =>
  Effect.gen(function* () {
    const config = yield* AppConfig
    const registry = yield* PoolRegistry
    const sessions = yield* SessionRegistry
    const upstreamTls = yield* UpstreamTls
    const { tenant, user, database, credentials } = auth
    const size = userPoolSize(tenant, user)
    const pool = yield* registry.get({
      key: poolKey(tenant.external_id, credentials.poolUser, mode, database),
      tenant: tenant.external_id,
      user: credentials.upstream.user,
      database,
      mode,
      size,
      maxClients: userMaxClients(tenant, user),
      checkoutTimeoutMs: user.pool_checkout_timeout,
      serverIdleTimeoutMs: config.serverIdleTimeoutMs,
      minSize: config.minPoolSize,
      serverLifetimeMs: config.serverLifetimeMs,
      connectBackoffMs: 2500,
      target: {
        host: tenant.db_host,
        port: tenant.db_port,
        database,
        ...credentials.upstream,
        connectTimeoutMs: config.upstreamConnectTimeoutMs,
        tls:
          upstreamTls.optionsFor(tenant) ??
          (credentials.followClientTls === true && client.tls !== undefined
            ? { verify: false, ca: undefined }
            : undefined)
      }
    })
    yield* countClient(pool, startedAt)

    const { server, settings, reported } =
      mode === "session"
        ? yield* attachSession(client, pool, auth.settings)
        : yield* attachTransaction(client, pool, auth.settings)
    const live = new LiveSession(
      client,
      pool,
      tenant.external_id,
      auth.identity.user,
      auth.settings.get("application_name") ?? "",
      server,
      settings,
      {
        maxMessageSize: config.maxMessageSize,
        rename: tenant.feature_flags.prepared_statements !== false,
        cacheSize: config.preparedCacheSize,
        maxCount: config.maxPreparedStatements,
        maxMemory: config.maxPreparedMemory
      },
      yield* Effect.withFiber((fiber: Fiber.Fiber<unknown, unknown>) => Effect.succeed(fiber))
    )
    const key = yield* register(sessions, live)
    // A login that ends while the pooler drains was registered too late to be drained: it is told
    // now, as a drained client would be, instead of being greeted and then held until the timeout.
    // Checked after registering, so a drain that starts in between has drained this session anyway.
    if (shuttingDown()) return yield* tidepoolError("EADMINSHUTDOWN")
    const revoked = revokedSince(yield* TenantRegistry, tenant.external_id, auth.identity.user)
    if (revoked !== undefined) return yield* revoked
    const greeting: Array<Buffer> = []
    for (const [name, value] of reported) greeting.push(parameterStatus(name, value))
    greeting.push(backendKeyData(key.processId, key.secretKey), readyForQuery("I"))
    client.write(Buffer.concat(greeting))
    pool.counters.clientConnect.observe(Date.now() - startedAt)
    return live
  })

/** Runs the session's relay until it ends; how it ended decides the session's error, if any. */
const runRelay = (live: LiveSession) =>
  Effect.callback<RelayEnd>((resume) => {
    const onEnd = (end: RelayEnd) => resume(Effect.succeed(end))
    // Same tick as the relay's start: once the handshake reader lets go, unread bytes must reach the relay.
    const { readAhead, reads } = live.client.takeOver()
    const options = live.relayOptions
    const r =
      live.settings === undefined
        ? new SessionRelay(live.client.socket, live.held!, options.maxMessageSize, live.pool.counters, onEnd)
        : new TransactionRelay(live.client.socket, live.pool, options.maxMessageSize, live.settings, onEnd, options)
    live.relay = r
    r.start(readAhead, reads)
    if (live.drainRequested) r.drain()
    if (live.kicked !== undefined) r.abort()
    return Effect.sync(() => r.abort())
  }).pipe(Effect.flatMap((end) => relayEnded(live, end)))

const relayEnded = (live: LiveSession, end: RelayEnd): Effect.Effect<void, TidepoolError> =>
  Effect.andThen(Effect.logDebug(`relay ended: ${end._tag}`), () => {
    switch (end._tag) {
      case "ClientError":
        return Effect.fail(end.error)
      case "ServerClosed":
        return Effect.fail(tidepoolError("ESERVERCLOSED", end.reason))
      case "Fault":
        // A bug of ours: the operator gets the cause and stack, the client only the code.
        return Effect.andThen(
          Effect.logError("internal error in the relay; the session was closed", Cause.die(end.cause)),
          Effect.fail(tidepoolError("EINTERNAL"))
        )
      case "Drained":
        return Effect.fail(live.kicked ?? tidepoolError("EADMINSHUTDOWN"))
      default:
        return Effect.void
    }
  })
