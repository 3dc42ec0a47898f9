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
  /** How far ahead `exp` may be, in seconds (TIDEPOOL_JWT_MAX_LIFETIME); 0: no bound. */
  readonly maxLifetimeSeconds: number
}

/**
 * What a bearer token gets: in; refused without a word (403); or refused with a reason (401), which
 * only a token passing every other check can get, so the reason tells nothing to anyone who does
 * not hold the secret already.
 */
export type BearerVerdict =
  | { readonly _tag: "Accepted" }
  | { readonly _tag: "Refused" }
  | { readonly _tag: "Unacceptable"; readonly reason: string }

const accepted: BearerVerdict = { _tag: "Accepted" }
const refused: BearerVerdict = { _tag: "Refused" }

const ALGORITHMS = ["HS256", "HS384", "HS512"]

const sameJson = (a: unknown, b: unknown) => JSON.stringify(a) === JSON.stringify(b)

const DAY = 86_400

const days = (seconds: number) => {
  const n = seconds / DAY
  return n < 10 ? `${Number(n.toFixed(2))} days` : `${Math.round(n)} days`
}

/**
 * Checks the bearer token of `authorization` against the policy: HMAC-signed with the secret
 * (HS256/384/512 only, so `none` and public-key algorithms are refused), `exp` present and ahead,
 * every configured claim matching, not blocklisted, and `exp` no further ahead than the policy's
 * lifetime (a token minted for `exp: 1e20` is an eternal one). Never fails.
 */
export const verifyBearer = (authorization: string | undefined, policy: JwtPolicy): Effect.Effect<BearerVerdict> =>
  Effect.promise(async () => {
    if (policy.secret === undefined || authorization === undefined) return refused
    const match = /^Bearer\s+(\S+)\s*$/i.exec(authorization)
    if (match === null) return refused
    const token = match[1]!
    if (policy.blocklist.length > 0) {
      const digest = createHash("sha256").update(token).digest("hex")
      if (policy.blocklist.some((entry) => entry === token || entry.toLowerCase() === digest)) return refused
    }
    let payload: Record<string, unknown>
    try {
      payload = (
        await jwtVerify(token, new TextEncoder().encode(Redacted.value(policy.secret)), {
          algorithms: ALGORITHMS,
          requiredClaims: ["exp"]
        })
      ).payload
    } catch {
      return refused
    }
    if (!Object.entries(policy.claims).every(([claim, value]) => sameJson(payload[claim], value))) return refused
    const ahead = Number(payload.exp) - Date.now() / 1000
    if (policy.maxLifetimeSeconds > 0 && ahead > policy.maxLifetimeSeconds) {
      return {
        _tag: "Unacceptable",
        reason: `token expires too far ahead: exp is ${days(ahead)} from now, and tokens may expire at most ${days(policy.maxLifetimeSeconds)} ahead (TIDEPOOL_JWT_MAX_LIFETIME); mint one that expires sooner`
      }
    }
    return accepted
  })
