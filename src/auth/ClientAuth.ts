import { createHash } from "node:crypto"
import { Context, Effect, Exit, Redacted, Result, Tracer } from "effect"
import { AppConfig, type Tenant, type User } from "../config/index.ts"
import { type ErrorArgs, type ErrorCode, type TidepoolError, tidepoolError } from "../errors/index.ts"
import {
  authenticationCleartextPassword,
  authenticationSASL,
  authenticationSASLContinue,
  authenticationSASLFinal,
  Frontend,
  type ScramSecret,
  ScramServer
} from "../protocol/index.ts"
import type { UpstreamTarget } from "../upstream/index.ts"
import { AuthQuery, USER_NOT_FOUND } from "./AuthQuery.ts"
import { ADDRESS_BLOCKED, AUTH_FAILURES, type Check, CircuitBreaker } from "./CircuitBreaker.ts"
import { JitApi, looksLikeToken, passwordKeys } from "./Jit.ts"
import { SecretCache } from "./SecretCache.ts"

/** What authentication needs from the client connection: framed reads and writes. */
export interface AuthChannel {
  readonly readMessage: Effect.Effect<{ readonly type: number; readonly body: Buffer }, TidepoolError>
  readonly write: (data: Buffer) => void
  /** The login is refused: read nothing more from the client (its refusal comes after a delay). */
  readonly stopReading?: () => void
}

const PASSWORD_MESSAGE = Frontend.Password

/**
 * Runs `self` in a span named `name`, as `Effect.fn(name)` does, without the stack trace
 * `Effect.fn` and `Effect.withSpan` capture on every call (an Error each, and a stack-frame
 * context patch): every login pays for them, and the span's name already says where it comes from.
 */
export const inSpan =
  (name: string, options: Tracer.SpanOptions = {}) =>
  <A, E, R>(self: Effect.Effect<A, E, R>): Effect.Effect<A, E, R> =>
    Effect.useSpan(name, options, (span) => Effect.provideService(self, Tracer.ParentSpan, span))

const notPassword = (type: number) =>
  tidepoolError("EAUTHPROTOCOL", `expected a password message, got message type '${String.fromCharCode(type)}'`)

/**
 * A client-visible error made without a stack trace: V8 captures one for every `Error` (some
 * microseconds each), and a refusal's error is a value sent to the client and logged by its
 * message, never by its stack.
 */
export const withoutStack = <A>(make: () => A): A => {
  const limit = Error.stackTraceLimit
  Error.stackTraceLimit = 0
  try {
    return make()
  } finally {
    Error.stackTraceLimit = limit
  }
}

/**
 * A refusal's error, made once per distinct (code, arguments) and shared: a guessing client gets
 * the same wrong-password or unknown-name error again and again, and making one (a `TidepoolError`,
 * its message formatted from the catalog) was 2–3 % of a refusal's CPU. Errors are values nobody
 * changes once made; they are sent and logged by code and message. Bounded (cleared when full),
 * so made-up names cannot grow it.
 */
const refusals = new Map<string, TidepoolError>()
const REFUSALS_MAX = 1000
const REFUSAL_KEY_MAX = 256

export const refusalError = <C extends ErrorCode>(code: C, ...args: ErrorArgs<C>): TidepoolError => {
  const key = args.length === 0 ? code : `${code}\u0000${args.join("\u0000")}`
  // A long name (a startup packet allows kilobytes) is made each time: a thousand of them kept would be megabytes.
  if (key.length > REFUSAL_KEY_MAX) return withoutStack(() => tidepoolError(code, ...args))
  let error = refusals.get(key)
  if (error === undefined) {
    error = withoutStack(() => tidepoolError(code, ...args))
    if (refusals.size >= REFUSALS_MAX) refusals.clear()
    refusals.set(key, error)
  }
  return error
}

/**
 * AuthenticationSASL for each list of mechanisms a `ScramServer` offers (two lists, shared by every
 * exchange): rendered once, not per login. The buffer is only ever written, never changed.
 */
