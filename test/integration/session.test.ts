import { Readable } from "node:stream"
import { pipeline } from "node:stream/promises"
import pg from "pg"
import postgres from "postgres"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { cancelWhileBusy } from "../support/cancel.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"
import { hasTool, run } from "../support/tools.ts"

const hasPsql = await hasTool("psql")

let db: PostgresServer
let tidepool: RunningTidepool

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: "app-secret", superuser: true }] })
  tidepool = await startTidepool({
    tenants: [
      {
        external_id: "acme",
        ...upstreamOf(db),
        users: [
          { db_user: "app", db_password: "app-secret", pool_size: 3 },
          { db_user_alias: "pair", db_user: "app", db_password: "app-secret", pool_size: 2 }
        ]
      }
    ]
  })
})

afterAll(async () => {
  await tidepool?.stop()
  await db?.stop()
})

const connect = async (user = "app.acme", password = "app-secret") => {
  const client = new pg.Client({ connectionString: tidepool.url({ user, password }) })
  await client.connect()
  return client
}

describe("session mode with node-postgres", () => {
  it("runs a SELECT and a multi-statement simple query", async () => {
    const client = await connect()
    try {
      const { rows } = await client.query("SELECT 1 + 1 AS two, current_user AS who")
      expect(rows).toEqual([{ two: 2, who: "app" }])
      const results = (await client.query(
        "SELECT 1 AS a; SELECT 2 AS b; SELECT 3 AS c"
      )) as unknown as Array<pg.QueryResult>
      expect(results.map((r) => r.rows[0])).toEqual([{ a: 1 }, { b: 2 }, { c: 3 }])
    } finally {
      await client.end()
    }
  })

  it("writes what a direct connection reads back", async () => {
    const client = await connect()
    try {
      await client.query("CREATE TABLE IF NOT EXISTS notes (id serial PRIMARY KEY, body text)")
      await client.query("INSERT INTO notes (body) VALUES ($1)", ["through tidepool"])
    } finally {
      await client.end()
    }
    const rows = await db.query<{ body: string }>("SELECT body FROM notes WHERE body = 'through tidepool'")
    expect(rows).toEqual([{ body: "through tidepool" }])
  })

  it("uses named prepared statements", async () => {
    const client = await connect()
    try {
      for (const n of [1, 2, 3]) {
        const { rows } = await client.query({ name: "plus-one", text: "SELECT $1::int + 1 AS n", values: [n] })
        expect(rows).toEqual([{ n: n + 1 }])
      }
    } finally {
      await client.end()
    }
  })

  it("delivers LISTEN/NOTIFY", async () => {
    const client = await connect()
    try {
      await client.query("LISTEN tidepool_events")
      const received = new Promise<pg.Notification>((resolve) => client.once("notification", resolve))
      await db.query("SELECT pg_notify('tidepool_events', 'hello')")
      const note = await received
      expect(note.channel).toBe("tidepool_events")
      expect(note.payload).toBe("hello")
    } finally {
      await client.end()
    }
  })

  it("does not leak SET from one session to the next on the same backend", async () => {
    const a = await connect()
    await a.query("SET statement_timeout = 1234")
    const pidA = (await a.query("SELECT pg_backend_pid() AS pid")).rows[0].pid as number
    await a.end()
    // Hold every other server so B must get A's backend: pool_size 3, two held here.
    const holders = [await connect(), await connect()]
    try {
      const b = await connect()
      try {
        const pidB = (await b.query("SELECT pg_backend_pid() AS pid")).rows[0].pid as number
        const pids = await Promise.all(
          holders.map(async (h) => (await h.query("SELECT pg_backend_pid() AS pid")).rows[0].pid)
        )
        expect([pidB, ...pids]).toContain(pidA)
        const timeouts = await Promise.all(
          [b, ...holders].map(async (c) => (await c.query("SHOW statement_timeout")).rows[0].statement_timeout)
        )
        expect(timeouts).toEqual(["0", "0", "0"])
      } finally {
        await b.end()
      }
    } finally {
      await Promise.all(holders.map((h) => h.end()))
    }
  })

  it("passes startup parameters upstream", async () => {
    const client = new pg.Client({
      connectionString: tidepool.url({ user: "app.acme", password: "app-secret" }),
      application_name: "billing-worker",
      options: "-c search_path=pg_catalog,public -c work_mem=2047GB"
    })
    await client.connect()
    try {
      const { rows } = await client.query(
        "SELECT current_setting('application_name') AS app, current_setting('search_path') AS path, current_setting('work_mem') AS mem"
      )
      expect(rows[0].app).toBe("billing-worker")
      expect(rows[0].path).toBe("pg_catalog,public")
      // -c settings outside the forwarded set never reach a shared server.
      expect(rows[0].mem).not.toBe("2047GB")
    } finally {
      await client.end()
    }
  })

  it("caps session clients at pool_size with EMAXCONNSESSION", async () => {
    const held = [await connect("pair.acme"), await connect("pair.acme")]
    try {
      const error = await connect("pair.acme").then(
        (c) => c.end().then(() => undefined),
        (e: pg.DatabaseError) => e
      )
      expect(error?.code).toBe("XX000")
      expect(error?.message).toBe(
        "(EMAXCONNSESSION) max clients reached in session mode - max clients are limited to pool_size: 2"
      )
    } finally {
      await Promise.all(held.map((c) => c.end()))
    }
  })

  it("cancels only the cancelling client's query", async () => {
    const victim = await connect()
    const bystander = await connect()
    try {
      expect(await cancelWhileBusy({ db, port: tidepool.sessionPort, victim, bystander })).toEqual({
        victimCode: "57014",
        bystanderState: "done"
      })
    } finally {
      await victim.end()
      await bystander.end()
    }
  })
})

