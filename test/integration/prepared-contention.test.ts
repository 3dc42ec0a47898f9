import pg from "pg"
import { serialize } from "pg-protocol"
import postgres from "postgres"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { decodeErrorFields } from "../../src/protocol/index.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { RawClient, type RawMessage } from "../support/raw.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"
import { hasTool, run } from "../support/tools.ts"

/*
 * Named prepared statements where clients outnumber servers, and where a statement shared between
 * clients by its text outlives the table it was planned for. Both defects here passed every other
 * test: pgbench `-M prepared` with more clients than servers hung, and a client's first use of a
 * statement another client had prepared before DDL failed with `cached plan must not change result
 * type`, which PostgreSQL would not have said to it.
 */

const hasPgbench = await hasTool("pgbench")

const PASSWORD = "app-secret"

let db: PostgresServer
let tidepool: RunningTidepool

const user = (alias: string, pool_size: number) => ({
  db_user_alias: alias,
  db_user: "app",
  db_password: PASSWORD,
  pool_size
})

beforeAll(async () => {
  db = await startPostgres({
    roles: [{ name: "app", password: PASSWORD, superuser: true }],
    settings: { max_connections: "100" }
  })
  tidepool = await startTidepool({
    tenants: [
      {
        external_id: "acme",
        ...upstreamOf(db),
        users: [user("trio", 3), user("solo", 1), user("pgjs", 1), user("nodepg", 1), user("raw", 1), user("alone", 1)]
      }
    ]
  })
})

afterAll(async () => {
  await tidepool?.stop()
  await db?.stop()
})

const url = (alias: string) => tidepool.url({ user: `${alias}.acme`, password: PASSWORD, mode: "transaction" })
const raw = (alias: string) => RawClient.connect(tidepool.transactionPort, `${alias}.acme`, PASSWORD)
const types = (messages: ReadonlyArray<RawMessage>) => messages.map((m) => m.type).join("")
const errorCode = (messages: ReadonlyArray<RawMessage>) => {
  const e = messages.find((m) => m.type === "E")
  return e === undefined ? undefined : decodeErrorFields(e.body, 0, e.body.length).C
}
const firstValue = (messages: ReadonlyArray<RawMessage>) => {
  const row = messages.find((m) => m.type === "D")!.body
  const length = row.readInt32BE(2)
  return row.toString("utf8", 6, 6 + length)
}

/** Fails the test when `promise` does not settle within `ms` (a hang is a failure, not a timeout of the suite). */
const within = <A>(ms: number, what: string, promise: Promise<A>): Promise<A> => {
  let timer: NodeJS.Timeout | undefined
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms)
  })
  return Promise.race([promise, deadline]).finally(() => clearTimeout(timer))
}

