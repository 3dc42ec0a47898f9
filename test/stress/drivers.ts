/**
 * Real drivers under the same checks as the raw scripts: seeded workloads of named statements,
 * transactions and errors, run by node-postgres (named queries) and postgres.js (`prepare: true`)
 * through Tidepool and directly, results compared; and pgbench's TPC-B with `-M prepared`, more
 * clients than servers, checked by its own balance invariants.
 */
import { execFile } from "node:child_process"
import fc from "fast-check"
import pg from "pg"
import postgres from "postgres"
import { run } from "../support/tools.ts"
import { Epochs } from "./epochs.ts"
import type { StressEnv } from "./harness.ts"
import { type Gate, type RenderContext, SHARED_TYPES, STATEMENTS, substitute } from "./script.ts"

interface Use {
  readonly stmt: number
  readonly a: number
  readonly b: number
}

type DriverOp =
  | { readonly k: "one"; readonly use: Use }
  | { readonly k: "tx"; readonly uses: ReadonlyArray<Use>; readonly commit: boolean }
  | { readonly k: "plain"; readonly use: Use }
  /** The shared table `{S0}` queried (`ddl`: its column changed to the next type), at its place in the run's order (`phase`). */
  | { readonly k: "shared"; readonly ddl: boolean; readonly phase: number }

const use: fc.Arbitrary<Use> = fc.record({
  stmt: fc.nat({ max: STATEMENTS.length - 1 }),
  a: fc.nat({ max: 1000 }),
  b: fc.nat({ max: 1000 })
})

const driverOp: fc.Arbitrary<DriverOp> = fc.oneof(
  { weight: 4, arbitrary: fc.record({ k: fc.constant("one" as const), use }) },
  {
    weight: 3,
    arbitrary: fc.record({
      k: fc.constant("tx" as const),
      uses: fc.array(use, { minLength: 1, maxLength: 5 }),
      commit: fc.boolean()
    })
  },
  { weight: 1, arbitrary: fc.record({ k: fc.constant("plain" as const), use }) },
  {
    weight: 1,
    arbitrary: fc.record({
      k: fc.constant("shared" as const),
      ddl: fc.nat({ max: 4 }).map((n) => n === 0),
      phase: fc.nat({ max: 999 })
    })
  }
)

/** Each client's operations, from `seed`. */
export const driverWorkload = (seed: number, clients: number, length: number): ReadonlyArray<ReadonlyArray<DriverOp>> =>
  fc.sample(
    fc.array(fc.array(driverOp, { minLength: length, maxLength: length }), { minLength: clients, maxLength: clients }),
    { seed, numRuns: 1 }
  )[0]!

/**
 * The gates of a workload's shared-table operations, per client (as script.ts's `compileRun` orders a
 * run's scripts): a use falls in the epoch current at its place in the run's order, a DDL ends it.
 */
const sharedGates = (workload: ReadonlyArray<ReadonlyArray<DriverOp>>): Array<Array<Gate | undefined>> => {
  const items: Array<{ client: number; index: number; phase: number; ddl: boolean }> = []
  for (const [client, ops] of workload.entries()) {
    const mine = ops.flatMap((op, index) => (op.k === "shared" ? [{ index, op }] : []))
    const phases = mine.map((m) => m.op.phase).sort((x, y) => x - y)
    for (const [n, m] of mine.entries()) items.push({ client, index: m.index, phase: phases[n]!, ddl: m.op.ddl })
  }
  items.sort((x, y) => x.phase - y.phase || x.client - y.client || x.index - y.index)
  const gates = workload.map((ops) => ops.map((): Gate | undefined => undefined))
  let epoch = 0
  for (const item of items) {
    gates[item.client]![item.index] = { table: 0, epoch, ddl: item.ddl }
    if (item.ddl) epoch++
  }
  return gates
}

/** What one driver does with one statement: its result rows, or its error. */
interface Driver {
  /** Runs a statement; `named` asks for a prepared (named) statement. */
  query(sql: string, values: Array<string>, named: string | undefined): Promise<string>
  begin(): Promise<void>
  end(commit: boolean): Promise<string>
  close(): Promise<void>
}

const failure = (error: unknown): string => {
  const e = error as { code?: string; message?: string }
  return `error ${e.code ?? "?"} ${(e.message ?? String(error)).replace(/^\([A-Z0-9]+\) /, "")}`
}

const nodePostgres = async (url: string): Promise<Driver> => {
  const client = new pg.Client({ connectionString: url })
  client.on("error", () => {})
  await client.connect()
  const simple = async (sql: string) => {
    try {
      return `${(await client.query(sql)).command}`
    } catch (error) {
      return failure(error)
    }
  }
  return {
    query: async (text, values, name) => {
      try {
        const result = await client.query({ text, values, rowMode: "array", ...(name !== undefined ? { name } : {}) })
        return `${result.command} ${result.rowCount} ${JSON.stringify(result.rows)}`
      } catch (error) {
        return failure(error)
      }
    },
    begin: async () => {
      await client.query("BEGIN")
    },
    end: (commit) => simple(commit ? "COMMIT" : "ROLLBACK"),
    close: () => client.end()
  }
}

