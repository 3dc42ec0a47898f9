/**
 * Transaction mode keeps session semantics (docs/session-state.md): settings a client SETs follow it
 * from server to server and never reach another client; state that cannot move (session advisory
 * locks, temporary tables, WITH HOLD cursors, SQL-level prepared statements) pins the client to its
 * server; nothing of a client that left is visible to the next. Pools of one and two servers, so
 * clients share servers.
 */
import { Effect } from "effect"
import pg from "pg"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { PoolRegistry } from "../../src/pool/index.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"

let db: PostgresServer
let tidepool: RunningTidepool

const PASSWORD = "app-secret"

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: PASSWORD, superuser: true }] })
  // One connection only: the pool's server takes it, so a listening connection cannot be opened.
  await db.query(`CREATE ROLE limited LOGIN PASSWORD '${PASSWORD}' CONNECTION LIMIT 1`)
  tidepool = await startTidepool({
    tenants: [
      {
        external_id: "acme",
        ...upstreamOf(db),
        users: [
          { db_user_alias: "solo", db_user: "app", db_password: PASSWORD, pool_size: 1 },
          { db_user_alias: "pair", db_user: "app", db_password: PASSWORD, pool_size: 2 },
          { db_user_alias: "mix", db_user: "app", db_password: PASSWORD, pool_size: 2 },
          { db_user_alias: "limited", db_user: "limited", db_password: PASSWORD, pool_size: 1 }
        ]
      }
    ],
    config: { adminUsers: [{ name: "ops", secret: "ops-secret" }] }
  })
})

afterAll(async () => {
  await tidepool?.stop()
  await db?.stop()
})

const client = async (alias: string) => {
  const c = new pg.Client({
    connectionString: tidepool.url({ user: `${alias}.acme`, password: PASSWORD, mode: "transaction" })
  })
  await c.connect()
  return c
}

const one = async <T = Record<string, unknown>>(c: pg.Client, sql: string): Promise<T> =>
  (await c.query(sql)).rows[0] as T

const poolOf = (alias: string) =>
  tidepool.runtime.runPromise(
    Effect.map(PoolRegistry, (r) => r.all().find((p) => p.settings.key.includes(`\u0000${alias}\u0000transaction`)))
  )

const busy = async (alias: string) => (await poolOf(alias))?.stats.busy ?? 0

/**
 * Polls `read` until it returns `want`, failing after a deadline. Needed where the pooler acts just
 * after the client's answer (a server is released or closed one round trip after a transaction
 * that changed session state, once the pooler has asked the server what is left on it).
 */
const eventually = async <T>(read: () => Promise<T>, want: T, what: string): Promise<void> => {
  const deadline = Date.now() + 5_000
  let seen = await read()
  while (seen !== want) {
    if (Date.now() > deadline) throw new Error(`${what}: still ${String(seen)}, want ${String(want)}`)
    await new Promise((resolve) => setImmediate(resolve))
    seen = await read()
  }
}

const errorCode = async (p: Promise<unknown>): Promise<string | undefined> => {
  try {
    await p
    return undefined
  } catch (error) {
    return (error as { code?: string }).code
  }
}

