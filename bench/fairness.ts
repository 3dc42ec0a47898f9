/**
 * `npm run bench:fairness`: how evenly processes sharing one `pool_size` share it
 * (docs/scale-out.md#fairness-measured). One embedded PostgreSQL is the tenant database and, in
 * cluster mode, the store; pgbench -S drives a pool smaller than its clients:
 *
 * - workers: TIDEPOOL_WORKERS=N on one port; per-worker transactions from the admin console's
 *   SHOW STATS, servers per worker from SHOW POOLS once a second (pgbench's latency is the port's:
 *   a worker's own clients cannot be told apart from outside);
 * - cluster: N `tidepool serve` runners (TIDEPOOL_CLUSTER=on) on their own ports, one pgbench each;
 *   servers per runner from the store's tidepool_permits once a second;
 * - uneven: two of those runners, one with many clients and one with few; then the delay for an
 *   idle runner's first query while the other holds every permit (median over --tries).
 *
 * pg_stat_activity is sampled alongside: the pool's servers must never exceed pool_size.
 */
import { randomBytes } from "node:crypto"
import { parseArgs } from "node:util"
import * as NodeRuntime from "@effect/platform-node/NodeRuntime"
import { Cause, Console, Effect, Exit } from "effect"
import pg from "pg"
import { benchMain, buildMode, UsageError } from "./options.ts"
import { type Endpoint, initPgbench, type PgbenchResult, percentile, pgbenchVersion, runPgbench } from "./pgbench.ts"
import { BenchError, benchPostgres, scopedTempDir } from "./process.ts"
import { type BuildMode, startTidepool } from "./tidepool.ts"

const HELP = `npm run bench:fairness -- [flags]

Measures how processes sharing one pool share its servers: TIDEPOOL_WORKERS on one host, runners
in cluster mode (TIDEPOOL_CLUSTER=on) on one store, uneven demand between two runners, and the
delay for an idle runner's first query while another holds every permit. Prints markdown tables.

  --parts LIST        workers, cluster, uneven (default all three; uneven starts the cluster's runners)
  --seconds N         load per run once its clients have connected (default 15)
  --pool N            pool_size (default 10)
  --processes N       workers, and runners in the cluster part (default 3)
  --clients N         pgbench clients per process (default 8)
  --big N, --small N  clients of the two runners in the uneven part (default 16 and 2)
  --tries N           idle-runner delays measured (default 10)
  --lease-ms N        TIDEPOOL_LEASE_MS of the runners (default 3000)
  --build MODE        tsx (default: from the sources, as npm run serve) or dist (compiled first)
  --help, -h          this text
`

const ROLE = "bench"
const PASSWORD = "bench"
const DATABASE = "bench"
const TENANT = "bench"
const ADMIN = { user: "ops", password: "ops-secret" }

interface Options {
  readonly parts: ReadonlyArray<"workers" | "cluster" | "uneven">
  readonly seconds: number
  readonly pool: number
  readonly processes: number
  readonly clients: number
  readonly big: number
  readonly small: number
  readonly tries: number
  readonly leaseMs: number
  readonly build: BuildMode
}

const positive = (flag: string, value: string | undefined, fallback: number): number => {
  if (value === undefined) return fallback
  const n = Number(value)
  if (!/^\d+$/.test(value) || n < 1) throw new UsageError(`--${flag}: expected a positive integer, got ${value}`)
  return n
}

const string = { type: "string" } as const
const parse = (argv: ReadonlyArray<string>) =>
  parseArgs({
    args: [...argv],
    strict: true,
    options: {
      parts: string,
      seconds: string,
      pool: string,
      processes: string,
      clients: string,
      big: string,
      small: string,
      tries: string,
      "lease-ms": string,
      build: string,
      help: { type: "boolean", short: "h" }
    }
  })

