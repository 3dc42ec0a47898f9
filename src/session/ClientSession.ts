import { Buffer } from "node:buffer"
import type * as net from "node:net"
import type { BlockList } from "node:net"
import { Cause, Context, Effect, Exit, type Fiber, LogLevel, References } from "effect"
import { adminConsole, authenticateAdmin, isAdminDatabase } from "../admin/index.ts"
import {
  ADDRESS_BLOCKED,
  AUTH_FAILURES,
  authenticateClient,
  CircuitBreaker,
  type ClientCredentials,
  inSpan,
  matchUsers,
  refusalError,
  withoutStack
} from "../auth/index.ts"
import {
  AppConfig,
  allowListOf,
  isAllowed,
  parseCidr,
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
  readyForQuery,
  type StartupPacket
} from "../protocol/index.ts"
import { clientTraceParent, type EventCounters, tenantLogLevel } from "../telemetry/index.ts"
import { banOf, revokedSince, TenantRegistry } from "../tenants/index.ts"
import { channelBindingOf, DownstreamTls, UpstreamTls } from "../tls/index.ts"
import type { ServerConnection } from "../upstream/index.ts"
import { ClientSocket, DIRECT_TLS } from "./ClientSocket.ts"
import { type ClientIdentity, resolveIdentity } from "./identity.ts"
import { acceptDirectTls, answerSslRequest, tenantBySni } from "./negotiateTls.ts"
import {
  type IdleProbe,
  type SessionHandle,
  type SessionInfo,
  type SessionKey,
  SessionRegistry
} from "./SessionRegistry.ts"
import { type RelayEnd, SessionRelay } from "./SessionRelay.ts"
import {
  clientSettings,
  FORWARDED_PARAMETERS,
  reportedParameters,
  type StartSettings,
  settingsChange,
  shareSettings
} from "./settings.ts"
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
 * until it changes, so a login only checks its address. `EVERYONE` for a list that allows every
 * address of both families (the default, `0.0.0.0/0` and `::/0`): the BlockList would answer yes
 * to any address the kernel gives us, so the login skips it (and its address parsing).
 */
const EVERYONE = "everyone"
const allowLists = new WeakMap<ReadonlyArray<string>, BlockList | typeof EVERYONE>()
const allowListFor = (tenant: Tenant): BlockList | typeof EVERYONE => {
  let list = allowLists.get(tenant.allow_list)
  if (list === undefined) {
    const widest = tenant.allow_list.map(parseCidr).filter((cidr) => cidr?.prefix === 0)
    list =
      widest.some((cidr) => cidr?.family === "ipv4") && widest.some((cidr) => cidr?.family === "ipv6")
        ? EVERYONE
        : allowListOf(tenant.allow_list)
    allowLists.set(tenant.allow_list, list)
  }
  return list
}

/**
 * `isAllowed`. A list that allows every address refuses only a client whose address is unknown (its
 * socket already closed: `remoteAddress` is then ""); any other comes from the kernel's
 * getpeername and is an address.
 */
const allowed = (tenant: Tenant, address: string): boolean => {
  const list = allowListFor(tenant)
  return list === EVERYONE ? address !== "" : isAllowed(list, address)
}

const poolKey = (tenant: string, user: string, mode: PoolMode, database: string) =>
  `${tenant}\u0000${user}\u0000${mode}\u0000${database}`

/**
 * How the listener supervises the sessions its connections become (one per listener): a logged-in
 * session outlives its login's fiber, held by its `LiveSession` alone, and the listener's drain
 * waits for it, and force-closes it, through this.
 */
export interface SessionSupervisor {
  /** The listeners are draining: a login that completes now is refused with 57P01. */
  readonly draining: () => boolean
  /**
   * An adopted session's relay ended: its connection no longer counts toward
   * TIDEPOOL_MAX_CLIENT_CONNECTIONS (called once, before the client can hear why it ended).
   */
  readonly left: (session: LiveSession) => void
  /** The session ended and has given back everything it held (a session-mode server's reset included). */
  readonly ended: (session: LiveSession) => void
  /** Runs a session's teardown (its log lines, a session-mode server's reset) on a fiber of its own. */
  readonly run: (teardown: Effect.Effect<void>) => void
  /** The node's least severe log level; a tenant's `log_level` overrides it for its sessions. */
  readonly logLevel: LogLevel.LogLevel
  readonly events: Context.Service.Shape<typeof EventCounters>
}

/** One accepted connection's login, from the listener. */
export interface LoginTicket {
  /**
   * The client authenticated (a tenant's or the admin console's login), before its
   * AuthenticationOk is sent: the end of its handshake, which frees its handshake slot.
   */
  readonly authenticated: () => void
  /**
   * The login ends without a session (refused, failed, interrupted): its connection stops counting,
   * before the client is told why, so that a client reconnecting at once finds its slot free.
   */
  readonly over: () => void
  /** From here on the session lives without its login's fiber, until `SessionSupervisor.ended`. */
  readonly adopt: (session: LiveSession) => void
}

