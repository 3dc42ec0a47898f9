import { Effect } from "effect"
import pg from "pg"
import { serialize } from "pg-protocol"
import postgres from "postgres"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { PoolRegistry } from "../../src/pool/index.ts"
import { cancelWhileBusy } from "../support/cancel.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { RawClient } from "../support/raw.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"
import { hasTool, run } from "../support/tools.ts"

const hasPgbench = await hasTool("pgbench")

let db: PostgresServer
let tidepool: RunningTidepool

const PASSWORD = "app-secret"

beforeAll(async () => {
  db = await startPostgres({
    roles: [{ name: "app", password: PASSWORD, superuser: true }],
    settings: { max_connections: "200" }
  })
  await db.query("CREATE TABLE counters (id int PRIMARY KEY, n int NOT NULL)")
  await db.query("INSERT INTO counters SELECT g, 0 FROM generate_series(1, 10) g")
  tidepool = await startTidepool({
    tenants: [
      {
        external_id: "acme",
        ...upstreamOf(db),
        users: [
          { db_user: "app", db_password: PASSWORD, pool_size: 5 },
          { db_user_alias: "pair", db_user: "app", db_password: PASSWORD, pool_size: 2, pool_checkout_timeout: 500 },
          { db_user_alias: "solo", db_user: "app", db_password: PASSWORD, pool_size: 1 },
          { db_user_alias: "closed", db_user: "app", db_password: PASSWORD, pool_size: 1, max_clients: 0 }
        ]
      }
    ]
  })
})

afterAll(async () => {
  await tidepool?.stop()
  await db?.stop()
})

const client = async (user = "app.acme", config: pg.ClientConfig = {}) => {
  const c = new pg.Client({
    connectionString: tidepool.url({ user, password: PASSWORD, mode: "transaction" }),
    ...config
  })
  await c.connect()
  return c
}

const poolStats = (alias: string) =>
  tidepool.runtime.runPromise(
    Effect.map(
      PoolRegistry,
      (r) => r.all().find((p) => p.settings.key.includes(`\u0000${alias}\u0000transaction`))!.stats
    )
  )

const serverCount = async () =>
  Number(
    (
      await db.query<{ n: string }>(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend'"
      )
    )[0]!.n
  )

