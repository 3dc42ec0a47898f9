import { Effect } from "effect"
import pg from "pg"
import { serialize } from "pg-protocol"
import postgres from "postgres"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { PoolRegistry } from "../../src/pool/index.ts"
import { decodeErrorFields } from "../../src/protocol/index.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { RawClient as Raw, type RawMessage } from "../support/raw.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"
import { hasTool, run } from "../support/tools.ts"

const hasPgbench = await hasTool("pgbench")

const PASSWORD = "app-secret"
const CACHE_SIZE = 50

let db: PostgresServer
/** Cache of CACHE_SIZE statements per server, generous per-client limits. */
let tidepool: RunningTidepool
/** Tight per-client limits, for EMAXPREPARED and EMAXPREPAREDMEM. */
let strict: RunningTidepool

const user = (alias: string, pool_size: number) => ({
  db_user_alias: alias,
  db_user: "app",
  db_password: PASSWORD,
  pool_size
})

beforeAll(async () => {
  db = await startPostgres({
    roles: [{ name: "app", password: PASSWORD, superuser: true }],
    settings: { max_connections: "300" }
  })
  await db.query("CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL)")
  await db.query("INSERT INTO items SELECT g, g * 10 FROM generate_series(1, 100) g")
  tidepool = await startTidepool({
    tenants: [
      {
        external_id: "acme",
        ...upstreamOf(db),
        users: [
          user("app", 5),
          user("ten", 10),
          user("pair", 2),
          user("trio", 3),
          user("ddl", 2),
          user("pin", 2),
          { ...user("solo", 1) },
          user("one", 1),
          user("copy", 1)
        ]
      },
      {
        external_id: "plain",
        ...upstreamOf(db),
        feature_flags: { prepared_statements: false },
        users: [user("app", 1)]
      }
    ],
    config: { preparedCacheSize: CACHE_SIZE, maxPreparedStatements: 1000 }
  })
  strict = await startTidepool({
    tenants: [{ external_id: "acme", ...upstreamOf(db), users: [user("app", 2)] }],
    config: { maxPreparedStatements: 20, maxPreparedMemory: 4096 }
  })
})

afterAll(async () => {
  await tidepool?.stop()
  await strict?.stop()
  await db?.stop()
})

const url = (alias: string, t = tidepool) => t.url({ user: `${alias}.acme`, password: PASSWORD, mode: "transaction" })

const client = async (alias: string, t = tidepool) => {
  const c = new pg.Client({ connectionString: url(alias, t) })
  await c.connect()
  return c
}

const raw = (alias: string, t = tidepool) => Raw.connect(t.transactionPort, `${alias}.acme`, PASSWORD)

const pid = async (c: pg.Client) => (await c.query<{ pid: number }>("SELECT pg_backend_pid() AS pid")).rows[0]!.pid

const counters = (alias: string) =>
  tidepool.runtime.runPromise(
    Effect.map(
      PoolRegistry,
      (r) => r.all().find((p) => p.settings.key.includes(`\u0000${alias}\u0000transaction`))!.counters
    )
  )

const stats = (alias: string) =>
  tidepool.runtime.runPromise(
    Effect.map(
      PoolRegistry,
      (r) => r.all().find((p) => p.settings.key.includes(`\u0000${alias}\u0000transaction`))!.stats
    )
  )

const types = (messages: ReadonlyArray<RawMessage>) => messages.map((m) => m.type).join("")

const parse = (name: string, text: string) => serialize.parse({ name, text, types: [] })
const bindExecuteSync = (statement: string) =>
  Buffer.concat([serialize.bind({ statement }), serialize.execute(), serialize.sync()])

const errorOf = (messages: ReadonlyArray<RawMessage>) => {
  const e = messages.find((m) => m.type === "E")
  return e === undefined ? undefined : decodeErrorFields(e.body, 0, e.body.length)
}

/**
 * Makes the next transaction of a client of a two-server pool land on the server it did NOT use last:
 * `holder` keeps the other server in a transaction. Returns the pid of the server left free.
 */