/**
 * The services a login uses, read from the fiber's context (`Context.getUnsafe`, `servicesOf`)
 * and passed down: each `yield*` of a service is a turn of the fiber's loop, and a login made
 * eleven of them.
 */
interface LoginServices {
  readonly config: Context.Service.Shape<typeof AppConfig>
  readonly sessions: Context.Service.Shape<typeof SessionRegistry>
  readonly downstreamTls: Context.Service.Shape<typeof DownstreamTls>
  readonly upstreamTls: Context.Service.Shape<typeof UpstreamTls>
  readonly tenants: Context.Service.Shape<typeof TenantRegistry>
  readonly breaker: Context.Service.Shape<typeof CircuitBreaker>
  readonly registry: Context.Service.Shape<typeof PoolRegistry>
  readonly events: Context.Service.Shape<typeof EventCounters>
}

type LoginRequirements =
  | AppConfig
  | SessionRegistry
  | DownstreamTls
  | UpstreamTls
  | TenantRegistry
  | CircuitBreaker
  | PoolRegistry

/**
 * Every login of a listener starts with the same context (its FiberSet's), so the services are
 * looked up once per context, not once per login.
 */
const servicesByContext = new WeakMap<Context.Context<LoginRequirements>, LoginServices>()

const servicesOf = (context: Context.Context<LoginRequirements>, events: LoginServices["events"]): LoginServices => {
  const known = servicesByContext.get(context)
  if (known !== undefined && known.events === events) return known
  const services: LoginServices = {
    config: Context.getUnsafe(context, AppConfig),
    sessions: Context.getUnsafe(context, SessionRegistry),
    downstreamTls: Context.getUnsafe(context, DownstreamTls),
    upstreamTls: Context.getUnsafe(context, UpstreamTls),
    tenants: Context.getUnsafe(context, TenantRegistry),
    breaker: Context.getUnsafe(context, CircuitBreaker),
    registry: Context.getUnsafe(context, PoolRegistry),
    events
  }
  servicesByContext.set(context, services)
  return services
}

/**
 * One client connection, from its first byte to its greeting (or refusal), as one fiber: startup,
 * tenant resolution, SCRAM, attach to a pool. The handshake's deadline is one timer that interrupts
 * the fiber. A logged-in client's session then runs on without a fiber: its relay's callbacks and
 * its `LiveSession`, which holds what the session holds (its place in the pool, its registration, a
 * session-mode server) and gives it all back when the relay ends, whatever way it ends.
 */
export const clientSession = (
  socket: net.Socket,
  mode: PoolMode,
  supervisor: SessionSupervisor,
  ticket: LoginTicket
): Effect.Effect<void, never, LoginRequirements | Effect.Services<ReturnType<typeof afterStartup>>> =>
  Effect.withFiber((fiber) => {
    const services = servicesOf(fiber.context as Context.Context<LoginRequirements>, supervisor.events)
    // Without a certificate the connection can never become TLS: its handshake reads go through
    // the shared read buffer from the start (`ClientSocket.sharedReads`).
    const client = new ClientSocket(socket, services.downstreamTls.context() === undefined)
    return serve(client, services, mode, supervisor, ticket, fiber)
  })

