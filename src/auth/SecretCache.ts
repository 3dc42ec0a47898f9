import { Effect, Redacted } from "effect"
import { createScramSecret, type ScramSecret } from "../protocol/index.ts"

/**
 * SCRAM verifiers derived from stored passwords. Deriving one costs 4096 PBKDF2 rounds, so it is
 * done once per (tenant, user, password) with a random salt, and redone when the password changes.
 */
export class SecretCache extends Effect.Service<SecretCache>()("tidepool/SecretCache", {
  sync: () => {
    const cache = new Map<string, { readonly password: string; readonly secret: ScramSecret }>()
    return {
      forPassword: (tenant: string, user: string, password: Redacted.Redacted<string>): ScramSecret => {
        const key = `${tenant}\u0000${user}`
        const plain = Redacted.value(password)
        const hit = cache.get(key)
        if (hit !== undefined && hit.password === plain) return hit.secret
        const secret = createScramSecret(plain)
        cache.set(key, { password: plain, secret })
        return secret
      }
    } as const
  }
}) {}
