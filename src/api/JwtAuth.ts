import { createHash } from "node:crypto"
import { Effect, Redacted } from "effect"
import { jwtVerify } from "jose"

export interface JwtPolicy {
  /** Unset: every token is refused (an API without a secret is closed, not open). */
  readonly secret: Redacted.Redacted<string> | undefined
  /** Claims that must be present with exactly these values (JWT_CLAIM_VALIDATORS). */
  readonly claims: Readonly<Record<string, unknown>>
  /** Revoked tokens, as the token itself or its SHA-256 in hex (API_TOKEN_BLOCKLIST). */
  readonly blocklist: ReadonlyArray<string>
}

const ALGORITHMS = ["HS256", "HS384", "HS512"]

const sameJson = (a: unknown, b: unknown) => JSON.stringify(a) === JSON.stringify(b)

/**
 * Whether `authorization` carries a bearer token this policy accepts: HMAC-signed with the secret
 * (HS256/384/512 only, so `none` and public-key algorithms are refused), `exp` present and ahead,
 * every configured claim matching, not blocklisted. Never fails: any problem is `false`, and the
 * caller answers 403 without saying which check failed.
 */
export const verifyBearer = (authorization: string | undefined, policy: JwtPolicy): Effect.Effect<boolean> =>
  Effect.promise(async () => {
    if (policy.secret === undefined || authorization === undefined) return false
    const match = /^Bearer\s+(\S+)\s*$/i.exec(authorization)
    if (match === null) return false
    const token = match[1]!
    if (policy.blocklist.length > 0) {
      const digest = createHash("sha256").update(token).digest("hex")
      if (policy.blocklist.some((entry) => entry === token || entry.toLowerCase() === digest)) return false
    }
    try {
      const { payload } = await jwtVerify(token, new TextEncoder().encode(Redacted.value(policy.secret)), {
        algorithms: ALGORITHMS,
        requiredClaims: ["exp"]
      })
      return Object.entries(policy.claims).every(([claim, value]) => sameJson(payload[claim], value))
    } catch {
      return false
    }
  })