const serve = (
  client: ClientSocket,
  services: LoginServices,
  mode: PoolMode,
  supervisor: SessionSupervisor,
  ticket: LoginTicket,
  fiber: Fiber.Fiber<unknown, unknown>
) => {
  const { config, events } = services
  const log: LogContext = { mode, peer_ip: client.remoteAddress }
  const startedAt = Date.now()
  // The handshake's deadline: startup and authentication, not the wait for a server that follows
  // (bounded by the pool's checkout timeout, as every wait for a server is).
  let timedOut = false
  let answered = false
  let timer: ReturnType<typeof setTimeout> | undefined = setTimeout(() => {
    timedOut = true
    fiber.interruptUnsafe()
  }, config.handshakeTimeoutMs)
  const login: Login = {
    client,
    log,
    services,
    mode,
    startedAt,
    supervisor,
    ticket,
    authenticated: () => {
      clearTimeout(timer)
      timer = undefined
      ticket.authenticated()
    },
    fail: (error: TidepoolError) => {
      answered = true
      events.error(log.tenant, error.code)
      ticket.over()
      client.refuse(error)
      // Annotated here, not up front: tenant and user are learnt during the handshake. A blocked
      // address's refusals are a flood's: the block itself was logged once when it began.
      const line =
        error.code === "ECLIENTSOCKETCLOSED" ||
        (error.code === "ECIRCUITBREAKER" && error.message.endsWith(ADDRESS_BLOCKED))
          ? Effect.logDebug(error.message)
          : Effect.logWarning(error.message)
      // Data-first, no `pipe`: every refusal runs this.
      return Effect.andThen(
        Effect.annotateCurrentSpan({ "error.code": error.code, "tidepool.tenant": log.tenant ?? "" }),
        Effect.annotateLogs(line, { ...log, code: error.code })
      )
    },
    // Interrupted: by the handshake's deadline (the client is told EAUTHTIMEOUT) or by the shutdown.
    interrupted: Effect.suspend(() => {
      if (answered) return Effect.void
      if (timedOut) return login.fail(tidepoolError("EAUTHTIMEOUT"))
      answered = true
      ticket.over()
      client.refuse(tidepoolError("EADMINSHUTDOWN"))
      return Effect.void
    })
  }

  const ended = () => {
    clearTimeout(timer)
    // A session handed to its relay lives on; anything else ends with its fiber, destroyed once
    // what was written has gone out (a refusal's error and FIN: `ClientSocket.refuse`).
    if (!client.handedOver) {
      client.flush()
      client.socket.destroySoon()
    }
  }

  // The startup packet comes first, so that a client's W3C traceparent can parent the session span.
  return Effect.matchEffect(readStartup(client, services), {
    onFailure: (error) => Effect.suspend(() => login.fail(error)).pipe(inSpan("client.session", ROOT)),
    onSuccess: (startup) => (startup === undefined ? Effect.void : afterStartup(login, startup))
  }).pipe(
    Effect.onExit((exit) => {
      if (Exit.hasInterrupts(exit)) return Effect.ensuring(login.interrupted, Effect.sync(ended))
      ended()
      return Effect.void
    })
  )
}

/** One login's state and services, passed down instead of read from the fiber's context. */
interface Login {
  readonly client: ClientSocket
  readonly log: LogContext
  readonly services: LoginServices
  readonly mode: PoolMode
  readonly startedAt: number
  readonly supervisor: SessionSupervisor
  readonly ticket: LoginTicket
  /** The end of the handshake: its deadline and slot are given up. */
  readonly authenticated: () => void
  /** Tells the client why its login ended, and logs it (once). */
  readonly fail: (error: TidepoolError) => Effect.Effect<void>
  readonly interrupted: Effect.Effect<void>
}

/** From the StartupMessage on: the session span around the handshake, authentication and attach. */
const afterStartup = (login: Login, startup: Readonly<Record<string, string>>) => {
  const parent = clientTraceParent(startup)
  return Effect.flatMap(handshake(login, startup), (auth) => {
    login.authenticated()
    login.client.write(authenticationOk())
    if ("admin" in auth) return adminConsole(login.client, auth.admin, login.supervisor.draining)
    const level = tenantLogLevel(auth.tenant.feature_flags)
    const attached = attach(login, auth, level)
    return level === undefined ? attached : Effect.provideService(attached, References.MinimumLogLevel, level)
  }).pipe(
    Effect.onInterrupt(() => login.interrupted),
    Effect.catch((error) => Effect.suspend(() => login.fail(error))),
    inSpan("client.session", parent === undefined ? ROOT : { parent })
  )
}

/**
 * The startup phase: TLS negotiation (SSLRequest or direct TLS), CancelRequest (handled here; then
 * undefined), and the StartupMessage's parameters. The usual connection sends its StartupMessage
 * first, whole: one read, no generator.
 */
const readStartup = (
  client: ClientSocket,
  services: LoginServices
): Effect.Effect<Readonly<Record<string, string>> | undefined, TidepoolError> =>
  Effect.flatMap(client.readFirst, (first) =>
    first === DIRECT_TLS
      ? Effect.andThen(acceptDirectTls(client, services.downstreamTls), nextStartupPacket(client, services))
      : startupPacket(client, services, first)
  )

const nextStartupPacket = (
  client: ClientSocket,
  services: LoginServices
): Effect.Effect<Readonly<Record<string, string>> | undefined, TidepoolError> =>
  Effect.flatMap(client.readStartup, (packet) => startupPacket(client, services, packet))

const GSS_NO = Buffer.from("N")

const startupPacket = (
  client: ClientSocket,
  services: LoginServices,
  packet: StartupPacket
): Effect.Effect<Readonly<Record<string, string>> | undefined, TidepoolError> => {
  switch (packet._tag) {
    case "SSLRequest":
      return Effect.andThen(answerSslRequest(client, services.downstreamTls), nextStartupPacket(client, services))
    case "GSSENCRequest":
      client.write(GSS_NO)
      return nextStartupPacket(client, services)
    case "CancelRequest":
      return Effect.andThen(
        services.sessions.cancel(packet.processId, packet.secretKey),
        Effect.sync(() => {
          client.socket.destroy()
          return undefined
        })
      )
    case "StartupMessage":
      if (packet.protocolMinor > 0 || packet.protocolOptions.length > 0) {
        client.write(negotiateProtocolVersion(0, packet.protocolOptions))
      }
      return Effect.succeed(packet.parameters)
  }
}

