/**
 * `npm run bench -- --connect …`: what logging in costs the poolers, outside the pgbench -S matrix.
 *
 * For each target (Tidepool, Tidepool from --baseline, PgBouncer), in rotating order, --repeat times:
 *
 * - **new connections**: `pgbench -S -C` (a SCRAM login, one query and a disconnect per
 *   transaction); pooler CPU per connection over the steady part of the run, as in the matrix;
 * - **refused logins**: `--refused` logins with a wrong password, and as many for an unknown tenant
 *   (PgBouncer: an unknown user), `--concurrency` at a time from `pg`; pooler CPU per refusal (all
 *   its threads, from schedstat in ns), less what the process spends idle over the same time. Each attempt comes from a loopback address of its own
 *   (127.0.x.y), so Tidepool's per-address breaker (10 wrong passwords block an address) never
 *   trips and every refusal goes through the whole SCRAM exchange;
 * - **idle clients**: `--idle` authenticated clients opened with the lean client (bench/leanClient.ts:
 *   SCRAM keys derived once, one raw socket each, from loopback source addresses of their own) and
 *   left idle on the pooler's port of a freshly started (and warmed-up) pooler process; the time to
 *   connect them all, resident memory (VmRSS from /proc) before and after, divided by the clients,
 *   and a query on a sample of them afterwards;
 * - **storm**: `--storm` clients arriving at once (every connect started in the same tick): the time
 *   until the last is authenticated, the p99 of a login, the pooler's CPU per login, refusals;
 * - **disconnect wave**: `pgbench -S -c --wave-clients` running while `--wave` other idle clients
 *   disconnect at once (Terminate, then FIN, all in the same tick); the p99 and the maximum of the
 *   running transactions that complete in the second after the wave, against the same second of a
 *   run without it.
 *
 * The client side runs in this process; only the pooler processes are measured.
 */
import { readdirSync, readFileSync } from "node:fs"
import * as fs from "node:fs/promises"
import * as net from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import { parseArgs } from "node:util"
import { Effect, Fiber, type Scope } from "effect"
import pg from "pg"
import { freePort } from "../test/support/ports.ts"
import { startPostgres } from "../test/support/postgres.ts"
import { sampleAllocations } from "./allocations.ts"
import { childrenOf } from "./cpu.ts"
import { LeanClient, type LeanTarget, ScramKeyCache, ServerError } from "./leanClient.ts"
import { startLoginFloor } from "./loginFloorProcess.ts"
import { describeMachine, nodeVersion, tidepoolRevision } from "./machine.ts"
import { baselineNodeDefault, buildMode, nodeFlagsOf, type PoolMode, UsageError } from "./options.ts"
import { type Endpoint, initPgbench, type PgbenchResult, pgbenchVersion, runPgbench } from "./pgbench.ts"
import { pgbouncerVersion, startPgBouncer } from "./pgbouncer.ts"
import { BenchError, scopedTempDir } from "./process.ts"
import { median } from "./report.ts"
import { type BuildMode, buildLabel, flagsLabel, startTidepool } from "./tidepool.ts"

const ROLE = "bench"
const PASSWORD = "bench"
const DATABASE = "bench"
const TENANT = "bench"

export const CONNECT_TARGETS = ["tidepool", "tidepool-base", "pgbouncer", "login-floor", "pool-floor"] as const
type ConnectTarget = (typeof CONNECT_TARGETS)[number]

const LABEL: Record<ConnectTarget, string> = {
  tidepool: "Tidepool",
  "tidepool-base": "Tidepool (base)",
  pgbouncer: "PgBouncer",
  "login-floor": "Node login floor",
  "pool-floor": "Node pool floor"
}

export interface ConnectOptions {
  readonly targets: ReadonlyArray<ConnectTarget>
  readonly baseline: string | undefined
  readonly baselineNode: string
  readonly repeat: number
  /** pgbench -C clients. */
  readonly clients: number
  readonly duration: number
  /** Refused logins per kind (wrong password, unknown tenant); 0 skips. */
  readonly refused: number
  /** Idle clients for the memory figure; 0 skips. */
  readonly idle: number
  /**
   * Seconds of quiet before the idle phase's first reading and after its last login for the settled
   * reading: the resident memory once the pooler has given a burst's memory back.
   */
  readonly idleSettle: number
  /** Logins in flight at once from this process (refused and idle phases). */
  readonly concurrency: number
  /** Idle clients asked for a query after the idle phase. */
  readonly sample: number
  /** Clients arriving at once; 0 skips. */
  readonly storm: number
  /** Idle clients that disconnect at once during pgbench; 0 skips. */
  readonly wave: number
  /** pgbench clients running through the wave. */
  readonly waveClients: number
  readonly pool: number
  /** Tidepool's port and PgBouncer's pool_mode; session mode fits only the -C run (clients ≤ pool). */
  readonly mode: PoolMode
  readonly out: string | undefined
  /** How the Tidepool targets run: compiled (`dist`, default) or from the sources (`tsx`). */
  readonly build: BuildMode
  /** Extra Node.js flags for the tidepool target only. */
  readonly nodeFlags: ReadonlyArray<string>
  /** TIDEPOOL_WORKERS for the tidepool target (1: one process). */
  readonly workers: number
  /** Also the bytes allocated per pgbench -C connection (Node.js targets, over the inspector). */
  readonly alloc: boolean
}

