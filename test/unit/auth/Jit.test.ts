import { once } from "node:events"
import * as http from "node:http"
import type { AddressInfo } from "node:net"
import { describe, expect, it } from "@effect/vitest"
import { Effect, Layer, Schema } from "effect"
import * as jose from "jose"
import { afterAll, beforeAll } from "vitest"
import { JitApi, looksLikeJwt, passwordKeys } from "../../../src/auth/Jit.ts"
import { AppConfig, Tenant } from "../../../src/config/index.ts"
import { createScramSecret } from "../../../src/protocol/index.ts"

/** A real HTTP server playing the JIT API: answers per token, records what it was asked. */
interface Seen {
  readonly authorization: string | undefined
  readonly body: unknown
}
const seen: Array<Seen> = []
const answers = new Map<string, { status: number; role?: string } | "hang">()
let server: http.Server
let url: string

beforeAll(async () => {
  server = http.createServer(async (req, res) => {
    let raw = ""
    for await (const chunk of req) raw += chunk
    seen.push({ authorization: req.headers.authorization, body: JSON.parse(raw) })
    const token = req.headers.authorization?.replace(/^Bearer /, "") ?? ""
    const answer = answers.get(token) ?? { status: 401 }
    if (answer === "hang") return // never answers
    res.writeHead(answer.status, { "content-type": "application/json" })
    res.end(JSON.stringify(answer.role === undefined ? { error: "no" } : { user_role: { role: answer.role } }))
  })
  server.listen(0, "127.0.0.1")
  await once(server, "listening")
  url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/jit`
})
afterAll(() => {
  server.closeAllConnections()
  server.close()
})

const SECRET = "jit-test-secret-of-32-bytes-long!"

const tenant = (extra: Record<string, unknown> = {}) =>
  Schema.decodeUnknownSync(Tenant)({
    external_id: "acme",
    db_host: "127.0.0.1",
    db_port: 5432,
    db_database: "postgres",
    use_jit: true,
    jit_api_url: url,
    users: [{ db_user: "app", db_password: "x" }],
    ...extra
  })

const layer = JitApi.layer.pipe(Layer.provide(AppConfig.layerFrom({ jitTimeoutMs: 300 })))

const check = (token: string, role = "app", t = tenant()) =>
  Effect.flatMap(JitApi, (api) => api.check(t, token, role, "10.1.2.3")).pipe(Effect.provide(layer))

const codeOf = (token: string, role?: string, t?: Tenant) =>
  check(token, role, t).pipe(
    Effect.as("ok"),
    Effect.catch((e) => Effect.succeed(e.code))
  )

describe("JIT API", () => {
  it.live("accepts a token the API grants for the role, sending the bearer and {rhost, role}", () =>
    Effect.gen(function* () {
      answers.set("sbp_good", { status: 200, role: "app" })
      seen.length = 0
      expect(yield* codeOf("sbp_good")).toBe("ok")
      expect(seen).toEqual([{ authorization: "Bearer sbp_good", body: { rhost: "10.1.2.3", role: "app" } }])
    })
  )

  it.live("401, 403 and a grant for another role are EJITUNAUTHORIZED", () =>
    Effect.gen(function* () {
      answers.set("sbp_401", { status: 401 })
      answers.set("sbp_403", { status: 403 })
      answers.set("sbp_other", { status: 200, role: "admin" })
      expect(yield* codeOf("sbp_401")).toBe("EJITUNAUTHORIZED")
      expect(yield* codeOf("sbp_403")).toBe("EJITUNAUTHORIZED")
      expect(yield* codeOf("sbp_other")).toBe("EJITUNAUTHORIZED")
    })
  )

  it.live("a 500, a malformed answer, silence past the timeout, and no API at all are EJITREQUESTFAILED", () =>
    Effect.gen(function* () {
      answers.set("sbp_500", { status: 500 })
      answers.set("sbp_weird", { status: 200 })
      answers.set("sbp_hang", "hang")
      expect(yield* codeOf("sbp_500")).toBe("EJITREQUESTFAILED")
      expect(yield* codeOf("sbp_weird")).toBe("EJITREQUESTFAILED")
      expect(yield* codeOf("sbp_hang")).toBe("EJITREQUESTFAILED")
      expect(yield* codeOf("sbp_500", "app", tenant({ jit_api_url: "http://127.0.0.1:1/jit" }))).toBe(
        "EJITREQUESTFAILED"
      )
    })
  )

  it.live("with a JWT key, JWT-shaped tokens are verified locally first", () =>
    Effect.gen(function* () {
      const key = new TextEncoder().encode(SECRET)
      const sign = (exp: number) =>
        Effect.promise(() =>
          new jose.SignJWT({ role: "app" }).setProtectedHeader({ alg: "HS256" }).setExpirationTime(exp).sign(key)
        )
      const now = Math.floor(Date.now() / 1000)
      const good = yield* sign(now + 600)
      const expired = yield* sign(now - 600)
      const forged = yield* Effect.promise(() =>
        new jose.SignJWT({})
          .setProtectedHeader({ alg: "HS256" })
          .setExpirationTime(now + 600)
          .sign(new TextEncoder().encode("another key of enough length!!"))
      )
      answers.set(good, { status: 200, role: "app" })
      answers.set(expired, { status: 200, role: "app" })
      answers.set(forged, { status: 200, role: "app" })
      const t = tenant({ jit_jwt_secret: SECRET })
      seen.length = 0
      expect(yield* codeOf(expired, "app", t)).toBe("EJITUNAUTHORIZED")
      expect(yield* codeOf(forged, "app", t)).toBe("EJITUNAUTHORIZED")
      expect(seen).toEqual([]) // refused without asking the API
      expect(yield* codeOf(good, "app", t)).toBe("ok")
      expect(seen.length).toBe(1)
      // Without a key, the API alone decides.
      expect(yield* codeOf(expired)).toBe("ok")
    })
  )
})

describe("JIT with a JWKS", () => {
  it.live("verifies JWT-shaped tokens against the tenant's JWKS before asking the API", () =>
    Effect.gen(function* () {
      const { publicKey, privateKey } = yield* Effect.promise(() => jose.generateKeyPair("RS256"))
      const jwk = { ...(yield* Effect.promise(() => jose.exportJWK(publicKey))), kid: "k1", alg: "RS256", use: "sig" }
      const jwks = http.createServer((_req, res) => {
        res.writeHead(200, { "content-type": "application/json" })
        res.end(JSON.stringify({ keys: [jwk] }))
      })
      jwks.listen(0, "127.0.0.1")
      yield* Effect.promise(() => once(jwks, "listening"))
      const t = tenant({ jit_jwks_url: `http://127.0.0.1:${(jwks.address() as AddressInfo).port}/jwks.json` })
      const sign = (key: Parameters<jose.SignJWT["sign"]>[0], alg: string, exp: number) =>
        Effect.promise(() =>
          new jose.SignJWT({}).setProtectedHeader({ alg, kid: "k1" }).setExpirationTime(exp).sign(key)
        )
      const now = Math.floor(Date.now() / 1000)
      const good = yield* sign(privateKey, "RS256", now + 600)
      const expired = yield* sign(privateKey, "RS256", now - 600)
      const other = yield* Effect.promise(() => jose.generateKeyPair("RS256"))
      const forged = yield* sign(other.privateKey, "RS256", now + 600)
      for (const token of [good, expired, forged]) answers.set(token, { status: 200, role: "app" })
      seen.length = 0
      expect(yield* codeOf(expired, "app", t)).toBe("EJITUNAUTHORIZED")
      expect(yield* codeOf(forged, "app", t)).toBe("EJITUNAUTHORIZED")
      expect(seen).toEqual([])
      expect(yield* codeOf(good, "app", t)).toBe("ok")
      expect(seen.length).toBe(1)
      // A JWKS that cannot be reached is the provider's failure, not the token's.
      jwks.closeAllConnections()
      jwks.close()
      const unreachable = tenant({ jit_jwks_url: "http://127.0.0.1:1/jwks.json" })
      expect(yield* codeOf(good, "app", unreachable)).toBe("EJITREQUESTFAILED")
    })
  )
})

describe("JIT helpers", () => {
  it("tells JWT-shaped tokens from others", () => {
    expect(looksLikeJwt("eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoiYXBwIn0.c2ln")).toBe(true)
    expect(looksLikeJwt("sbp_0123456789abcdef")).toBe(false)
    expect(looksLikeJwt("a.b")).toBe(false)
  })

  it("checks a cleartext password against a SCRAM verifier", () => {
    const secret = createScramSecret("correct horse")
    expect(passwordKeys("correct horse", secret)?.serverKey).toEqual(secret.serverKey)
    expect(passwordKeys("correct hors", secret)).toBeUndefined()
  })
})
