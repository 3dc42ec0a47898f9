import { type ChildProcessWithoutNullStreams, spawn } from "node:child_process"
import { Effect } from "effect"
import pg from "pg"
import postgres from "postgres"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { PoolRegistry, type TenantPool } from "../../src/pool/index.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"
import { hasTool } from "../support/tools.ts"

// Issue 18's acceptance case for LISTEN/NOTIFY on the transaction port (docs/session-state.md#listen-and-notify):
// two clients share a pool of one server; A listens, B notifies, both keep running transactions.

const hasPsql = await hasTool("psql")

const PASSWORD = "listen-secret"

let db: PostgresServer
let tidepool: RunningTidepool

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: PASSWORD, superuser: true }] })
  await db.query("CREATE TABLE ledger (client text NOT NULL, n int NOT NULL)")
  tidepool = await startTidepool({
    tenants: [
      {
        external_id: "acme",
        ...upstreamOf(db),
        users: [{ db_user: "app", db_password: PASSWORD, pool_size: 1 }]
      }
    ]
  })
})

afterAll(async () => {
  await tidepool?.stop()
  await db?.stop()
})

const url = () => tidepool.url({ user: "app.acme", password: PASSWORD, mode: "transaction" })

const client = async () => {
  const c = new pg.Client({ connectionString: url() })
  await c.connect()
  return c
}

/** The pool both clients share (one server). */
const pool = (): Promise<TenantPool> =>
  tidepool.runtime.runPromise(
    Effect.map(
      PoolRegistry,
      (r) => r.all().find((p) => p.settings.mode === "transaction" && p.settings.user === "app")!
    )
  )

/** Bounds every wait: a test fails here instead of hanging. */
const within = async (what: string, check: () => boolean | Promise<boolean>, ms = 15_000): Promise<void> => {
  const deadline = Date.now() + ms
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => setImmediate(resolve))
  }
}

/** One transaction of ordinary work, as either client runs between notifications. */
const work = async (c: pg.Client, name: string, n: number) => {
  await c.query("BEGIN")
  await c.query("INSERT INTO ledger VALUES ($1, $2)", [name, n])
  await c.query("SELECT count(*) FROM ledger")
  await c.query("COMMIT")
}