describe("session mode with postgres.js", () => {
  it("queries, uses prepared statements, streams COPY both ways and cancels", async () => {
    const sql = postgres(tidepool.url({ user: "app.acme", password: "app-secret" }), { max: 1, prepare: true })
    try {
      const [row] = await sql`SELECT ${41}::int + 1 AS answer`
      expect(row?.answer).toBe(42)
      await sql`CREATE TABLE IF NOT EXISTS copy_target (n int, label text)`
      const writable = await sql`COPY copy_target FROM STDIN`.writable()
      await pipeline(Readable.from(Array.from({ length: 1000 }, (_, i) => `${i}\tlabel-${i}\n`)), writable)
      const [count] = await sql`SELECT count(*)::int AS n FROM copy_target`
      expect(count?.n).toBe(1000)
      const readable = await sql`COPY (SELECT n FROM copy_target ORDER BY n) TO STDOUT`.readable()
      let text = ""
      for await (const chunk of readable) text += chunk.toString()
      expect(text.split("\n").filter(Boolean)).toHaveLength(1000)

      const sleeping = sql`SELECT pg_sleep(30)`
      const outcome = sleeping.then(
        () => undefined,
        (e: { code?: string }) => e
      )
      for (;;) {
        const rows = await db.query(
          "SELECT 1 FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(30)%' AND state = 'active'"
        )
        if (rows.length > 0) break
      }
      sleeping.cancel()
      expect((await outcome)?.code).toBe("57014")
    } finally {
      await sql.end()
    }
  })
})

describe.skipIf(!hasPsql)("session mode with psql", () => {
  it("runs queries and COPY through psql", async () => {
    const url = tidepool.url({ user: "app.acme", password: "app-secret" })
    const { stdout } = await run("psql", [url, "-XAtc", "SELECT 'from psql'"])
    expect(stdout.trim()).toBe("from psql")
    const copy = await run("psql", [url, "-XAtc", "COPY (SELECT g FROM generate_series(1,3) g) TO STDOUT"])
    expect(copy.stdout.trim().split("\n")).toEqual(["1", "2", "3"])
  })
})