/** postgres.js: one connection, statements prepared (named) by the driver itself. */
const postgresJs = async (url: string): Promise<Driver> => {
  const sql = postgres(url, { max: 1, prepare: true, onnotice: () => {}, idle_timeout: 0 })
  const reserved = await sql.reserve()
  return {
    query: async (text, values, name) => {
      try {
        const rows = await reserved.unsafe(text, values, { prepare: name !== undefined }).values()
        return `${rows.command} ${rows.count} ${JSON.stringify(rows)}`
      } catch (error) {
        return failure(error)
      }
    },
    begin: async () => {
      await reserved.unsafe("BEGIN")
    },
    end: async (commit) => {
      try {
        return `${(await reserved.unsafe(commit ? "COMMIT" : "ROLLBACK")).command}`
      } catch (error) {
        return failure(error)
      }
    },
    close: async () => {
      reserved.release()
      await sql.end({ timeout: 5 })
    }
  }
}

export type DriverName = "node-postgres" | "postgres.js"

const connectors: Record<DriverName, (url: string) => Promise<Driver>> = {
  "node-postgres": nodePostgres,
  "postgres.js": postgresJs
}

const runOps = async (
  driver: Driver,
  name: DriverName,
  ops: ReadonlyArray<DriverOp>,
  gates: ReadonlyArray<Gate | undefined>,
  epochs: Epochs,
  ctx: RenderContext,
  log: Array<string>,
  deadline: number
) => {
  const one = async ({ stmt, a, b }: Use, named: boolean) => {
    const st = STATEMENTS[stmt]!
    const text = substitute(st.sql, ctx)
    log.push(await driver.query(text, st.values(a, b), named ? `n${stmt}` : undefined))
  }
  let done = 0
  try {
    for (const [i, op] of ops.entries()) {
      const gate = gates[i]
      if (gate !== undefined) await epochs.enter(gate, ctx.client, deadline)
      if (op.k === "one") await one(op.use, true)
      else if (op.k === "plain") await one(op.use, false)
      else if (op.k === "shared" && gate !== undefined) {
        if (op.ddl) {
          const type = SHARED_TYPES[(gate.epoch + 1) % SHARED_TYPES.length]!
          log.push(
            await driver.query(
              substitute(`ALTER TABLE {S0} ALTER COLUMN x TYPE ${type} USING x::${type}`, ctx),
              [],
              undefined
            )
          )
        } else {
          // node-postgres: a name per epoch, so each is a fresh Parse of a text the pool's servers may hold
          // from before the DDL. postgres.js keys its statements by text: it re-uses its statement after
          // the DDL, meets 0A000 and prepares it again by itself (stale-reuse, differences.ts).
          const named = name === "node-postgres" ? `sh${gate.epoch}` : "sh"
          log.push(await driver.query(substitute("SELECT id, x FROM {S0} ORDER BY id", ctx), [], named))
        }
      } else if (op.k === "tx") {
        await driver.begin()
        for (const u of op.uses) await one(u, true)
        log.push(await driver.end(op.commit))
      }
      if (gate !== undefined) epochs.done(gate, ctx.client)
      done = i + 1
    }
  } catch (error) {
    epochs.retire(
      gates.slice(done).map((gate) => ({ gate })),
      ctx.client
    )
    throw error
  }
}

const steps = (gates: ReadonlyArray<Gate | undefined>) => ({ steps: gates.map((gate) => ({ gate })) })

const withDeadline = <A>(promise: Promise<A>, deadline: number, what: () => string): Promise<A> => {
  let timer: NodeJS.Timeout | undefined
  return Promise.race([
    promise,
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(what())), Math.max(0, deadline - Date.now()))
    })
  ]).finally(() => clearTimeout(timer))
}

/**
 * The driver's clients run the seeded workload through Tidepool and directly, at the same time;
 * each client's results must match, then the harness's after-run checks apply. Returns problems.
 */