describe("transaction mode", () => {
  it("200 clients × 20 transactions share 5 servers, with exact results", { timeout: 180_000 }, async () => {
    await db.query("UPDATE counters SET n = 0")
    let running = true
    let maxServers = 0
    const sampler = (async () => {
      while (running) maxServers = Math.max(maxServers, await serverCount())
    })()
    const clients = await Promise.all(Array.from({ length: 200 }, () => client()))
    try {
      await Promise.all(
        clients.map(async (c, i) => {
          for (let t = 0; t < 20; t++) {
            await c.query("BEGIN")
            await c.query("UPDATE counters SET n = n + 1 WHERE id = $1", [(i % 10) + 1])
            await c.query("COMMIT")
          }
        })
      )
    } finally {
      running = false
      await sampler
      await Promise.all(clients.map((c) => c.end()))
    }
    const rows = await db.query<{ total: string }>("SELECT sum(n) AS total FROM counters")
    expect(Number(rows[0]!.total)).toBe(200 * 20)
    expect(maxServers).toBeGreaterThan(0)
    expect(maxServers).toBeLessThanOrEqual(5)
  })

  it("keeps one backend for the whole of a transaction", async () => {
    const a = await client()
    const b = await client()
    try {
      await a.query("BEGIN")
      const pids = new Set<number>()
      for (let i = 0; i < 5; i++) {
        pids.add((await a.query("SELECT pg_backend_pid() AS pid")).rows[0].pid)
        await b.query("SELECT 1") // another client's traffic in between must not take A's server
      }
      await a.query("COMMIT")
      expect(pids.size).toBe(1)
    } finally {
      await a.end()
      await b.end()
    }
  })

  it("answers 50 pipelined queries in one write and then releases the server", async () => {
    const raw = await RawClient.connect(tidepool.transactionPort, "solo.acme", PASSWORD)
    try {
      raw.write(Buffer.concat(Array.from({ length: 50 }, (_, i) => serialize.query(`SELECT ${i} AS n`))))
      const messages = await raw.untilReady(50)
      expect(messages.filter((m) => m.type === "Z")).toHaveLength(50)
      expect(messages.filter((m) => m.type === "D")).toHaveLength(50)
      expect((await poolStats("solo")).busy).toBe(0)
      // pool_size 1: a second client only gets through if the server really went back.
      const other = await client("solo.acme")
      expect((await other.query("SELECT 'next' AS who")).rows[0].who).toBe("next")
      await other.end()
    } finally {
      raw.close()
    }
  })

  it("ECHECKOUTTIMEOUT when every server is held past the checkout timeout", async () => {
    const holders = [await client("pair.acme"), await client("pair.acme")]
    try {
      await Promise.all(holders.map((h) => h.query("BEGIN")))
      await Promise.all(holders.map((h) => h.query("SELECT 1")))
      const third = await client("pair.acme")
      const error = await third.query("SELECT 1").then(
        () => undefined,
        (e: pg.DatabaseError) => e
      )
      expect(error?.code).toBe("XX000")
      expect(error?.message).toBe(
        "(ECHECKOUTTIMEOUT) unable to check out connection from the pool after 500ms in Transaction mode"
      )
      await third.end().catch(() => {})
    } finally {
      await Promise.all(holders.map((h) => h.query("COMMIT").then(() => h.end())))
    }
  })

  it("EMAXCONN when the pool's client limit is reached", async () => {
    const error = await client("closed.acme").then(
      (c) => c.end().then(() => undefined),
      (e: pg.DatabaseError) => e
    )
    expect(error?.code).toBe("XX000")
    expect(error?.message).toBe("(EMAXCONN) max client connections reached, limit: 0")
  })

  it("a client that vanishes inside a transaction does not keep its row locks", async () => {
    const a = await client()
    a.on("error", () => {})
    await a.query("BEGIN")
    await a.query("SELECT * FROM counters WHERE id = 1 FOR UPDATE")
    ;(a as unknown as { connection: { stream: { destroy(): void } } }).connection.stream.destroy()
    const b = await client()
    try {
      await b.query("BEGIN")
      await b.query("SET LOCAL lock_timeout = '30s'")
      await b.query("UPDATE counters SET n = n WHERE id = 1")
      await b.query("COMMIT")
    } finally {
      await b.end()
    }
  })

  it("keeps each client's settings its own across shared servers", async () => {
    // pool_size 2 ("pair"): A and B share both servers in turn.
    const a = await client("pair.acme", { options: "-c TimeZone=Asia/Tokyo", application_name: "client-a" })
    const b = await client("pair.acme", { application_name: "client-b" })
    const show = async (c: pg.Client) =>
      (
        await c.query(
          "SELECT current_setting('TimeZone') AS tz, current_setting('application_name') AS app, pg_backend_pid() AS pid"
        )
      ).rows[0] as { tz: string; app: string; pid: number }
    try {
      await a.query("SET application_name = 'client-a-renamed'")
      const seenByA = await show(a)
      expect(seenByA).toMatchObject({ tz: "Asia/Tokyo", app: "client-a-renamed" })
      // B on whichever server, A's settings must not show.
      const pidsB = new Set<number>()
      for (let i = 0; i < 4; i++) {
        const seen = await show(b)
        pidsB.add(seen.pid)
        expect(seen.tz).not.toBe("Asia/Tokyo")
        expect(seen.app).toBe("client-b")
      }
      // B holds one server; A must run on the other and still see its own values.
      await b.query("BEGIN")
      const pidHeldByB = (await show(b)).pid
      const again = await show(a)
      expect(again.pid).not.toBe(pidHeldByB)
      expect(again).toMatchObject({ tz: "Asia/Tokyo", app: "client-a-renamed" })
      await b.query("COMMIT")
      // And B, landing wherever A has been, still sees its own.
      expect(await show(b)).toMatchObject({ app: "client-b" })
      expect((await show(b)).tz).not.toBe("Asia/Tokyo")
      expect(pidsB.size + 1).toBeGreaterThan(1)
    } finally {
      await a.end()
      await b.end()
    }
  })

  it("greets each client with its own startup settings, however many share them", async () => {
    // The greeting is made once per pool and set of startup settings, and shared (ClientSession).
    const url = tidepool.url({ user: "pair.acme", password: PASSWORD, mode: "transaction" })
    const opened: Array<postgres.Sql> = []
    const connect = async (connection: Record<string, string>) => {
      const sql = postgres(url, { max: 1, connection, onnotice: () => undefined })
      opened.push(sql)
      await sql`SELECT 1`
      return sql.parameters
    }
    try {
      const tokyo = await connect({ TimeZone: "Asia/Tokyo", application_name: "greet-a" })
      const plain = await connect({ application_name: "greet-b" })
      const tokyoAgain = await connect({ TimeZone: "Asia/Tokyo", application_name: "greet-a" })
      const lima = await connect({ TimeZone: "America/Lima", application_name: "greet-a" })
      expect(tokyo).toMatchObject({ TimeZone: "Asia/Tokyo", application_name: "greet-a" })
      expect(plain.application_name).toBe("greet-b")
      expect(plain.TimeZone).not.toBe("Asia/Tokyo")
      expect(tokyoAgain).toEqual(tokyo)
      expect(lima).toMatchObject({ TimeZone: "America/Lima", application_name: "greet-a" })
    } finally {
      await Promise.all(opened.map((sql) => sql.end()))
    }
  })

  it("does not carry unreported startup settings over to the next client of a server", async () => {
    // pool_size 1 ("solo"): both clients use the same server.
    const a = await client("solo.acme", {
      options: "-c search_path=pg_catalog -c bytea_output=escape -c extra_float_digits=0"
    })
    const b = await client("solo.acme")
    const show = async (c: pg.Client) =>
      (
        await c.query(
          "SELECT current_setting('search_path') AS path, current_setting('bytea_output') AS bytea, current_setting('extra_float_digits') AS digits"
        )
      ).rows[0]
    try {
      expect(await show(a)).toEqual({ path: "pg_catalog", bytea: "escape", digits: "0" })
      const seenByB = await show(b)
      expect(seenByB.path).not.toBe("pg_catalog")
      expect(seenByB.bytea).toBe("hex")
      expect(await show(a)).toEqual({ path: "pg_catalog", bytea: "escape", digits: "0" })
    } finally {
      await a.end()
      await b.end()
    }
  })

  it("cancels the query running for the cancelling client, and only it", async () => {
    const victim = await client()
    const bystander = await client()
    try {
      expect(await cancelWhileBusy({ db, port: tidepool.transactionPort, victim, bystander })).toEqual({
        victimCode: "57014",
        bystanderState: "done"
      })
      // The victim's connection is still good.
      expect((await victim.query("SELECT 1 AS one")).rows[0].one).toBe(1)
    } finally {
      await victim.end()
      await bystander.end()
    }
  })

  it("a cancel from a client that holds no server does nothing, even to the query now on its last server", async () => {
    // pool_size 1 ("solo"): A used the only server, then B runs on it.
    const a = await client("solo.acme")
    const b = await client("solo.acme")
    try {
      await a.query("SELECT 1")
      const running = b.query("SELECT pg_sleep(2), 'finished' AS state")
      for (;;) {
        const rows = await db.query(
          "SELECT 1 FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(2)%' AND state = 'active'"
        )
        if (rows.length > 0) break
      }
      const canceller = new pg.Client({ host: "127.0.0.1", port: tidepool.transactionPort })
      const idleQuery = new pg.Query("SELECT 1")
      ;(a as unknown as { activeQuery: pg.Query }).activeQuery = idleQuery
      ;(canceller as unknown as { cancel(c: pg.Client, q: pg.Query): void }).cancel(a, idleQuery)
      expect((await running).rows[0].state).toBe("finished")
    } finally {
      ;(a as unknown as { activeQuery: unknown }).activeQuery = null
      await a.end()
      await b.end()
    }
  })

  it("replaces an idle server killed by pg_terminate_backend without any client noticing", async () => {
    const c = await client("solo.acme")
    try {
      const pid = (await c.query("SELECT pg_backend_pid() AS pid")).rows[0].pid as number
      await db.query("SELECT pg_terminate_backend($1)", [pid])
      for (;;) {
        const rows = await db.query("SELECT 1 FROM pg_stat_activity WHERE pid = $1", [pid])
        if (rows.length === 0) break
      }
      const next = await c.query("SELECT pg_backend_pid() AS pid")
      expect(next.rows[0].pid).not.toBe(pid)
    } finally {
      await c.end()
    }
  })

  it.skipIf(!hasPgbench)("pgbench -S -c 50 through pool_size 5 has no failed transactions", async () => {
    await run("pgbench", ["-i", "-s", "1", "-q", db.url({ user: "app", password: PASSWORD })])
    const url = tidepool.url({ user: "app.acme", password: PASSWORD, mode: "transaction" })
    const { stdout } = await run("pgbench", ["-S", "-c", "50", "-j", "2", "-T", "10", url], {
      maxBuffer: 16 * 1024 * 1024
    })
    expect(stdout).toMatch(/number of failed transactions: 0 \(0\.000%\)/)
    expect(Number(stdout.match(/number of transactions actually processed: (\d+)/)?.[1])).toBeGreaterThan(0)
  })
})
