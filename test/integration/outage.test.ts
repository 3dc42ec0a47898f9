import { mkdtempSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import * as path from "node:path"
import { Effect, Exit, Scope } from "effect"
import pg from "pg"
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest"
import * as EmbeddedPostgres from "../../src/cli/EmbeddedPostgres.ts"
import { freePort } from "../support/ports.ts"
import { type RunningTidepool, startTidepool } from "../support/tidepool.ts"

// A database we can stop and start again on the same port and data, as an operator would.
let dataDir: string
let port: number
let scope: Scope.CloseableScope | undefined
let tidepool: RunningTidepool

const startDatabase = () =>
  Effect.runPromise(
    Effect.gen(function* () {
      scope = yield* Scope.make()
      yield* EmbeddedPostgres.start({
        dataDir,
        port,
        init: { superuser: "postgres", password: "outage-secret" },
        settings: { unix_socket_directories: "", fsync: "off" }
      }).pipe(Scope.extend(scope))
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
        users: [{ db_user: "postgres", db_password: "outage-secret", pool_size: 3 }]
      }
    ]
  })
})

afterAll(async () => {
  await tidepool?.stop()
  if (scope !== undefined) await stopDatabase()
  if (dataDir) rmSync(path.dirname(dataDir), { recursive: true, force: true })
})

const url = (mode: "session" | "transaction") =>
  tidepool.url({ user: "postgres.acme", password: "outage-secret", mode })

describe("upstream outage", () => {
  it("clients get a coded error, not a hang, and the pool recovers when the database returns", async () => {
    const client = new pg.Client({ connectionString: url("transaction") })
    client.on("error", () => {})
    await client.connect()
    expect((await client.query("SELECT 1 AS one")).rows[0].one).toBe(1)

    await stopDatabase()
    const failure = await client.query("SELECT 1").then(
      () => undefined,
      (e: pg.DatabaseError) => e
    )
    expect(failure?.code).toBe("08006")
    expect(failure?.message).toMatch(/Failed to connect to database|server connection lost/)
    await client.end().catch(() => {})

    // New clients fail fast with the same code while the database is down (in transaction mode
    // connecting needs no server, so the error comes with the first query).
    const late = new pg.Client({ connectionString: url("transaction") })
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
          const c = new pg.Client({ connectionString: url(mode) })
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