describe("session state in transaction mode", () => {
  it("statement_timeout SET by one client applies to it alone, on a shared server", async () => {
    const a = await client("solo")
    const b = await client("solo")
    try {
      await a.query("SET statement_timeout = '50ms'")
      expect(await errorCode(b.query("SELECT pg_sleep(0.2)"))).toBeUndefined()
      expect(await errorCode(a.query("SELECT pg_sleep(0.2)"))).toBe("57014")
      expect(await one(b, "SHOW statement_timeout")).toEqual({ statement_timeout: "0" })
      expect(await one(a, "SHOW statement_timeout")).toEqual({ statement_timeout: "50ms" })
      await a.query("RESET statement_timeout")
      expect(await errorCode(a.query("SELECT pg_sleep(0.2)"))).toBeUndefined()
    } finally {
      await a.end()
      await b.end()
    }
  })

  it("search_path (not reported before PostgreSQL 18) follows its client", async () => {
    await db.query("CREATE SCHEMA IF NOT EXISTS alt; CREATE TABLE IF NOT EXISTS alt.marker AS SELECT 'alt' AS v")
    const a = await client("pair")
    const b = await client("pair")
    try {
      await a.query("SET search_path = alt, public")
      for (let i = 0; i < 4; i++) {
        expect(await one(a, "SELECT v FROM marker")).toEqual({ v: "alt" })
        expect(await errorCode(b.query("SELECT v FROM marker"))).toBe("42P01")
        expect(await one(b, "SHOW search_path")).toEqual({ search_path: '"$user", public' })
      }
    } finally {
      await a.end()
      await b.end()
    }
  })

  it("follows PostgreSQL's rules: SET LOCAL ends with its transaction, a rolled-back SET is undone", async () => {
    const a = await client("solo")
    try {
      await a.query("BEGIN; SET LOCAL work_mem = '1MB'; COMMIT")
      expect(await one(a, "SHOW work_mem")).toEqual({ work_mem: "4MB" })
      await a.query("BEGIN")
      await a.query("SET work_mem = '2MB'")
      await a.query("ROLLBACK")
      expect(await one(a, "SHOW work_mem")).toEqual({ work_mem: "4MB" })
      await a.query("SELECT set_config('app.tenant', 'x', false)")
      await a.query("BEGIN; SET work_mem = '3MB'; COMMIT")
      expect(await one(a, "SELECT current_setting('work_mem') AS w, current_setting('app.tenant') AS t")).toEqual({
        w: "3MB",
        t: "x"
      })
    } finally {
      await a.end()
    }
  })

  it("SET ROLE and SET SESSION AUTHORIZATION stay with the client that ran them", async () => {
    await db.query("DO $$ BEGIN CREATE ROLE other; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    const a = await client("solo")
    const b = await client("solo")
    try {
      await a.query("SET ROLE other")
      expect(await one(b, "SELECT current_user AS u")).toEqual({ u: "app" })
      expect(await one(a, "SELECT current_user AS u")).toEqual({ u: "other" })
      await a.query("RESET ROLE")
      await a.query("SET SESSION AUTHORIZATION other")
      expect(await one(b, "SELECT session_user AS u, current_user AS c")).toEqual({ u: "app", c: "app" })
      expect(await one(a, "SELECT session_user AS u")).toEqual({ u: "other" })
    } finally {
      await a.end()
      await b.end()
    }
  })

  it("a session advisory lock pins its client until it is unlocked, or the client leaves", async () => {
    const a = await client("pair")
    const b = await client("pair")
    try {
      const held = await one<{ pid: number }>(a, "SELECT pg_advisory_lock(42), pg_backend_pid() AS pid")
      for (let i = 0; i < 3; i++) {
        const seen = await one<{ got: boolean; pid: number }>(
          b,
          "SELECT pg_try_advisory_lock(42) AS got, pg_backend_pid() AS pid"
        )
        expect(seen.got).toBe(false)
        expect(seen.pid).not.toBe(held.pid)
        expect((await one<{ pid: number }>(a, "SELECT pg_backend_pid() AS pid")).pid).toBe(held.pid)
      }
      await eventually(() => busy("pair"), 1, "servers held while A holds the lock")
      expect((await poolOf("pair"))?.counters.pinnedClients).toBe(1)
      // The admin console says why.
      const admin = new pg.Client({
        connectionString: `postgresql://ops:ops-secret@127.0.0.1:${tidepool.transactionPort}/pgbouncer`
      })
      await admin.connect()
      const pins = (await admin.query("SHOW CLIENTS")).rows.map((r) => r.pinned).sort()
      await admin.end()
      expect(pins).toEqual(["", "session advisory lock"])
      await a.query("SELECT pg_advisory_unlock(42)")
      await eventually(() => busy("pair"), 0, "servers held after the unlock")
      expect((await poolOf("pair"))?.counters.pinnedClients).toBe(0)
      const got = await one<{ got: boolean }>(b, "SELECT pg_try_advisory_lock(42) AS got")
      expect(got.got).toBe(true)
      // Now B holds it: B is pinned, and leaving releases it (its server is closed, never lent on).
      await b.end()
      // Its server is closed (the lock goes with its backend), never lent to another client.
      await eventually(
        async () => (await one<{ got: boolean }>(a, "SELECT pg_try_advisory_lock(42) AS got")).got,
        true,
        "lock of a client that left"
      )
      await a.query("SELECT pg_advisory_unlock_all()")
    } finally {
      await a.end()
      await b.end().catch(() => {})
    }
  })

  it("a pinned client that LISTENs gets notifications while it idles (the leader pattern)", async () => {
    const a = await client("pair")
    const b = await client("pair")
    try {
      await a.query("SELECT pg_advisory_lock(77)")
      await a.query("LISTEN leader_jobs")
      // One more statement: A is now idle, pinned, with nothing of its LISTEN still in flight.
      await a.query("SELECT 1")
      const got = new Promise<string | undefined>((resolve) => a.once("notification", (n) => resolve(n.payload)))
      await b.query("NOTIFY leader_jobs, 'job-1'")
      const deadline = new Promise<string>((resolve) => setTimeout(() => resolve("no notification in 5 s"), 5_000))
      expect(await Promise.race([got, deadline])).toBe("job-1")
      await a.query("SELECT pg_advisory_unlock(77)")
    } finally {
      await a.end()
      await b.end()
    }
  })

  it("a LISTEN the listening connection cannot take ends the session with ELISTENFAILED", async () => {
    const a = await client("limited")
    const failed = new Promise<string | undefined>((resolve) => a.once("error", (e) => resolve(e.message)))
    await a.query("LISTEN refused_here").catch(() => {})
    const deadline = new Promise<string>((resolve) => setTimeout(() => resolve("no error in 5 s"), 5_000))
    expect(await Promise.race([failed, deadline])).toMatch(/^\(ELISTENFAILED\) could not open the listening connection/)
    await a.end().catch(() => {})
  })

  it("temporary tables, WITH HOLD cursors and PL/pgSQL-prepared statements pin; dropping, closing or deallocating unpins", async () => {
    const a = await client("pair")
    try {
      await a.query("CREATE TEMP TABLE scratch (x int)")
      const pid = (await one<{ pid: number }>(a, "SELECT pg_backend_pid() AS pid")).pid
      await a.query("INSERT INTO scratch VALUES (1)")
      expect(await one(a, "SELECT count(*)::int AS n, pg_backend_pid() AS pid FROM scratch")).toEqual({ n: 1, pid })
      await a.query("DROP TABLE scratch")
      await a.query("BEGIN; DECLARE c CURSOR WITH HOLD FOR SELECT 1 AS one; COMMIT")
      expect(await one(a, "FETCH c")).toEqual({ one: 1 })
      await a.query("CLOSE c")
      await eventually(() => busy("pair"), 0, "servers held after the cursor closed")
      // A statement PREPAREd by PL/pgSQL pins too, and EXECUTE finds it on the same server.
      await a.query("DO $$ BEGIN EXECUTE 'PREPARE by_plpgsql AS SELECT 7 AS seven'; END $$")
      await eventually(() => busy("pair"), 1, "servers held by a client with a PL/pgSQL-prepared statement")
      expect(await one(a, "EXECUTE by_plpgsql")).toEqual({ seven: 7 })
      await a.query("DEALLOCATE by_plpgsql")
      await eventually(() => busy("pair"), 0, "servers held after DEALLOCATE")
    } finally {
      await a.end()
    }
  })

  it("after a client leaves, the next client of its server sees nothing of it", async () => {
    const a = await client("solo")
    await a.query("SET statement_timeout = '7s'")
    await a.query("SET search_path = pg_catalog")
    await a.query("SET work_mem = '5MB'")
    await a.query("SELECT set_config('app.secret', 'a-only', false)")
    await a.query("CREATE TEMP TABLE mine AS SELECT 1 AS x")
    await a.query("SELECT pg_advisory_lock(7)")
    await a.query("LISTEN a_channel")
    await a.query("PREPARE a_stmt AS SELECT 1")
    await a.end()
    const c = await client("solo")
    try {
      const seen = await one(
        c,
        `SELECT current_setting('statement_timeout') AS timeout, current_setting('search_path') AS path,
                current_setting('work_mem') AS work_mem, current_setting('app.secret', true) AS secret,
                (SELECT count(*)::int FROM pg_class WHERE relnamespace = pg_my_temp_schema()) AS temps,
                (SELECT count(*)::int FROM pg_locks WHERE locktype = 'advisory') AS locks,
                (SELECT count(*)::int FROM pg_listening_channels()) AS listens,
                (SELECT count(*)::int FROM pg_prepared_statements WHERE from_sql) AS prepared`
      )
      expect(seen).toEqual({
        timeout: "0",
        path: '"$user", public',
        work_mem: "4MB",
        secret: seen.secret === null ? null : "",
        temps: 0,
        locks: 0,
        listens: 0,
        prepared: 0
      })
    } finally {
      await c.end()
    }
  })

  it("random SET / RESET / SET LOCAL / set_config traffic and pins on shared servers never leak between clients", async () => {
    // A seeded generator, so a failure can be replayed.
    let seed = 20261206
    const random = (n: number) => {
      seed = (seed * 1103515245 + 12345) % 2147483648
      return seed % n
    }
    const names = ["work_mem", "statement_timeout", "app.k"] as const
    const values: Record<(typeof names)[number], ReadonlyArray<string>> = {
      work_mem: ["1MB", "2MB", "3MB"],
      statement_timeout: ["10s", "20s", "30s"],
      "app.k": ["p", "q", "r"]
    }
    const defaults: Record<string, string> = { work_mem: "4MB", statement_timeout: "0", "app.k": "" }
    const clients = await Promise.all(Array.from({ length: 8 }, () => client("mix")))
    const models = clients.map(() => ({ ...defaults }))
    const read =
      "SELECT current_setting('work_mem') AS work_mem, current_setting('statement_timeout') AS statement_timeout, coalesce(current_setting('app.k', true), '') AS \"app.k\""
    try {
      await Promise.all(
        clients.map(async (c, i) => {
          const model = models[i]!
          for (let step = 0; step < 25; step++) {
            const name = names[random(names.length)]!
            const value = values[name][random(3)]!
            const set = name === "app.k" ? `SELECT set_config('app.k', '${value}', false)` : `SET ${name} = '${value}'`
            switch (random(6)) {
              case 0:
                await c.query(set)
                model[name] = value
                break
              case 1:
                await c.query(
                  `BEGIN; ${name === "app.k" ? `SELECT set_config('app.k', '${value}', true)` : `SET LOCAL ${name} = '${value}'`}; COMMIT`
                )
                break
              case 2:
                await c.query("BEGIN")
                await c.query(set)
                await c.query("ROLLBACK")
                break
              case 5: {
                // A pin taken and given up again, among the settings traffic: a temporary table
                // (only ever this client's) and a session advisory lock.
                await c.query(`CREATE TEMP TABLE own_${i} AS SELECT ${i} AS owner`)
                await c.query(`SELECT pg_advisory_lock(${1000 + i})`)
                const seen = await one(
                  c,
                  "SELECT string_agg(relname, ',') AS temps FROM pg_class WHERE relnamespace = pg_my_temp_schema()"
                )
                expect([i, step, seen]).toEqual([i, step, { temps: `own_${i}` }])
                await c.query(`DROP TABLE own_${i}`)
                await c.query(`SELECT pg_advisory_unlock(${1000 + i})`)
                break
              }
              case 3:
                if (name !== "app.k") {
                  await c.query(`RESET ${name}`)
                  model[name] = defaults[name]!
                }
                break
              default:
                await c.query("BEGIN")
                await c.query(set)
                await c.query("COMMIT")
                model[name] = value
            }
            expect([i, step, await one(c, read)]).toEqual([i, step, model])
          }
        })
      )
    } finally {
      await Promise.all(clients.map((c) => c.end()))
    }
  })
})