/** Breaker key of logins naming a tenant that does not exist (tenant ids cannot contain NUL). */
const UNKNOWN_TENANTS = "\u0000unknown"

/** Once per block: the refusals that follow are logged at debug level only. */
const logBlocked = (log: LogContext, breakerKey: string) =>
  Effect.logWarning(
    `${log.peer_ip} blocked for ${AUTH_FAILURES.blockMs / 1000} s after ${AUTH_FAILURES.failures} failed logins${breakerKey === UNKNOWN_TENANTS ? " naming tenants that do not exist" : ""}`
  ).pipe(Effect.annotateLogs({ ...log, code: "ECIRCUITBREAKER" }))

/** Who a login is, once its checks before authentication have passed. */
interface Identified {
  readonly tenant: Tenant
  readonly user: User
  readonly identity: ClientIdentity
}

/**
 * A login refused before authentication: `delayed` refusals depend on what exists (answered after
 * the failure delay, reading nothing meanwhile); `tripped` names the breaker key whose block this
 * refusal began (logged once).
 */
class Refusal {
  constructor(
    readonly error: TidepoolError,
    readonly delayed: boolean,
    readonly tripped: string | undefined = undefined
  ) {}
}

/**
 * The checks before authentication, as one synchronous function: identity, tenant, ban, allow
 * list, user, `enforce_ssl`. Nothing in them waits, so they cost no fiber steps; a refusal is a
 * value the caller turns into its delay and error. Its errors are made without stack traces (a
 * refusal's error is sent and logged by its message): a prober's refusals should cost little.
 * Only the errors: an exception here is a bug, and keeps its stack.
 */
const identify = (login: Login, startup: Readonly<Record<string, string>>): Identified | Refusal => {
  const { client, log, services } = login
  const { tenants, events, breaker } = services
  const resolved = resolveIdentity(startup)
  if ("_tag" in resolved) return new Refusal(resolved, false)
  const identity = resolved.tenant !== undefined ? resolved : { ...resolved, tenant: tenantBySni(client, tenants) }
  log.user = identity.user
  if (identity.tenant === undefined) return new Refusal(refusalError("ENOIDENTIFIER"), false)
  log.tenant = identity.tenant
  // Every refusal that depends on what exists is answered after the same delay, so timing tells a
  // prober nothing about which tenants and users exist, and guessing stays slow. Nothing more is
  // read from a refused client: its bytes stay in the kernel (and its sends block) meanwhile.
  const refuse = (error: TidepoolError) => {
    events.loginFailed(identity.tenant, "none", error.code)
    return new Refusal(error, true)
  }
  // A name that does not exist is a guess: it counts toward the address's breaker like a wrong
  // password (unknown tenants under one key per address, so made-up names cannot grow the state).
  const notFound = (breakerKey: string) => {
    if (breaker.addressBlocked(breakerKey, log.peer_ip)) {
      events.loginFailed(identity.tenant, "none", "ECIRCUITBREAKER")
      return new Refusal(refusalError("ECIRCUITBREAKER", ADDRESS_BLOCKED), false)
    }
    const tripped = breaker.addressFailed(breakerKey, log.peer_ip)
    events.loginFailed(identity.tenant, "none", "ENOTFOUND")
    return new Refusal(
      refusalError("ENOTFOUND", identity.user, identity.tenant!),
      true,
      tripped ? breakerKey : undefined
    )
  }
  const tenant = tenants.get(identity.tenant)
  if (tenant === undefined) return notFound(UNKNOWN_TENANTS)
  const ban = withoutStack(() => banOf(tenant))
  if (ban !== undefined) return refuse(ban)
  // Before the user lookup, so an address outside the allow list learns nothing about the users.
  if (!allowed(tenant, log.peer_ip)) return refuse(refusalError("EADDRNOTALLOWED", log.peer_ip))
  const users = matchUsers(tenant, identity.user)
  if (users.length > 1) return refuse(refusalError("EMULTIPLEUSERS", identity.user, identity.tenant!))
  const user = users[0]
  if (user === undefined) return notFound(tenant.external_id)
  if (tenant.enforce_ssl && client.tls === undefined) return refuse(refusalError("ESSLREQUIRED", identity.user))
  return { tenant, user, identity }
}

