/**
 * A client's named statement whose table changed after the client used it (docs/prepared-statements.md,
 * "After DDL"), when its next use lands on a server with no copy of it that could refuse it: another
 * server of the pool, or its copy evicted from the server's cache. Each scenario runs the same
 * raw-protocol client once directly against PostgreSQL and once through Tidepool, with the same DDL
 * between the same steps, and the two transcripts must be equal.
 */
import pg from "pg"
import { serialize } from "pg-protocol"
import postgres from "postgres"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { decodeErrorFields } from "../../src/protocol/index.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { RawClient as Raw, type RawMessage } from "../support/raw.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"

const PASSWORD = "app-secret"
/** Two statements per server: a third one prepared there evicts the least recently used. */
const CACHE_SIZE = 2
const DEADLINE_MS = 20_000

let db: PostgresServer
let tidepool: RunningTidepool

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: PASSWORD, superuser: true }] })
  tidepool = await startTidepool({
    tenants: [
      {
        external_id: "acme",
        ...upstreamOf(db),
        users: [
          { db_user_alias: "one", db_user: "app", db_password: PASSWORD, pool_size: 1 },
          { db_user_alias: "two", db_user: "app", db_password: PASSWORD, pool_size: 2 },
          { db_user_alias: "js", db_user: "app", db_password: PASSWORD, pool_size: 1 }
        ]
      }
    ],
    config: { preparedCacheSize: CACHE_SIZE }
  })
})

afterAll(async () => {
  await tidepool?.stop()
  await db?.stop()
})