const saslRequests = new Map<ReadonlyArray<string>, Buffer>()
const saslRequest = (mechanisms: ReadonlyArray<string>): Buffer => {
  let request = saslRequests.get(mechanisms)
  if (request === undefined) {
    request = authenticationSASL(mechanisms)
    // Bounded: a list made elsewhere than ScramServer's two would otherwise grow the map.
    if (saslRequests.size < 8) saslRequests.set(mechanisms, request)
  }
  return request
}

/**
 * Runs a SCRAM-SHA-256 exchange against `secret`. A wrong proof fails with EWRONGPASSWORD after
 * `failureDelayMs` (slows guessing); malformed messages fail with EAUTHPROTOCOL. Errors go out as an
 * ErrorResponse, never inside server-final (Supavisor #710 broke node-postgres and pgJDBC).
 * Returns the ClientKey recovered from the proof, for SCRAM pass-through upstream.
 * With `channelBinding` (the TLS connection's tls-server-end-point data) SCRAM-SHA-256-PLUS is
 * offered first, so `channel_binding=require` clients can prove there is no man in the middle.
 *
 * Two reads chained by `flatMap`, no generator: every login runs it, and each step of a
 * generator-based Effect is a turn of the fiber's loop. Nothing inside logs or opens a span, so
 * the `client.auth.scram` span is not made the current parent (a context patch saved).
 */
export const authenticateScram = (
  channel: AuthChannel,
  secret: ScramSecret,
  user: string,
  failureDelayMs: number,
  channelBinding?: Buffer
): Effect.Effect<Buffer, TidepoolError> =>
  Effect.useSpan("client.auth.scram", (span) => {
    const server = new ScramServer(
      secret,
      channelBinding === undefined ? {} : { channelBinding: { type: "tls-server-end-point", data: channelBinding } }
    )
    channel.write(saslRequest(server.mechanisms))
    return Effect.flatMap(channel.readMessage, (m) => {
      if (m.type !== PASSWORD_MESSAGE) return Effect.fail(notPassword(m.type))
      const initial = m.body
      const nul = initial.indexOf(0)
      if (nul < 0 || initial.length < nul + 5) {
        return Effect.fail(tidepoolError("EAUTHPROTOCOL", "malformed SASLInitialResponse"))
      }
      const mechanism = initial.toString("utf8", 0, nul)
      const dataLength = initial.readInt32BE(nul + 1)
      const data = dataLength < 0 ? Buffer.alloc(0) : initial.subarray(nul + 5, nul + 5 + dataLength)
      if (!server.mechanisms.includes(mechanism)) {
        return Effect.fail(tidepoolError("EAUTHPROTOCOL", `unsupported SASL mechanism ${mechanism}`))
      }
      span.attribute("mechanism", mechanism)
      const first = server.handleClientFirst(mechanism, data)
      if (!("serverFirst" in first)) return Effect.fail(tidepoolError("EAUTHPROTOCOL", first.message))
      channel.write(authenticationSASLContinue(first.serverFirst))
      return Effect.flatMap(channel.readMessage, (m) => {
        if (m.type !== PASSWORD_MESSAGE) return Effect.fail(notPassword(m.type))
        const final = server.handleClientFinal(m.body)
        if (!("serverFinal" in final)) {
          if (final.reason !== "password") return Effect.fail(tidepoolError("EAUTHPROTOCOL", final.message))
          const wrong = refusalError("EWRONGPASSWORD", user)
          return failureDelayMs > 0
            ? Effect.andThen(Effect.sleep(failureDelayMs), Effect.fail(wrong))
            : Effect.fail(wrong)
        }
        channel.write(authenticationSASLFinal(final.serverFinal))
        return Effect.succeed(final.clientKey)
      })
    })
  })

export { ADDRESS_BLOCKED } from "./CircuitBreaker.ts"

/**
 * The configured users a client username matches. `require_user: false` tenants have one user, the
 * manager, and every username maps to it for limits (the secret comes from auth_query). Otherwise the
 * username is matched against `db_user_alias` (which defaults to `db_user`). The tenant schema
 * rejects duplicate aliases, so more than one match means the tenant skipped validation.
 */
export const matchUsers = (tenant: Tenant, username: string): ReadonlyArray<User> =>
  tenant.require_user ? tenant.users.filter((u) => u.db_user_alias === username) : tenant.users.slice(0, 1)

