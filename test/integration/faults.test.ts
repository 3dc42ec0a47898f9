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

/** Connection-loss errors a client whose transaction was in flight may see (PostgreSQL's FATAL, or Tidepool's). */
const LOST = ["57P01", "08006"]

interface Failure {
  readonly client: number
  readonly step: string
  readonly code: string | undefined
  readonly message: string
}

/**
 * `count` clients each looping BEGIN; UPDATE; COMMIT on their own row of `tally` through `url`,
 * reconnecting after an error, until `enough(i)` says stop. Tracks commits and failures.
 */
const loadOf = (url: string, count: number) => {
  const committed = Array.from({ length: count }, () => 0)
  const failures: Array<Failure> = []
  const loop = async (i: number, enough: () => boolean, reconnect: boolean) => {
    do {
      const client = new pg.Client({ connectionString: url })
      // A FATAL between two queries arrives as an 'error' event; the next query only says "not queryable".
      let lost: pg.DatabaseError | undefined
      client.on("error", (e) => {
        lost ??= e as pg.DatabaseError
      })
      let step = "connect"
      try {
        await client.connect()
        while (!enough()) {
          step = "BEGIN"
          await client.query("BEGIN")
          step = "UPDATE"
          await client.query(`UPDATE tally SET n = n + 1 WHERE client = ${i}`)
          step = "COMMIT"
          await client.query("COMMIT")
          committed[i]!++
        }
      } catch (e) {
        const error = lost ?? (e as pg.DatabaseError)
        failures.push({ client: i, step, code: error.code, message: error.message })
      } finally {
        await client.end().catch(() => {})
      }
    } while (reconnect && !enough())
  }
  return { committed, failures, loop }
}

const resetTally = async (count: number) => {
  await db.query("DELETE FROM tally")
  await db.query("INSERT INTO tally SELECT g, 0 FROM generate_series(0, $1::int - 1) g", [count])
}

const tally = async (): Promise<Array<number>> =>
  (await db.query<{ n: number }>("SELECT n FROM tally ORDER BY client")).map((r) => r.n)

describe("every pooled server terminated during load", () => {
  it("fails only the clients whose transaction was on a terminated server; the rest carry on", async () => {
    const CLIENTS = 10 // loader's pool_size is 3
    await resetTally(CLIENTS)
    const url = tidepool.url({ user: "loader.acme", password: PASSWORD, mode: "transaction" })
    const load = loadOf(url, CLIENTS)
    let terminated = -1
    const after = Array.from({ length: CLIENTS }, () => -1)
    const loopers = Array.from({ length: CLIENTS }, (_, i) =>
      load.loop(
        i,
        () => {
          if (terminated < 0) return false
          if (after[i]! < 0) after[i] = load.committed[i]!
          return load.committed[i]! >= after[i]! + 5
        },
        true
      )
    )
    await vi.waitFor(() => expect(Math.min(...load.committed)).toBeGreaterThanOrEqual(3), {
      timeout: 20_000,
      interval: 20
    })
    const [{ n }] = await db.query<{ n: number }>(
      "SELECT count(pg_terminate_backend(pid))::int AS n FROM pg_stat_activity WHERE usename = 'loader'"
    )
    terminated = n
    await Promise.all(loopers)
    expect(terminated).toBeGreaterThan(0)
    // A server serves one transaction at a time: each termination can have failed one client at most.
    expect(load.failures.length, JSON.stringify(load.failures)).toBeLessThanOrEqual(terminated)
    for (const failure of load.failures) expect(LOST, JSON.stringify(failure)).toContain(failure.code)
    const counts = await tally()
    // A failed transaction was rolled back; every reported commit is there (a COMMIT whose reply was
    // lost with its server may be there too).
    for (const [i, count] of counts.entries()) {
      expect(count).toBeGreaterThanOrEqual(load.committed[i]!)
      expect(count).toBeLessThanOrEqual(load.committed[i]! + load.failures.filter((f) => f.client === i).length)
    }
  })
})

describe("SIGTERM during load", () => {
  it("lets every transaction in flight finish, then ends each client at a transaction boundary with 57P01", async () => {
    const CLIENTS = 10
    await resetTally(CLIENTS)
    const draining = await startTidepool({
      tenants: [
        {
          external_id: "acme",
          ...upstreamOf(db),
          users: [{ db_user: "loader", db_password: PASSWORD, pool_size: 3 }]
        }
      ]
    })
    const load = loadOf(draining.url({ user: "loader.acme", password: PASSWORD, mode: "transaction" }), CLIENTS)
    const loopers = Array.from({ length: CLIENTS }, (_, i) => load.loop(i, () => false, false))
    await vi.waitFor(() => expect(Math.min(...load.committed)).toBeGreaterThanOrEqual(3), {
      timeout: 20_000,
      interval: 20
    })
    await draining.stop()
    await Promise.all(loopers)
    // Every client was ended, each with 57P01, and never inside a transaction: nothing was cut short.
    expect(load.failures).toHaveLength(CLIENTS)
    for (const failure of load.failures) {
      expect(failure, JSON.stringify(failure)).toMatchObject({ code: "57P01" })
      expect(["BEGIN", "connect"], JSON.stringify(failure)).toContain(failure.step)
    }
    expect(await tally()).toEqual(load.committed)
  })
})

describe("slow and half-open handshakes", () => {
  let silent: net.Server
  let strict: RunningTidepool
  const held: Array<net.Socket> = []

  beforeAll(async () => {
    // Accepts connections and never says a word: a database host that is half there.
    silent = net.createServer((socket) => {
      held.push(socket)
      socket.on("error", () => {})
    })
    await new Promise<void>((resolve) => silent.listen(0, "127.0.0.1", resolve))
    strict = await startTidepool({
      tenants: [
        {
          external_id: "mute",
          db_host: "127.0.0.1",
          db_port: (silent.address() as net.AddressInfo).port,
          db_database: "postgres",
          users: [{ db_user: "app", db_password: PASSWORD, pool_size: 2 }]
        }
      ],
      config: { handshakeTimeoutMs: 500, upstreamConnectTimeoutMs: 300 }
    })
  })

  afterAll(async () => {
    await strict?.stop()
    for (const socket of held) socket.destroy()
    await new Promise((resolve) => silent?.close(resolve))
  })

  it("a client that connects and sends nothing is closed with EAUTHTIMEOUT", async () => {
    const received = await new Promise<string>((resolve, reject) => {
      const socket = net.connect(strict.sessionPort, "127.0.0.1")
      let bytes = Buffer.alloc(0)
      socket.on("data", (chunk) => {
        bytes = Buffer.concat([bytes, chunk])
      })
      socket.on("error", reject)
      socket.on("close", () => resolve(bytes.toString("latin1")))
    })
    expect(received).toContain("C08006")
    expect(received).toContain("(EAUTHTIMEOUT) timeout while waiting for message")
  })

  it("a database that accepts the connection and never answers fails logins with 08006, every time", async () => {
    for (let attempt = 0; attempt < 2; attempt++) {
      const client = new pg.Client({
        connectionString: strict.url({ user: "app.mute", password: PASSWORD, mode: "session" })
      })
      const error = await client.connect().then(
        () => client.end().then(() => undefined),
        (e: pg.DatabaseError) => e
      )
      expect(error?.code).toBe("08006")
      expect(error?.message).toBe("Failed to connect to database: login timed out after 300ms")
    }
  })
})