const parseOptions = (argv: ReadonlyArray<string>): Options | undefined => {
  let values: ReturnType<typeof parse>["values"]
  try {
    values = parse(argv).values
  } catch (error) {
    throw new UsageError((error as Error).message)
  }
  if (values.help === true) return undefined
  const str = (name: Exclude<keyof typeof values, "help">) => values[name]
  const parts = (str("parts") ?? "workers,cluster,uneven").split(",").map((part) => part.trim())
  for (const part of parts) {
    if (part !== "workers" && part !== "cluster" && part !== "uneven") throw new UsageError(`--parts: unknown ${part}`)
  }
  return {
    parts: parts as Options["parts"],
    seconds: positive("seconds", str("seconds"), 15),
    pool: positive("pool", str("pool"), 10),
    processes: positive("processes", str("processes"), 3),
    clients: positive("clients", str("clients"), 8),
    big: positive("big", str("big"), 16),
    small: positive("small", str("small"), 2),
    tries: positive("tries", str("tries"), 10),
    leaseMs: positive("lease-ms", str("lease-ms"), 3000),
    build: buildMode(str("build") ?? "tsx")
  }
}

const progress = (line: string) => Effect.sync(() => process.stderr.write(`${line}\n`))

/** A pg client for the enclosing scope. */
const client = (config: pg.ClientConfig) =>
  Effect.acquireRelease(
    Effect.tryPromise({
      try: async () => {
        const c = new pg.Client(config)
        c.on("error", () => undefined)
        await c.connect()
        return c
      },
      catch: (error) => new BenchError({ message: `connecting to ${config.port}: ${(error as Error).message}` })
    }),
    (c) => Effect.promise(() => c.end().catch(() => undefined))
  )

const query = <T>(c: pg.Client, sql: string) =>
  Effect.tryPromise({
    try: async () => (await c.query(sql)).rows as Array<T>,
    catch: (error) => new BenchError({ message: `${sql}: ${(error as Error).message}` })
  })

interface Sample {
  /** Servers per process (worker number or runner index), as the process or the store says. */
  readonly held: ReadonlyMap<number, number>
  /** The pool's connections as PostgreSQL counts them. */
  readonly servers: number
  /** Workers: SHOW STATS' total_xact_count per worker, and when it was read. */
  readonly xacts?: ReadonlyMap<number, number>
  readonly at?: number
}

/**
 * Takes a sample every `ms` until stopped. Plain async on purpose: pacing a sampler is not
 * synchronisation, and a sample lost to a busy moment is just one fewer.
 */
const sampleEvery = <S>(ms: number, take: () => Promise<S>) =>
  Effect.acquireRelease(
    Effect.sync(() => {
      const samples: Array<S> = []
      let running = true
      const loop = (async () => {
        while (running) {
          const started = Date.now()
          await take().then(
            (sample) => samples.push(sample),
            () => undefined
          )
          await new Promise((resolve) => setTimeout(resolve, Math.max(0, ms - (Date.now() - started))))
        }
      })()
      return {
        samples,
        stop: () => {
          running = false
          return loop
        }
      }
    }),
    (sampler) => Effect.promise(() => sampler.stop())
  )

const serversOf = async (db: pg.Client) =>
  Number((await db.query("SELECT count(*) AS n FROM pg_stat_activity WHERE usename = $1", [ROLE])).rows[0].n)

/** Backend pids per process, every 100 ms: servers that live shorter than that can be missed. */
const PIDS_MS = 100

/**
 * Sessions PostgreSQL has started on the tenant database: every server any process opened (the
 * bench's own connections use another database). Exact where the sampled pids are a lower bound;
 * a backend reports its start with its next statistics flush (within a second, or at its exit).
 */
const sessionsOf = async (db: pg.Client) => {
  await db.query("SELECT pg_stat_clear_snapshot()")
  const { rows } = await db.query("SELECT sessions FROM pg_stat_database WHERE datname = $1", [DATABASE])
  return Number(rows[0]?.sessions ?? Number.NaN)
}