const occupyLastUsed = async (alias: string, lastPid: number) => {
  // Two holders take both servers; the one holding `lastPid` keeps it, the other lets go.
  const a = await client(alias)
  const b = await client(alias)
  await a.query("BEGIN")
  await b.query("BEGIN")
  const [pa, pb] = [await pid(a), await pid(b)]
  expect(new Set([pa, pb]).size).toBe(2)
  const [keep, free] = pa === lastPid ? [a, b] : [b, a]
  await free.query("COMMIT")
  await free.end()
  return {
    freePid: pa === lastPid ? pb : pa,
    done: async () => {
      await keep.query("COMMIT")
      await keep.end()
    }
  }
}

describe("named prepared statements in transaction mode", () => {
  it("node-postgres named queries work across transactions on different servers", async () => {
    const c = await client("pair")
    const q = { name: "plus", text: "SELECT $1::int + 1 AS v, pg_backend_pid() AS pid", values: [41] }
    const first = (await c.query<{ v: number; pid: number }>(q)).rows[0]!
    expect(first.v).toBe(42)
    const other = await occupyLastUsed("pair", first.pid)
    const second = (await c.query<{ v: number; pid: number }>({ ...q, values: [1] })).rows[0]!
    expect(second).toEqual({ v: 2, pid: other.freePid })
    expect(second.pid).not.toBe(first.pid)
    await other.done()
    // And back: the statement is on both servers now.
    for (let i = 0; i < 5; i++) expect((await c.query<{ v: number }>({ ...q, values: [i] })).rows[0]!.v).toBe(i + 1)
    await c.end()
    expect((await counters("pair")).statementsReprepared).toBeGreaterThan(0)
  })

  it("a standalone Describe of a named statement works on a server that lacks it", async () => {
    const r = await raw("pair")
    r.socket.write(
      Buffer.concat([
        serialize.parse({
          name: "desc",
          text: "SELECT $1::int AS a, 'x'::text AS b, pg_backend_pid() AS pid",
          types: []
        }),
        serialize.bind({ statement: "desc", values: ["7"] }),
        serialize.execute(),
        serialize.sync()
      ])
    )
    const first = await r.untilReady()
    expect(types(first)).toBe("12DCZ")
    const rowPid = Number(rowValues(first.find((m) => m.type === "D")!)[2])
    const other = await occupyLastUsed("pair", rowPid)
    r.socket.write(Buffer.concat([serialize.describe({ type: "S", name: "desc" }), serialize.sync()]))
    const described = await r.untilReady()
    expect(types(described)).toBe("tTZ")
    const params = described[0]!.body
    expect(params.readInt16BE(0)).toBe(1)
    expect(params.readInt32BE(2)).toBe(23) // int4
    expect(columnNames(described[1]!)).toEqual(["a", "b", "pid"])
    await other.done()
    r.close()
  })

  it("errors about a statement name it as the client did, never by the pooler's internal name", async () => {
    const r = await raw("app")
    r.socket.write(
      Buffer.concat([
        serialize.parse({ name: "needs_one", text: "SELECT $1::int AS v", types: [] }),
        serialize.bind({ statement: "needs_one", values: [] }),
        serialize.execute(),
        serialize.sync()
      ])
    )
    const failed = await r.untilReady()
    expect(types(failed)).toBe("1EZ")
    const error = errorOf(failed)!
    expect(error.C).toBe("08P01")
    expect(error.M).toContain('prepared statement "needs_one"')
    expect(JSON.stringify(error)).not.toContain("tp_")
    r.close()
  })

  it("a failed Parse leaves no name behind: the fixed statement can reuse it", async () => {
    const r = await raw("app")
    r.socket.write(Buffer.concat([serialize.parse({ name: "retry", text: "SELEC 1", types: [] }), serialize.sync()]))
    const failed = await r.untilReady()
    expect(types(failed)).toBe("EZ")
    expect(errorOf(failed)?.C).toBe("42601")
    r.socket.write(
      Buffer.concat([
        serialize.parse({ name: "retry", text: "SELECT 1 AS one", types: [] }),
        serialize.bind({ statement: "retry" }),
        serialize.execute(),
        serialize.sync()
      ])
    )
    expect(types(await r.untilReady())).toBe("12DCZ")
    r.close()
  })

  it("a Parse skipped after an earlier error in the same batch leaves no name behind", async () => {
    const r = await raw("app")
    r.socket.write(
      Buffer.concat([
        serialize.parse({ name: "", text: "SELEC 1", types: [] }),
        serialize.parse({ name: "skipped", text: "SELECT 2", types: [] }),
        serialize.sync()
      ])
    )
    expect(types(await r.untilReady())).toBe("EZ")
    r.socket.write(
      Buffer.concat([
        serialize.parse({ name: "skipped", text: "SELECT 2 AS two", types: [] }),
        serialize.bind({ statement: "skipped" }),
        serialize.execute(),
        serialize.sync()
      ])
    )
    expect(types(await r.untilReady())).toBe("12DCZ")
    r.close()
  })

  it("EPREPAREDDUP and EPREPAREDNOTFOUND as PostgreSQL would, and the session goes on", async () => {
    const r = await raw("app")
    r.socket.write(Buffer.concat([serialize.parse({ name: "dup", text: "SELECT 1", types: [] }), serialize.sync()]))
    expect(types(await r.untilReady())).toBe("1Z")
    r.socket.write(Buffer.concat([serialize.parse({ name: "dup", text: "SELECT 2", types: [] }), serialize.sync()]))
    const dup = await r.untilReady()
    expect(types(dup)).toBe("EZ")
    expect(errorOf(dup)).toMatchObject({
      S: "ERROR",
      C: "42P05",
      M: '(EPREPAREDDUP) prepared statement "dup" already exists'
    })
    r.socket.write(Buffer.concat([serialize.bind({ statement: "nope" }), serialize.execute(), serialize.sync()]))
    const missing = await r.untilReady()
    expect(types(missing)).toBe("EZ")
    expect(errorOf(missing)).toMatchObject({
      S: "ERROR",
      C: "26000",
      M: '(EPREPAREDNOTFOUND) prepared statement "nope" does not exist'
    })
    // Close, then the name is free again.
    r.socket.write(
      Buffer.concat([
        serialize.close({ type: "S", name: "dup" }),
        serialize.parse({ name: "dup", text: "SELECT 2 AS two", types: [] }),
        serialize.bind({ statement: "dup" }),
        serialize.execute(),
        serialize.sync()
      ])
    )
    const reused = await r.untilReady()
    expect(types(reused)).toBe("312DCZ")
    expect(rowValues(reused.find((m) => m.type === "D")!)).toEqual(["2"])
    r.close()
  })

  it("a refused Parse inside a transaction aborts it, as in PostgreSQL", async () => {
    const c = await client("app")
    const r = await raw("app")
    r.socket.write(Buffer.concat([serialize.parse({ name: "tx", text: "SELECT 1", types: [] }), serialize.sync()]))
    await r.untilReady()
    r.socket.write(serialize.query("BEGIN"))
    await r.untilReady()
    r.socket.write(Buffer.concat([serialize.parse({ name: "tx", text: "SELECT 2", types: [] }), serialize.sync()]))
    const dup = await r.untilReady()
    expect(types(dup)).toBe("EZ")
    expect(dup[1]!.body.toString()).toBe("E") // the transaction is aborted
    r.socket.write(serialize.query("ROLLBACK"))
    await r.untilReady()
    r.close()
    await c.end()
  })

  it("EMAXPREPARED and EMAXPREPAREDMEM bound what one client may keep", async () => {
    const r = await raw("app", strict)
    for (let i = 0; i < 20; i++) {
      r.socket.write(
        Buffer.concat([serialize.parse({ name: `s${i}`, text: `SELECT ${i}`, types: [] }), serialize.sync()])
      )
      expect(types(await r.untilReady())).toBe("1Z")
    }
    r.socket.write(Buffer.concat([serialize.parse({ name: "s20", text: "SELECT 20", types: [] }), serialize.sync()]))
    const tooMany = await r.untilReady()
    expect(errorOf(tooMany)).toMatchObject({
      C: "XX000",
      M: "(EMAXPREPARED) max prepared statements limit reached. Limit: 20 per connection"
    })
    // Closing one makes room.
    r.socket.write(
      Buffer.concat([
        serialize.close({ type: "S", name: "s0" }),
        serialize.parse({ name: "s20", text: "SELECT 20", types: [] }),
        serialize.sync()
      ])
    )
    expect(types(await r.untilReady())).toBe("31Z")
    r.close()

    const big = await raw("app", strict)
    const text = `SELECT '${"x".repeat(5000)}' AS big`
    big.socket.write(Buffer.concat([serialize.parse({ name: "big", text, types: [] }), serialize.sync()]))
    expect(errorOf(await big.untilReady())).toMatchObject({
      C: "XX000",
      M: "(EMAXPREPAREDMEM) max prepared statements memory limit reached. Limit: 4kB per connection"
    })
    // Unnamed statements are not kept, so they are not limited.
    big.socket.write(
      Buffer.concat([
        serialize.parse({ name: "", text, types: [] }),
        serialize.bind({}),
        serialize.execute(),
        serialize.sync()
      ])
    )
    expect(types(await big.untilReady())).toBe("12DCZ")
    big.close()
  })

  it("10 clients × 300 distinct statements: no server holds more than the cache, results exact", async () => {
    const clients = await Promise.all(Array.from({ length: 10 }, () => client("trio")))
    await Promise.all(
      clients.map(async (c, ci) => {
        for (let k = 0; k < 300; k++) {
          const { rows } = await c.query<{ v: number }>({
            name: `q${k}`,
            text: `SELECT ${k} + $1::int AS v`,
            values: [ci]
          })
          expect(rows[0]!.v).toBe(k + ci)
        }
      })
    )
    // Hold every server of the pool at once and ask each what it holds.
    const holders = clients.slice(0, 3)
    await Promise.all(holders.map((c) => c.query("BEGIN")))
    const held = await Promise.all(
      holders.map(
        async (c) =>
          (
            await c.query<{ n: string; pid: number }>(
              "SELECT count(*) AS n, pg_backend_pid() AS pid FROM pg_prepared_statements"
            )
          ).rows[0]!
      )
    )
    expect(new Set(held.map((h) => h.pid)).size).toBe(3)
    for (const h of held) expect(Number(h.n)).toBeLessThanOrEqual(CACHE_SIZE)
    await Promise.all(holders.map((c) => c.query("COMMIT")))
    // Old statements still work after eviction.
    for (const [ci, c] of clients.entries()) {
      expect(
        (await c.query<{ v: number }>({ name: "q0", text: "SELECT 0 + $1::int AS v", values: [ci] })).rows[0]!.v
      ).toBe(ci)
    }
    await Promise.all(clients.map((c) => c.end()))
    expect((await counters("trio")).statementsEvicted).toBeGreaterThan(0)
  })

  it("postgres.js (prepare: true): 200 clients over pool_size 10, 50 statements each, exact", {
    timeout: 180_000
  }, async () => {
    const sqls = Array.from({ length: 200 }, () => postgres(url("ten"), { max: 1, prepare: true, onnotice: () => {} }))
    try {
      await Promise.all(
        sqls.map(async (sql, ci) => {
          for (let k = 0; k < 50; k++) {
            const rows = await sql.unsafe(`SELECT $1::int + ${k} AS v`, [ci], { prepare: true })
            expect(rows[0]!.v).toBe(ci + k)
          }
        })
      )
    } finally {
      await Promise.all(sqls.map((sql) => sql.end()))
    }
    const after = await stats("ten")
    expect(after.idle + after.busy + after.opening).toBeLessThanOrEqual(10)
  })

  it("after DDL changes a result type, each client sees the error at most once", async () => {
    await db.query("CREATE TABLE ddl (id int PRIMARY KEY, v int NOT NULL)")
    await db.query("INSERT INTO ddl VALUES (1, 10)")
    const clients = await Promise.all(Array.from({ length: 4 }, () => client("ddl")))
    const get = { name: "getv", text: "SELECT v FROM ddl WHERE id = $1", values: [1] }
    for (const c of clients) expect((await c.query(get)).rows[0].v).toBe(10)
    await db.query("ALTER TABLE ddl ALTER COLUMN v TYPE text")
    const errors = await Promise.all(
      clients.map(async (c) => {
        let failures = 0
        for (let i = 0; i < 3; i++) {
          try {
            expect((await c.query(get)).rows[0].v).toBe("10")
          } catch (e) {
            expect((e as Error).message).toMatch(/cached plan must not change result type/)
            failures++
          }
        }
        return failures
      })
    )
    for (const n of errors) expect(n).toBeLessThanOrEqual(1)
    await Promise.all(clients.map((c) => c.end()))
  })

  it("SQL-level PREPARE pins the client to its server until DEALLOCATE", async () => {
    const a = await client("pin")
    const b = await client("pin")
    await a.query("PREPARE twice(int) AS SELECT $1 * 2 AS v, pg_backend_pid() AS pid")
    const pinned = (await a.query("EXECUTE twice(21)")).rows[0]
    expect(pinned.v).toBe(42)
    // Others keep using the pool meanwhile, on the other server.
    for (let i = 0; i < 5; i++) expect(await pid(b)).not.toBe(pinned.pid)
    for (let i = 0; i < 5; i++) expect((await a.query("EXECUTE twice(1)")).rows[0]).toEqual({ v: 2, pid: pinned.pid })
    expect((await stats("pin")).busy).toBe(1)
    await a.query("DEALLOCATE twice")
    // Released one round trip after DEALLOCATE's answer: the pooler first asks the server what the
    // client left on it (docs/session-state.md). Bounded, not timed.
    const deadline = Date.now() + 5_000
    while ((await stats("pin")).busy !== 0 && Date.now() < deadline) await new Promise((r) => setImmediate(r))
    expect((await stats("pin")).busy).toBe(0)
    await a.end()
    await b.end()
  })

  it("DISCARD ALL and DEALLOCATE ALL clear the client's statements", async () => {
    const r = await raw("solo")
    r.socket.write(Buffer.concat([serialize.parse({ name: "gone", text: "SELECT 1", types: [] }), serialize.sync()]))
    expect(types(await r.untilReady())).toBe("1Z")
    r.socket.write(serialize.query("DEALLOCATE ALL"))
    await r.untilReady()
    r.socket.write(Buffer.concat([serialize.bind({ statement: "gone" }), serialize.execute(), serialize.sync()]))
    expect(errorOf(await r.untilReady())?.C).toBe("26000")
    // Another client's statements are re-prepared on the server that lost them.
    const c = await client("solo")
    for (let i = 0; i < 2; i++)
      expect((await c.query({ name: "n", text: "SELECT $1::int AS v", values: [i] })).rows[0].v).toBe(i)
    r.socket.write(serialize.query("DISCARD ALL"))
    await r.untilReady()
    expect((await c.query({ name: "n", text: "SELECT $1::int AS v", values: [9] })).rows[0].v).toBe(9)
    r.close()
    await c.end()
  })

  it("with the prepared_statements flag off, statement names pass through unchanged", async () => {
    const c = new pg.Client({
      connectionString: tidepool.url({ user: "app.plain", password: PASSWORD, mode: "transaction" })
    })
    await c.connect()
    await c.query({ name: "asis", text: "SELECT 1", values: [] })
    const names = (await c.query<{ name: string }>("SELECT name FROM pg_prepared_statements")).rows.map((r) => r.name)
    expect(names).toContain("asis")
    await c.end()
  })

  it("clients whose settings read the same text differently never share its statement", async () => {
    const connect = async (datestyle: string) => {
      const c = new pg.Client({ connectionString: url("one"), options: `-c datestyle=${datestyle}` })
      await c.connect()
      return c
    }
    const mdy = await connect("ISO,MDY")
    const dmy = await connect("ISO,DMY")
    const month = { name: "m", text: "SELECT extract(month FROM '01/02/2024'::date)::int AS m", values: [] }
    // One server: both statements live on it side by side.
    for (let i = 0; i < 2; i++) {
      expect((await mdy.query(month)).rows[0].m).toBe(1)
      expect((await dmy.query(month)).rows[0].m).toBe(2)
    }
    await mdy.end()
    await dmy.end()
  })

  it("a statement whose Close and Parse were both skipped after an error is prepared afresh, not refused", async () => {
    await db.query("CREATE TABLE skipped (v int)")
    await db.query("INSERT INTO skipped VALUES (7)")
    const r = await raw("one")
    const run = async (statement: string) => {
      r.socket.write(Buffer.concat([parse(statement, "SELECT v FROM skipped"), bindExecuteSync(statement)]))
      return r.untilReady()
    }
    expect(types(await run("s"))).toBe("12DCZ")
    await db.query("ALTER TABLE skipped ALTER COLUMN v TYPE text")
    r.socket.write(bindExecuteSync("s"))
    expect(errorOf(await r.untilReady())?.C).toBe("0A000")
    // The stale statement's re-prepare (Close + Parse) rides behind an error and is skipped.
    r.socket.write(
      Buffer.concat([parse("", "SELEC"), serialize.bind({ statement: "s" }), serialize.execute(), serialize.sync()])
    )
    expect(errorOf(await r.untilReady())?.C).toBe("42601")
    const fresh = await run("s2")
    expect(types(fresh)).toBe("12DCZ")
    expect(rowValues(fresh.find((m) => m.type === "D")!)).toEqual(["7"])
    r.close()
  })

  it("a Close the server skips after an error leaves the statement in place", async () => {
    const r = await raw("one")
    r.socket.write(Buffer.concat([parse("kept", "SELECT 1 AS one"), serialize.sync()]))
    expect(types(await r.untilReady())).toBe("1Z")
    r.socket.write(Buffer.concat([parse("", "SELEC"), serialize.close({ type: "S", name: "kept" }), serialize.sync()]))
    expect(types(await r.untilReady())).toBe("EZ")
    r.socket.write(bindExecuteSync("kept"))
    expect(types(await r.untilReady())).toBe("2DCZ")
    r.close()
  })

  it("COPY FROM STDIN over the extended protocol: the Sync sent during COPY is ignored, the server comes back", async () => {
    await db.query("CREATE TABLE copied (v int)")
    const r = await raw("copy")
    r.socket.write(
      Buffer.concat([parse("", "COPY copied FROM STDIN"), serialize.bind({}), serialize.execute(), serialize.sync()])
    )
    const started: Array<string> = []
    while (started.at(-1) !== "G") started.push((await r.next()).type)
    expect(started.join("")).toBe("12G")
    r.socket.write(Buffer.concat([serialize.copyData(Buffer.from("1\n2\n")), serialize.copyDone(), serialize.sync()]))
    expect(types(await r.untilReady())).toBe("CZ")
    expect((await stats("copy")).busy).toBe(0)
    // Replies stay in step afterwards: a Parse the server already has gets its made-up ParseComplete.
    r.socket.write(Buffer.concat([parse("c1", "SELECT count(*) FROM copied"), bindExecuteSync("c1")]))
    expect(types(await r.untilReady())).toBe("12DCZ")
    r.socket.write(Buffer.concat([parse("c2", "SELECT count(*) FROM copied"), bindExecuteSync("c2")]))
    const again = await r.untilReady()
    expect(types(again)).toBe("12DCZ")
    expect(rowValues(again.find((m) => m.type === "D")!)).toEqual(["2"])
    r.close()
  })

  it.skipIf(!hasPgbench)("pgbench -M prepared -S -c 50 through pool_size 5 has no failed transactions", async () => {
    await run("pgbench", ["-i", "-s", "1", "-q", db.url({ user: "app", password: PASSWORD })])
    const { stdout } = await run("pgbench", ["-M", "prepared", "-S", "-c", "50", "-j", "2", "-T", "10", url("app")], {
      maxBuffer: 16 * 1024 * 1024
    })
    expect(stdout).toMatch(/number of failed transactions: 0 \(0\.000%\)/)
    expect(Number(stdout.match(/number of transactions actually processed: (\d+)/)?.[1])).toBeGreaterThan(0)
  })
})

/** Text values of a DataRow. */
const rowValues = (m: RawMessage): Array<string | null> => {
  const n = m.body.readInt16BE(0)
  const out: Array<string | null> = []
  let pos = 2
  for (let i = 0; i < n; i++) {
    const len = m.body.readInt32BE(pos)
    pos += 4
    if (len < 0) out.push(null)
    else {
      out.push(m.body.toString("utf8", pos, pos + len))
      pos += len
    }
  }
  return out
}

const columnNames = (m: RawMessage): Array<string> => {
  const n = m.body.readInt16BE(0)
  const out: Array<string> = []
  let pos = 2
  for (let i = 0; i < n; i++) {
    const end = m.body.indexOf(0, pos)
    out.push(m.body.toString("utf8", pos, end))
    pos = end + 1 + 18
  }
  return out
}
