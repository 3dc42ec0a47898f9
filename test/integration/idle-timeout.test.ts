import pg from "pg"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"

// A tenant's client_idle_timeout ends clients that sent nothing for that long while outside any
// transaction with no query running. No test waits a fixed time: each holds a client in the state
// under test from before a quiet client's idle clock starts, so it would have been closed first if
// the timeout applied to it; the quiet client's close is awaited under the test's deadline.

let db: PostgresServer
let tidepool: RunningTidepool

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: "app-secret" }] })
  tidepool = await startTidepool({
    tenants: [
      {
        external_id: "sleepy",
        ...upstreamOf(db),
        client_idle_timeout: 300,
        users: [{ db_user: "app", db_password: "app-secret", pool_size: 4 }]
      },
      {
        external_id: "patient",
        ...upstreamOf(db),
        users: [{ db_user: "app", db_password: "app-secret", pool_size: 2 }]
      }
    ]
  })
})

afterAll(async () => {
  await tidepool?.stop()
  await db?.stop()
})

type Mode = "transaction" | "session"

const connect = async (tenant: string, mode: Mode) => {
  const client = new pg.Client({
    host: tidepool.host,
    port: mode === "transaction" ? tidepool.transactionPort : tidepool.sessionPort,
    user: `app.${tenant}`,
    password: "app-secret",
    database: "postgres"
  })
  // The error the pooler closes an idle client with, as the driver reports it.
  const closed = new Promise<pg.DatabaseError>((resolve) => client.on("error", (e) => resolve(e as pg.DatabaseError)))
  await client.connect()
  return { client, closed }
}

const isOpen = async (client: pg.Client) => (await client.query("select 1 as one")).rows[0].one === 1

describe.each<Mode>(["transaction", "session"])("client_idle_timeout (%s mode)", (mode) => {
  it("closes a quiet client with ECLIENTIDLETIMEOUT (57P05) and its server serves the next client", async () => {
    const { client, closed } = await connect("sleepy", mode)
    await client.query("select 1")
    const error = await closed
    expect(error.code).toBe("57P05")
    expect(error.severity).toBe("FATAL")
    expect(error.message).toBe("(ECLIENTIDLETIMEOUT) terminating connection due to client idle timeout (300ms)")
    await client.end().catch(() => undefined)
    const next = await connect("sleepy", mode)
    expect(await isOpen(next.client)).toBe(true)
    await next.client.end()
  })

  it("leaves alone a client idle in a transaction, one whose query runs, and a tenant without the timeout", async () => {
    const inTransaction = await connect("sleepy", mode)
    await inTransaction.client.query("begin")
    await inTransaction.client.query("select 1")
    // The lock is held directly, so the client's query waits on it, silent, for as long as we like.
    const locker = new pg.Client({ connectionString: db.url() })
    await locker.connect()
    await locker.query("select pg_advisory_lock(4242)")
    const running = await connect("sleepy", mode)
    const waiting = running.client.query("select pg_advisory_lock(4242) as locked")
    const untimed = await connect("patient", mode)
    await untimed.client.query("select 1")

    // The sweep notes a client's bytes when it next runs, so the first quiet client may be closed
    // before the clients above count as silent; one connected after that close is closed only after
    // a sweep that saw them silent, by which time they would have been closed too.
    const quiet = await connect("sleepy", mode)
    expect((await quiet.closed).code).toBe("57P05")
    const later = await connect("sleepy", mode)
    expect((await later.closed).code).toBe("57P05")

    await locker.query("select pg_advisory_unlock(4242)")
    expect((await waiting).rows).toHaveLength(1)
    await running.client.query("select pg_advisory_unlock(4242)")
    expect(await isOpen(inTransaction.client)).toBe(true)
    await inTransaction.client.query("commit")
    expect(await isOpen(untimed.client)).toBe(true)
    await Promise.all([inTransaction.client.end(), running.client.end(), untimed.client.end(), locker.end()])
    await quiet.client.end().catch(() => undefined)
    await later.client.end().catch(() => undefined)
  })
})