/** docs/architecture.md#telemetry: the `client.auth` span says how the login ended, and a failure's catalogued code. */
export const annotateOutcome = <A, R>(self: Effect.Effect<A, TidepoolError, R>) =>
  self.pipe(
    Effect.tap(() => Effect.annotateCurrentSpan("tidepool.outcome", "ok")),
    Effect.tapError((error) => Effect.annotateCurrentSpan({ "tidepool.outcome": "fail", "error.code": error.code }))
  )

/** Who a client's pool logs in upstream as, once the client is authenticated. */
export interface ClientCredentials {
  /** The user part of the pool key: one pool per distinct upstream identity. */
  readonly poolUser: string
  readonly upstream: Pick<UpstreamTarget, "user" | "password" | "scramKeys">
  /** JIT token logins: the upstream hop is encrypted whenever the client's is (as in Supavisor). */
  readonly followClientTls?: boolean
}

/** How the client reached us, for the choice of method (docs/jit.md). */
export interface ClientTransport {
  /** The client is on TLS. */
  readonly tls: boolean
  /** The TLS connection's tls-server-end-point data, offering SCRAM-SHA-256-PLUS. */
  readonly channelBinding: Buffer | undefined
  /** The client asked for JIT access (`options=--jit=true`). */
  readonly jit: boolean
}

const expectPasswordMessage = (channel: AuthChannel) =>
  Effect.flatMap(channel.readMessage, (m) =>
    m.type === PASSWORD_MESSAGE ? Effect.succeed(m.body) : Effect.fail(notPassword(m.type))
  )

/**
 * A failed login: counted by the address breaker, answered after the delay that slows guessing,
 * reading nothing from the client meanwhile. The failure that trips the breaker is logged: the
 * refusals that follow are logged at debug level only (a flood would otherwise flood the log too).
 */
const refuser =
  (channel: AuthChannel, check: Check, delayMs: number, who: Readonly<Record<string, string>>) =>
  (error: TidepoolError): Effect.Effect<never, TidepoolError> =>
    Effect.suspend(() => {
      const tripped = check.end("failed")
      channel.stopReading?.()
      const refused = Effect.andThen(Effect.sleep(delayMs), Effect.fail(error))
      return tripped
        ? Effect.andThen(
            Effect.logWarning(
              `${who.peer_ip} blocked for ${AUTH_FAILURES.blockMs / 1000} s after ${AUTH_FAILURES.failures} failed logins`
            ).pipe(Effect.annotateLogs({ ...who, code: "ECIRCUITBREAKER" })),
            refused
          )
        : refused
    })

/** A configured user's pools log in with its stored password. */
const stored = (user: User): ClientCredentials => ({
  poolUser: user.db_user_alias,
  upstream: { user: user.db_user, password: user.db_password }
})

/** An auth_query user's pools log in with the keys of its latest verified login (SCRAM pass-through). */
const passThrough = (
  authQuery: Context.Service.Shape<typeof AuthQuery>,
  tenant: string,
  username: string
): ClientCredentials => ({
  poolUser: username,
  upstream: { user: username, password: undefined, scramKeys: () => authQuery.keysOf(tenant, username) }
})

/**
 * Authenticates a client of `tenant` with SCRAM-SHA-256, under the authentication breaker of
 * (tenant, client address), which counts the attempt from its start (at most its threshold of
 * checks run at once per address; more wait their turn). Configured users are checked against a verifier derived from their
 * stored password; auth_query users against the verifier fetched from the database, whose recovered
 * ClientKey then logs their pools in upstream (SCRAM pass-through). A wrong password with a cached
 * auth_query secret re-fetches it first: a changed secret means the cache was stale, not the client
 * wrong, and the next attempt uses the new one.
 */
