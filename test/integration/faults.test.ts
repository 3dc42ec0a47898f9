import * as net from "node:net"
import { Effect } from "effect"
import pg from "pg"
import { serialize } from "pg-protocol"
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest"
import { PoolRegistry, type TenantPool } from "../../src/pool/index.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { RawClient } from "../support/raw.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"

// The fault matrix of docs/operations.md: what clients see when the other side fails.

let db: PostgresServer
let tidepool: RunningTidepool
/** Counts the TCP connections Tidepool opens to the database for tenant `counted`. */
let proxy: net.Server
let upstreamConnections = 0

const PASSWORD = "fault-secret"

beforeAll(async () => {
  db = await startPostgres({
    roles: [
      { name: "app", password: PASSWORD, superuser: true },
      { name: "loader", password: PASSWORD }
    ]
  })
  await db.query("CREATE TABLE locked (id int PRIMARY KEY, n int NOT NULL)")
  await db.query("INSERT INTO locked VALUES (1, 0), (2, 0)")
  await db.query("CREATE TABLE tally (client int PRIMARY KEY, n int NOT NULL)")
  await db.query("GRANT ALL ON tally TO loader")
  proxy = net.createServer((inbound) => {
    upstreamConnections++
    const outbound = net.connect(db.port, db.host)
    inbound.pipe(outbound).pipe(inbound)
    inbound.on("error", () => outbound.destroy())
    outbound.on("error", () => inbound.destroy())
  })
  await new Promise<void>((resolve) => proxy.listen(0, "127.0.0.1", resolve))
  tidepool = await startTidepool({
    tenants: [
      {
        external_id: "acme",
        ...upstreamOf(db),
        users: [
          { db_user: "app", db_password: PASSWORD, pool_size: 2 },
          { db_user: "loader", db_password: PASSWORD, pool_size: 3 }
        ]
      },
      {
        external_id: "counted",
        db_host: "127.0.0.1",
        db_port: (proxy.address() as net.AddressInfo).port,
        db_database: "postgres",
        users: [{ db_user: "app", db_password: PASSWORD, pool_size: 3 }]
      }
    ],
    // Many distinct databases for one tenant: the cap is not what is under test.
    config: { maxPoolsPerTenant: 1000 }
  })
})

afterAll(async () => {
  await tidepool?.stop()
  await new Promise((resolve) => proxy?.close(resolve))
  await db?.stop()
})

const poolsOf = (tenant: string): Promise<ReadonlyArray<TenantPool>> =>
  tidepool.runtime.runPromise(Effect.map(PoolRegistry, (r) => r.poolsOf(tenant)))

/** The first Q-reply's single value, as text. */
const scalar = (messages: ReadonlyArray<{ type: string; body: Buffer }>): string => {
  const row = messages.find((m) => m.type === "D")!
  return row.body.toString("utf8", 6, 6 + row.body.readInt32BE(2))
}

describe("a client killed mid-statement", () => {
  for (const mode of ["transaction", "session"] as const) {
    it(`releases its row lock at once: its statement is cancelled, not left to finish (${mode})`, async () => {
      const port = mode === "session" ? tidepool.sessionPort : tidepool.transactionPort
      const victim = await RawClient.connect(port, "app.acme", PASSWORD)
      victim.write(serialize.query("BEGIN; SELECT pg_backend_pid() FROM locked WHERE id = 1 FOR UPDATE"))
      const pid = Number(scalar(await victim.untilReady()))
      victim.write(serialize.query("SELECT pg_sleep(10)"))
      await vi.waitFor(
        async () => {
          const rows = await db.query(
            "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND query = 'SELECT pg_sleep(10)'",
            [pid]
          )
          expect(rows).toHaveLength(1)
        },
        { timeout: 5_000, interval: 20 }
      )
      victim.socket.destroy()
      // The lock must come well before pg_sleep would have ended; the lock timeout is only a bound
      // that fails the test instead of hanging it.
      await db.query("BEGIN; SET LOCAL lock_timeout = '5s'; UPDATE locked SET n = n + 1 WHERE id = 1; COMMIT")
      // And the backend itself is gone, not left sleeping without a client.
      await vi.waitFor(
        async () => expect(await db.query("SELECT 1 FROM pg_stat_activity WHERE pid = $1", [pid])).toHaveLength(0),
        { timeout: 5_000, interval: 20 }
      )
    })
  }
})

describe("logins naming a database that does not exist", () => {
  it("get 3D000 at once, and their pools stop dialling once the clients are gone", async () => {
    const before = upstreamConnections
    const logins = Array.from({ length: 50 }, (_, i) => ({
      mode: i % 2 === 0 ? ("session" as const) : ("transaction" as const),
      database: `missing_${i % 25}`
    }))
    // Each login's checkout timeout (60 s) is far beyond the test's; a 3D000 that waited for retries would time out here.
    const errors = await Promise.all(
      logins.map(async ({ mode, database }) => {
        const client = new pg.Client({
          connectionString: tidepool.url({ user: "app.counted", password: PASSWORD, database, mode })
        })
        client.on("error", () => {})
        return client
          .connect()
          .then(() => client.query("SELECT 1"))
          .then(
            () => undefined,
            (e: pg.DatabaseError) => ({ code: e.code, message: e.message })
          )
          .finally(() => client.end().catch(() => {}))
      })
    )
    for (const [i, error] of errors.entries()) {
      expect(error).toEqual({ code: "3D000", message: `database "${logins[i]!.database}" does not exist` })
    }
    // At most one attempt per login (less: a refusal is remembered for a moment).
    expect(upstreamConnections - before).toBeLessThanOrEqual(logins.length)

    // Drive the pools' own tick far past every back-off: no pool may dial again with nobody waiting.
    const pools = (await poolsOf("counted")).filter((p) => p.settings.database.startsWith("missing_"))
    const failures = pools.map((p) => p.counters.serverConnectFailures)
    const start = Date.now()
    for (let tick = 1; tick <= 600; tick++) {
      for (const pool of pools) {
        pool.maintain(start + tick * 1000)
        expect(pool.stats.opening).toBe(0)
      }
    }
    expect(pools.map((p) => p.counters.serverConnectFailures)).toEqual(failures)
    // No pool is left holding the tenant's pool cap either: the next sweep shuts them down.
    await vi.waitFor(async () => expect((await poolsOf("counted")).filter((p) => !p.isClosed)).toHaveLength(0), {
      timeout: 10_000,
      interval: 100
    })
    expect(pools.every((p) => p.stats.opening === 0)).toBe(true)
  })
})