/** A refusal's answer: after the failure delay for those that depend on what exists. */
const refused = (login: Login, refusal: Refusal): Effect.Effect<never, TidepoolError> => {
  if (!refusal.delayed) return Effect.fail(refusal.error)
  login.client.stopReading()
  const answer = Effect.andThen(Effect.sleep(login.services.config.authFailureDelayMs), Effect.fail(refusal.error))
  return refusal.tripped === undefined ? answer : Effect.andThen(logBlocked(login.log, refusal.tripped), answer)
}

type Handshaken = Authenticated | { readonly admin: Effect.Success<ReturnType<typeof authenticateAdmin>> }

const handshake = (
  login: Login,
  startup: Readonly<Record<string, string>>
): Effect.Effect<
  Handshaken,
  TidepoolError,
  Effect.Services<ReturnType<typeof authenticateClient>> | Effect.Services<ReturnType<typeof authenticateAdmin>>
> => {
  const { client, log, services } = login
  if (isAdminDatabase(startup.database)) {
    log.user = startup.user
    return Effect.map(authenticateAdmin(client, startup, log.peer_ip), (admin) => ({ admin }))
  }
  const identified = identify(login, startup)
  if (identified instanceof Refusal) return refused(login, identified)
  const { tenant, user, identity } = identified
  const tls = client.tls
  const method =
    tenant.use_jit && tls !== undefined ? "cleartext" : tenant.require_user ? "scram-sha-256" : "auth_query"
  return Effect.matchEffect(
    authenticateClient(client, tenant, user, identity.user, log.peer_ip, {
      tls: tls !== undefined,
      channelBinding: tls === undefined ? undefined : channelBindingOf(tls),
      jit: identity.jit
    }),
    {
      onFailure: (error) => {
        services.events.loginFailed(tenant.external_id, method, error.code)
        return Effect.fail(error)
      },
      onSuccess: (credentials) => {
        services.events.loginSucceeded(tenant.external_id, identity.user, method)
        const settings = new Map<string, string>()
        for (const [name, value] of identity.settings) if (FORWARDED_PARAMETERS.has(name)) settings.set(name, value)
        for (const name in startup) {
          const lower = name.toLowerCase()
          if (FORWARDED_PARAMETERS.has(lower)) settings.set(lower, startup[name]!)
        }
        return Effect.succeed({
          tenant,
          user,
          identity,
          credentials,
          database: identity.database ?? tenant.db_database,
          settings
        } satisfies Authenticated)
      }
    }
  )
}

/**
 * Lends a server to a logged-in client. The wait is given up as soon as the client leaves, so a
 * server is not lent to nobody, and is interruptible (shutdown); a server handed over in the same
 * instant as an interruption goes straight back to the pool instead of being lost. Bounded by the
 * pool's checkout timeout (ECHECKOUTTIMEOUT), as every wait for a server is, not by the handshake's.
 */
const lendToClient = (client: ClientSocket, pool: TenantPool, lent: (server: ServerConnection) => void) =>
  Effect.uninterruptibleMask((restore) => {
    let delivered: ServerConnection | undefined
    const checkout = Effect.callback<ServerConnection, TidepoolError>((resume) => {
      let settled = false
      const waiter = pool.checkout((error, server) => {
        settled = true
        delivered = server
        client.forgetGone()
        resume(server !== undefined ? Effect.succeed(server) : Effect.fail(error!))
      })
      if (!settled) {
        // Told it is in while it waits (its AuthenticationOk), as a login that needs no wait is.
        client.flush()
        client.whenGone(() => {
          settled = true
          if (waiter !== undefined) pool.cancel(waiter)
          resume(Effect.fail(tidepoolError("ECLIENTSOCKETCLOSED")))
        })
      }
      return Effect.sync(() => {
        client.forgetGone()
        if (!settled && waiter !== undefined) pool.cancel(waiter)
      })
    })
    return restore(checkout).pipe(
      Effect.onInterrupt(() =>
        Effect.sync(() => {
          if (delivered !== undefined) pool.release(delivered)
        })
      ),
      // Still uninterruptible: from here the server has a keeper.
      Effect.tap((server) => Effect.sync(() => lent(server)))
    )
  })

/** Puts a session-mode server back: reset when its state is known and resettable, closed otherwise. */
const resetAndRelease = (pool: TenantPool, server: ServerConnection) =>
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
    // Run uninterruptibly (a shutdown must not lose the server): the reset opts in, so that the
    // timeout can stop it.
    const exit = yield* reset.pipe(Effect.interruptible, Effect.timeout(5000), Effect.exit)
    if (Exit.isSuccess(exit) && server.isIdle) pool.release(server)
    else pool.discard(server, "reset failed")
  }).pipe(Effect.uninterruptible)

/**
 * Session mode: the client's server for life, given the client's startup settings (a value the
 * server rejects is the client's error, as on a direct connection). Held by the LiveSession from
 * the moment it is lent.
 */