export const authenticateClient = (
  channel: AuthChannel,
  tenant: Tenant,
  user: User,
  username: string,
  address: string,
  transport: ClientTransport
): Effect.Effect<ClientCredentials, TidepoolError, AppConfig | CircuitBreaker | SecretCache | AuthQuery | JitApi> =>
  Effect.useSpan(
    "client.auth",
    {
      attributes: {
        "tidepool.tenant": tenant.external_id,
        "db.user": username,
        method: tenant.require_user ? "scram-sha-256" : "scram-sha-256 auth_query"
      }
    },
    (span) =>
      Effect.provideService(
        Effect.withFiber((fiber) => {
          // No password is judged here: the refusal does not count toward the breaker.
          if (tenant.use_jit && transport.jit && !transport.tls) {
            return Effect.fail(tidepoolError("ESSLREQUIRED", username))
          }
          const services = fiber.context as Context.Context<AppConfig | CircuitBreaker>
          const breaker = Context.getUnsafe(services, CircuitBreaker)
          const delayMs = Context.getUnsafe(services, AppConfig).authFailureDelayMs
          const judged = (check: Check) => {
            const refuse = refuser(channel, check, delayMs, {
              tenant: tenant.external_id,
              user: username,
              peer_ip: address
            })
            if (tenant.use_jit && transport.tls) {
              return authenticateCleartext(channel, tenant, user, username, address, transport.jit, check)
            }
            if (!tenant.require_user)
              return authQueryLogin(channel, tenant, username, transport, check, refuse, delayMs)
            const secret = Context.getUnsafe(fiber.context as Context.Context<SecretCache>, SecretCache).forPassword(
              tenant.external_id,
              user.db_user,
              user.db_password
            )
            return Effect.matchEffect(authenticateScram(channel, secret, username, 0, transport.channelBinding), {
              onFailure: (error) => (error.code === "EWRONGPASSWORD" ? refuse(error) : Effect.fail(error)),
              onSuccess: () => {
                check.end("succeeded")
                return Effect.succeed(stored(user))
              }
            })
          }
          // The check is taken and its end made certain in one uninterruptible step; only the wait for
          // room and the exchange itself can be interrupted. A check that ends without a verdict (the
          // client left, broke the protocol, the upstream failed) stops counting.
          return Effect.uninterruptibleMask((restore) => {
            const begin: Effect.Effect<ClientCredentials, TidepoolError, AppConfig | SecretCache | AuthQuery | JitApi> =
              Effect.suspend(() => {
                const began = breaker.tryBegin(tenant.external_id, address)
                if (began === "blocked") return Effect.fail(refusalError("ECIRCUITBREAKER", ADDRESS_BLOCKED))
                if (began === "full")
                  return Effect.andThen(restore(breaker.waitForRoom(tenant.external_id, address)), begin)
                return Effect.onExit(restore(judged(began)), () => Effect.sync(() => began.end("abandoned")))
              })
            return begin
          })
        }).pipe(Effect.onExit((exit) => outcome(span, exit))),
        Tracer.ParentSpan,
        span
      )
  )

/** docs/architecture.md#telemetry: the `client.auth` span says how the login ended, and a failure's catalogued code. */
const outcome = (span: Tracer.Span, exit: Exit.Exit<unknown, TidepoolError>): Effect.Effect<void> => {
  if (Exit.isSuccess(exit)) span.attribute("tidepool.outcome", "ok")
  else {
    for (const reason of exit.cause.reasons) {
      if (reason._tag === "Fail") {
        span.attribute("tidepool.outcome", "fail")
        span.attribute("error.code", reason.error.code)
        break
      }
    }
  }
  return Effect.void
}

/**
 * auth_query users: checked against the verifier fetched from the database, whose recovered
 * ClientKey then logs their pools in upstream (SCRAM pass-through).
 */