/** Server connects during a part: the sessions counter's growth, read after a second for the last flushes. */
const connectsDuring = <A, E, R>(db: pg.Client, run: Effect.Effect<A, E, R>) =>
  Effect.gen(function* () {
    const before = yield* Effect.promise(() => sessionsOf(db))
    const result = yield* run
    yield* Effect.sleep("1100 millis")
    const after = yield* Effect.promise(() => sessionsOf(db))
    return [result, after - before] as const
  })

interface Row {
  readonly name: string
  readonly clients: number
  readonly transactions: number
  readonly seconds: number
  readonly meanHeld: number
  readonly serversSeen: number
  readonly result?: PgbenchResult
}

/** Jain's index: 1 when every value is equal, 1/n when one process has everything. */
const jain = (values: ReadonlyArray<number>) => {
  const sum = values.reduce((a, b) => a + b, 0)
  const squares = values.reduce((a, b) => a + b * b, 0)
  return squares === 0 ? Number.NaN : (sum * sum) / (values.length * squares)
}

/** Backend pids of each process's servers (every PIDS_MS): how many distinct ones a run saw shows server churn. */
type Pids = ReadonlyMap<number, ReadonlyArray<number>>

const serversSeen = (samples: ReadonlyArray<Pids>, process: number) =>
  new Set(samples.flatMap((s) => s.get(process) ?? [])).size

const meanHeld = (samples: ReadonlyArray<Sample>, process: number) =>
  samples.length === 0 ? Number.NaN : samples.reduce((sum, s) => sum + (s.held.get(process) ?? 0), 0) / samples.length

const fixed = (n: number, digits = 1) => (Number.isFinite(n) ? n.toFixed(digits) : "–")

const latency = (result: PgbenchResult | undefined, fraction: number) =>
  result === undefined ? Number.NaN : percentile(result.latencies.slice().sort(), fraction) / 1000

const table = (
  title: string,
  rows: ReadonlyArray<Row>,
  samples: ReadonlyArray<Sample>,
  pool: number,
  connects: number,
  failed = rows.reduce((sum, row) => sum + (row.result?.failed ?? 0) + (row.result?.aborted ?? 0), 0)
) => {
  const total = rows.reduce((sum, row) => sum + row.transactions, 0)
  const lines = [
    `### ${title}`,
    "",
    "| process | clients | transactions | share | tx/s | tx/s per client | mean servers held | servers seen | p50 ms | p99 ms |",
    "| --- | --: | --: | --: | --: | --: | --: | --: | --: | --: |",
    ...rows.map(
      (row) =>
        `| ${row.name} | ${row.clients} | ${row.transactions} | ${fixed((100 * row.transactions) / total)} % | ${fixed(row.transactions / row.seconds, 0)} | ${fixed(row.transactions / row.seconds / row.clients, 0)} | ${fixed(row.meanHeld)} | ${row.serversSeen} | ${fixed(latency(row.result, 0.5), 2)} | ${fixed(latency(row.result, 0.99), 2)} |`
    ),
    "",
    `Jain's index over the processes' throughput ${fixed(jain(rows.map((row) => row.transactions / row.seconds)), 3)}, ` +
      `over their throughput per client ${fixed(jain(rows.map((row) => row.transactions / row.seconds / row.clients)), 3)}; ` +
      `servers in pg_stat_activity at most ${Math.max(0, ...samples.map((s) => s.servers))} (pool_size ${pool}, ${samples.length} samples); ` +
      `failed transactions ${failed}; server connects ${connects} (sessions PostgreSQL started on the tenant database ` +
      `during the run; servers seen: distinct backend pids sampled every ${PIDS_MS} ms, a lower bound per process).`,
    ""
  ]
  return lines.join("\n")
}

