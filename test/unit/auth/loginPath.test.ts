import { Effect, Redacted } from "effect"
import { describe, expect, it } from "vitest"
import { SecretCache } from "../../../src/auth/index.ts"
import { ScramClient, ScramError, ScramServer } from "../../../src/protocol/index.ts"

/*
 * What the login path caches (docs/login-path.md): verifiers found by the password object, HMAC keys
 * kept per verifier, nonces cut from a pooled random block. Each cache must give what computing
 * afresh would.
 */

const cache = () => Effect.runSync(SecretCache.make)

/** A whole SCRAM exchange against `server`; the server's verdict on the client's proof. */
const exchange = (server: ScramServer, password: string) => {
  const client = new ScramClient({ password })
  const first = server.handleClientFirst("SCRAM-SHA-256", client.clientFirst())
  if (!("serverFirst" in first)) throw new Error(first.message)
  const final = client.handleServerFirst(first.serverFirst)
  if (final instanceof ScramError) throw new Error(final.message)
  const verdict = server.handleClientFinal(final)
  return "serverFinal" in verdict && client.verifyServerFinal(verdict.serverFinal) === true ? "ok" : "refused"
}

describe("login path caches", () => {
  it("a password object finds its verifier; a new object with the same password keeps it; a new password gets a new one", () => {
    const secrets = cache()
    const password = Redacted.make("secret")
    const first = secrets.forPassword("acme", "app", password)
    expect(secrets.forPassword("acme", "app", password)).toBe(first)
    // A reloaded tenant brings new objects: matched by digest, same verifier (same salt).
    expect(secrets.forPassword("acme", "app", Redacted.make("secret"))).toBe(first)
    const changed = secrets.forPassword("acme", "app", Redacted.make("changed"))
    expect(changed).not.toBe(first)
    // Another reload with the changed password keeps the new verifier.
    expect(secrets.forPassword("acme", "app", Redacted.make("changed"))).toBe(changed)
    // The same object under another user is that user's verifier, not the first user's.
    expect(secrets.forPassword("acme", "other", password)).not.toBe(first)
  })

  it("a verifier's cached HMAC keys check every login against it: right passwords pass, wrong ones fail", () => {
    const secret = cache().forPassword("acme", "app", Redacted.make("pencil"))
    const outcomes = ["pencil", "wrong", "pencil", "pencil", "Pencil"].map((password) =>
      exchange(new ScramServer(secret), password)
    )
    expect(outcomes).toEqual(["ok", "refused", "ok", "ok", "refused"])
  })

  it("server nonces stay distinct across refills of the random block", () => {
    const secret = cache().forPassword("acme", "app", Redacted.make("pencil"))
    const nonces = new Set<string>()
    // 600 logins cross the 256-nonce block twice.
    for (let i = 0; i < 600; i++) {
      const first = new ScramServer(secret).handleClientFirst("SCRAM-SHA-256", "n,,n=,r=client")
      if (!("serverFirst" in first)) throw new Error(first.message)
      const nonce = /^r=client([^,]+),/.exec(first.serverFirst)![1]!
      expect(Buffer.from(nonce, "base64")).toHaveLength(18)
      nonces.add(nonce)
    }
    expect(nonces.size).toBe(600)
  })
})
