import { createHash } from "node:crypto"
import { Context, Effect, Layer, Redacted } from "effect"
import { createScramSecret, type ScramSecret } from "../protocol/index.ts"

/**
 * SCRAM verifiers derived from stored passwords. Deriving one costs 4096 PBKDF2 rounds, so it is
 * done once per (tenant, user, password) with a random salt, and redone when the password changes.
 */
export class SecretCache extends Context.Service<SecretCache>()("tidepool/SecretCache", {
  make: Effect.sync(() => {
    // Keyed by a digest of the password, so the cache notices a change without keeping the plaintext.
    const cache = new Map<string, { readonly digest: string; readonly secret: ScramSecret }>()
    return {
      forPassword: (tenant: string, user: string, password: Redacted.Redacted<string>): ScramSecret => {
        const key = `${tenant}\u0000${user}`
        const plain = Redacted.value(password)
        const digest = createHash("sha256").update(plain).digest("base64")
        const hit = cache.get(key)
        if (hit !== undefined && hit.digest === digest) return hit.secret
        const secret = createScramSecret(plain)
        cache.set(key, { digest, secret })
        return secret
      }
    } as const
  })
}) {
  static readonly layer = Layer.effect(this, this.make)
}
