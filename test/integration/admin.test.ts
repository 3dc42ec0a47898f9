import { Effect } from "effect"
import pg from "pg"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { AdminControl } from "../../src/admin/index.ts"
import { PoolRegistry } from "../../src/pool/index.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"
import { hasTool, run } from "../support/tools.ts"

const psqlPresent = await hasTool("psql")
if (!psqlPresent) console.log("admin.test: psql not found, the psql checks are skipped")

let db: PostgresServer
let tidepool: RunningTidepool

const user = { db_user: "app", db_password: "app-secret", pool_size: 2 }
beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: "app-secret" }] })
  tidepool = await startTidepool({
    tenants: [
      ...["acme", "beta"].map((id) => ({ external_id: id, ...upstreamOf(db), users: [user] })),
      { external_id: "solo", ...upstreamOf(db), users: [{ ...user, pool_size: 1 }] }
    ],
    config: { adminUsers: [{ name: "ops", secret: "ops-secret" }] }
  })
})

afterAll(async () => {
  await tidepool?.stop()
  await db?.stop()
})

const connect = async (username: string, password: string, database = "postgres") => {
  const client = new pg.Client({
    host: "127.0.0.1",
    port: tidepool.transactionPort,
    user: username,
    password,
    database
  })
  await client.connect()
  return client
}

const admin = () => connect("ops", "ops-secret", "pgbouncer")

/** Rows of an admin SHOW through psql, as objects keyed by column name. */
const psql = async (command: string): Promise<Array<Record<string, string>>> => {
  const url = `postgresql://ops:ops-secret@127.0.0.1:${tidepool.transactionPort}/pgbouncer`
  const { stdout } = await run("psql", ["-X", "-A", "-F", "|", "-P", "footer=off", "-c", command, url])
  const [header, ...lines] = stdout.trim().split("\n")
  const names = header!.split("|")
  return lines.map((line) => Object.fromEntries(line.split("|").map((v, i) => [names[i]!, v])))
}

const failure = (p: Promise<unknown>) =>
  p.then(
    () => undefined,
    (e: pg.DatabaseError) => ({ code: e.code, message: e.message })
  )

