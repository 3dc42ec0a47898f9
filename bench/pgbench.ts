/** Runs pgbench and turns its summary and per-transaction log into numbers. */
import * as fs from "node:fs/promises"
import * as path from "node:path"
import { Effect } from "effect"
import { type CpuSample, sampleCpu, treeCpuTimeUs } from "./cpu.ts"
import { BenchError, runChecked, runProcess } from "./process.ts"

export interface Endpoint {
  readonly host: string
  readonly port: number
  readonly user: string
  readonly password: string
  readonly database: string
}

/**
 * pgbench's `-M`. `prepared` names statements, which a transaction pooler must support (PgBouncer
 * before 1.21 cannot: it runs `-M extended` in that row, the closest it can do).
 */
export type Protocol = "simple" | "extended" | "prepared"

export interface PgbenchRun {
  readonly endpoint: Endpoint
  readonly protocol: Protocol
  /** What pgbench actually runs, when it differs from the row's protocol. */
  readonly pgbenchProtocol?: Protocol
  readonly clients: number
  readonly threads: number
  /** Seconds of load wanted after every client has connected. */
  readonly durationS: number
  /**
   * Seconds added to pgbench's `-T` for connecting the clients: pgbench 15 starts its clock before
   * connecting, so a thousand clients that take 8 s to connect would leave 2 s of a 10 s run.
   */
  readonly connectAllowanceS: number
  /** Where this run's transaction logs go (in a directory of their own, removed afterwards). */
  readonly workDir: string
  /** The pooler process whose CPU time is charged to the transactions. */
  readonly cpuPid: number | undefined
  /** `-C`: a new connection (login) for every transaction. */
  readonly connectEach?: boolean
}

export interface PgbenchResult {
  /** pgbench's "tps = … (without initial connection time)". */
  readonly tps: number
  readonly transactions: number
  readonly failed: number
  /** Clients pgbench gave up on (connection lost, error outside a transaction, …). */
  readonly aborted: number
  readonly meanMs: number
  readonly p99Ms: number
  /** Pooler CPU per transaction in the steady part of the run; undefined without a pooler. */
  readonly cpuUsPerTx: number | undefined
  /**
   * The same for the whole stack: every process below the bench process (pgbench, PostgreSQL, the
   * poolers; bench/cpu.ts treeCpuTimeUs). On a machine of its own and CPU-bound, TPS would be the
   * cores over this; its ratio between two targets is their TPS ratio with other people's load
   * on the machine taken out.
   */
  readonly stackUsPerTx: number | undefined
  /** pgbench's "initial connection time". */
  readonly connectMs: number
  /** Seconds pgbench measured over: `-T` minus the connection time. */
  readonly measuredS: number
  readonly exitCode: number | null
  /** Per transaction (same order): latency in µs, completion time in epoch ms (windows of a run). */
  readonly latencies: Float64Array
  readonly completions: Float64Array
  /** Last lines of pgbench's stderr when something went wrong, else "". */
  readonly problem: string
}

// libpq would otherwise try SSL and GSS encryption first; none of the targets offers them.
export const clientEnv = (endpoint: Endpoint) => ({
  PATH: process.env.PATH ?? "/usr/bin:/bin",
  LANG: "C",
  LC_ALL: "C",
  PGPASSWORD: endpoint.password,
  PGSSLMODE: "disable",
  PGGSSENCMODE: "disable",
  PGCONNECT_TIMEOUT: "30"
})

export const connectionArgs = (endpoint: Endpoint) => [
  "-h",
  endpoint.host,
  "-p",
  String(endpoint.port),
  "-U",
  endpoint.user,
  endpoint.database
]

export const pgbenchVersion = runChecked("pgbench", ["--version"], { limit: "10 seconds" }).pipe(
  Effect.map((finished) => finished.stdout.trim()),
  Effect.mapError(
    (error) =>
      new BenchError({ message: `pgbench is required (Debian: apt-get install postgresql-client): ${error.message}` })
  )
)

/** `pgbench -i` with server-side data generation, then VACUUM and primary keys. */
export const initPgbench = (endpoint: Endpoint, scale: number) =>
  runChecked("pgbench", ["-i", "-q", "-s", String(scale), "-I", "dtGvp", ...connectionArgs(endpoint)], {
    env: clientEnv(endpoint),
    limit: "10 minutes"
  }).pipe(Effect.asVoid)

const numberAfter = (text: string, pattern: RegExp): number | undefined => {
  const match = text.match(pattern)
  return match === null ? undefined : Number(match[1])
}

interface TransactionLog {
  /** Latencies of successful transactions, µs. */
  readonly latencies: Float64Array
  /** Completion times of successful transactions, ms since the epoch. */
  readonly completions: Float64Array
}

/**
 * pgbench 15's per-transaction log (`--log`), one file per thread:
 * `client_id transaction_no time script_no time_epoch time_us [schedule_lag] [retries]`,
 * where `time` is the latency in µs, or `failed` / `skipped`, and the epoch stamp is the completion.
 */
const readTransactionLog = async (dir: string): Promise<TransactionLog> => {
  let latencies = new Float64Array(1 << 16)
  let completions = new Float64Array(1 << 16)
  let count = 0
  for (const file of await fs.readdir(dir)) {
    const text = await fs.readFile(path.join(dir, file), "utf8")
    let start = 0
    while (start < text.length) {
      let end = text.indexOf("\n", start)
      if (end === -1) end = text.length
      const fields = text.slice(start, end).split(" ")
      start = end + 1
      const latency = Number(fields[2])
      if (fields.length < 6 || !Number.isFinite(latency)) continue
      if (count === latencies.length) {
        const grown = new Float64Array(count * 2)
        grown.set(latencies)
        latencies = grown
        const grownCompletions = new Float64Array(count * 2)
        grownCompletions.set(completions)
        completions = grownCompletions
      }
      latencies[count] = latency
      completions[count] = Number(fields[4]) * 1000 + Number(fields[5]) / 1000
      count++
    }
  }
  return { latencies: latencies.subarray(0, count), completions: completions.subarray(0, count) }
}

