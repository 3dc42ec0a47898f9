import * as net from "node:net"
import { Effect, Redacted } from "effect"
import pg from "pg"
import { describe, expect, it } from "vitest"
import { connect, type UpstreamTarget, upstreamScramKeys } from "../../src/upstream/index.ts"
import { type PgAuthMethod, startPostgres } from "../support/postgres.ts"
import { startTidepool, upstreamOf } from "../support/tidepool.ts"

// Tidepool logs in to the database with whatever method its pg_hba.conf asks for.
describe("upstream login methods", () => {
  for (const auth of ["scram-sha-256", "md5", "password", "trust"] as const satisfies ReadonlyArray<PgAuthMethod>) {
    it(`logs in upstream with ${auth}`, async () => {
      const db = await startPostgres({ auth, roles: [{ name: "app", password: "upstream-secret" }] })
      const tidepool = await startTidepool({
        tenants: [
          {
            external_id: "acme",
            ...upstreamOf(db),
            users: [{ db_user: "app", db_password: "upstream-secret", pool_size: 1 }]
          }
        ]
      })
      try {
        for (const mode of ["session", "transaction"] as const) {
          const client = new pg.Client({
            connectionString: tidepool.url({ user: "app.acme", password: "upstream-secret", mode })
          })
          await client.connect()
          const { rows } = await client.query("SELECT current_user AS who")
          expect(rows[0].who).toBe("app")
          await client.end()
        }
      } finally {
        await tidepool.stop()
        await db.stop()
      }
    })
  }
})

// A pool opening servers derives its SCRAM keys from the configured password once (PBKDF2, 4096
// iterations: a millisecond or more of the event loop per server otherwise), and again only when
// the salt changes, as it does when the role's password is changed upstream.
describe("upstream SCRAM keys", () => {
  it("are derived once per password and salt, and derived anew when the salt changes", async () => {
    const db = await startPostgres({ auth: "scram-sha-256", roles: [{ name: "app", password: "keys-secret" }] })
    const password = Redacted.make("keys-secret")
    const target: UpstreamTarget = {
      host: db.host,
      port: db.port,
      database: "postgres",
      user: "app",
      password,
      connectTimeoutMs: 5_000
    }
    const login = () =>
      Effect.runPromise(
        Effect.flatMap(connect(target), (server) => Effect.sync(() => server.close("test"))).pipe(
          Effect.as("logged in"),
          Effect.catch((error) => Effect.succeed(error.message))
        )
      )
    try {
      expect(await login()).toBe("logged in")
      const derived = upstreamScramKeys.get(password)
      expect(derived).toBeDefined()
      // The next server's login uses the kept keys: kept keys that are wrong make it fail.
      const wrong = { ...derived!, clientKey: Buffer.alloc(32, 7), serverKey: undefined }
      upstreamScramKeys.set(password, wrong)
      expect(await login()).toMatch(/password authentication failed/)
      upstreamScramKeys.set(password, derived!)
      expect(await login()).toBe("logged in")
      expect(upstreamScramKeys.get(password)).toBe(derived)
      // The same password set again upstream: a new salt, so the kept keys no longer apply.
      await db.query("ALTER ROLE app PASSWORD 'keys-secret'")
      expect(await login()).toBe("logged in")
      const again = upstreamScramKeys.get(password)
      expect(again?.salt.equals(derived!.salt)).toBe(false)
    } finally {
      await db.stop()
    }
  })
})

// Between Tidepool and the database, something that drops the server's SASLFinal (the proof that
// the server knows the password) and passes the rest: the login must fail, not go on unproven.
describe("an upstream that skips the end of SCRAM", () => {
  it("is refused: AuthenticationOk without SASLFinal", async () => {
    const db = await startPostgres({ auth: "scram-sha-256", roles: [{ name: "app", password: "proof-secret" }] })
    const middle = net.createServer((inbound) => {
      const outbound = net.connect(db.port, db.host)
      inbound.pipe(outbound)
      let held = Buffer.alloc(0)
      outbound.on("data", (chunk: Buffer) => {
        held = Buffer.concat([held, chunk])
        const out: Array<Buffer> = []
        while (held.length >= 5 && held.length >= 1 + held.readInt32BE(1)) {
          const end = 1 + held.readInt32BE(1)
          const message = held.subarray(0, end)
          held = held.subarray(end)
          // AuthenticationSASLFinal: 'R', code 12.
          if (!(message[0] === 0x52 && message.readInt32BE(5) === 12)) out.push(message)
        }
        inbound.write(Buffer.concat(out))
      })
      inbound.on("error", () => outbound.destroy())
      outbound.on("error", () => inbound.destroy())
      inbound.on("close", () => outbound.destroy())
      outbound.on("close", () => inbound.destroy())
    })
    await new Promise<void>((resolve) => middle.listen(0, "127.0.0.1", resolve))
    const target: UpstreamTarget = {
      host: "127.0.0.1",
      port: (middle.address() as net.AddressInfo).port,
      database: "postgres",
      user: "app",
      password: Redacted.make("proof-secret"),
      connectTimeoutMs: 5_000
    }
    try {
      const outcome = await Effect.runPromise(
        Effect.flatMap(connect(target), (server) => Effect.sync(() => server.close("test"))).pipe(
          Effect.as("logged in"),
          Effect.catch((error) => Effect.succeed(error.message))
        )
      )
      expect(outcome).toMatch(/without proving it knows the password/)
    } finally {
      await new Promise((resolve) => middle.close(resolve))
      await db.stop()
    }
  })
})