const attachSession = (live: LiveSession, startup: ReadonlyMap<string, string>) =>
  Effect.gen(function* () {
    const server = yield* lendToClient(live.client, live.pool, (server) => {
      live.held = server
    })
    yield* applySettings(server, startup)
    return { settings: undefined, greeting: greetingOf(server.parameters) } satisfies Attached
  })

/**
 * Transaction mode: no server is held between transactions, so connecting needs one only to learn
 * the pool's parameters (first client) or to check startup settings no server of the pool has
 * accepted yet. Everything else comes from the pool's pristine parameters.
 */
const attachTransaction = (
  client: ClientSocket,
  pool: TenantPool,
  startup: ReadonlyMap<string, string>
): Effect.Effect<Attached, TidepoolError> => {
  let unchecked = pool.parameters === undefined
  for (const [name, value] of startup) if (!pool.knownSettings.has(`${name}=${value}`)) unchecked = true
  // The usual login: the pool knows its parameters and has seen these settings. No Effect step.
  if (!unchecked) return Effect.succeed(transactionSettings(pool, startup))
  let lent: ServerConnection | undefined
  return lendToClient(client, pool, (server) => {
    lent = server
  }).pipe(
    Effect.flatMap((server) => applySettings(server, startup)),
    Effect.onExit(() =>
      Effect.sync(() => {
        if (lent !== undefined) pool.release(lent)
      })
    ),
    Effect.map(() => {
      // Bounded: a pool seeing endless distinct application_names re-checks rather than grows.
      if (pool.knownSettings.size > 1000) pool.knownSettings.clear()
      for (const [name, value] of startup) pool.knownSettings.add(`${name}=${value}`)
      return transactionSettings(pool, startup)
    })
  )
}

/**
 * What a transaction-mode login starts with — its relay's settings and the greeting's ParameterStatus
 * messages — by the pool's parameters (a pool's, kept until the pool forgets them) and the client's
 * startup settings: a pool's clients nearly always log in with the same settings, so these are made
 * once and shared (the settings map is read only: a relay copies it before its client's first change).
 * Bounded per pool's parameters: endless distinct `application_name`s start it over.
 */
const transactionGreetings = new WeakMap<ReadonlyMap<string, string>, Map<string, Attached>>()
const GREETINGS_MAX = 1000
const NO_PARAMETERS: ReadonlyMap<string, string> = new Map()

const transactionSettings = (pool: TenantPool, startup: ReadonlyMap<string, string>): Attached => {
  const pristine = pool.parameters ?? NO_PARAMETERS
  let known = transactionGreetings.get(pristine)
  if (known === undefined) {
    known = new Map()
    transactionGreetings.set(pristine, known)
  }
  let key = ""
  for (const [name, value] of startup) key += `${name}\u0000${value}\u0000`
  let attached = known.get(key)
  if (attached === undefined) {
    const settings = clientSettings(pristine, startup)
    attached = { settings: shareSettings(settings), greeting: greetingOf(reportedParameters(pristine, settings)) }
    if (known.size >= GREETINGS_MAX) known.clear()
    known.set(key, attached)
  }
  return attached
}

/** The ParameterStatus messages of a greeting, as one buffer. */
const greetingOf = (reported: Iterable<readonly [string, string]>): Buffer => {
  const messages: Array<Buffer> = []
  for (const [name, value] of reported) messages.push(parameterStatus(name, value))
  return Buffer.concat(messages)
}

/** What the greeting needs from attaching: the relay's settings (transaction mode) and the ParameterStatus to report. */
interface Attached {
  readonly settings: StartSettings | undefined
  readonly greeting: Buffer
}

/**
 * A logged-in client, from its admission to its pool to its end: what it holds (its place in the
 * pool, its registration, a session-mode server), the registry's handle (cancel, drain, kick, KILL),
 * what the admin console and the idle sweep read, and its relay. Once greeted, it is the session:
 * no fiber waits for it; the relay's end gives everything back (`relayEnded`). One object with
 * methods rather than a handle of closures: an idle client keeps it for its whole life.
 */
export class LiveSession implements SessionHandle, SessionInfo, IdleProbe {
  relay: SessionRelay | TransactionRelay | undefined = undefined
  /** Session mode: the server held for the session's life. */
  held: ServerConnection | undefined = undefined
  /** While registered: its BackendKeyData. */
  key: SessionKey | undefined = undefined
  drainRequested = false
  kicked: TidepoolError | undefined = undefined
  /** Its resources were given back (or are being): it counts for nothing any more. */
  done = false
  readonly address: string
  readonly port: number
  readonly tls: boolean