const pgbench = (endpoint: Endpoint, clients: number, seconds: number, workDir: string) =>
  runPgbench({
    endpoint,
    protocol: "simple",
    clients,
    threads: clients > 8 ? 2 : 1,
    durationS: seconds,
    connectAllowanceS: 2,
    workDir,
    cpuPid: undefined
  }).pipe(
    Effect.filterOrFail(
      (result) => result.problem === "",
      (result) => new BenchError({ message: `pgbench through port ${endpoint.port}: ${result.problem}` })
    )
  )

/**
 * (a) TIDEPOOL_WORKERS=N: one port, the kernel spreads the clients over the workers. Transactions
 * per worker are counted between two SHOW STATS samples taken while pgbench runs: a worker's pool
 * with no client and no server left is dropped a sweep after pgbench ends, and its totals with it.
 */
const workersPart = (options: Options, upstream: Endpoint, db: pg.Client, workDir: string) =>
  Effect.gen(function* () {
    yield* progress(`workers: starting Tidepool with TIDEPOOL_WORKERS=${options.processes}`)
    const tidepool = yield* startTidepool({
      upstream,
      tenant: TENANT,
      poolSize: options.pool,
      maxClients: 1_000,
      mode: "transaction",
      workers: options.processes,
      build: options.build,
      env: { TIDEPOOL_ADMIN_USERS: `${ADMIN.user}=${ADMIN.password}` }
    })
    const admin = yield* client({ ...tidepool.endpoint, ...ADMIN, database: "pgbouncer" })
    // A gathered view leaves out a worker that does not answer within 2 s, with a NOTICE: say so.
    const notices: Array<string> = []
    admin.on("notice", (notice) => notices.push(notice.message ?? ""))
    const mine = (row: Record<string, string | number>) => String(row.database).startsWith(`${TENANT}/`)
    const clientsSeen = new Map<number, number>()
    const sampler = yield* sampleEvery(1_000, async (): Promise<Sample> => {
      const pools = (await admin.query("SHOW POOLS")).rows as Array<Record<string, string | number>>
      const stats = (await admin.query("SHOW STATS")).rows as Array<Record<string, string | number>>
      const at = Date.now()
      const held = new Map<number, number>()
      for (const row of pools.filter(mine)) {
        const worker = Number(row.worker)
        held.set(worker, Number(row.sv_active) + Number(row.sv_idle) + Number(row.sv_login))
        const clients = Number(row.cl_active) + Number(row.cl_waiting)
        clientsSeen.set(worker, Math.max(clientsSeen.get(worker) ?? 0, clients))
      }
      const xacts = new Map(stats.filter(mine).map((row) => [Number(row.worker), Number(row.total_xact_count)]))
      return { held, servers: await serversOf(db), xacts, at }
    })
    // A second admin connection: the views are gathered from every worker, one round trip each.
    const serversAdmin = yield* client({ ...tidepool.endpoint, ...ADMIN, database: "pgbouncer" })
    const pidSampler = yield* sampleEvery(PIDS_MS, async (): Promise<Pids> => {
      const servers = (await serversAdmin.query("SHOW SERVERS")).rows as Array<Record<string, string | number>>
      const pids = new Map<number, Array<number>>()
      for (const row of servers.filter(mine)) {
        const worker = Number(row.worker)
        pids.set(worker, [...(pids.get(worker) ?? []), Number(row.remote_pid)])
      }
      return pids
    })
    const [result, connects] = yield* connectsDuring(
      db,
      pgbench(tidepool.endpoint, options.processes * options.clients, options.seconds, workDir)
    )
    yield* Effect.promise(() => Promise.all([sampler.stop(), pidSampler.stop()]))
    const whole = sampler.samples.filter((sample) => sample.xacts?.size === options.processes)
    const [first, last] = [whole[0], whole.at(-1)]
    if (first === undefined || last === undefined || last === first) {
      return yield* new BenchError({ message: "SHOW STATS never had a row for every worker twice during the run" })
    }
    const rows = [...last.xacts!.keys()]
      .sort((a, b) => a - b)
      .map((worker) => ({
        name: `worker ${worker}`,
        // SO_REUSEPORT hashes connections over the workers: not necessarily an even split.
        clients: clientsSeen.get(worker) ?? 0,
        transactions: last.xacts!.get(worker)! - first.xacts!.get(worker)!,
        seconds: (last.at! - first.at!) / 1000,
        meanHeld: meanHeld(sampler.samples, worker),
        serversSeen: serversSeen(pidSampler.samples, worker)
      }))
    const p50 = latency(result, 0.5)
    const p99 = latency(result, 0.99)
    const workers = yield* query<{ worker: number; state: string; restarts: number }>(admin, "SHOW WORKERS")
    return (
      `${table(
        `Workers: TIDEPOOL_WORKERS=${options.processes}, ${options.processes * options.clients} clients on one port, pool ${options.pool}`,
        rows,
        sampler.samples,
        options.pool,
        connects,
        result.failed + result.aborted
      )}\nTransactions per worker between SHOW STATS samples ${fixed(rows[0]!.seconds)} s apart; pgbench counted ${result.transactions} in ${fixed(result.measuredS)} s, ` +
      `p50 ${fixed(p50, 2)} ms, p99 ${fixed(p99, 2)} ms over all clients (pgbench cannot tell the workers apart). ` +
      `Console notices: ${notices.length === 0 ? "none" : [...new Set(notices)].join("; ")}. ` +
      `SHOW WORKERS: ${workers.map((w) => `${w.worker} ${w.state} (${w.restarts} restarts)`).join(", ")}.\n`
    )
  }).pipe(Effect.scoped)