describe("prepared statements with more clients than servers", () => {
  it.skipIf(!hasPgbench)(
    "pgbench -M prepared (TPC-B) finishes with no failure at -c 8, 20 and 100 on pool_size 3",
    async () => {
      await run("pgbench", ["-i", "-s", "2", "-q", db.url({ user: "app", password: PASSWORD })])
      for (const clients of [8, 20, 100]) {
        // A hang is killed by the timeout and fails the test with pgbench's output so far.
        const { stdout } = await run(
          "pgbench",
          ["-n", "-M", "prepared", "-c", String(clients), "-j", "2", "-t", "20", url("trio")],
          { timeout: 60_000, killSignal: "SIGKILL", maxBuffer: 16 * 1024 * 1024 }
        )
        expect(stdout).toMatch(/number of failed transactions: 0 \(0\.000%\)/)
        expect(stdout).toContain(`number of transactions actually processed: ${clients * 20}/${clients * 20}`)
      }
    },
    240_000
  )

  it("a Parse of a statement the pool knows is answered while every server is lent", async () => {
    const holder = await raw("alone")
    const other = await raw("alone")
    const text = "SELECT $1::int * 3 AS v"
    // Known to the pool: parsed once on its server.
    holder.socket.write(Buffer.concat([serialize.parse({ name: "h", text, types: [] }), serialize.sync()]))
    expect(types(await holder.untilReady())).toBe("1Z")
    holder.socket.write(serialize.query("BEGIN"))
    expect(types(await holder.untilReady())).toBe("CZ")
    // The only server is in the holder's transaction: the other client's prepare needs none.
    other.socket.write(Buffer.concat([serialize.parse({ name: "o", text, types: [] }), serialize.sync()]))
    expect(types(await within(5000, "Parse + Sync while the server is lent", other.untilReady()))).toBe("1Z")
    other.socket.write(
      Buffer.concat([serialize.bind({ statement: "o", values: ["14"] }), serialize.execute(), serialize.sync()])
    )
    const waiting = other.untilReady()
    holder.socket.write(serialize.query("COMMIT"))
    expect(types(await holder.untilReady())).toBe("CZ")
    const ran = await within(5000, "Bind after the server came back", waiting)
    expect(types(ran)).toBe("2DCZ")
    expect(firstValue(ran)).toBe("42")
    // A statement the pool has never parsed still goes to a server: its errors come at Parse.
    other.socket.write(Buffer.concat([serialize.parse({ name: "bad", text: "SELEC 1", types: [] }), serialize.sync()]))
    const refused = await other.untilReady()
    expect(types(refused)).toBe("EZ")
    expect(errorCode(refused)).toBe("42601")
    holder.close()
    other.close()
  })

  it("a Parse the server already has is answered by the pooler and never reaches the server under the client's name", async () => {
    const a = await raw("solo")
    const b = await raw("solo")
    const text = "SELECT 7 AS seven"
    a.socket.write(Buffer.concat([serialize.parse({ name: "first", text, types: [] }), serialize.sync()]))
    expect(types(await a.untilReady())).toBe("1Z")
    // Same text on the same (only) server, first message of its chunk, under another name.
    b.socket.write(
      Buffer.concat([
        serialize.parse({ name: "second", text, types: [] }),
        serialize.bind({ statement: "second" }),
        serialize.execute(),
        serialize.sync()
      ])
    )
    const ran = await b.untilReady()
    expect(types(ran)).toBe("12DCZ")
    // Inside a transaction (the server is held), alone in its chunk with its Sync.
    b.socket.write(serialize.query("BEGIN"))
    expect(types(await b.untilReady())).toBe("CZ")
    b.socket.write(Buffer.concat([serialize.parse({ name: "third", text, types: [] }), serialize.sync()]))
    expect(types(await b.untilReady())).toBe("1Z")
    b.socket.write(serialize.query("COMMIT"))
    expect(types(await b.untilReady())).toBe("CZ")
    b.socket.write(serialize.query("SELECT name FROM pg_prepared_statements ORDER BY name"))
    const names = (await b.untilReady()).filter((m) => m.type === "D").map((m) => firstValue([m]))
    expect(names.every((n) => n.startsWith("tp_"))).toBe(true)
    a.close()
    b.close()
  })
})

describe("statements met inside a failed transaction", () => {
  it("a Bind after an earlier re-prepare failed in the same aborted transaction gets 25P02, as directly", async () => {
    // Found by the stress harness (seed 1287): the first Bind's hidden Parse failed (aborted
    // transaction), so the server lacked the statement at the second, which PostgreSQL looks up
    // before it checks for an aborted transaction (26000 instead of 25P02).
    const x = await raw("solo")
    const y = await raw("solo")
    x.socket.write(
      Buffer.concat([serialize.parse({ name: "s", text: "SELECT 1 AS one", types: [] }), serialize.sync()])
    )
    expect(types(await x.untilReady())).toBe("1Z")
    // The only server forgets it, and the pooler knows: X's next use re-prepares it.
    y.socket.write(serialize.query("DEALLOCATE ALL"))
    expect(types(await y.untilReady())).toBe("CZ")
    const use = Buffer.concat([serialize.bind({ statement: "s" }), serialize.execute(), serialize.sync()])
    x.socket.write(
      Buffer.concat([serialize.query("BEGIN"), serialize.query("SELECT 1/0"), use, use, serialize.query("ROLLBACK")])
    )
    const replies = await x.untilReady(5)
    expect(types(replies)).toBe("CZEZEZEZCZ")
    const codes = replies.filter((m) => m.type === "E").map((m) => decodeErrorFields(m.body, 0, m.body.length).C)
    expect(codes).toEqual(["22012", "25P02", "25P02"])
    x.close()
    y.close()
  })
})