export const runDriverWorkload = async (
  env: StressEnv,
  options: {
    readonly driver: DriverName
    readonly seed: number
    readonly clients: number
    readonly pool: number
    readonly length: number
    readonly deadlineMs: number
  }
): Promise<Array<string>> => {
  const { clients, pool } = options
  const workload = driverWorkload(options.seed, clients, options.length)
  const schema = await env.newSchema(clients, pool)
  const capacity = env.watchCapacity(pool)
  const deadline = Date.now() + options.deadlineMs
  const logs = { direct: [] as Array<Array<string>>, pooled: [] as Array<Array<string>> }
  const gates = sharedGates(workload)
  const epochs = { direct: new Epochs(gates.map(steps)), pooled: new Epochs(gates.map(steps)) }
  const problems: Array<string> = []
  try {
    await withDeadline(
      Promise.all(
        (["direct", "pooled"] as const).flatMap((side) =>
          workload.map(async (ops, client) => {
            const log: Array<string> = []
            logs[side][client] = log
            const driver = await connectors[options.driver](env.url(side, pool))
            try {
              await runOps(driver, options.driver, ops, gates[client]!, epochs[side], { schema, client }, log, deadline)
            } finally {
              await driver.close()
            }
          })
        )
      ),
      deadline,
      () =>
        `HANG: ${options.driver} clients not done after ${options.deadlineMs} ms; results so far per client (direct/pooled): ` +
        workload
          .map((ops, i) => `${i}: ${logs.direct[i]?.length}/${logs.pooled[i]?.length} of ${ops.length}+`)
          .join(", ")
    )
    for (let i = 0; i < clients; i++) {
      const a = logs.direct[i]!
      const b = logs.pooled[i]!
      const at = a.findIndex((line, j) => line !== b[j])
      if (at >= 0 || a.length !== b.length) {
        const j = at >= 0 ? at : Math.min(a.length, b.length)
        problems.push(
          `MISMATCH (${options.driver}, seed ${options.seed}): client ${i}, result ${j}\n    direct: ${a[j]}\n    pooled: ${b[j]}\n` +
            `  workload: ${JSON.stringify(workload[i])}`
        )
      }
    }
    problems.push(...(await env.afterwards(pool, { schema, clients })))
    if (problems.length === 0) await env.dropSchema(schema, pool)
  } catch (error) {
    problems.push((error as Error).message)
  } finally {
    problems.push(...(await capacity.stop()))
  }
  return problems
}

/** Runs pgbench; at the deadline, describes the hang (before killing it: its exit frees everything) and throws. */
const pgbenchUntil = (args: Array<string>, deadlineMs: number, describe: () => Promise<string>): Promise<string> =>
  new Promise((resolve, reject) => {
    let hung: string | undefined
    const child = execFile("pgbench", args, { maxBuffer: 16 * 1024 * 1024 }, (error, stdout, stderr) => {
      clearTimeout(timer)
      if (hung !== undefined) reject(new Error(`${hung}\n${stdout}${stderr}`))
      else if (error !== null) reject(new Error(`pgbench failed: ${error.message}\n${stdout}${stderr}`))
      else resolve(stdout)
    })
    const timer = setTimeout(async () => {
      hung = await describe().catch((e: Error) => `HANG (and no snapshot: ${e.message})`)
      child.kill("SIGKILL")
    }, deadlineMs)
  })

export interface PgbenchOptions {
  readonly clients: number
  readonly threads: number
  readonly transactions: number
  readonly pool: number
  readonly deadlineMs: number
}

/**
 * pgbench TPC-B with `-M prepared` through Tidepool, after `pgbench -i` directly: no failed
 * transaction, every transaction counted, and the balances add up (each transaction adds the same
 * delta to one account, teller and branch and logs it in history).
 */
export const runPgbench = async (env: StressEnv, options: PgbenchOptions): Promise<Array<string>> => {
  const { pool } = options
  await run("pgbench", ["-i", "-s", "1", "-q", env.directUrl(pool)])
  const capacity = env.watchCapacity(pool)
  const problems: Array<string> = []
  try {
    const args = [
      "-M",
      "prepared",
      "-c",
      `${options.clients}`,
      "-j",
      `${options.threads}`,
      "-t",
      `${options.transactions}`,
      "-n"
    ]
    const stdout = await pgbenchUntil([...args, env.url("pooled", pool)], options.deadlineMs, async () => {
      const backends = await env.backends(`pooled${pool}`)
      return (
        `HANG: pgbench ${args.join(" ")} on pool_size ${pool} not done after ${options.deadlineMs} ms; ` +
        `pool: ${env.poolState(pool)}; PostgreSQL: ` +
        backends.map((b) => `${b.pid} ${b.state}${b.xact ? " in transaction" : ""}: ${b.query}`).join(" | ")
      )
    })
    const expected = options.clients * options.transactions
    const processed = Number(stdout.match(/number of transactions actually processed: (\d+)/)?.[1])
    if (processed !== expected)
      problems.push(`PGBENCH processed ${processed} transactions, expected ${expected}\n${stdout}`)
    const failed = stdout.match(/number of failed transactions: (\d+)/)?.[1]
    if (failed !== undefined && failed !== "0") problems.push(`PGBENCH: ${failed} failed transactions\n${stdout}`)
    const [sums] = await env.asOwner<{ a: string; t: string; b: string; h: string; n: string }>(
      "pooled",
      pool,
      "SELECT (SELECT sum(abalance) FROM pgbench_accounts) AS a, (SELECT sum(tbalance) FROM pgbench_tellers) AS t, " +
        "(SELECT sum(bbalance) FROM pgbench_branches) AS b, (SELECT sum(delta) FROM pgbench_history) AS h, (SELECT count(*) FROM pgbench_history) AS n"
    )
    if (sums === undefined || new Set([sums.a, sums.t, sums.b, sums.h]).size !== 1 || Number(sums.n) !== expected) {
      problems.push(`PGBENCH balances do not add up: ${JSON.stringify(sums)} (history rows expected: ${expected})`)
    }
    problems.push(...(await env.afterwards(pool)))
  } catch (error) {
    problems.push((error as Error).message)
  } finally {
    problems.push(...(await capacity.stop()))
  }
  return problems
}
