import { createHash, createHmac, pbkdf2Sync, timingSafeEqual } from "node:crypto"
import { Context, Duration, Effect, Layer, Redacted, Result, Schema } from "effect"
import { FetchHttpClient, HttpClient, HttpClientRequest } from "effect/http"
import * as jose from "jose"
import { AppConfig, type Tenant } from "../config/index.ts"
import { tidepoolError } from "../errors/index.ts"
import { type ScramSecret, saslprep } from "../protocol/index.ts"

/** Whether a value has a JWT's shape (three base64url parts); such tokens can be verified locally. */
export const looksLikeJwt = (value: string): boolean => /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$/.test(value)

/** A personal access token (`sbp_…`) or a JWT: checked by the JIT API, never as a password. */
export const looksLikeToken = (value: string): boolean => value.startsWith("sbp_") || looksLikeJwt(value)

/**
 * Checks a cleartext password against a SCRAM verifier (as auth_query fetches it, so the password is
 * never stored): the keys it yields when it is the one the verifier was made from, for logging in
 * upstream by SCRAM pass-through; undefined otherwise.
 */
export const passwordKeys = (
  password: string,
  secret: ScramSecret
): { readonly clientKey: Buffer; readonly serverKey: Buffer } | undefined => {
  const salted = pbkdf2Sync(saslprep(password), secret.salt, secret.iterations, 32, "sha256")
  const clientKey = createHmac("sha256", salted).update("Client Key").digest()
  const storedKey = createHash("sha256").update(clientKey).digest()
  const matches = storedKey.length === secret.storedKey.length && timingSafeEqual(storedKey, secret.storedKey)
  return matches ? { clientKey, serverKey: secret.serverKey } : undefined
}

const JitAnswer = Schema.Struct({ user_role: Schema.Struct({ role: Schema.String }) })

/**
 * The JIT access API (docs/jit.md): `POST <jit_api_url>` with the token as bearer and
 * `{"rhost", "role"}`; the grant holds only on 200 with `user_role.role` equal to the role. Every
 * connection asks anew (no cache), so revoking a token takes effect at once. A tenant with a JWT
 * verification key (`jit_jwt_secret` or `jit_jwks_url`) has JWT-shaped tokens checked locally first:
 * a bad signature, or an `exp`/`nbf` out of range, is refused without calling the API.
 */
export class JitApi extends Context.Service<JitApi>()("tidepool/JitApi", {
  make: Effect.gen(function* () {
    const config = yield* AppConfig
    const http = yield* HttpClient.HttpClient
    // One remote key set per URL, which jose caches and refreshes itself.
    const keySets = new Map<string, ReturnType<typeof jose.createRemoteJWKSet>>()

    const verifyLocally = (tenant: Tenant, token: string) =>
      Effect.tryPromise({
        try: () => {
          if (tenant.jit_jwt_secret !== undefined) {
            return jose.jwtVerify(token, new TextEncoder().encode(Redacted.value(tenant.jit_jwt_secret)))
          }
          const url = tenant.jit_jwks_url!
          let keys = keySets.get(url)
          if (keys === undefined) {
            keys = jose.createRemoteJWKSet(new URL(url), { timeoutDuration: config.jitTimeoutMs })
            keySets.set(url, keys)
          }
          return jose.jwtVerify(token, keys)
        },
        catch: (e) => e
      })

    const check = Effect.fn("client.auth.jit")(function* (tenant: Tenant, token: string, role: string, rhost: string) {
      const unauthorized = tidepoolError("EJITUNAUTHORIZED", role)
      const failed = tidepoolError("EJITREQUESTFAILED", role)
      const url = tenant.jit_api_url!
      yield* Effect.annotateCurrentSpan({ "tidepool.tenant": tenant.external_id, "db.user": role, "jit.url": url })
      if ((tenant.jit_jwt_secret !== undefined || tenant.jit_jwks_url !== undefined) && looksLikeJwt(token)) {
        const local = yield* Effect.result(verifyLocally(tenant, token))
        if (Result.isFailure(local)) {
          const e = local.failure
          // A key set that cannot be fetched is the provider's failure, not the token's.
          if (e instanceof jose.errors.JWKSTimeout || e instanceof TypeError) return yield* failed
          yield* Effect.annotateCurrentSpan({ "jit.local": "refused" })
          return yield* unauthorized
        }
        yield* Effect.annotateCurrentSpan({ "jit.local": "verified" })
      }
      const request = HttpClientRequest.post(url).pipe(
        HttpClientRequest.bearerToken(token),
        HttpClientRequest.bodyJsonUnsafe({ rhost, role })
      )
      const response = yield* http.execute(request).pipe(
        Effect.timeoutOrElse({ duration: Duration.millis(config.jitTimeoutMs), orElse: () => Effect.fail(failed) }),
        Effect.mapError(() => failed)
      )
      yield* Effect.annotateCurrentSpan({ "http.response.status_code": response.status })
      if (response.status === 401 || response.status === 403) return yield* unauthorized
      if (response.status !== 200) return yield* failed
      const body = yield* response.json.pipe(
        Effect.flatMap(Schema.decodeUnknownEffect(JitAnswer)),
        Effect.timeoutOrElse({ duration: Duration.millis(config.jitTimeoutMs), orElse: () => Effect.fail(failed) }),
        Effect.mapError(() => failed)
      )
      if (body.user_role.role !== role) return yield* unauthorized
    })

    return { check } as const
  })
}) {
  static readonly layer = Layer.effect(this, this.make).pipe(Layer.provide(FetchHttpClient.layer))
}