/** Fails the test instead of waiting for ever. */
const within = <A>(promise: Promise<A>, what: string): Promise<A> =>
  new Promise<A>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no answer within ${DEADLINE_MS} ms: ${what}`)), DEADLINE_MS)
    promise.then(
      (a) => {
        clearTimeout(timer)
        resolve(a)
      },
      (e) => {
        clearTimeout(timer)
        reject(e)
      }
    )
  })

/** What a client can observe, comparable between two connections (no pids, OIDs of tables, notices). */
const transcript = (messages: ReadonlyArray<RawMessage>): Array<string> => {
  const out: Array<string> = []
  for (const { type, body } of messages) {
    if (type === "S" || type === "N" || type === "K") continue
    if (type === "E") {
      const f = decodeErrorFields(body, 0, body.length)
      out.push(`E ${f.C} ${f.M}`)
    } else if (type === "T") {
      const fields: Array<string> = []
      let at = 2
      for (let i = 0; i < body.readInt16BE(0); i++) {
        const nameEnd = body.indexOf(0, at)
        fields.push(`${body.toString("utf8", at, nameEnd)}:${body.readUInt32BE(nameEnd + 7)}`)
        at = nameEnd + 19
      }
      out.push(`T ${fields.join(",")}`)
    } else if (type === "t") {
      const oids: Array<number> = []
      for (let i = 0; i < body.readInt16BE(0); i++) oids.push(body.readUInt32BE(2 + 4 * i))
      out.push(`t ${oids.join(",")}`)
    } else if (type === "D") {
      const values: Array<string> = []
      let at = 2
      for (let i = 0; i < body.readInt16BE(0); i++) {
        const n = body.readInt32BE(at)
        values.push(n < 0 ? "NULL" : body.toString("utf8", at + 4, at + 4 + n))
        at += 4 + Math.max(n, 0)
      }
      out.push(`D ${values.join(",")}`)
    } else if (type === "C") {
      out.push(`C ${body.toString("utf8", 0, body.length - 1)}`)
    } else if (type === "Z") {
      out.push(`Z ${String.fromCharCode(body[0]!)}`)
    } else {
      out.push(type)
    }
  }
  return out
}

type Step =
  /** Sent by the client under test; its replies up to the last ReadyForQuery are recorded. */
  | { readonly send: Buffer }
  /** Run on an administrative connection (DDL) between the client's steps. */
  | { readonly sql: string }
  /** Sent by another client of the same kind (direct, or through Tidepool); its replies are not recorded. */
  | { readonly other: Buffer }
  /** Leaves the client's server to another client of the pool (no-op directly). */
  | { readonly occupy: true }

/** The ReadyForQuery messages `bytes` (whole messages) will be answered with: one per Sync or Query. */
const readies = (bytes: Buffer): number => {
  let n = 0
  for (let at = 0; at < bytes.length; at += 1 + bytes.readInt32BE(at + 1))
    if (bytes[at] === 0x53 || bytes[at] === 0x51) n++
  return n
}

const parse = (name: string, text: string) => serialize.parse({ name, text, types: [] })
const use = (name: string) =>
  Buffer.concat([serialize.bind({ statement: name }), serialize.execute({}), serialize.sync()])
const describeStatement = (name: string) => Buffer.concat([serialize.describe({ type: "S", name }), serialize.sync()])
const prepareAndUse = (name: string, text: string) =>
  Buffer.concat([
    parse(name, text),
    serialize.describe({ type: "S", name }),
    serialize.bind({ statement: name, values: text.includes("$1") ? ["0"] : [] }),
    serialize.execute({}),
    serialize.sync()
  ])
/** Prepares and uses statements that take the statement cache's places (it holds CACHE_SIZE per server). */
const fill = (tag: string) =>
  Buffer.concat(
    Array.from({ length: CACHE_SIZE }, (_, i) =>
      Buffer.concat([parse(`fill_${tag}_${i}`, `SELECT ${i} AS fill_${tag}`), use(`fill_${tag}_${i}`)])
    )
  )

interface Side {
  readonly connect: () => Promise<Raw>
  /** Through Tidepool: a client that holds a server (an open transaction) until released. */
  readonly occupy?: () => Promise<() => Promise<void>>
}

const direct: Side = { connect: () => Raw.connect(db.port, "app", PASSWORD) }

const pooled = (alias: string): Side => ({
  connect: () => Raw.connect(tidepool.transactionPort, `${alias}.acme`, PASSWORD),
  occupy: async () => {
    const c = new pg.Client({
      connectionString: tidepool.url({ user: `${alias}.acme`, password: PASSWORD, mode: "transaction" })
    })
    await c.connect()
    await c.query("BEGIN")
    return async () => {
      await c.query("COMMIT")
      await c.end()
    }
  }
})

/** Runs `steps` on one side, the table `table` created afresh first; returns the client's transcript. */
const run = async (side: Side, table: string, steps: ReadonlyArray<Step>): Promise<Array<string>> => {
  await db.query(`DROP TABLE IF EXISTS ${table}; CREATE TABLE ${table} (id int PRIMARY KEY, x int NOT NULL)`)
  await db.query(`INSERT INTO ${table} VALUES (1, 10), (2, 20)`)
  const client = await side.connect()
  const other = await side.connect()
  const releases: Array<() => Promise<void>> = []
  const out: Array<string> = []
  try {
    for (const step of steps) {
      if ("send" in step) {
        client.write(step.send)
        out.push(...transcript(await within(client.untilReady(readies(step.send)), "the client's step")))
        out.push("--")
      } else if ("sql" in step) {
        await db.query(step.sql)
      } else if ("other" in step) {
        other.write(step.other)
        await within(other.untilReady(readies(step.other)), "the other client's step")
      } else if (side.occupy !== undefined) {
        releases.push(await side.occupy())
      }
    }
  } finally {
    for (const release of releases) await release()
    client.close()
    other.close()
  }
  return out
}

/** Both sides' transcripts of the same scenario; through Tidepool with user `alias`. */
const compare = async (alias: string, table: string, steps: ReadonlyArray<Step>) => {
  const expected = await run(direct, table, steps)
  const actual = await run(pooled(alias), table, steps)
  expect(actual).toEqual(expected)
  return expected
}

/** Two servers in the pool, both idle: the pool lends the last one returned first. */
const warmTwo = async () => {
  const side = pooled("two")
  const a = await side.occupy!()
  const b = await side.occupy!()
  await a()
  await b()
}

describe("a named statement used again after DDL changed its table, on a server without its copy", () => {
  it("ALTER COLUMN … TYPE, copy evicted (pool of 1): 0A000, as directly", async () => {
    const text = "SELECT id, x FROM evicted ORDER BY id"
    const expected = await compare("one", "evicted", [
      { send: prepareAndUse("s", text) },
      { send: fill("evicted") },
      { sql: "ALTER TABLE evicted ALTER COLUMN x TYPE text USING x::text" },
      { send: use("s") }
    ])
    expect(expected.slice(-3)).toEqual(["E 0A000 cached plan must not change result type", "Z I", "--"])
  })

  it("ALTER COLUMN … TYPE, another server (pool of 2): Describe gets ParameterDescription then 0A000, as directly", async () => {
    await warmTwo()
    const text = "SELECT id, x FROM moved WHERE id > $1::int ORDER BY id"
    const expected = await compare("two", "moved", [
      { send: prepareAndUse("s", text) },
      { sql: "ALTER TABLE moved ALTER COLUMN x TYPE bigint" },
      // The server the client used goes to another client: its next use lands on the other server.
      { occupy: true },
      { send: describeStatement("s") }
    ])
    expect(expected.slice(-4)).toEqual(["t 23", "E 0A000 cached plan must not change result type", "Z I", "--"])
  })

  it("table dropped: Bind gets 42P01 and Describe ParameterDescription then 42P01, as directly", async () => {
    const text = "SELECT id, x FROM dropped WHERE id = $1::int"
    const expected = await compare("one", "dropped", [
      {
        send: Buffer.concat([
          parse("s", text),
          serialize.bind({ statement: "s", values: ["1"] }),
          serialize.execute({}),
          serialize.sync()
        ])
      },
      { send: fill("dropped") },
      { sql: "DROP TABLE dropped" },
      {
        send: Buffer.concat([
          serialize.bind({ statement: "s", values: ["1"] }),
          serialize.execute({}),
          serialize.sync()
        ])
      },
      { send: describeStatement("s") }
    ])
    expect(expected.slice(-4)).toEqual(["t 23", 'E 42P01 relation "dropped" does not exist', "Z I", "--"])
  })

  it("a statement never used, table dropped: Describe gets ParameterDescription then 42P01, as directly", async () => {
    const expected = await compare("one", "unused", [
      { send: Buffer.concat([parse("s", "SELECT x FROM unused WHERE id = $1::int"), serialize.sync()]) },
      { send: fill("unused") },
      { sql: "DROP TABLE unused" },
      { send: describeStatement("s") }
    ])
    expect(expected.slice(-4)).toEqual(["t 23", 'E 42P01 relation "unused" does not exist', "Z I", "--"])
  })

  it("a type changed and changed back (A → B → A) runs, as directly, though another client met 0A000 meanwhile", async () => {
    const text = "SELECT id, x FROM back ORDER BY id"
    const expected = await compare("one", "back", [
      { send: prepareAndUse("s", text) },
      // Another client uses the same text before and after the change: its server reports it stale.
      { other: prepareAndUse("o", text) },
      { sql: "ALTER TABLE back ALTER COLUMN x TYPE text USING x::text" },
      { other: use("o") },
      { sql: "ALTER TABLE back ALTER COLUMN x TYPE int USING x::int" },
      { send: use("s") }
    ])
    expect(expected.slice(-6)).toEqual(["2", "D 1,10", "D 2,20", "C SELECT 2", "Z I", "--"])
  })

  it("a column renamed: 0A000, as directly (PostgreSQL compares column names too)", async () => {
    await compare("one", "renamed", [
      { send: prepareAndUse("s", "SELECT * FROM renamed ORDER BY id") },
      { send: fill("renamed") },
      { sql: "ALTER TABLE renamed RENAME COLUMN x TO y" },
      { send: use("s") }
    ])
  })

  it("dropped and created again with the same columns runs, as directly", async () => {
    await compare("one", "recreated", [
      { send: prepareAndUse("s", "SELECT id, x FROM recreated ORDER BY id") },
      { send: fill("recreated") },
      { sql: "DROP TABLE recreated; CREATE TABLE recreated (id int PRIMARY KEY, x int NOT NULL)" },
      { send: use("s") }
    ])
  })
})

describe("postgres.js (prepare: true) after ALTER COLUMN … TYPE, its statement's copy evicted", () => {
  it("re-prepares on 0A000 and reads the new type, as directly", async () => {
    const read = async (url: string) => {
      await db.query("DROP TABLE IF EXISTS js_t; CREATE TABLE js_t (id int PRIMARY KEY, x int NOT NULL)")
      await db.query("INSERT INTO js_t VALUES (1, 10)")
      const sql = postgres(url, { max: 1, prepare: true, onnotice: () => {} })
      try {
        const query = () => sql`SELECT x FROM js_t WHERE id = ${1}`
        const first = await query()
        // Other statements take the copy's place in the server's cache.
        for (let i = 0; i <= CACHE_SIZE; i++) await sql.unsafe(`SELECT ${i} AS evicts`, [], { prepare: true })
        await db.query("ALTER TABLE js_t ALTER COLUMN x TYPE text USING 'v' || x")
        const second = await query()
        return [first[0]!.x, second[0]!.x]
      } finally {
        await sql.end()
      }
    }
    const expected = await within(read(`postgresql://app:${PASSWORD}@127.0.0.1:${db.port}/postgres`), "directly")
    const actual = await within(
      read(tidepool.url({ user: "js.acme", password: PASSWORD, mode: "transaction" })),
      "through Tidepool"
    )
    expect(expected).toEqual([10, "v10"])
    expect(actual).toEqual(expected)
  })
})
