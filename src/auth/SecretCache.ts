import { createHash } from "node:crypto"
import { Context, Effect, Layer, Redacted } from "effect"
import { createScramSecret, type ScramSecret } from "../protocol/index.ts"

/**
 * SCRAM verifiers derived from stored passwords. Deriving one costs 4096 PBKDF2 rounds, so it is
 * done once per (tenant, user, password) with a random salt, and redone when the password changes.
 * A login finds its verifier by the password's `Redacted` object, which lives as long as the cached
 * tenant does: no hashing per login. A reloaded tenant brings new objects; they are matched by the
 * password's digest once, so an unchanged password keeps its verifier (and its salt).
 */
export class SecretCache extends Context.Service<SecretCache>()("tidepool/SecretCache", {
  make: Effect.sync(() => {
    // Keyed by a digest of the password, so the cache notices a change without keeping the plaintext.
    const cache = new Map<string, { readonly digest: string; readonly secret: ScramSecret }>()
    const byObject = new WeakMap<Redacted.Redacted<string>, { readonly key: string; readonly secret: ScramSecret }>()
    return {
      forPassword: (tenant: string, user: string, password: Redacted.Redacted<string>): ScramSecret => {
        const key = `${tenant}\u0000${user}`
        const known = byObject.get(password)
        if (known !== undefined && known.key === key) return known.secret
        const plain = Redacted.value(password)
        const digest = createHash("sha256").update(plain).digest("base64")
        const hit = cache.get(key)
        if (hit !== undefined && hit.digest === digest) {
          byObject.set(password, { key, secret: hit.secret })
          return hit.secret
        }
        const secret = createScramSecret(plain)
        cache.set(key, { digest, secret })
        byObject.set(password, { key, secret })
        return secret
      }
    } as const
  })
}) {
  static readonly layer = Layer.effect(this, this.make)
}