interface Runner {
  readonly endpoint: Endpoint
}

const startRunners = (options: Options, upstream: Endpoint, storeUrl: string, count: number) =>
  Effect.gen(function* () {
    const env = {
      DATABASE_URL: storeUrl,
      TIDEPOOL_CLUSTER: "on",
      TIDEPOOL_LEASE_MS: String(options.leaseMs),
      // Runners sharing a store must decrypt each other's stored tenant passwords.
      VAULT_ENC_KEY: randomBytes(32).toString("hex")
    }
    const runners: Array<Runner> = []
    // One after the other: each seeds the same tenant (an upsert), and each registers its row.
    for (let n = 1; n <= count; n++) {
      yield* progress(`cluster: starting runner ${n}`)
      const running = yield* startTidepool({
        upstream,
        tenant: TENANT,
        poolSize: options.pool,
        maxClients: 1_000,
        mode: "transaction",
        build: options.build,
        label: `runner ${n}`,
        env
      })
      runners.push(running)
    }
    return runners
  })

/** Servers held per runner (its index) from the store's ledger, plus pg_stat_activity's count. */
const storeSample = (db: pg.Client, runners: ReadonlyArray<Runner>) => async (): Promise<Sample> => {
  const { rows } = await db.query(
    `SELECT r.address, sum(p.held)::int AS held FROM tidepool_permits p JOIN tidepool_runners r USING (runner_id) GROUP BY r.address`
  )
  const held = new Map<number, number>()
  for (const row of rows as Array<{ address: string; held: number }>) {
    const index = runners.findIndex((runner) => row.address.endsWith(`:${runner.endpoint.port}`))
    if (index >= 0) held.set(index, row.held)
  }
  return { held, servers: await serversOf(db) }
}

/** Backend pids per runner (its index) from the store's record of each runner's servers. */
const storePids = (db: pg.Client, runners: ReadonlyArray<Runner>) => async (): Promise<Pids> => {
  const backends = await db.query(
    "SELECT r.address, array_agg(b.pid) AS pids FROM tidepool_backends b JOIN tidepool_runners r USING (runner_id) GROUP BY r.address"
  )
  const pids = new Map<number, ReadonlyArray<number>>()
  for (const row of backends.rows as Array<{ address: string; pids: Array<number> }>) {
    const index = runners.findIndex((runner) => row.address.endsWith(`:${runner.endpoint.port}`))
    if (index >= 0) pids.set(index, row.pids)
  }
  return pids
}