const fixedMs = (ms: number) => (Number.isFinite(ms) ? `${(ms / 1000).toFixed(1)} s` : "an unknown time")

export const percentile = (sorted: Float64Array, fraction: number): number =>
  sorted.length === 0 ? Number.NaN : sorted[Math.min(sorted.length - 1, Math.ceil(fraction * sorted.length) - 1)]!

/**
 * CPU per transaction over the steady part of the run: between the first sample a little after the
 * first transaction completed and the last sample a little before the last one did, so connecting
 * (and authenticating) hundreds of clients is not charged to the transactions. Falls back to the
 * whole run when that window is too short to measure.
 */
export const cpuPerTransaction = (samples: ReadonlyArray<CpuSample>, completions: Float64Array): number | undefined => {
  if (samples.length < 2 || completions.length === 0) return undefined
  let first = Number.POSITIVE_INFINITY
  let last = Number.NEGATIVE_INFINITY
  for (const at of completions) {
    if (at < first) first = at
    if (at > last) last = at
  }
  const trim = Math.min(1_000, 0.1 * (last - first))
  const from = samples.find((sample) => sample.at >= first + trim)
  let to: CpuSample | undefined
  for (const sample of samples) if (sample.at <= last - trim) to = sample
  if (from !== undefined && to !== undefined && to.at - from.at >= 500) {
    let inWindow = 0
    for (const at of completions) if (at > from.at && at <= to.at) inWindow++
    if (inWindow > 0) return (to.cpuUs - from.cpuUs) / inWindow
  }
  return (samples.at(-1)!.cpuUs - samples[0]!.cpuUs) / completions.length
}

/** One `pgbench -S` run; pgbench failing part-way is a result (counted), not an error. */
export const runPgbench = (run: PgbenchRun): Effect.Effect<PgbenchResult, BenchError> =>
  Effect.gen(function* () {
    const logDir = yield* Effect.acquireRelease(
      Effect.promise(() => fs.mkdtemp(path.join(run.workDir, "pgbench-"))),
      (dir) => Effect.promise(() => fs.rm(dir, { recursive: true, force: true }))
    )
    const threads = Math.max(1, Math.min(run.threads, run.clients))
    const duration = run.durationS + Math.max(0, Math.ceil(run.connectAllowanceS))
    const args = [
      "-S",
      "-n",
      ...(run.connectEach === true ? ["-C"] : []),
      "-M",
      run.pgbenchProtocol ?? run.protocol,
      "-c",
      String(run.clients),
      "-j",
      String(threads),
      "-T",
      String(duration),
      "--log",
      `--log-prefix=${path.join(logDir, "tx")}`,
      ...connectionArgs(run.endpoint)
    ]
    const { finished, samples, stackSamples } = yield* Effect.acquireUseRelease(
      Effect.sync(() => ({
        pooler: run.cpuPid === undefined ? undefined : sampleCpu(run.cpuPid),
        // A walk of the process tree: every 500 ms is plenty for a window of seconds.
        stack: sampleCpu(process.pid, 500, treeCpuTimeUs)
      })),
      (sampler) =>
        runProcess("pgbench", args, {
          env: clientEnv(run.endpoint),
          // pgbench stops by itself after -T; the margin is for a target that wedges its clients.
          limit: `${duration + 120 + Math.ceil(run.clients / 10)} seconds`
        }).pipe(
          Effect.map((finished) => ({
            finished,
            samples: sampler.pooler?.stop() ?? [],
            stackSamples: sampler.stack.stop()
          }))
        ),
      (sampler) =>
        Effect.sync(() => {
          sampler.pooler?.stop()
          sampler.stack.stop()
        })
    )
    const log = yield* Effect.promise(() => readTransactionLog(logDir))

    const sorted = log.latencies.slice().sort()
    let sum = 0
    for (const latency of log.latencies) sum += latency
    const output = finished.stdout
    const aborted = (finished.stderr.match(/client \d+ aborted/g) ?? []).length
    const transactions = numberAfter(output, /number of transactions actually processed: (\d+)/) ?? log.latencies.length
    const connectMs = numberAfter(output, /initial connection time = ([\d.]+) ms/) ?? Number.NaN
    const stderr = finished.stderr.trim().split("\n").slice(-5).join("\n")
    const problem =
      finished.code !== 0 || aborted > 0
        ? stderr || `pgbench exited with ${finished.code ?? finished.signal}`
        : transactions === 0
          ? `no transaction completed (${stderr || `connecting took ${fixedMs(connectMs)} of the ${duration} s`})`
          : ""
    return {
      tps: numberAfter(output, /tps = ([\d.]+) \(without initial connection time\)/) ?? 0,
      transactions,
      failed: numberAfter(output, /number of failed transactions: (\d+)/) ?? 0,
      aborted,
      meanMs: log.latencies.length === 0 ? Number.NaN : sum / log.latencies.length / 1000,
      p99Ms: percentile(sorted, 0.99) / 1000,
      cpuUsPerTx: run.cpuPid === undefined ? undefined : cpuPerTransaction(samples, log.completions),
      stackUsPerTx: run.connectEach === true ? undefined : cpuPerTransaction(stackSamples, log.completions),
      connectMs,
      measuredS: duration - connectMs / 1000,
      exitCode: finished.code,
      latencies: log.latencies,
      completions: log.completions,
      problem
    }
  }).pipe(Effect.scoped)
