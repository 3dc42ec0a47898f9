import { mkdtempSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import * as path from "node:path"
import { Effect, Exit, Scope } from "effect"
import pg from "pg"
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest"
import * as EmbeddedPostgres from "../../src/cli/EmbeddedPostgres.ts"
import { PoolRegistry, type TenantPool } from "../../src/pool/index.ts"
import { freePort } from "../support/ports.ts"
import { type RunningTidepool, startTidepool } from "../support/tidepool.ts"

// A database we can stop and start again on the same port and data, as an operator would.
let dataDir: string
let port: number
let scope: Scope.Closeable | undefined
let tidepool: RunningTidepool

const startDatabase = () =>
  Effect.runPromise(
    Effect.gen(function* () {
      const opened = yield* Scope.make()
      scope = opened
      yield* EmbeddedPostgres.start({
        dataDir,
        port,
        init: { superuser: "postgres", password: "outage-secret" },
        settings: { unix_socket_directories: "", fsync: "off" }
      }).pipe(Scope.provide(opened))
    })
  )

const stopDatabase = () => Effect.runPromise(Scope.close(scope!, Exit.void))

beforeAll(async () => {
  dataDir = path.join(mkdtempSync(path.join(tmpdir(), "tidepool-outage-")), "data")
  // The server may run as another OS user: it must reach the parent directory.
  await Effect.runPromise(
    Effect.flatMap(EmbeddedPostgres.runtime, (rt) => EmbeddedPostgres.chownToServer(rt, path.dirname(dataDir)))
  )
  port = await freePort()
  await startDatabase()
  tidepool = await startTidepool({
    tenants: [
      {
        external_id: "acme",
        db_host: "127.0.0.1",
        db_port: port,
        db_database: "postgres",
        users: [
          { db_user: "postgres", db_password: "outage-secret", pool_size: 3 },
          // Rides out outages for one second only.
          { db_user_alias: "brief", db_user: "postgres", db_password: "outage-secret", pool_checkout_timeout: 1000 }
        ]
      }
    ]
  })
})

afterAll(async () => {
  await tidepool?.stop()
  if (scope !== undefined) await stopDatabase()
  if (dataDir) rmSync(path.dirname(dataDir), { recursive: true, force: true })
})

const url = (mode: "session" | "transaction", user = "postgres") =>
  tidepool.url({ user: `${user}.acme`, password: "outage-secret", mode })

const transactionPool = (alias: string): Promise<TenantPool> =>
  tidepool.runtime.runPromise(
    Effect.map(PoolRegistry, (r) => r.all().find((p) => p.settings.key.includes(`\u0000${alias}\u0000transaction`))!)
  )

/** Connection-loss errors a client whose transaction was in flight may see (PostgreSQL's FATAL, or Tidepool's). */
const LOST = ["57P01", "08006"]

describe("upstream outage", () => {
  it("a restart under load fails only the transactions in flight; clients between transactions wait", async () => {
    const CLIENTS = 10 // pool_size 3
    const AFTER = 5 // transactions each client completes once the database is back
    const sql = new pg.Client({ connectionString: url("transaction") })
    await sql.connect()
    await sql.query("CREATE TABLE tally (client int PRIMARY KEY, n int NOT NULL)")
    await sql.query("INSERT INTO tally SELECT g, 0 FROM generate_series(0, $1::int - 1) g", [CLIENTS])
    await sql.end()

    const done = Array.from({ length: CLIENTS }, () => 0)
    const doneAfter = Array.from({ length: CLIENTS }, () => 0)
    const errors: Array<{ client: number; code: string | undefined; message: string }> = []
    let restarted = false
    const loop = async (i: number) => {
      while (!restarted || doneAfter[i]! < AFTER) {
        const client = new pg.Client({ connectionString: url("transaction") })
        // A FATAL between two queries arrives as an 'error' event; the next query only says "not queryable".
        let lost: pg.DatabaseError | undefined
        client.on("error", (e) => {
          lost ??= e as pg.DatabaseError
        })
        try {
          await client.connect()
          while (!restarted || doneAfter[i]! < AFTER) {
            await client.query("BEGIN")
            await client.query("UPDATE tally SET n = n + 1 WHERE client = $1", [i])
            await client.query("COMMIT")
            done[i]!++
            if (restarted) doneAfter[i]!++
          }
        } catch (e) {
          const error = lost ?? (e as pg.DatabaseError)
          errors.push({ client: i, code: error.code, message: error.message })
        } finally {
          await client.end().catch(() => {})
        }
      }
    }
    const loopers = Array.from({ length: CLIENTS }, (_, i) => loop(i))

    await vi.waitFor(() => expect(Math.min(...done)).toBeGreaterThanOrEqual(3), { timeout: 20_000, interval: 20 })
    const pool = await transactionPool("postgres")
    const failuresBefore = pool.counters.serverConnectFailures
    await stopDatabase()
    // Every server the stop can take down was open by now.
    const servers = pool.counters.serverConnects
    // Clients now queue while the pool fails to reach the database (no server is left to lend).
    await vi.waitFor(
      () => {
        expect(pool.counters.serverConnectFailures).toBeGreaterThan(failuresBefore)
        expect(pool.stats.waiting).toBeGreaterThanOrEqual(CLIENTS - 3)
      },
      { timeout: 20_000, interval: 20 }
    )
    await startDatabase()
    restarted = true
    // No stale failure is served once the database is back: new logins, in both modes, get in.
    for (const mode of ["session", "transaction"] as const) {
      const c = new pg.Client({ connectionString: url(mode) })
      await c.connect()
      expect((await c.query("SELECT 2 AS two")).rows[0].two).toBe(2)
      await c.end()
    }
    await Promise.all(loopers)

    // Each server the restart took down failed at most the one client it was serving; everyone else
    // (at least CLIENTS - 3 clients were between transactions, waiting) saw nothing.
    expect(errors.length, JSON.stringify({ errors, servers })).toBeLessThanOrEqual(servers)
    for (const error of errors) expect(LOST, JSON.stringify(error)).toContain(error.code)
    expect(doneAfter.every((n) => n >= AFTER)).toBe(true)
  })

  it("a longer outage ends in a coded error, not a hang, and the pool recovers when the database returns", async () => {
    const client = new pg.Client({ connectionString: url("transaction", "brief") })
    client.on("error", () => {})
    await client.connect()
    expect((await client.query("SELECT 1 AS one")).rows[0].one).toBe(1)

    await stopDatabase()
    // The client waits out its checkout timeout, then learns why no server came.
    const failure = await client.query("SELECT 1").then(
      () => undefined,
      (e: pg.DatabaseError) => e
    )
    expect(failure?.code).toBe("08006")
    expect(failure?.message).toMatch(/^Failed to connect to database: /)
    await client.end().catch(() => {})

    // An outage older than the checkout timeout is no passing restart: new clients fail fast with
    // the same code (in transaction mode connecting needs no server, so the error comes with the
    // first query).
    const late = new pg.Client({ connectionString: url("transaction", "brief") })
    late.on("error", () => {})
    const refused = await late
      .connect()
      .then(() => late.query("SELECT 1"))
      .then(
        () => undefined,
        (e: pg.DatabaseError) => e
      )
    expect(refused?.code).toBe("08006")
    expect(refused?.message).toMatch(/^Failed to connect to database: /)
    await late.end().catch(() => {})

    await startDatabase()
    // Connect attempts back off for a moment after a failure; within that the pool recovers on its own.
    await vi.waitFor(
      async () => {
        for (const mode of ["transaction", "session"] as const) {
          const c = new pg.Client({ connectionString: url(mode, "brief") })
          await c.connect()
          try {
            expect((await c.query("SELECT 2 AS two")).rows[0].two).toBe(2)
          } finally {
            await c.end()
          }
        }
      },
      { timeout: 20_000, interval: 200 }
    )
  })
})