/** One pgbench per runner at once, `clients[i]` clients on runner i. */
const perRunner = (
  title: string,
  options: Options,
  runners: ReadonlyArray<Runner>,
  clients: ReadonlyArray<number>,
  db: pg.Client,
  storeUrl: string,
  workDir: string
) =>
  Effect.gen(function* () {
    const sampler = yield* sampleEvery(1_000, storeSample(db, runners))
    // Its own connection, so a slow sample of the other kind does not space these out.
    const pidsDb = yield* client({ connectionString: storeUrl })
    const pidSampler = yield* sampleEvery(PIDS_MS, storePids(pidsDb, runners))
    const [results, connects] = yield* connectsDuring(
      db,
      Effect.all(
        clients.map((n, i) => pgbench(runners[i]!.endpoint, n, options.seconds, workDir)),
        { concurrency: "unbounded" }
      )
    )
    yield* Effect.promise(() => Promise.all([sampler.stop(), pidSampler.stop()]))
    const rows = results.map((result, i) => ({
      name: `runner ${i + 1}`,
      clients: clients[i]!,
      transactions: result.transactions,
      seconds: result.measuredS,
      meanHeld: meanHeld(sampler.samples, i),
      serversSeen: serversSeen(pidSampler.samples, i),
      result
    }))
    return table(title, rows, sampler.samples, options.pool, connects)
  }).pipe(Effect.scoped)

const median = (values: ReadonlyArray<number>) => {
  const sorted = [...values].sort((a, b) => a - b)
  return sorted.length === 0 ? Number.NaN : sorted[Math.floor((sorted.length - 1) / 2)]!
}

/**
 * The idle runner's first query while the busy one holds every permit: the want goes to the store,
 * the busy runner is told its share and closes a server as one comes back from a transaction, and
 * the store grants the permit to the waiting runner, which connects a server.
 */
const idleDelay = (
  options: Options,
  busy: Runner,
  idle: Runner,
  runners: ReadonlyArray<Runner>,
  db: pg.Client,
  workDir: string
) => {
  const take = storeSample(db, runners)
  const busyIndex = runners.indexOf(busy)
  const tries = Effect.gen(function* () {
    const delays: Array<number> = []
    const logins: Array<number> = []
    let maxServers = 0
    for (let i = 0; i < options.tries; i++) {
      // Wait (bounded) until the busy runner holds the whole pool again, the others nothing.
      const deadline = Date.now() + 60_000
      for (;;) {
        const sample = yield* Effect.promise(take)
        maxServers = Math.max(maxServers, sample.servers)
        const others = [...sample.held].reduce((sum, [index, held]) => sum + (index === busyIndex ? 0 : held), 0)
        if (sample.held.get(busyIndex) === options.pool && others === 0) break
        if (Date.now() > deadline) {
          return yield* new BenchError({ message: "the busy runner did not get the whole pool back within 60 s" })
        }
        yield* Effect.sleep("100 millis")
      }
      const [login, delay] = yield* Effect.scoped(
        Effect.gen(function* () {
          // The login is timed apart: a pool's first login may itself wait for a server.
          const connecting = performance.now()
          const c = yield* client({ ...idle.endpoint })
          const started = performance.now()
          yield* query(c, "SELECT 1")
          return [started - connecting, performance.now() - started] as const
        })
      )
      delays.push(delay)
      logins.push(login)
      yield* progress(`uneven: idle runner's login ${fixed(login, 1)} ms, first query ${fixed(delay, 1)} ms`)
    }
    return { delays, logins, maxServers }
  })
  const load = pgbench(busy.endpoint, options.big, 600, workDir).pipe(
    Effect.andThen(Effect.fail(new BenchError({ message: "pgbench ended before the tries did" })))
  )
  return Effect.raceFirst(tries, load).pipe(
    Effect.map(
      ({ delays, logins, maxServers }) =>
        `Idle runner's first client while the other (${options.big} clients) holds all ${options.pool} permits, ${delays.length} tries: ` +
        `its first query median ${fixed(median(delays), 1)} ms, min ${fixed(Math.min(...delays), 1)} ms, max ${fixed(Math.max(...delays), 1)} ms; ` +
        `its login before it median ${fixed(median(logins), 1)} ms, max ${fixed(Math.max(...logins), 1)} ms; ` +
        `login + query median ${fixed(median(delays.map((d, i) => d + logins[i]!)), 1)} ms, max ${fixed(Math.max(...delays.map((d, i) => d + logins[i]!)), 1)} ms ` +
        `(servers in pg_stat_activity at most ${maxServers}).\n`
    )
  )
}