export const CONNECT_HELP = `npm run bench -- --connect [flags]

Login costs, per pooler process: CPU per new connection (pgbench -S -C, SCRAM), CPU per refused
login (wrong password; unknown tenant), resident memory per idle authenticated client.

  --targets LIST       tidepool, tidepool-base, pgbouncer, login-floor, pool-floor (default
                       tidepool,pgbouncer); login-floor: bench/loginFloor.ts, a bare Node.js server
                       doing Tidepool's login (SCRAM with a cached verifier) and holding clients
                       idle, answering pgbench's query itself; pool-floor: the same with a pool of
                       --pool PostgreSQL connections that the query goes to (Tidepool's "vs floor"
                       is against it when it runs, else against login-floor)
  --baseline DIR       checkout for tidepool-base (as in the matrix); --baseline-node PATH its Node
                       (default: the node dev dependency's Node 24)
  --build MODE         dist (default: compiled first, as the Docker image runs it) or tsx
  --node-flags="FLAGS" extra Node.js flags for the tidepool target only (e.g. "--optimize-for-size")
  --workers N          TIDEPOOL_WORKERS for the tidepool target (default 1): a supervisor and N
                       workers on one port; CPU and RSS are the supervisor's plus its workers'
  --alloc              also kB allocated per new connection (Tidepool and the Node floors): a second
                       pgbench -C run as long as the first, V8's sampling heap profiler over the
                       inspector counting what GC took too; steadier than CPU on a shared machine
  --repeat N           repetitions, targets in rotating order; medians reported (default 1)
  --clients N          pgbench -C clients (default 8)
  --duration, -T S     seconds of pgbench -C per run (default 10; 0 skips)
  --refused N          refused logins per kind and run (default 600; 0 skips)
  --idle N             idle clients for the memory figure (default 10000; 0 skips; needs an
                       open-files limit above N for this process and the poolers: see
                       docs/benchmarks.md)
  --idle-settle S      seconds of quiet before the first idle client and after the last, for the
                       settled RSS figure (default 20; the 3-s figure is reported beside it)
  --concurrency N      logins in flight at once for --refused and --idle (default 64)
  --sample N           idle clients that run a query after the idle phase (default 100)
  --storm N            clients arriving at once: time until all are authenticated (default 10000;
                       0 skips); Tidepool runs with TIDEPOOL_MAX_HANDSHAKES ≥ N, like PgBouncer,
                       which has no such cap
  --wave N             idle clients that disconnect at once while pgbench -S runs (default 1000;
                       0 skips)
  --wave-clients N     pgbench clients running through the wave (default 4)
  --pool N             pool size (default 20)
  --mode MODE          transaction (default) or session: Tidepool's port, PgBouncer's pool_mode;
                       session mode serves at most --pool clients, so use it for -C alone
  --out FILE           also write the report to FILE
`

const modeOf = (raw: string | boolean | undefined): PoolMode => {
  if (raw === undefined || raw === "transaction" || raw === "session") return raw ?? "transaction"
  throw new UsageError(`--mode: expected transaction or session, got ${JSON.stringify(raw)}`)
}

/** This process's open-files limit (the soft one, which Node raised to the hard one at start). */
const openFilesLimit = (): number => {
  const line = readFileSync("/proc/self/limits", "utf8")
    .split("\n")
    .find((l) => l.startsWith("Max open files"))
  const soft = line?.slice("Max open files".length).trim().split(/\s+/)[0]
  return soft === undefined || soft === "unlimited" ? Number.POSITIVE_INFINITY : Number(soft)
}

export const parseConnectOptions = (argv: ReadonlyArray<string>): ConnectOptions | undefined => {
  let values: Record<string, string | boolean | undefined>
  try {
    values = parseArgs({
      args: argv.filter((arg) => arg !== "--connect"),
      strict: true,
      options: {
        targets: { type: "string" },
        baseline: { type: "string" },
        "baseline-node": { type: "string" },
        repeat: { type: "string" },
        clients: { type: "string" },
        duration: { type: "string", short: "T" },
        refused: { type: "string" },
        idle: { type: "string" },
        "idle-settle": { type: "string" },
        concurrency: { type: "string" },
        sample: { type: "string" },
        storm: { type: "string" },
        wave: { type: "string" },
        "wave-clients": { type: "string" },
        pool: { type: "string" },
        mode: { type: "string" },
        out: { type: "string" },
        build: { type: "string" },
        "node-flags": { type: "string" },
        workers: { type: "string" },
        alloc: { type: "boolean" },
        help: { type: "boolean", short: "h" }
      }
    }).values
  } catch (error) {
    throw new UsageError((error as Error).message)
  }
  if (values.help === true) return undefined
  const count = (flag: string, fallback: number, min = 1) => {
    const raw = values[flag]
    if (raw === undefined) return fallback
    const n = Number(raw)
    if (!Number.isSafeInteger(n) || n < min) throw new UsageError(`--${flag}: expected an integer ≥ ${min}`)
    return n
  }
  const targets = String(values.targets ?? "tidepool,pgbouncer")
    .split(",")
    .map((item) => item.trim())
    .filter((item) => item !== "")
  for (const target of targets) {
    if (!CONNECT_TARGETS.includes(target as ConnectTarget)) {
      throw new UsageError(`--targets: unknown ${JSON.stringify(target)} (expected ${CONNECT_TARGETS.join(", ")})`)
    }
  }
  const baseline = values.baseline === undefined ? undefined : path.resolve(String(values.baseline))
  if (targets.includes("tidepool-base") && baseline === undefined) {
    throw new UsageError("--targets tidepool-base needs --baseline DIR")
  }
  // Each client is a descriptor here and one in the pooler, whose limit is inherited from this process.
  const crowd = Math.max(count("idle", 10_000, 0), count("storm", 10_000, 0), count("wave", 1000, 0))
  const limit = openFilesLimit()
  if (crowd + 1000 > limit) {
    throw new UsageError(
      `${crowd} clients need an open-files limit above ${crowd + 1000} (this process and the poolers have ${limit}): ` +
        `raise it (ulimit -Hn / ulimit -n, prlimit, LimitNOFILE=; docs/benchmarks.md) or lower --idle/--storm/--wave`
    )
  }
  // The inspector would sample the supervisor, which serves no client.
  if (values.alloc === true && count("workers", 1) > 1)
    throw new UsageError("--alloc measures one process: drop --workers")
  return {
    targets: [...new Set(targets)] as Array<ConnectTarget>,
    baseline,
    baselineNode: values["baseline-node"] === undefined ? baselineNodeDefault() : String(values["baseline-node"]),
    repeat: count("repeat", 1),
    clients: count("clients", 8),
    duration: count("duration", 10, 0),
    refused: count("refused", 600, 0),
    idle: count("idle", 10_000, 0),
    idleSettle: count("idle-settle", 20, 3),
    concurrency: count("concurrency", 64),
    sample: count("sample", 100, 0),
    storm: count("storm", 10_000, 0),
    wave: count("wave", 1000, 0),
    waveClients: count("wave-clients", 4),
    pool: count("pool", 20),
    mode: modeOf(values.mode),
    out: values.out === undefined ? undefined : String(values.out),
    build: buildMode(values.build === undefined ? undefined : String(values.build)),
    nodeFlags: nodeFlagsOf(values["node-flags"] === undefined ? undefined : String(values["node-flags"])),
    workers: count("workers", 1),
    alloc: values.alloc === true
  }
}

