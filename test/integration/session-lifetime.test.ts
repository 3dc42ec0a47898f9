import { Effect } from "effect"
import pg from "pg"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { tidepoolError } from "../../src/errors/index.ts"
import { Listeners } from "../../src/listener/index.ts"
import { PoolRegistry } from "../../src/pool/index.ts"
import { SessionRegistry } from "../../src/session/index.ts"
import { EventCounters } from "../../src/telemetry/index.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"

// A logged-in session is held by its LiveSession, not by a parked fiber (docs/login-path.md): every
// way an idle session is ended from the pooler's side — the admin console's KILL, a control-plane
// kick, the shutdown's drain — must give back its place in the pool, its registration, a
// session-mode server and its count in the node's connection cap. And an admin console login, like
// a tenant's, ends its handshake (frees its TIDEPOOL_MAX_HANDSHAKES slot) once authenticated.

const PASSWORD = "lifetime-secret"
const POOL = 2

let db: PostgresServer

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: PASSWORD }] })
})

afterAll(async () => {
  await db?.stop()
})

const start = () =>
  startTidepool({
    tenants: [
      { external_id: "acme", ...upstreamOf(db), users: [{ db_user: "app", db_password: PASSWORD, pool_size: POOL }] }
    ],
    config: { adminUsers: [{ name: "ops", secret: "ops-secret" }], shutdownTimeoutMs: 120_000 }
  })

/** What the node holds for its clients right now. */
const holdings = (tidepool: RunningTidepool) =>
  tidepool.runtime.runPromise(
    Effect.gen(function* () {
      const pools = (yield* PoolRegistry).all()
      const { admission } = yield* EventCounters
      return {
        open: admission.open,
        handshaking: admission.handshaking,
        registered: (yield* SessionRegistry).countOf("acme"),
        clients: pools.reduce((n, p) => n + p.stats.clients, 0),
        busyServers: pools.reduce((n, p) => n + p.stats.busy, 0)
      }
    })
  )

/** Polls until `condition` holds; the deadline turns a leak into a failure that says what was awaited. */
const until = async <A>(what: string, read: () => Promise<A>, condition: (a: A) => boolean, deadlineMs = 20_000) => {
  const deadline = Date.now() + deadlineMs
  for (;;) {
    const value = await read()
    if (condition(value)) return value
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; last seen ${JSON.stringify(value)}`)
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
}

/** An idle client that has run a query, and the SQLSTATE it is closed with (undefined: closed quietly). */
const idleClient = async (tidepool: RunningTidepool, mode: "session" | "transaction") => {
  const client = new pg.Client({ connectionString: tidepool.url({ user: "app.acme", password: PASSWORD, mode }) })
  const closed = new Promise<string | undefined>((resolve) => {
    client.on("error", (error: Error & { code?: string }) => resolve(error.code))
    client.on("end", () => resolve(undefined))
  })
  await client.connect()
  await client.query("SELECT 1")
  return { client, closed }
}

const crowd = async (tidepool: RunningTidepool) => [
  // Session mode: each holds one of the pool's servers for its life.
  ...(await Promise.all(Array.from({ length: POOL }, () => idleClient(tidepool, "session")))),
  ...(await Promise.all(Array.from({ length: 3 }, () => idleClient(tidepool, "transaction"))))
]

const NOTHING_HELD = { registered: 0, clients: 0, busyServers: 0 }

describe("an idle session ended from the pooler's side", () => {
  it("by the admin console's KILL or a control-plane kick gives back everything it held", async () => {
    const tidepool = await start()
    try {
      const console = new pg.Client({
        connectionString: tidepool.url({ user: "ops", password: "ops-secret", database: "pgbouncer" })
      })
      await console.connect()
      // Logged in and still connected: its handshake slot is free, its connection still counts.
      expect(await holdings(tidepool)).toMatchObject({ open: 1, handshaking: 0 })

      const killed = await crowd(tidepool)
      expect(await holdings(tidepool)).toMatchObject({
        open: 1 + killed.length,
        registered: 5,
        clients: 5,
        busyServers: POOL
      })
      await console.query("KILL acme")
      expect(await Promise.all(killed.map((c) => c.closed))).toEqual(killed.map(() => "57P01"))
      await until(
        "KILL's sessions to give everything back",
        () => holdings(tidepool),
        (h) => h.open === 1 && h.clients === 0
      )
      expect(await holdings(tidepool)).toMatchObject({ ...NOTHING_HELD, open: 1, handshaking: 0 })

      // The session-mode servers are free again: a full pool of new session-mode clients gets in.
      const kicked = await crowd(tidepool)
      await tidepool.runtime.runPromise(
        Effect.flatMap(SessionRegistry, (s) => s.kickTenant("acme", () => tidepoolError("EADMINSHUTDOWN")))
      )
      expect(await Promise.all(kicked.map((c) => c.closed))).toEqual(kicked.map(() => "57P01"))
      await until(
        "the kicked sessions to give everything back",
        () => holdings(tidepool),
        (h) => h.open === 1 && h.clients === 0
      )
      expect(await holdings(tidepool)).toMatchObject({ ...NOTHING_HELD, open: 1 })
      await console.end()
      await until(
        "the console's connection to end",
        () => holdings(tidepool),
        (h) => h.open === 0
      )
    } finally {
      await tidepool.stop()
    }
  })

  it("by the shutdown's drain ends at once (no wait for the drain timeout) and gives back everything", async () => {
    const tidepool = await start()
    try {
      const clients = await crowd(tidepool)
      // The drain timeout is two minutes: a drain that did not see these sessions end would hold
      // the shutdown past the test's own timeout.
      await tidepool.runtime.runPromise(Effect.flatMap(Listeners, (l) => l.shutdown))
      expect(await Promise.all(clients.map((c) => c.closed))).toEqual(clients.map(() => "57P01"))
      expect(await holdings(tidepool)).toMatchObject({ ...NOTHING_HELD, open: 0, handshaking: 0 })
    } finally {
      await tidepool.stop()
    }
  })
})