const clusterParts = (options: Options, upstream: Endpoint, storeUrl: string, db: pg.Client, workDir: string) =>
  Effect.gen(function* () {
    const wantsCluster = options.parts.includes("cluster")
    const runners = yield* startRunners(options, upstream, storeUrl, wantsCluster ? options.processes : 2)
    const out: Array<string> = []
    if (wantsCluster) {
      yield* progress(`cluster: ${options.clients} clients on each of ${runners.length} runners`)
      out.push(
        yield* perRunner(
          `Cluster: ${runners.length} runners × ${options.clients} clients, pool ${options.pool}, lease ${options.leaseMs} ms`,
          options,
          runners,
          runners.map(() => options.clients),
          db,
          storeUrl,
          workDir
        )
      )
    }
    if (options.parts.includes("uneven")) {
      const [big, small] = [runners[0]!, runners[1]!]
      yield* progress(`uneven: ${options.big} clients on runner 1, ${options.small} on runner 2`)
      out.push(
        yield* perRunner(
          `Uneven: runner 1 × ${options.big} clients, runner 2 × ${options.small}, pool ${options.pool}` +
            (runners.length > 2 ? ` (runner 3 idle)` : ""),
          options,
          runners,
          [options.big, options.small],
          db,
          storeUrl,
          workDir
        )
      )
      out.push(yield* idleDelay(options, big, small, runners, db, workDir))
    }
    return out.join("\n")
  }).pipe(Effect.scoped)

const bench = (options: Options) =>
  Effect.gen(function* () {
    yield* progress(yield* pgbenchVersion)
    const workDir = yield* scopedTempDir("tidepool-fairness-")
    const server = yield* benchPostgres({ roles: [{ name: ROLE, password: PASSWORD }], databases: [DATABASE] })
    const upstream: Endpoint = {
      host: server.host,
      port: server.port,
      user: ROLE,
      password: PASSWORD,
      database: DATABASE
    }
    yield* initPgbench(upstream, 1)
    // The store and pg_stat_activity are read as the superuser, whose connections are not the pool's.
    const db = yield* client({ connectionString: server.url() })
    const out: Array<string> = [
      `pgbench -S, ${options.seconds} s per run, pool_size ${options.pool}; ${new Date().toISOString()}\n`
    ]
    if (options.parts.includes("workers")) out.push(yield* workersPart(options, upstream, db, workDir))
    if (options.parts.includes("cluster") || options.parts.includes("uneven")) {
      out.push(yield* clusterParts(options, upstream, server.url(), db, workDir))
    }
    yield* Console.log(out.join("\n"))
  }).pipe(Effect.scoped)

const main = benchMain(() => parseOptions(process.argv.slice(2)), HELP, bench)

NodeRuntime.runMain(main, {
  teardown: (exit, onExit) => onExit(Exit.isSuccess(exit) ? 0 : Cause.hasInterruptsOnly(exit.cause) ? 130 : 1)
})