describe("a shared statement outlived by DDL", () => {
  /** Client A uses `select x from <table>` with x int, then drops the table; B re-creates it with x text. */
  const recreate = async (table: string, use: (sql: string) => Promise<unknown>) => {
    await db.query(`CREATE TABLE ${table} (x int)`)
    await db.query(`INSERT INTO ${table} VALUES (1)`)
    await use(`SELECT x FROM ${table}`)
    await db.query(`DROP TABLE ${table}`)
    await db.query(`CREATE TABLE ${table} (x text)`)
    await db.query(`INSERT INTO ${table} VALUES ('one')`)
  }

  it("postgres.js (prepare: true): a second client gets the new result type, the first sees the change once", async () => {
    const a = postgres(url("pgjs"), { max: 1, prepare: true })
    const b = postgres(url("pgjs"), { max: 1, prepare: true })
    const select = (sql: postgres.Sql) => sql`SELECT x FROM pgjs_t`
    try {
      await recreate("pgjs_t", async () => expect(await select(a)).toEqual([{ x: 1 }]))
      expect(await select(b)).toEqual([{ x: "one" }])
      expect(await select(b)).toEqual([{ x: "one" }])
      // A prepared it before the change: PostgreSQL would refuse A's statement; postgres.js re-prepares.
      expect(await select(a)).toEqual([{ x: "one" }])
      await db.query("ALTER TABLE pgjs_t ALTER COLUMN x TYPE varchar(10)")
      const c = postgres(url("pgjs"), { max: 1, prepare: true })
      expect(await select(c)).toEqual([{ x: "one" }])
      // With a parameter postgres.js describes first (Parse, Describe, Flush), then binds.
      await db.query("ALTER TABLE pgjs_t ALTER COLUMN x TYPE text")
      const d = postgres(url("pgjs"), { max: 1, prepare: true })
      expect(await d`SELECT x FROM pgjs_t WHERE ${1}::int = 1`).toEqual([{ x: "one" }])
      expect(await c`SELECT x FROM pgjs_t WHERE ${1}::int = 1`).toEqual([{ x: "one" }])
      await Promise.all([c.end(), d.end()])
    } finally {
      await Promise.all([a.end(), b.end()])
    }
  })

  it("node-postgres named statements: a second client's first use succeeds, also after ALTER COLUMN TYPE", async () => {
    const a = new pg.Client({ connectionString: url("nodepg") })
    const b = new pg.Client({ connectionString: url("nodepg") })
    await a.connect()
    await b.connect()
    const q = { name: "getx", text: "SELECT x FROM nodepg_t" }
    await recreate("nodepg_t", async () => expect((await a.query(q)).rows).toEqual([{ x: 1 }]))
    expect((await b.query(q)).rows).toEqual([{ x: "one" }])
    // After ALTER: a client that prepares afresh gets the new type at once.
    await db.query("ALTER TABLE nodepg_t ALTER COLUMN x TYPE int USING 5")
    const c = new pg.Client({ connectionString: url("nodepg") })
    await c.connect()
    expect((await c.query(q)).rows).toEqual([{ x: 5 }])
    // B had used it before the ALTER: on its own connection PostgreSQL refuses it once the type changed.
    await expect(b.query(q)).rejects.toThrow(/cached plan must not change result type/)
    expect((await b.query(q)).rows).toEqual([{ x: 5 }])
    await Promise.all([a.end(), b.end(), c.end()])
  })

  it("raw protocol: Parse/Bind/Execute/Sync, and Parse/Describe/Flush then Bind/Execute/Sync", async () => {
    const a = await raw("raw")
    const b = await raw("raw")
    const runAll = async (client: RawClient, name: string, text: string) => {
      client.socket.write(
        Buffer.concat([
          serialize.parse({ name, text, types: [] }),
          serialize.bind({ statement: name }),
          serialize.execute(),
          serialize.sync()
        ])
      )
      return client.untilReady()
    }
    await recreate("raw_t", async (text) => expect(types(await runAll(a, "s", text))).toBe("12DCZ"))
    const ran = await runAll(b, "s", "SELECT x FROM raw_t")
    expect(types(ran)).toBe("12DCZ")
    expect(firstValue(ran)).toBe("one")
    // The other shape: a Describe first, with Flush, as drivers that need the parameter types do.
    await db.query("ALTER TABLE raw_t ALTER COLUMN x TYPE int USING 9")
    const c = await raw("raw")
    c.socket.write(
      Buffer.concat([
        serialize.parse({ name: "d", text: "SELECT x FROM raw_t", types: [] }),
        serialize.describe({ type: "S", name: "d" }),
        serialize.flush()
      ])
    )
    const described: Array<RawMessage> = []
    while (described.length < 3) described.push(await within(5000, "Describe after Flush", c.next()))
    expect(types(described)).toBe("1tT")
    c.socket.write(Buffer.concat([serialize.bind({ statement: "d" }), serialize.execute(), serialize.sync()]))
    const bound = await c.untilReady()
    expect(types(bound)).toBe("2DCZ")
    expect(firstValue(bound)).toBe("9")
    a.close()
    b.close()
    c.close()
  })
})