describe("admin console", () => {
  it.skipIf(!psqlPresent)("SHOW POOLS and SHOW CLIENTS reflect connected clients (psql)", async () => {
    const a = await connect("app.acme", "app-secret")
    const b = await connect("app.acme", "app-secret")
    const c = await connect("app.beta", "app-secret")
    try {
      await b.query("BEGIN")
      const pools = await psql("SHOW POOLS")
      const acme = pools.find((p) => p.database === "acme/postgres")!
      expect(acme).toMatchObject({
        user: "app",
        cl_active: "2",
        cl_waiting: "0",
        sv_active: "1",
        pool_mode: "transaction"
      })
      expect(pools.find((p) => p.database === "beta/postgres")).toMatchObject({ cl_active: "1", sv_active: "0" })

      const clients = (await psql("SHOW CLIENTS")).filter((r) => r.database === "acme/postgres")
      expect(clients).toHaveLength(2)
      expect(clients.map((r) => r.state).sort()).toEqual(["active", "idle"])
      expect(clients.every((r) => r.user === "app" && r.type === "C" && r.addr === "127.0.0.1")).toBe(true)

      const servers = (await psql("SHOW SERVERS")).filter((r) => r.database === "acme/postgres")
      const active = servers.find((r) => r.state === "active")!
      expect(active.link).toBe(clients.find((r) => r.state === "active")!.ptr)
      const pid = (await b.query("SELECT pg_backend_pid() AS pid")).rows[0].pid as number
      expect(active.remote_pid).toBe(String(pid))
      await b.query("COMMIT")
    } finally {
      await Promise.all([a.end(), b.end(), c.end()])
    }
  })

  it.skipIf(!psqlPresent)("answers every SHOW with PgBouncer's columns and never shows secrets", async () => {
    const stats = await psql("SHOW STATS")
    expect(Object.keys(stats[0]!)).toEqual(
      expect.arrayContaining(["database", "total_xact_count", "total_query_count", "total_wait_time", "avg_xact_time"])
    )
    expect((await psql("SHOW DATABASES")).map((r) => r.name)).toEqual([
      "acme/postgres",
      "beta/postgres",
      "solo/postgres"
    ])
    expect((await psql("SHOW USERS")).map((r) => r.name)).toEqual(["app.acme", "app.beta", "app.solo"])
    const config = await psql("SHOW CONFIG")
    expect(config.find((r) => r.key === "admin_users")?.value).toBe("ops=********")
    expect(JSON.stringify(config)).not.toContain("ops-secret")
    expect((await psql("SHOW VERSION"))[0]!.version).toMatch(/^Tidepool \S+ \(PgBouncer 1\.21\.0/)
    expect((await psql("SHOW LISTS")).find((r) => r.list === "pools")).toBeDefined()
  })

  it("PAUSE holds new transactions until RESUME", async () => {
    const client = await connect("app.acme", "app-secret")
    const other = await connect("app.beta", "app-secret")
    const console = await admin()
    try {
      await client.query("SELECT 1")
      await console.query("PAUSE acme")
      let done = false
      const held = client.query("SELECT 42 AS answer").then((r) => {
        done = true
        return r.rows[0].answer as number
      })
      // The held query shows up as a waiting client; another tenant's transactions still run.
      for (;;) {
        const { rows } = await console.query("SHOW POOLS")
        if (rows.find((r) => r.database === "acme/postgres")?.cl_waiting === 1) break
      }
      expect((await other.query("SELECT 7 AS marker")).rows[0].marker).toBe(7)
      expect(done).toBe(false)
      const { rows } = await console.query("SHOW DATABASES")
      expect(rows.find((r) => r.name === "acme/postgres")?.paused).toBe(1)
      await console.query("RESUME acme")
      expect(await held).toBe(42)
    } finally {
      await Promise.all([client.end(), other.end(), console.end()])
    }
  })

  it("PAUSE answers only once running transactions have finished", async () => {
    const client = await connect("app.acme", "app-secret")
    const console = await admin()
    try {
      await client.query("BEGIN")
      let paused = false
      const pause = console.query("PAUSE").then(() => {
        paused = true
      })
      // The open transaction keeps its server and runs on; PAUSE answers only after its COMMIT.
      expect((await client.query("SELECT 1 AS one")).rows[0].one).toBe(1)
      expect(paused).toBe(false)
      await client.query("COMMIT")
      await pause
      const resumer = await admin()
      await resumer.query("RESUME")
      await resumer.end()
      expect((await client.query("SELECT 2 AS two")).rows[0].two).toBe(2)
    } finally {
      await Promise.all([client.end(), console.end()])
    }
  })

  it("PAUSE; RESUME in one query: the release that makes the pool quiet lends its server to the waiter, opening none", async () => {
    const holder = await connect("app.solo", "app-secret")
    const waiter = await connect("app.solo", "app-secret")
    const console = await admin()
    const watcher = await admin()
    try {
      await holder.query("BEGIN")
      // The pool of one lends its only server to the open transaction; PAUSE waits for its end.
      const both = console.query("PAUSE solo; RESUME solo")
      for (;;) {
        const { rows } = await watcher.query("SHOW DATABASES")
        if (rows.find((r) => r.name === "solo/postgres")?.paused === 1) break
      }
      const held = waiter.query("SELECT 42 AS answer")
      for (;;) {
        const { rows } = await watcher.query("SHOW POOLS")
        if (rows.find((r) => r.database === "solo/postgres")?.cl_waiting === 1) break
      }
      // The COMMIT's release makes the pool quiet: PAUSE answers, RESUME runs at once, and the
      // server being released goes to the waiting query instead of a second one being opened for it.
      await holder.query("COMMIT")
      expect((await held).rows[0].answer).toBe(42)
      await both
      const pool = await tidepool.runtime.runPromise(
        Effect.map(PoolRegistry, (registry) => registry.all().find((p) => p.settings.tenant === "solo")!)
      )
      expect(pool.total).toBe(1)
    } finally {
      await Promise.all([holder.end(), waiter.end(), console.end(), watcher.end()])
    }
  })

  it("RECONNECT replaces the servers; KILL closes a database's clients with 57P01", async () => {
    const client = await connect("app.acme", "app-secret")
    const console = await admin()
    try {
      const before = (await client.query("SELECT pg_backend_pid() AS pid")).rows[0].pid as number
      await console.query("RECONNECT acme")
      const after = (await client.query("SELECT pg_backend_pid() AS pid")).rows[0].pid as number
      expect(after).not.toBe(before)

      const closed = new Promise<{ code?: string }>((resolve) =>
        client.on("error", (e) => resolve(e as { code?: string }))
      )
      await console.query("KILL acme/postgres")
      expect((await closed).code).toBe("57P01")
    } finally {
      await console.end()
      await client.end().catch(() => undefined)
    }
  })

  it("refuses users that are not admins with ENOTADMIN, and wrong admin passwords", async () => {
    expect(await failure(connect("app.acme", "app-secret", "pgbouncer"))).toEqual({
      code: "28000",
      message: '(ENOTADMIN) user "app.acme" may not use the admin console'
    })
    expect(await failure(connect("ops", "wrong", "tidepool"))).toEqual({
      code: "28P01",
      message: 'password authentication failed for user "ops"'
    })
  })

  it("runs at most the breaker's threshold of checks for concurrent wrong admin passwords: 100 at once get 10", async () => {
    // A pooler of its own: the block it ends with would refuse this file's other admin logins.
    const guarded = await startTidepool({
      tenants: [{ external_id: "acme", ...upstreamOf(db), users: [user] }],
      config: { adminUsers: [{ name: "ops", secret: "ops-secret" }], authFailureDelayMs: 100 },
      captureLogs: true
    })
    try {
      const login = async (password: string) => {
        const client = new pg.Client({
          host: "127.0.0.1",
          port: guarded.sessionPort,
          user: "ops",
          password,
          database: "pgbouncer"
        })
        client.on("error", () => undefined)
        try {
          await client.connect()
          await client.end()
          return "ok"
        } catch (e) {
          const error = e as pg.DatabaseError
          return error.message.match(/^\((E[A-Z]+)\)/)?.[1] ?? error.code ?? error.message
        }
      }
      const outcomes = await Promise.all(Array.from({ length: 100 }, () => login("wrong")))
      const tally: Record<string, number> = {}
      for (const outcome of outcomes) tally[outcome] = (tally[outcome] ?? 0) + 1
      // Every check that ran ended with its verdict (28P01); the others never reached one.
      expect(tally).toEqual({ "28P01": 10, ECIRCUITBREAKER: 90 })
      expect(await login("ops-secret")).toBe("ECIRCUITBREAKER")
      // The admin console's count is its own: the address's tenant logins are not blocked.
      const tenant = new pg.Client({ connectionString: guarded.url({ user: "app.acme", password: "app-secret" }) })
      await tenant.connect()
      await tenant.end()
      const warnings = guarded.logs.filter((l) => l.code === "ECIRCUITBREAKER" && l.level === "WARN")
      expect(warnings.map((l) => l.message)).toEqual([
        "127.0.0.1 blocked for 120 s after 10 failed admin console logins"
      ])
    } finally {
      await guarded.stop()
    }
  })

  it("answers unknown commands with EADMINCOMMAND and stays usable", async () => {
    const console = await admin()
    try {
      expect(await failure(console.query("SHOW NOTHING"))).toEqual({
        code: "42601",
        message: "(EADMINCOMMAND) unknown SHOW: NOTHING; try SHOW HELP"
      })
      expect(await failure(console.query("PAUSE nosuchtenant"))).toEqual({
        code: "42601",
        message: "(EADMINCOMMAND) no such database: nosuchtenant"
      })
      expect(await failure(console.query("SELECT $1::int", [1]))).toMatchObject({ code: "42601" })
      expect((await console.query("SHOW VERSION")).rows).toHaveLength(1)
    } finally {
      await console.end()
    }
  })

  it("SHUTDOWN stops accepting connections and asks the process to shut down", async () => {
    const other = await startTidepool({
      tenants: [{ external_id: "acme", ...upstreamOf(db), users: [user] }],
      config: { adminUsers: [{ name: "ops", secret: "ops-secret" }] }
    })
    try {
      const console = new pg.Client({
        host: "127.0.0.1",
        port: other.sessionPort,
        user: "ops",
        password: "ops-secret",
        database: "pgbouncer"
      })
      await console.connect()
      await console.query("SHUTDOWN")
      await other.runtime.runPromise(Effect.flatMap(AdminControl, (control) => control.shutdownRequested))
      const late = new pg.Client({ host: "127.0.0.1", port: other.sessionPort, user: "ops", password: "ops-secret" })
      await expect(late.connect()).rejects.toMatchObject({ code: "ECONNREFUSED" })
      await console.end()
    } finally {
      await other.stop()
    }
  })
})