describe("LISTEN/NOTIFY on the transaction port, pool of one", () => {
  it("node-postgres: A receives B's notifications while both run transactions; UNLISTEN stops them; a disconnect unsubscribes", async () => {
    const a = await client()
    const b = await client()
    const got: Array<{ channel: string; payload: string | undefined }> = []
    a.on("notification", (m) => got.push({ channel: m.channel, payload: m.payload }))
    await a.query('LISTEN "Orders"')
    await a.query("LISTEN sentinel")
    for (let i = 1; i <= 5; i++) {
      await work(a, "a", i)
      await b.query("BEGIN")
      await b.query("SELECT pg_notify('Orders', $1)", [`order ${i}`])
      await b.query("INSERT INTO ledger VALUES ('b', $1)", [i])
      await b.query("COMMIT")
      await work(a, "a", i)
      await within(`notification ${i}`, () => got.length === i)
    }
    expect(got).toEqual([1, 2, 3, 4, 5].map((i) => ({ channel: "Orders", payload: `order ${i}` })))

    await a.query('UNLISTEN "Orders"')
    await b.query("NOTIFY \"Orders\", 'after unlisten'")
    // One sender's notifications arrive in commit order: once the sentinel is in, "Orders" would be.
    await b.query("NOTIFY sentinel, 'last'")
    await within("the sentinel", () => got.length === 6)
    expect(got.at(-1)).toEqual({ channel: "sentinel", payload: "last" })

    const hub = (await pool()).listenHub
    expect(hub.subscriberCount).toBe(1)
    await a.end()
    await within("the hub to drop A", () => hub.subscriberCount === 0)
    expect(hub.channelCount).toBe(0)
    await b.end()
  })

  it("follows PostgreSQL's transaction rules: a rolled-back LISTEN never listens, notifications wait for the end of the listener's transaction", async () => {
    const a = await client()
    const got: Array<{ channel: string; payload: string | undefined }> = []
    a.on("notification", (m) => got.push({ channel: m.channel, payload: m.payload }))
    try {
      await a.query("BEGIN")
      await a.query("LISTEN rolled_back")
      await a.query("ROLLBACK")
      await a.query("BEGIN")
      await a.query("LISTEN committed")
      await a.query("COMMIT")

      const hub = (await pool()).listenHub
      const received = hub.notificationsReceived
      await a.query("BEGIN")
      await a.query("INSERT INTO ledger VALUES ('a', 0)")
      // A holds the pool's only server: these come straight from PostgreSQL.
      await db.query("NOTIFY rolled_back, 'never'")
      await db.query("NOTIFY committed, 'after commit'")
      // The hub has both; A, still in its transaction, must not see them yet (nor ever the first).
      await within("the hub to receive the notification", () => hub.notificationsReceived >= received + 1)
      await a.query("SELECT 1")
      expect(got).toEqual([])
      await a.query("COMMIT")
      await within("the notification after A's commit", () => got.length === 1)
      expect(got).toEqual([{ channel: "committed", payload: "after commit" }])

      // A session hears its own notifications, as on PostgreSQL.
      await a.query("NOTIFY committed, 'from A itself'")
      await within("A's own notification", () => got.length === 2)
      expect(got[1]).toEqual({ channel: "committed", payload: "from A itself" })
    } finally {
      await a.end()
    }
  })

  it("postgres.js: sql.listen receives notifications sent with sql.notify inside transactions, and unlisten stops them", async () => {
    const a = postgres(url(), { max: 1, onnotice: () => undefined })
    const b = postgres(url(), { max: 1, onnotice: () => undefined })
    try {
      const got: Array<string> = []
      const sentinel: Array<string> = []
      const orders = await a.listen("orders", (payload) => got.push(payload))
      await a.listen("sentinel", (payload) => sentinel.push(payload))
      for (let i = 1; i <= 5; i++) {
        await a.begin((sql) => sql`INSERT INTO ledger VALUES ('pjs-a', ${i})`)
        await b.begin(async (sql) => {
          await sql`INSERT INTO ledger VALUES ('pjs-b', ${i})`
          await sql`SELECT pg_notify('orders', ${`order ${i}`})`
        })
        await within(`notification ${i}`, () => got.length === i)
      }
      expect(got).toEqual(["order 1", "order 2", "order 3", "order 4", "order 5"])

      await orders.unlisten()
      await b.notify("orders", "after unlisten")
      await b.notify("sentinel", "last")
      await within("the sentinel", () => sentinel.length === 1)
      expect(got).toHaveLength(5)
    } finally {
      await a.end()
      await b.end()
    }
  })

  it.skipIf(!hasPsql)(
    "psql: A's LISTEN shows up as psql's asynchronous notification after its next command",
    async () => {
      const b = await client()
      const psql: ChildProcessWithoutNullStreams = spawn("psql", ["-X", url()], {
        env: { ...process.env, PGCONNECT_TIMEOUT: "10" }
      })
      let out = ""
      psql.stdout.on("data", (d: Buffer) => {
        out += d.toString()
      })
      psql.stderr.on("data", (d: Buffer) => {
        out += d.toString()
      })
      try {
        psql.stdin.write("LISTEN psql_channel;\n")
        await within("psql's LISTEN", () => out.includes("LISTEN"))
        await work(b, "b", 1)
        await b.query("SELECT pg_notify('psql_channel', 'hello from B')")
        // psql prints notifications only after a command; A keeps running transactions until it has.
        let sent = 0
        await within("psql to print the notification", () => {
          if (out.includes("Asynchronous notification")) return true
          const done = (out.match(/COMMIT/g) ?? []).length
          if (done === sent) {
            sent++
            psql.stdin.write("BEGIN; SELECT 1; COMMIT;\n")
          }
          return false
        })
        expect(out).toMatch(
          /Asynchronous notification "psql_channel" with payload "hello from B" received from server process with PID \d+\./
        )
        psql.stdin.write("UNLISTEN *;\n\\q\n")
        await new Promise((resolve) => psql.once("exit", resolve))
      } finally {
        psql.kill()
        await b.end()
      }
    }
  )

  it("tells a listening client ELISTENLOST when the listening connection dies; postgres.js listens again by itself", async () => {
    const a = await client()
    const errors: Array<Error & { code?: string }> = []
    a.on("error", (e) => errors.push(e))
    await a.query("LISTEN doomed")
    const pjs = postgres(url(), { max: 1, onnotice: () => undefined })
    const got: Array<string> = []
    let listens = 0
    await pjs.listen(
      "doomed",
      (payload) => got.push(payload),
      () => listens++
    )
    const hub = (await pool()).listenHub
    const pid = hub.connection!.backendPid
    await db.query("SELECT pg_terminate_backend($1)", [pid])
    await within("A's error", () => errors.length > 0)
    expect(errors[0]!.message).toMatch(/^\(ELISTENLOST\) listening connection lost/)
    expect(errors[0]!.code).toBe("08006")
    await within("postgres.js to listen again", () => listens === 2)
    await within("a new listening connection", () => hub.connection !== undefined)
    expect(hub.connection!.backendPid).not.toBe(pid)
    await db.query("NOTIFY doomed, 'after the loss'")
    await within("the notification after the loss", () => got.length === 1)
    expect(got).toEqual(["after the loss"])
    await pjs.end()
    await a.end().catch(() => undefined)
  })
})
