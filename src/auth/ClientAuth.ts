import { createHash } from "node:crypto"
import { type Context, Effect, Redacted, Result, Tracer } from "effect"
import { AppConfig, type Tenant, type User } from "../config/index.ts"
import { type TidepoolError, tidepoolError } from "../errors/index.ts"
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
import { ADDRESS_BLOCKED, AUTH_FAILURES, type AuthAttempt, CircuitBreaker } from "./CircuitBreaker.ts"
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

const expectPasswordMessage = (channel: AuthChannel) =>
  Effect.flatMap(channel.readMessage, (m) =>
    m.type === PASSWORD_MESSAGE
      ? Effect.succeed(m.body)
      : Effect.fail(
          tidepoolError(
            "EAUTHPROTOCOL",
            `expected a password message, got message type '${String.fromCharCode(m.type)}'`
          )
        )
  )

/**
 * Runs a SCRAM-SHA-256 exchange against `secret`. A wrong proof fails with EWRONGPASSWORD after
 * `failureDelayMs` (slows guessing); malformed messages fail with EAUTHPROTOCOL. Errors go out as an
 * ErrorResponse, never inside server-final (Supavisor #710 broke node-postgres and pgJDBC).
 * Returns the ClientKey recovered from the proof, for SCRAM pass-through upstream.
 * With `channelBinding` (the TLS connection's tls-server-end-point data) SCRAM-SHA-256-PLUS is
 * offered first, so `channel_binding=require` clients can prove there is no man in the middle.
 */
export const authenticateScram = Effect.fnUntraced(function* (
  channel: AuthChannel,
  secret: ScramSecret,
  user: string,
  failureDelayMs: number,
  channelBinding?: Buffer
) {
  // Made only when a proof is wrong: an error captures a stack trace, which every login would pay for.
  const wrongPassword = Effect.andThen(
    Effect.sleep(failureDelayMs),
    Effect.failSync(() => tidepoolError("EWRONGPASSWORD", user))
  )
  const server = new ScramServer(
    secret,
    channelBinding === undefined ? {} : { channelBinding: { type: "tls-server-end-point", data: channelBinding } }
  )
  channel.write(authenticationSASL(server.mechanisms))
  const initial = yield* expectPasswordMessage(channel)
  const nul = initial.indexOf(0)
  if (nul < 0 || initial.length < nul + 5) return yield* tidepoolError("EAUTHPROTOCOL", "malformed SASLInitialResponse")
  const mechanism = initial.toString("utf8", 0, nul)
  const dataLength = initial.readInt32BE(nul + 1)
  const data = dataLength < 0 ? Buffer.alloc(0) : initial.subarray(nul + 5, nul + 5 + dataLength)
  if (!server.mechanisms.includes(mechanism)) {
    return yield* tidepoolError("EAUTHPROTOCOL", `unsupported SASL mechanism ${mechanism}`)
  }
  yield* Effect.annotateCurrentSpan("mechanism", mechanism)
  const first = server.handleClientFirst(mechanism, data)
  if (!("serverFirst" in first)) return yield* tidepoolError("EAUTHPROTOCOL", first.message)
  channel.write(authenticationSASLContinue(first.serverFirst))
  const final = server.handleClientFinal(yield* expectPasswordMessage(channel))
  if (!("serverFinal" in final)) {
    return yield* final.reason === "password" ? wrongPassword : tidepoolError("EAUTHPROTOCOL", final.message)
  }
  channel.write(authenticationSASLFinal(final.serverFinal))
  return final.clientKey
}, inSpan("client.auth.scram"))

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

/**
 * A failed login: counted by the address breaker, answered after the delay that slows guessing,
 * reading nothing from the client meanwhile. The failure that trips the breaker is logged: the
 * refusals that follow are logged at debug level only (a flood would otherwise flood the log too).
 */
const refuser =
  (channel: AuthChannel, attempt: AuthAttempt, delayMs: number, who: Readonly<Record<string, string>>) =>
  (error: TidepoolError) =>
    Effect.gen(function* () {
      if (yield* attempt.failed) {
        yield* Effect.logWarning(
          `${who.peer_ip} blocked for ${AUTH_FAILURES.blockMs / 1000} s after ${AUTH_FAILURES.failures} failed logins`
        ).pipe(Effect.annotateLogs({ ...who, code: "ECIRCUITBREAKER" }))
      }
      channel.stopReading?.()
      yield* Effect.sleep(delayMs)
      return yield* error
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
export const authenticateClient = Effect.fnUntraced(
  function* (
    channel: AuthChannel,
    tenant: Tenant,
    user: User,
    username: string,
    address: string,
    transport: ClientTransport
  ) {
    const channelBinding = transport.channelBinding
    const config = yield* AppConfig
    const breaker = yield* CircuitBreaker
    const authQuery = tenant.require_user ? undefined : yield* AuthQuery
    yield* Effect.annotateCurrentSpan({
      "tidepool.tenant": tenant.external_id,
      "db.user": username,
      method: authQuery === undefined ? "scram-sha-256" : "scram-sha-256 auth_query"
    })
    // No password is judged here: the refusal does not count toward the breaker.
    if (tenant.use_jit && transport.jit && !transport.tls) return yield* tidepoolError("ESSLREQUIRED", username)
    const attempt = yield* breaker.attempt(tenant.external_id, address)
    if (attempt === undefined) return yield* tidepoolError("ECIRCUITBREAKER", ADDRESS_BLOCKED)
    const refuse = refuser(channel, attempt, config.authFailureDelayMs, {
      tenant: tenant.external_id,
      user: username,
      peer_ip: address
    })

    if (tenant.use_jit && transport.tls) {
      return yield* authenticateCleartext(channel, tenant, user, username, address, transport.jit, attempt)
    }

    if (authQuery === undefined) {
      const secret = (yield* SecretCache).forPassword(tenant.external_id, user.db_user, user.db_password)
      const proof = yield* Effect.result(authenticateScram(channel, secret, username, 0, channelBinding))
      if (Result.isFailure(proof)) {
        return yield* proof.failure.code === "EWRONGPASSWORD" ? refuse(proof.failure) : proof.failure
      }
      yield* attempt.succeeded
      return stored(user)
    }

    const found = yield* Effect.result(authQuery.secret(tenant, username))
    if (Result.isFailure(found)) {
      // An unknown role costs an upstream query: it counts like a wrong password.
      const unknown = found.failure.code === "EAUTHQUERY" && found.failure.message === USER_NOT_FOUND
      return yield* unknown ? refuse(found.failure) : found.failure
    }
    const { secret, fresh } = found.success
    const proof = yield* Effect.result(authenticateScram(channel, secret, username, 0, channelBinding))
    if (Result.isFailure(proof)) {
      if (proof.failure.code !== "EWRONGPASSWORD") return yield* proof.failure
      const stale = !fresh && (yield* authQuery.refetch(tenant, username, secret))
      // A stale cache is not the client's failure; the attempt still fails, as the proof was made
      // with the old salt and cannot be checked against the new verifier.
      return yield* stale
        ? Effect.andThen(Effect.sleep(config.authFailureDelayMs), Effect.fail(proof.failure))
        : refuse(proof.failure)
    }
    yield* authQuery.remember(tenant.external_id, username, { clientKey: proof.success, serverKey: secret.serverKey })
    yield* attempt.succeeded
    return passThrough(authQuery, tenant.external_id, username)
  },
  Effect.scoped,
  annotateOutcome,
  inSpan("client.auth")
)

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
  attempt: AuthAttempt
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