interface Target {
  readonly name: ConnectTarget
  readonly endpoint: Endpoint
  readonly pid: number
  /** `--alloc`: the inspector's port (Node.js targets). */
  readonly inspectPort?: number
}

interface Run {
  connectUs?: number
  connectsPerS?: number
  /** `--alloc`: bytes allocated per pgbench -C connection. */
  allocBytes?: number
  wrongPasswordUs?: number
  unknownTenantUs?: number
  /** RSS per idle client 3 s after the last login. */
  idleBytes?: number
  /** The same `--idle-settle` seconds after. */
  idleSettledBytes?: number
  idleLoginUs?: number
  /** Seconds to connect all the idle clients. */
  idleConnectS?: number
  /** Seconds until the last of the storm's clients was authenticated. */
  stormS?: number
  stormP99Ms?: number
  stormLoginUs?: number
  /** Running transactions in the second after the wave, and in the same second without it. */
  waveP99Ms?: number
  waveMaxMs?: number
  calmP99Ms?: number
  calmMaxMs?: number
  notes: Array<string>
}

const progress = (line: string) => Effect.sync(() => process.stderr.write(`${line}\n`))

/** `pid` and its child processes (Tidepool's workers with `--workers`; none for one process). */
const processesOf = (pid: number): Array<number> => [pid, ...childrenOf(pid)]

/**
 * CPU time of all the threads of `pid` and its child processes in µs, from
 * /proc/<pid>/task/<tid>/schedstat (nanoseconds, where /proc/<pid>/stat counts 10 ms ticks: too
 * coarse for a few hundred refused logins).
 */
const cpuTimeUs = (pid: number): number => {
  let ns = 0
  for (const proc of processesOf(pid)) {
    let tids: Array<string> = []
    try {
      tids = readdirSync(`/proc/${proc}/task`)
    } catch {
      continue // the process has just exited
    }
    for (const tid of tids) {
      try {
        ns += Number(readFileSync(`/proc/${proc}/task/${tid}/schedstat`, "utf8").split(" ")[0])
      } catch {
        // the thread has just exited
      }
    }
  }
  return ns / 1000
}

/** Resident memory of `pid` and its child processes. */
const rssKb = async (pid: number): Promise<number> => {
  let kb = 0
  for (const proc of processesOf(pid)) {
    // A worker that has just exited has no status any more; the supervisor's is always there.
    const status = await fs.readFile(`/proc/${proc}/status`, "utf8").catch(() => (proc === pid ? undefined : ""))
    if (status === undefined) return Number.NaN
    kb += Number(status.match(/VmRSS:\s+(\d+)/)?.[1] ?? (proc === pid ? Number.NaN : 0))
  }
  return kb
}

/** The i-th loopback source address, 127.0.1.1 onwards (never 127.0.0.1, the readiness probes'). */
const sourceAddress = (i: number) =>
  `127.${1 + Math.floor(i / 62_500)}.${1 + (Math.floor(i / 250) % 250)}.${1 + (i % 250)}`

/** A pg client whose socket connects from `local`. */
const clientFrom = (endpoint: Endpoint, local: string) =>
  new pg.Client({
    ...endpoint,
    connectionTimeoutMillis: 60_000,
    stream: () => {
      const socket = new net.Socket()
      const connect = socket.connect.bind(socket) as (options: net.TcpSocketConnectOpts) => net.Socket
      ;(socket as unknown as { connect: (port: number, host: string) => net.Socket }).connect = (port, host) =>
        connect({ port, host, localAddress: local })
      return socket
    }
  })