const authQueryLogin = Effect.fnUntraced(function* (
  channel: AuthChannel,
  tenant: Tenant,
  username: string,
  transport: ClientTransport,
  check: Check,
  refuse: (error: TidepoolError) => Effect.Effect<never, TidepoolError>,
  delayMs: number
) {
  const authQuery = yield* AuthQuery
  const found = yield* Effect.result(authQuery.secret(tenant, username))
  if (Result.isFailure(found)) {
    // An unknown role costs an upstream query: it counts like a wrong password.
    const unknown = found.failure.code === "EAUTHQUERY" && found.failure.message === USER_NOT_FOUND
    return yield* unknown ? refuse(found.failure) : found.failure
  }
  const { secret, fresh } = found.success
  const proof = yield* Effect.result(authenticateScram(channel, secret, username, 0, transport.channelBinding))
  if (Result.isFailure(proof)) {
    if (proof.failure.code !== "EWRONGPASSWORD") return yield* proof.failure
    const stale = !fresh && (yield* authQuery.refetch(tenant, username, secret))
    // A stale cache is not the client's failure; the attempt still fails, as the proof was made
    // with the old salt and cannot be checked against the new verifier.
    return yield* stale ? Effect.andThen(Effect.sleep(delayMs), Effect.fail(proof.failure)) : refuse(proof.failure)
  }
  yield* authQuery.remember(tenant.external_id, username, { clientKey: proof.success, serverKey: secret.serverKey })
  check.end("succeeded")
  return passThrough(authQuery, tenant.external_id, username)
})

/**
 * JIT tenants, TLS clients (docs/jit.md): a cleartext password, accepted when it is the role's
 * password (checked against its SCRAM verifier, never stored) or a token the tenant's JIT API grants
 * for the role (asked on every login, so a revoked token stops working at once). Token-shaped values
 * (a personal access token `sbp_…` or a JWT), and every value of a client that asked for JIT, are
 * only ever tokens — a role whose database password happens to equal a token (PAM set-ups) still
 * goes through the API, so revocation holds; other values are only ever passwords. A token logs the
 * client's pools in upstream with the token itself, the database checking it again (e.g. PAM); each
 * token gets its own pools, so one person's token never serves another's connection.
 */
const authenticateCleartext = Effect.fnUntraced(function* (
  channel: AuthChannel,
  tenant: Tenant,
  user: User,
  username: string,
  address: string,
  jitRequested: boolean,
  attempt: Check
) {
  const config = yield* AppConfig
  const jit = yield* JitApi
  const authQuery = tenant.require_user ? undefined : yield* AuthQuery
  const role = authQuery === undefined ? user.db_user : username
  const refuse = refuser(channel, attempt, config.authFailureDelayMs, {
    tenant: tenant.external_id,
    user: username,
    peer_ip: address
  })
  channel.write(authenticationCleartextPassword())
  const message = yield* expectPasswordMessage(channel)
  const nul = message.indexOf(0)
  const value = message.toString("utf8", 0, nul < 0 ? message.length : nul)
  if (value === "") return yield* refuse(tidepoolError("EJITUNAUTHORIZED", role))

  // A token-shaped value, or any value of a client that asked for JIT, is a token; anything else is
  // only ever the role's password (a mistyped password is never sent to the API).
  if (!jitRequested && !looksLikeToken(value)) {
    if (authQuery === undefined) {
      const secret = (yield* SecretCache).forPassword(tenant.external_id, user.db_user, user.db_password)
      if (passwordKeys(value, secret) !== undefined) {
        yield* attempt.succeeded
        return stored(user)
      }
    } else {
      const found = yield* Effect.result(authQuery.secret(tenant, username))
      const keys = Result.isSuccess(found) ? passwordKeys(value, found.success.secret) : undefined
      if (keys !== undefined) {
        yield* authQuery.remember(tenant.external_id, username, keys)
        yield* attempt.succeeded
        return passThrough(authQuery, tenant.external_id, username)
      }
    }
    return yield* refuse(tidepoolError("EJITUNAUTHORIZED", role))
  }

  yield* Effect.annotateCurrentSpan({ method: "jit" })
  const granted = yield* Effect.result(jit.check(tenant, value, role, address))
  if (Result.isFailure(granted)) {
    return yield* granted.failure.code === "EJITUNAUTHORIZED" ? refuse(granted.failure) : granted.failure
  }
  yield* attempt.succeeded
  const digest = createHash("sha256").update(value).digest("base64url").slice(0, 22)
  return {
    poolUser: `${authQuery === undefined ? user.db_user_alias : username}\u0000jit\u0000${digest}`,
    upstream: { user: role, password: Redacted.make(value) },
    followClientTls: true
  } satisfies ClientCredentials
}, inSpan("client.auth.cleartext"))