  constructor(
    readonly client: ClientSocket,
    readonly pool: TenantPool,
    readonly tenant: string,
    readonly user: string,
    readonly applicationName: string,
    /** Epoch ms of the connection's accept. */
    readonly connectedAt: number,
    private readonly sessions: Context.Service.Shape<typeof SessionRegistry>,
    private readonly supervisor: SessionSupervisor,
    /** The tenant's `log_level`, when it has one. */
    private readonly level: LogLevel.LogLevel | undefined
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
    return Effect.sync(() => this.close())
  }
  /** Ends the session now with 57P01 (KILL, or the drain's timeout). */
  close(): void {
    this.kick(tidepoolError("EADMINSHUTDOWN"))
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

  /**
   * Gives back what the session holds: its registration and its place in the pool at once
   * (`leave`), then a session-mode server (reset, or closed). Synchronous unless there is a server
   * to reset. Once only.
   */
  giveBack(): Effect.Effect<void> {
    this.leave()
    const server = this.held
    this.held = undefined
    return server === undefined ? Effect.void : resetAndRelease(this.pool, server)
  }

  /**
   * `giveBack`'s synchronous part: the registration, the place in the pool and (an adopted
   * session) the connection's count; a session-mode server stays held until its reset. Run as soon
   * as the relay ends, in its callback: a client that closed (its FIN answered by Node at once) or
   * heard its error and reconnects must find its place free, not wait for the teardown queue or a
   * session-mode server's reset (a login admitted meanwhile waits for that server in the pool's
   * queue, as for any busy server).
   */
  private leave(): void {
    if (this.done) return
    this.done = true
    const key = this.key
    if (key !== undefined) {
      this.key = undefined
      this.sessions.unregister(key)
    }
    this.leavePool()
    if (this.relay !== undefined) this.supervisor.left(this)
  }

  private leavePool(): void {
    this.pool.leave()
    this.pool.counters.clientLifetime.observe(Date.now() - this.connectedAt)
  }

  /**
   * Greeted: the relay takes the socket, in the same tick (once the handshake reader lets go,
   * unread bytes must reach the relay), and the session goes on without the login's fiber.
   */
  start(settings: StartSettings | undefined, options: RelayOptions, ticket: LoginTicket): void {
    const { readAhead, reads } = this.client.takeOver()
    const r =
      settings === undefined
        ? new SessionRelay(this.client.socket, this.held!, options.maxMessageSize, this.pool.counters, this.onRelayEnd)
        : new TransactionRelay(
            this.client.socket,
            this.pool,
            options.maxMessageSize,
            settings,
            this.onRelayEnd,
            options
          )
    this.relay = r
    ticket.adopt(this)
    r.start(readAhead, reads)
    if (this.drainRequested) r.drain()
    if (this.kicked !== undefined) r.abort()
  }

  /** How its relay ended, once it has: its teardown is queued (`TEARDOWNS`). */
  private end: RelayEnd | undefined = undefined

  private readonly onRelayEnd = (end: RelayEnd): void => {
    this.end = end
    this.leave()
    queueTeardown(this)
  }

  /** Its turn in the teardown queue. */
  tearDown(): void {
    try {
      this.relayEnded(this.end!)
    } catch (cause) {
      // A bug of ours: logged, and the listener is not left waiting for this session at shutdown.
      this.supervisor.run(Effect.logError("internal error tearing down a client session", Cause.die(cause)))
      this.supervisor.ended(this)
    }
  }

  /**
   * How the relay ended decides the session's error, if any. Its resources are given back before
   * the client hears why it ended (its places already in `onRelayEnd`, a session-mode server by its
   * reset here): a client that reconnects at once after the error must find its slot free
   * (EMAXCONNSESSION on a pool of one otherwise). A clean end with nothing to log and no server to
   * reset costs no fiber.
   */
  private relayEnded(end: RelayEnd): void {
    const error = this.errorOf(end)
    const level = this.level ?? this.supervisor.logLevel
    const debug = LogLevel.isLessThanOrEqualTo(level, "Debug")
    if (error === undefined && this.held === undefined && !debug) {
      this.leave()
      this.client.socket.destroySoon()
      this.supervisor.ended(this)
      return
    }
    const annotations = {
      tenant: this.tenant,
      user: this.user,
      mode: this.pool.settings.mode,
      peer_ip: this.address
    }
    const logged = Effect.logDebug(`relay ended: ${end._tag}`)
    const teardown = (
      end._tag === "Fault"
        ? // A bug of ours: the operator gets the cause and stack, the client only the code.
          Effect.andThen(
            logged,
            Effect.logError("internal error in the relay; the session was closed", Cause.die(end.cause))
          )
        : logged
    ).pipe(
      Effect.andThen(this.giveBack()),
      Effect.andThen(
        Effect.suspend(() => {
          if (error === undefined) {
            this.client.socket.destroySoon()
            return Effect.void
          }
          this.supervisor.events.error(this.tenant, error.code)
          this.client.fail(error)
          return (
            error.code === "ECLIENTSOCKETCLOSED" ? Effect.logDebug(error.message) : Effect.logWarning(error.message)
          ).pipe(Effect.annotateLogs("code", error.code))
        })
      ),
      Effect.annotateLogs(annotations),
      Effect.ensuring(Effect.sync(() => this.supervisor.ended(this)))
    )
    this.supervisor.run(
      this.level === undefined ? teardown : Effect.provideService(teardown, References.MinimumLogLevel, this.level)
    )
  }

  private errorOf(end: RelayEnd): TidepoolError | undefined {
    switch (end._tag) {
      case "ClientError":
        return end.error
      case "ServerClosed":
        return tidepoolError("ESERVERCLOSED", end.reason)
      case "Fault":
        return tidepoolError("EINTERNAL")
      case "Drained":
        return this.kicked ?? tidepoolError("EADMINSHUTDOWN")
      default:
        return undefined
    }
  }
}

/**
 * Sessions whose relay ended, torn down a slice per turn of the event loop: when a thousand
 * clients disconnect at once, their teardowns (registration, pool place, the socket's close, a
 * log line or a server's reset) interleave with the traffic of the sessions still running instead
 * of blocking the loop for all of them in one go (docs/login-path.md, "The disconnect wave").
 */
const TEARDOWNS: Array<LiveSession> = []
let teardownHead = 0
const TEARDOWN_SLICE = 16

const queueTeardown = (session: LiveSession): void => {
  TEARDOWNS.push(session)
  if (TEARDOWNS.length - teardownHead === 1) setImmediate(drainTeardowns)
}

const drainTeardowns = (): void => {
  const stop = Math.min(TEARDOWNS.length, teardownHead + TEARDOWN_SLICE)
  while (teardownHead < stop) {
    const session = TEARDOWNS[teardownHead]!
    TEARDOWNS[teardownHead++] = undefined as unknown as LiveSession
    session.tearDown()
  }
  if (teardownHead < TEARDOWNS.length) {
    setImmediate(drainTeardowns)
    return
  }
  TEARDOWNS.length = 0
  teardownHead = 0
}

interface RelayOptions {
  readonly maxMessageSize: number
  readonly rename: boolean
  readonly cacheSize: number
  readonly maxCount: number
  readonly maxMemory: number
}

/**
 * Attaches an authenticated client to its pool: admits it, lends or checks a server, registers it,
 * greets it and starts its relay. Whatever ends it before the greeting gives back what it took (the
 * caller tells the client why); after the greeting the LiveSession holds it all.
 */
const attach = (login: Login, auth: Authenticated, level: LogLevel.LogLevel | undefined) => {
  const { client, mode, startedAt, supervisor, ticket } = login
  const { config, registry, sessions, upstreamTls, tenants } = login.services
  const { tenant, user, database, credentials } = auth
  const size = userPoolSize(tenant, user)
  return Effect.flatMap(
    registry.get({
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
    }),
    (pool) => {
      const refused = pool.admit()
      if (refused !== undefined) return Effect.fail(refused)
      const live = new LiveSession(
        client,
        pool,
        tenant.external_id,
        auth.identity.user,
        auth.settings.get("application_name") ?? "",
        startedAt,
        sessions,
        supervisor,
        level
      )
      const greet = ({ settings, greeting }: Attached) => {
        live.key = sessions.register(live)
        // A login that ends while the pooler drains was registered too late to be drained: it is
        // told now, as a drained client would be, instead of being greeted and then held until the
        // timeout. Checked after registering, so a drain that starts in between has drained it anyway.
        if (supervisor.draining()) return Effect.fail(tidepoolError("EADMINSHUTDOWN"))
        const revoked = revokedSince(tenants, tenant.external_id, auth.identity.user)
        if (revoked !== undefined) return Effect.fail(revoked)
        client.write(greeting)
        client.write(backendKeyData(live.key.processId, live.key.secretKey))
        client.write(readyForQuery("I"))
        pool.counters.clientConnect.observe(Date.now() - startedAt)
        live.start(
          settings,
          {
            maxMessageSize: config.maxMessageSize,
            rename: tenant.feature_flags.prepared_statements !== false,
            cacheSize: config.preparedCacheSize,
            maxCount: config.maxPreparedStatements,
            maxMemory: config.maxPreparedMemory
          },
          ticket
        )
        return Effect.void
      }
      return Effect.onExit(
        Effect.flatMap(
          mode === "session" ? attachSession(live, auth.settings) : attachTransaction(client, pool, auth.settings),
          greet
        ),
        (exit) => (Exit.isSuccess(exit) ? Effect.void : live.giveBack())
      )
    }
  )
}
