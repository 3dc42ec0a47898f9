/**
 * The differential stress harness in CI form: a few fixed seeds, real drivers, pgbench, and the bugs
 * the harness found, each kept as an `it.fails` test until it is fixed. Long runs on demand:
 * `npm run stress -- --help` (docs/operations.md, "Stress testing").
 */
import { serialize } from "pg-protocol"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { hasTool } from "../support/tools.ts"
import { normalizeError } from "./differences.ts"
import { runDriverWorkload, runPgbench } from "./drivers.ts"
import { checkSeed, StressEnv } from "./harness.ts"
import type { Feature, Frame, Step } from "./script.ts"
import { WireClient } from "./wire.ts"

const hasPgbench = await hasTool("pgbench")

/** Seeds and pool sizes CI runs, 30 clients each; any other seed may be run with `npm run stress`. */
const SEEDS: ReadonlyArray<readonly [seed: number, pool: number]> = [
  [1, 3],
  [2, 2],
  [3, 5],
  [4, 3],
  [5, 1],
  [6, 2],
  [7, 3],
  [8, 5],
  // Both catch a client's first use of a shared statement made stale by another client's DDL (0A000
  // where PostgreSQL answers rows) when Tidepool's transparent re-run of that use is taken out.
  [9, 1],
  [1, 1]
]

const CLIENTS = 30
const LENGTH = 12
/** A hang is reported (every stuck client, what it last sent and received) well before vitest gives up. */
const DEADLINE_MS = 90_000
const TIMEOUT = { timeout: 180_000 }

let env: StressEnv

beforeAll(async () => {
  env = await StressEnv.start({ pools: [1, 2, 3, 5] })
})

afterAll(async () => {
  await env?.stop()
})

const seed = (seed: number, pool: number, features: ReadonlySet<Feature> = new Set()) =>
  checkSeed(env, { seed, clients: CLIENTS, pool, length: LENGTH, deadlineMs: DEADLINE_MS, shrinkRuns: 0, features })

describe(`differential stress: ${CLIENTS} clients, raw protocol scripts, through Tidepool and direct`, () => {
  for (const [s, pool] of SEEDS) {
    it(`seed ${s} on pool_size ${pool}`, TIMEOUT, async () => {
      const outcome = await seed(s, pool)
      expect(outcome.ok, outcome.report).toBe(true)
    })
  }
})

describe("real drivers, more clients than servers, through Tidepool and direct", () => {
  for (const driver of ["node-postgres", "postgres.js"] as const) {
    it(`${driver} with named (prepared) statements: 12 clients on pool_size 3`, TIMEOUT, async () => {
      const problems = await runDriverWorkload(env, {
        driver,
        seed: 7,
        clients: 12,
        pool: 3,
        length: 30,
        deadlineMs: DEADLINE_MS
      })
      expect(problems, problems.join("\n")).toEqual([])
    })
  }

  // This hung until 7b89f9e (prepared statements deadlocked when clients outnumbered servers).
  it.skipIf(!hasPgbench)(
    "pgbench -M prepared TPC-B, -c 8 -j 2 on pool_size 3: no failure, balances add up",
    TIMEOUT,
    async () => {
      const problems = await runPgbench(env, { clients: 8, threads: 2, transactions: 100, pool: 3, deadlineMs: 60_000 })
      expect(problems, problems.join("\n")).toEqual([])
    }
  )
})

/**
 * Found by the harness (differences.ts, `stale-reuse`), reproduced without timing: the statement's
 * copy is evicted from the only server, so the use after the DDL meets no copy that could fail.
 */
describe("stale-reuse (a client's statement whose result type changed)", () => {
  it(
    "a client re-using its statement after DDL changed its result type gets 0A000, also when its copy was evicted meanwhile",
    TIMEOUT,
    async () => {
      const send = (label: string, frames: Array<Frame>): Step => ({
        label,
        act: { a: "send", frames, cuts: [], ready: frames.filter((f) => f.t === "S" || f.t === "Q").length }
      })
      const use: Array<Frame> = [
        { t: "B", portal: "", stmt: "x", values: [] },
        { t: "E", portal: "", rows: 0 },
        { t: "S" }
      ]
      const fill: Array<Frame> = []
      // One more statement than the server's cache holds (StressEnv's cacheSize, 20): the first is evicted.
      for (let i = 0; i < 21; i++) fill.push({ t: "P", name: `f${i}`, sql: `SELECT ${i} AS evicts_x_${i}` })
      fill.push({ t: "S" })
      const steps: Array<Step> = [
        send("prepare and use", [{ t: "P", name: "x", sql: "SELECT id, x FROM {S0} ORDER BY id" }, ...use]),
        send("prepare 21 others", fill),
        send("ALTER", [{ t: "Q", sql: "ALTER TABLE {S0} ALTER COLUMN x TYPE text USING x::text" }]),
        // PostgreSQL: 0A000. Tidepool prepares the evicted statement afresh and returns text rows.
        send("use again", use),
        { label: "Terminate", act: { a: "terminate", frames: [] } }
      ]
      const problems = await env.run([{ steps }], { clients: 1, pool: 1, length: 1, deadlineMs: DEADLINE_MS })
      expect(problems, problems.join("\n")).toEqual([])
    }
  )
})

