import { once } from "node:events"
import pg from "pg"
import { serialize } from "pg-protocol"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { startupMessage } from "../../src/protocol/index.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"
import { Wire } from "../support/wire.ts"

/*
 * The breaker's password check runs without a scope (docs/login-path.md, "Third round"): the login
 * ends it itself. A check that ends without a verdict — the client left mid-exchange, or the
 * handshake's deadline interrupted it — must stop counting, or ten of them from one address would
 * fill the address's room for checks (the breaker's threshold) and lock its next logins out.
 */

let db: PostgresServer
let tidepool: RunningTidepool

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: "app-secret" }] })
  tidepool = await startTidepool({
    // One tenant per test: the breaker counts per (tenant, address).
    tenants: ["left", "stalled"].map((external_id) => ({
      ...upstreamOf(db),
      external_id,
      users: [{ db_user: "app", db_password: "app-secret" }]
    })),
    config: { handshakeTimeoutMs: 1500 }
  })
})

afterAll(async () => {
  await tidepool?.stop()
  await db?.stop()
})

/** A login from 127.0.0.1 taken as far as the server's SCRAM challenge: its password check is running. */
const midExchange = async (tenant: string) => {
  const wire = await Wire.connect(tidepool.sessionPort)
  wire.socket.write(startupMessage({ user: `app.${tenant}`, database: "postgres" }))
  expect((await wire.next()).body.readInt32BE(0)).toBe(10) // AuthenticationSASL
  wire.socket.write(serialize.sendSASLInitialResponseMessage("SCRAM-SHA-256", "n,,n=,r=abandoned"))
  expect((await wire.next()).body.readInt32BE(0)).toBe(11) // AuthenticationSASLContinue
  return wire
}

/** A whole login with the right password, from the same address: "ok" or the error's code. */
const login = async (tenant: string) => {
  const client = new pg.Client({
    connectionString: tidepool.url({ user: `app.${tenant}`, password: "app-secret" })
  })
  client.on("error", () => undefined)
  try {
    await client.connect()
    await client.query("SELECT 1")
    await client.end()
    return "ok"
  } catch (e) {
    return (e as Error).message.match(/^\((E[A-Z]+)\)/)?.[1] ?? (e as Error).message
  }
}

describe("a password check that ends without a verdict", () => {
  it("stops counting when the client leaves mid-exchange", async () => {
    const wires = await Promise.all(Array.from({ length: 10 }, () => midExchange("left")))
    for (const wire of wires) wire.socket.destroy()
    // With the ten checks still counted, this login would wait for room until its deadline (EAUTHTIMEOUT).
    expect(await login("left")).toBe("ok")
  })

  it("stops counting when the handshake's deadline interrupts it", async () => {
    const wires = await Promise.all(Array.from({ length: 10 }, () => midExchange("stalled")))
    // The pooler closes each stalled login at its deadline.
    await Promise.all(wires.map((wire) => (wire.closed ? undefined : once(wire.socket, "close"))))
    expect(await login("stalled")).toBe("ok")
  })
})