/** Runs `attempt(i)` for i < n, `concurrency` at a time. */
const inParallel = async (n: number, concurrency: number, attempt: (i: number) => Promise<void>) => {
  let next = 0
  const worker = async () => {
    while (next < n) await attempt(next++)
  }
  await Promise.all(Array.from({ length: Math.min(n, concurrency) }, worker))
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

/**
 * Time for the pooler to settle (sockets closed, memory counted) around a crowd of `n` clients:
 * 3 s for thousands, less for the few of a smoke run (test/e2e/bench.test.ts).
 */
const settleMs = (n: number) => Math.min(3_000, 200 + n)

/** The pooler's CPU per refused login, less its idle CPU over the same time. */
const refusals = async (
  target: Target,
  endpoint: Endpoint,
  options: ConnectOptions,
  offset: number
): Promise<{ readonly us: number; readonly note: string | undefined }> => {
  const idleFrom = cpuTimeUs(target.pid)
  const idleStart = Date.now()
  await sleep(3_000)
  const idleRate = (cpuTimeUs(target.pid) - idleFrom) / (Date.now() - idleStart)
  const codes = new Map<string, number>()
  const from = cpuTimeUs(target.pid)
  const start = Date.now()
  await inParallel(options.refused, options.concurrency, async (i) => {
    const client = clientFrom(endpoint, sourceAddress(offset + i))
    client.on("error", () => undefined)
    const outcome = await client.connect().then(
      () => "accepted!",
      (error: Error & { code?: string }) => error.code ?? error.message.slice(0, 60)
    )
    codes.set(outcome, (codes.get(outcome) ?? 0) + 1)
    await client.end().catch(() => undefined)
  })
  // Let the last refusals' sockets close on the pooler's side too.
  await sleep(500)
  const elapsed = Date.now() - start
  const us = (cpuTimeUs(target.pid) - from - idleRate * elapsed) / options.refused
  const outcomes = [...codes].map(([code, n]) => `${n} × ${code}`).join(", ")
  return { us, note: `${outcomes} in ${(elapsed / 1000).toFixed(1)} s, idle ${(idleRate * 1000).toFixed(0)} µs/s` }
}

const leanTarget = (endpoint: Endpoint): LeanTarget => ({
  host: endpoint.host,
  port: endpoint.port,
  user: endpoint.user,
  password: endpoint.password,
  database: endpoint.database
})

const outcomeOf = (error: unknown): string =>
  error instanceof ServerError ? `${error.sqlstate} ${error.message.slice(0, 50)}` : String((error as Error).message)

const counted = (counts: Map<string, number>) => [...counts].map(([code, n]) => `${n} × ${code}`).join(", ")

/** `n` lean clients logged in, `concurrency` at a time, from source addresses `offset` onwards. */
const connectIdle = async (endpoint: Endpoint, n: number, concurrency: number, offset: number) => {
  const keys = new ScramKeyCache()
  const clients: Array<LeanClient> = []
  const errors = new Map<string, number>()
  await inParallel(n, concurrency, async (i) => {
    try {
      clients.push(await LeanClient.login(leanTarget(endpoint), keys, sourceAddress(offset + i)))
    } catch (error) {
      const outcome = outcomeOf(error)
      errors.set(outcome, (errors.get(outcome) ?? 0) + 1)
    }
  })
  return { clients, errors }
}

/**
 * Resident memory per idle authenticated client, the time to connect them all, the pooler's CPU per
 * login on the way, and a query on a sample of them afterwards.
 */
const idleClients = async (target: Target, options: ConnectOptions) => {
  // The same quiet time before as after: a pooler that gives memory back once it is quiet has
  // given back its warm-up's by then.
  await sleep(Math.max(settleMs(options.idle), options.idleSettle * 1000))
  const before = await rssKb(target.pid)
  const from = cpuTimeUs(target.pid)
  const startedAt = performance.now()
  const { clients, errors } = await connectIdle(target.endpoint, options.idle, options.concurrency, 0)
  const connectS = (performance.now() - startedAt) / 1000
  const loginUs = (cpuTimeUs(target.pid) - from) / Math.max(1, clients.length)
  const lastLogin = performance.now()
  await sleep(settleMs(options.idle))
  const after = await rssKb(target.pid)
  await sleep(Math.max(0, options.idleSettle * 1000 - (performance.now() - lastLogin)))
  const settled = await rssKb(target.pid)
  const connected = clients.length
  // Spread over the whole crowd: the first and the last clients connected are asked alike.
  const step = Math.max(1, Math.floor(connected / Math.max(1, options.sample)))
  const sample = clients.filter((_, i) => i % step === 0).slice(0, options.sample)
  const sampleStart = performance.now()
  const answers = await Promise.allSettled(sample.map((client) => client.query("select 1")))
  const sampleMs = performance.now() - sampleStart
  const answered = answers.filter((a) => a.status === "fulfilled").length
  for (const client of clients) client.terminate()
  await sleep(settleMs(options.idle))
  const note =
    `${connected} of ${options.idle} connected in ${connectS.toFixed(1)} s; RSS ${(before / 1024).toFixed(0)} → ${(after / 1024).toFixed(0)} MiB 3 s after the last login, ` +
    `${(settled / 1024).toFixed(0)} MiB ${options.idleSettle} s after; ` +
    `a query on ${sample.length} of them: ${answered} answered in ${sampleMs.toFixed(0)} ms` +
    (errors.size === 0 ? "" : `; failed: ${counted(errors)}`)
  const perClient = (kb: number) => (connected === 0 ? Number.NaN : ((kb - before) * 1024) / connected)
  return { bytes: perClient(after), settledBytes: perClient(settled), loginUs, connectS, note }
}

/** `--storm` clients arriving at once: every connect is started in the same tick. */
const storm = async (target: Target, options: ConnectOptions, offset: number) => {
  const keys = new ScramKeyCache()
  // One login first, so the generator derives its SCRAM keys before the storm, not during it.
  ;(await LeanClient.login(leanTarget(target.endpoint), keys, sourceAddress(offset))).terminate()
  await sleep(settleMs(options.storm))
  const clients: Array<LeanClient> = []
  const errors = new Map<string, number>()
  const durations = new Float64Array(options.storm)
  let last = 0
  const from = cpuTimeUs(target.pid)
  const startedAt = performance.now()
  await Promise.all(
    Array.from({ length: options.storm }, (_, i) =>
      LeanClient.login(leanTarget(target.endpoint), keys, sourceAddress(offset + 1 + i)).then(
        (client) => {
          last = performance.now()
          durations[clients.length] = last - startedAt
          clients.push(client)
        },
        (error: unknown) => {
          const outcome = outcomeOf(error)
          errors.set(outcome, (errors.get(outcome) ?? 0) + 1)
        }
      )
    )
  )
  const cpuUs = cpuTimeUs(target.pid) - from
  const ok = clients.length
  const sorted = durations.subarray(0, ok).sort()
  const p99Ms = ok === 0 ? Number.NaN : sorted[Math.min(ok - 1, Math.ceil(0.99 * ok) - 1)]!
  for (const client of clients) client.terminate()
  await sleep(settleMs(options.storm))
  const seconds = (last - startedAt) / 1000
  const note =
    `storm: ${ok} of ${options.storm} authenticated, the last after ${seconds.toFixed(2)} s (p99 ${p99Ms.toFixed(0)} ms), ` +
    `${(cpuUs / Math.max(1, ok)).toFixed(0)} µs pooler CPU per login` +
    (errors.size === 0 ? "" : `; failed: ${counted(errors)}`)
  return { seconds: ok === options.storm ? seconds : Number.NaN, p99Ms, loginUs: cpuUs / Math.max(1, ok), note }
}

const WAVE_AT_S = 4
const WAVE_RUN_S = 8

/** p99 and maximum (ms) of the transactions completing in [from, from + 1 s). */
const windowOf = (result: PgbenchResult, from: number) => {
  const inWindow: Array<number> = []
  for (let i = 0; i < result.completions.length; i++) {
    const at = result.completions[i]!
    if (at >= from && at < from + 1000) inWindow.push(result.latencies[i]! / 1000)
  }
  inWindow.sort((a, b) => a - b)
  const n = inWindow.length
  return {
    n,
    p99: n === 0 ? Number.NaN : inWindow[Math.min(n - 1, Math.ceil(0.99 * n) - 1)]!,
    max: n === 0 ? Number.NaN : inWindow[n - 1]!
  }
}

/**
 * pgbench -S with `--wave-clients` clients while `--wave` idle clients are connected; after
 * WAVE_AT_S seconds they disconnect all at once (or, in the calm run, only after pgbench ends).
 */
const waveRun = (run: Run, target: Target, options: ConnectOptions, workDir: string) =>
  Effect.gen(function* () {
    const measured: Record<"calm" | "wave", ReturnType<typeof windowOf>> = {} as never
    for (const kind of ["calm", "wave"] as const) {
      const { clients, errors } = yield* Effect.promise(() =>
        connectIdle(target.endpoint, options.wave, options.concurrency, 40_000)
      )
      if (errors.size > 0) run.notes.push(`wave (${kind}): ${counted(errors)} of the idle clients failed to connect`)
      const pgbench = yield* Effect.forkChild(
        runPgbench({
          endpoint: target.endpoint,
          protocol: "simple",
          clients: options.waveClients,
          threads: 2,
          durationS: WAVE_RUN_S,
          connectAllowanceS: 0,
          workDir,
          cpuPid: undefined
        })
      )
      yield* Effect.sleep(WAVE_AT_S * 1000)
      const at = Date.now()
      if (kind === "wave") for (const client of clients) client.terminate()
      const result = yield* Fiber.join(pgbench)
      if (kind === "calm") for (const client of clients) client.terminate()
      measured[kind] = windowOf(result, at)
      if (result.problem !== "") run.notes.push(`wave (${kind}): pgbench: ${result.problem.split("\n")[0]}`)
      yield* Effect.sleep(3_000)
    }
    run.waveP99Ms = measured.wave.p99
    run.waveMaxMs = measured.wave.max
    run.calmP99Ms = measured.calm.p99
    run.calmMaxMs = measured.calm.max
    const note =
      `wave: ${options.wave} idle clients disconnecting at once under pgbench -S -c ${options.waveClients}: ` +
      `the second after: p99 ${measured.wave.p99.toFixed(2)} ms, max ${measured.wave.max.toFixed(1)} ms (${measured.wave.n} transactions); ` +
      `same second without the wave: p99 ${measured.calm.p99.toFixed(2)} ms, max ${measured.calm.max.toFixed(1)} ms (${measured.calm.n})`
    run.notes.push(note)
    yield* progress(`  ${target.name}: ${note}`)
  })

const measure = (
  target: Target,
  options: ConnectOptions,
  workDir: string,
  repetition: number,
  start: (name: ConnectTarget) => Effect.Effect<Target, BenchError, Scope.Scope>
) =>
  Effect.gen(function* () {
    const run: Run = { notes: [] }
    if (options.duration > 0) yield* connectRun(run, target, options, workDir)
    if (options.duration > 0 && target.inspectPort !== undefined) yield* allocRun(run, target, options, workDir)
    if (options.refused > 0) yield* refusedRun(run, target, options, repetition)
    if (options.idle > 0) {
      // On a fresh process (warmed up like the first): a heap grown by an earlier 10 000 clients
      // is not returned to the OS, so the second time round the clients would look free.
      const idle = yield* Effect.scoped(
        Effect.flatMap(start(target.name), (fresh) => Effect.promise(() => idleClients(fresh, options)))
      )
      run.idleBytes = idle.bytes
      run.idleSettledBytes = idle.settledBytes
      run.idleLoginUs = idle.loginUs
      run.idleConnectS = idle.connectS
      run.notes.push(`idle (fresh process): ${idle.note}`)
      yield* progress(
        `  ${target.name}: ${(idle.bytes / 1024).toFixed(1)} kB RSS per idle client (${(idle.settledBytes / 1024).toFixed(1)} settled), ` +
          `${idle.loginUs.toFixed(0)} µs CPU per login (${idle.note})`
      )
    }
    if (options.storm > 0) {
      // Fresh source addresses in every run: no address reused while the last run's are in TIME_WAIT.
      const result = yield* Effect.promise(() => storm(target, options, 100_000 + (repetition % 2) * 20_000))
      run.stormS = result.seconds
      run.stormP99Ms = result.p99Ms
      run.stormLoginUs = result.loginUs
      run.notes.push(result.note)
      yield* progress(`  ${target.name}: ${result.note}`)
    }
    if (options.wave > 0) yield* waveRun(run, target, options, workDir)
    return run
  })

/** `pgbench -S -C` through the target: every transaction a new connection, its login and one query. */
const pgbenchConnect = (
  target: { readonly endpoint: Endpoint; readonly pid: number },
  options: ConnectOptions,
  workDir: string,
  durationS = options.duration
) =>
  runPgbench({
    endpoint: target.endpoint,
    protocol: "simple",
    clients: options.clients,
    threads: 2,
    durationS,
    connectAllowanceS: 0,
    workDir,
    cpuPid: target.pid,
    connectEach: true
  })

const connectRun = (run: Run, target: Target, options: ConnectOptions, workDir: string) =>
  Effect.gen(function* () {
    const result = yield* pgbenchConnect(target, options, workDir)
    if (result.cpuUsPerTx !== undefined) run.connectUs = result.cpuUsPerTx
    // With -C pgbench reports neither a connection-free TPS nor an initial connection time.
    run.connectsPerS = result.transactions / options.duration
    if (result.problem !== "" || result.failed > 0) run.notes.push(`pgbench -C: ${result.problem.split("\n")[0]}`)
    yield* progress(
      `  ${target.name}: pgbench -C ${run.connectsPerS.toFixed(0)} conn/s, ${run.connectUs?.toFixed(0)} µs CPU per connection`
    )
  })

/**
 * `--alloc`: another `pgbench -C` run as long as the CPU one, with the target's allocations sampled
 * (a run of its own: the sampling costs CPU).
 */
const allocRun = (run: Run, target: Target, options: ConnectOptions, workDir: string) =>
  Effect.gen(function* () {
    let transactions = 0
    const allocations = yield* Effect.tryPromise({
      try: () =>
        sampleAllocations(target.inspectPort!, async () => {
          const result = await Effect.runPromise(Effect.scoped(pgbenchConnect(target, options, workDir)))
          transactions = result.transactions
        }),
      catch: (error) => new BenchError({ message: `--alloc: ${(error as Error).message}` })
    })
    if (transactions === 0) return
    run.allocBytes = allocations.bytes / transactions
    const top = [...allocations.byFile]
      .sort((a, b) => b[1] - a[1])
      .slice(0, 8)
      .map(([file, bytes]) => `${file} ${(bytes / transactions / 1024).toFixed(1)}`)
      .join(", ")
    const note = `allocated per connection: ${(run.allocBytes / 1024).toFixed(1)} kB (kB by file: ${top})`
    run.notes.push(note)
    yield* progress(`  ${target.name}: ${note}`)
  })

const refusedRun = (run: Run, target: Target, options: ConnectOptions, repetition: number) =>
  Effect.gen(function* () {
    // Fresh source addresses in every run, so no address sees more than one refusal per kind.
    const offset = repetition * 2 * options.refused + 20_000
    const wrong = yield* Effect.promise(() =>
      refusals(target, { ...target.endpoint, password: "not-the-password" }, options, offset)
    )
    run.wrongPasswordUs = wrong.us
    const unknownUser =
      target.name === "pgbouncer" || target.name === "login-floor" || target.name === "pool-floor"
        ? "nosuch"
        : `${ROLE}.nosuch`
    const unknown = yield* Effect.promise(() =>
      refusals(target, { ...target.endpoint, user: unknownUser }, options, offset + options.refused)
    )
    run.unknownTenantUs = unknown.us
    run.notes.push(`wrong password: ${wrong.note}`, `unknown ${unknownUser}: ${unknown.note}`)
    yield* progress(
      `  ${target.name}: refused ${wrong.us.toFixed(0)} µs (wrong password: ${wrong.note}), ` +
        `${unknown.us.toFixed(0)} µs (unknown: ${unknown.note})`
    )
  })

const fmt = (value: number | undefined, digits = 0) =>
  value === undefined || !Number.isFinite(value) ? "–" : value.toFixed(digits)

const ratio = (
  a: ReadonlyArray<Run> | undefined,
  b: ReadonlyArray<Run> | undefined,
  metric: (run: Run) => number | undefined
) => {
  if (a === undefined || b === undefined) return ""
  const ratios: Array<number> = []
  for (let i = 0; i < Math.min(a.length, b.length); i++) {
    const x = metric(a[i]!)
    const y = metric(b[i]!)
    if (x !== undefined && y !== undefined && y > 0 && Number.isFinite(x / y)) ratios.push(x / y)
  }
  if (ratios.length === 0) return ""
  const text = `${median(ratios).toFixed(2)}×`
  return ratios.length === 1 ? text : `${text} (${Math.min(...ratios).toFixed(2)}–${Math.max(...ratios).toFixed(2)})`
}

const table = (header: ReadonlyArray<string>, rows: ReadonlyArray<ReadonlyArray<string>>) => {
  const widths = header.map((title, i) => Math.max(title.length, ...rows.map((row) => row[i]!.length)))
  const line = (cells: ReadonlyArray<string>) =>
    `| ${cells.map((cell, i) => (i === 0 ? cell.padEnd(widths[i]!) : cell.padStart(widths[i]!))).join(" | ")} |`
  const rule = `| ${widths.map((width, i) => (i === 0 ? "-".repeat(width) : `${"-".repeat(width - 1)}:`)).join(" | ")} |`
  return [line(header), rule, ...rows.map(line)]
}

const render = (
  options: ConnectOptions,
  results: Map<ConnectTarget, Array<Run>>,
  machine: ReadonlyArray<string>,
  startedAt: Date
) => {
  // The pool floor when it ran: its pgbench -C query reaches PostgreSQL, as a pooler's must. It is a
  // transaction pooler: the session port is compared with the login floor.
  const floor: ConnectTarget =
    options.targets.includes("pool-floor") && options.mode === "transaction" ? "pool-floor" : "login-floor"
  const metric = (name: ConnectTarget, f: (run: Run) => number | undefined) =>
    median((results.get(name) ?? []).map(f).filter((v): v is number => v !== undefined))
  const vs = (name: ConnectTarget, f: (run: Run) => number | undefined) => [
    name === "pgbouncer" ? "" : ratio(results.get(name), results.get("pgbouncer"), f),
    name === "tidepool" ? ratio(results.get(name), results.get("tidepool-base"), f) : "",
    name === "tidepool" || name === "tidepool-base"
      ? ratio(results.get(name), results.get(floor), f) || ratio(results.get(name), results.get("login-floor"), f)
      : ""
  ]
  const names = options.targets
  const connect = (run: Run) => run.connectUs
  const wrong = (run: Run) => run.wrongPasswordUs
  const unknown = (run: Run) => run.unknownTenantUs
  const idle = (run: Run) => run.idleBytes
  const settled = (run: Run) => run.idleSettledBytes
  const login = (run: Run) => run.idleLoginUs
  const connectAll = (run: Run) => run.idleConnectS
  const stormS = (run: Run) => run.stormS
  const waveP99 = (run: Run) => run.waveP99Ms
  const calmP99 = (run: Run) => run.calmP99Ms
  const waveRatio = (run: Run) =>
    run.waveP99Ms === undefined || run.calmP99Ms === undefined ? undefined : run.waveP99Ms / run.calmP99Ms
  const minutes = (Date.now() - startedAt.getTime()) / 60_000
  return [
    "## Login costs: new connections, refused logins, idle clients",
    "",
    `Run ${startedAt.toISOString()} (${minutes.toFixed(1)} min), ${options.repeat === 1 ? "1 run" : `median of ${options.repeat} interleaved runs`} per target; ` +
      `pgbench -S -C -c ${options.clients} -j 2 for ${options.duration} s; ${options.refused} refused logins per kind, ` +
      `${options.concurrency} at a time; ${options.idle} idle clients; ${options.storm} arriving at once; ` +
      `${options.wave} disconnecting under pgbench -S -c ${options.waveClients}; pool ${options.pool}, ${options.mode} mode.`,
    "",
    ...machine.map((item) => `- ${item}`),
    "",
    ...(options.duration > 0
      ? [
          ...table(
            [
              "target",
              "new conn/s",
              "CPU µs per connection",
              "vs PgBouncer",
              "vs base",
              "vs floor",
              ...(options.alloc ? ["kB allocated per connection", "vs base"] : [])
            ],
            names.map((name) => [
              LABEL[name],
              fmt(metric(name, (run) => run.connectsPerS)),
              fmt(metric(name, connect)),
              ...vs(name, connect),
              ...(options.alloc
                ? [
                    fmt(metric(name, (run) => run.allocBytes) / 1024, 1),
                    name === "tidepool"
                      ? ratio(results.get(name), results.get("tidepool-base"), (run) => run.allocBytes)
                      : ""
                  ]
                : [])
            ])
          ),
          ""
        ]
      : []),
    ...(options.refused > 0
      ? [
          ...table(
            [
              "target",
              "CPU µs per wrong password",
              "vs PgBouncer",
              "vs base",
              "vs floor",
              "CPU µs per unknown tenant",
              "vs PgBouncer",
              "vs base",
              "vs floor"
            ],
            names.map((name) => [
              LABEL[name],
              fmt(metric(name, wrong)),
              ...vs(name, wrong),
              fmt(metric(name, unknown)),
              ...vs(name, unknown)
            ])
          ),
          ""
        ]
      : []),
    ...(options.idle > 0
      ? [
          ...table(
            [
              "target",
              `RSS kB per idle client, ${options.idleSettle} s after the last login`,
              "vs PgBouncer",
              "vs base",
              "vs floor",
              "the same, 3 s after",
              "vs PgBouncer",
              "vs base",
              "vs floor",
              "CPU µs per login (concurrent)",
              "s to connect all"
            ],
            names.map((name) => [
              LABEL[name],
              fmt(metric(name, settled) / 1024, 1),
              ...vs(name, settled),
              fmt(metric(name, idle) / 1024, 1),
              ...vs(name, idle),
              fmt(metric(name, login)),
              fmt(metric(name, connectAll), 1)
            ])
          ),
          ""
        ]
      : []),
    ...(options.storm > 0
      ? [
          ...table(
            [
              "target",
              `s until all ${options.storm} arriving at once are authenticated`,
              "vs PgBouncer",
              "vs base",
              "vs floor",
              "p99 login ms",
              "CPU µs per login"
            ],
            names.map((name) => [
              LABEL[name],
              fmt(metric(name, stormS), 2),
              ...vs(name, stormS),
              fmt(metric(name, (run) => run.stormP99Ms)),
              fmt(metric(name, (run) => run.stormLoginUs))
            ])
          ),
          ""
        ]
      : []),
    ...(options.wave > 0
      ? [
          ...table(
            [
              "target",
              `p99 ms, ${options.wave} disconnecting`,
              "p99 ms, calm",
              "wave / calm",
              "max ms, wave",
              "max ms, calm"
            ],
            names.map((name) => [
              LABEL[name],
              fmt(metric(name, waveP99), 2),
              fmt(metric(name, calmP99), 2),
              fmt(metric(name, waveRatio), 2),
              fmt(
                metric(name, (run) => run.waveMaxMs),
                1
              ),
              fmt(
                metric(name, (run) => run.calmMaxMs),
                1
              )
            ])
          ),
          ""
        ]
      : []),
    "Per run:",
    "",
    ...names.flatMap((name) =>
      (results.get(name) ?? []).flatMap((run, i) => run.notes.map((note) => `- ${LABEL[name]}, run ${i + 1}: ${note}`))
    ),
    ""
  ].join("\n")
}

export const connections = (options: ConnectOptions) =>
  Effect.gen(function* () {
    const startedAt = new Date()
    const loadAtStart = os.loadavg()[0]!
    const revision =
      options.baseline === undefined
        ? `${tidepoolRevision()} ${buildLabel(options.build)}${flagsLabel(options.nodeFlags)}${options.workers > 1 ? `, ${options.workers} workers` : ""}`
        : `${tidepoolRevision()} ${buildLabel(options.build)}${flagsLabel(options.nodeFlags)}${options.workers > 1 ? `, ${options.workers} workers` : ""}; base: ${tidepoolRevision(options.baseline)} on Node ${nodeVersion(options.baselineNode)}`
    const pgbench = yield* pgbenchVersion
    const pgbouncer = options.targets.includes("pgbouncer") ? yield* pgbouncerVersion : undefined
    const workDir = yield* scopedTempDir("tidepool-bench-")
    yield* progress("starting PostgreSQL")
    const server = yield* Effect.acquireRelease(
      Effect.tryPromise({
        try: () =>
          startPostgres({
            roles: [{ name: ROLE, password: PASSWORD }],
            databases: [DATABASE],
            settings: { max_connections: "300" }
          }),
        catch: (error) => new BenchError({ message: `PostgreSQL: ${(error as Error).message}` })
      }),
      (server) => Effect.promise(() => server.stop())
    )
    const direct: Endpoint = {
      host: server.host,
      port: server.port,
      user: ROLE,
      password: PASSWORD,
      database: DATABASE
    }
    yield* initPgbench(direct, 1)
    const maxClients = Math.max(1100, options.idle + 200, options.storm + 200, options.wave + 200)
    const [{ rolpassword }] = yield* Effect.promise(() =>
      server.query<{ rolpassword: string }>("SELECT rolpassword FROM pg_authid WHERE rolname = $1", [ROLE])
    )
    const start = (name: ConnectTarget): Effect.Effect<Target, BenchError, Scope.Scope> =>
      Effect.gen(function* () {
        yield* progress(`starting ${LABEL[name]}`)
        // --alloc: the Node.js targets listen for the inspector (a port of their own each).
        const inspectPort = options.alloc && name !== "pgbouncer" ? yield* Effect.promise(() => freePort()) : undefined
        const inspect = inspectPort === undefined ? [] : [`--inspect=127.0.0.1:${inspectPort}`]
        const running =
          name === "login-floor" || name === "pool-floor"
            ? yield* startLoginFloor(
                ROLE,
                PASSWORD,
                DATABASE,
                500,
                "shared",
                name === "pool-floor" ? { endpoint: direct, pool: options.pool } : undefined,
                inspect
              )
            : name === "pgbouncer"
              ? yield* startPgBouncer({
                  upstream: direct,
                  authSecret: rolpassword,
                  poolSize: options.pool,
                  maxClients,
                  mode: options.mode
                })
              : yield* startTidepool({
                  upstream: direct,
                  tenant: TENANT,
                  poolSize: options.pool,
                  maxClients,
                  mode: options.mode,
                  // The node-wide limits sized to the run, as PgBouncer's max_client_conn is (and it
                  // has no handshake cap): the storm measures logins, not refusals.
                  env: {
                    TIDEPOOL_MAX_CLIENT_CONNECTIONS: String(maxClients),
                    TIDEPOOL_MAX_HANDSHAKES: String(Math.max(4096, options.storm))
                  },
                  build: options.build,
                  nodeFlags: [...(name === "tidepool" ? options.nodeFlags : []), ...inspect],
                  workers: name === "tidepool" ? options.workers : 1,
                  ...(name === "tidepool-base"
                    ? { dir: options.baseline!, node: options.baselineNode, label: "Tidepool (base)" }
                    : {})
                })
        // Unmeasured: JIT and pools warmed up by a few seconds of logins.
        yield* pgbenchConnect(running, options, workDir, 3)
        return { name, ...running, ...(inspectPort === undefined ? {} : { inspectPort }) }
      })
    const targets: Array<Target> = []
    for (const name of CONNECT_TARGETS.filter((target) => options.targets.includes(target))) {
      targets.push(yield* start(name))
    }
    const results = new Map<ConnectTarget, Array<Run>>(targets.map((target) => [target.name, []]))
    for (let repetition = 0; repetition < options.repeat; repetition++) {
      const order = [...targets.slice(repetition % targets.length), ...targets.slice(0, repetition % targets.length)]
      for (const target of order) {
        yield* progress(
          `run ${repetition + 1}/${options.repeat}, ${LABEL[target.name]} (load ${os.loadavg()[0]!.toFixed(1)})`
        )
        results.get(target.name)!.push(yield* measure(target, options, workDir, repetition, start))
      }
    }
    const [{ server_version }] = yield* Effect.promise(() =>
      server.query<{ server_version: string }>("SHOW server_version")
    )
    const machine = describeMachine({ tidepool: revision, postgres: server_version, pgbouncer, pgbench }, [
      loadAtStart,
      os.loadavg()[0]!
    ])
    const report = render(options, results, machine, startedAt)
    process.stdout.write(`${report}\n`)
    if (options.out !== undefined) {
      const out = path.resolve(options.out)
      yield* Effect.promise(() => fs.writeFile(out, report))
      yield* progress(`report written to ${out}`)
    }
  }).pipe(Effect.scoped)