/**
 * Bugs the harness found (the record is in differences.ts), each fixed since; the smallest scripts
 * that showed them, made deterministic, as regression tests.
 */
describe("bugs the harness found", () => {
  it(
    "a Close, or a Parse the server already has, alone in a chunk is answered once (was: twice)",
    TIMEOUT,
    async () => {
      const send = (label: string, frames: Array<Frame>): Step => ({
        label,
        act: { a: "send", frames, cuts: [], ready: frames.filter((f) => f.t === "S").length }
      })
      const steps: Array<Step> = [
        send("parse", [{ t: "P", name: "s", sql: "SELECT 1 AS one" }, { t: "S" }]),
        send("use", [{ t: "B", portal: "", stmt: "s", values: [] }, { t: "E", portal: "", rows: 0 }, { t: "S" }]),
        send("close", [{ t: "C", what: "S", name: "s" }, { t: "S" }]),
        send("same text, another name", [{ t: "P", name: "s2", sql: "SELECT 1 AS one" }, { t: "S" }]),
        { label: "Terminate", act: { a: "terminate", frames: [] } }
      ]
      // Twice, so the second client's Parse finds the statement on the server already.
      const problems = await env.run([{ steps }, { steps }], {
        clients: 2,
        pool: 1,
        length: 1,
        deadlineMs: DEADLINE_MS
      })
      expect(problems, problems.join("\n")).toEqual([])
    }
  )

  it("a client cannot bind another client's unnamed statement left on the server", TIMEOUT, async () => {
    const deadline = Date.now() + 20_000
    const connect = () => WireClient.connect(env.endpoint("pooled", 1), normalizeError, deadline)
    const x = await connect()
    const y = await connect()
    try {
      await x.write(
        Buffer.concat([serialize.parse({ text: "SELECT 'private to x' AS v, $1::text AS p" }), serialize.sync()])
      )
      await x.untilReady(1, deadline)
      // Y never prepared anything: on a direct connection its Bind fails with 26000.
      await y.write(Buffer.concat([serialize.bind({ values: ["from y"] }), serialize.execute({}), serialize.sync()]))
      await y.untilReady(1, deadline)
      expect(y.log).toEqual(['E S="ERROR" C="26000" M="unnamed prepared statement does not exist"', "Z I"])
    } finally {
      x.terminate()
      y.terminate()
    }
  })

  // Found by seed 4 with 4 clients on pool_size 2, about one run in three: it needs another client to take
  // the server at the wrong moment, which this arranges.
  it(
    "an extended COPY FROM STDIN keeps its server until its data is in (was: lent to the next client)",
    TIMEOUT,
    async () => {
      const schema = await env.newSchema(1, 1)
      const deadline = Date.now() + 20_000
      const connect = () => WireClient.connect(env.endpoint("pooled", 1), normalizeError, deadline)
      const [a, b, c] = [await connect(), await connect(), await connect()]
      const waiting = async (n: number) => {
        while (env.tenantPool(1)?.stats.waiting !== n) {
          if (Date.now() > deadline) throw new Error(`never ${n} waiting: ${env.poolState(1)}`)
          await new Promise((resolve) => setTimeout(resolve, 5))
        }
      }
      try {
        // B holds the only server; A's COPY (libpq's way) and C's query queue behind it, in that order.
        await b.write(serialize.query("BEGIN"))
        await b.untilReady(1, deadline)
        const copy = `COPY ${schema}.t0 (id, v) FROM STDIN`
        await a.write(
          Buffer.concat([serialize.parse({ text: copy }), serialize.bind({}), serialize.execute({}), serialize.sync()])
        )
        await waiting(1)
        await c.write(serialize.query("SELECT 1 AS one"))
        await waiting(2)
        await b.write(serialize.query("COMMIT"))
        await b.untilReady(1, deadline)
        expect(await a.until("GZ", deadline)).toBe("G")
        await a.write(
          Buffer.concat([serialize.copyData(Buffer.from("1000\t1\n")), serialize.copyDone(), serialize.sync()])
        )
        await Promise.allSettled([a.untilReady(1, deadline), c.untilReady(1, deadline)])
        expect({ a: a.log, c: c.log }).toEqual({
          a: ["1", "2", "G 0:0,0", "C COPY 1", "Z I"],
          c: ["T one:23/4/-1/0@0", 'D "1"', "C SELECT 1", "Z I"]
        })
      } finally {
        for (const client of [a, b, c]) client.socket.destroy()
      }
    }
  )
})
