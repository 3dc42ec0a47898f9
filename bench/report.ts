/** Medians, ratios and the markdown report. */
import type { BenchOptions, TargetName } from "./options.ts"
import type { PgbenchResult, Protocol } from "./pgbench.ts"

export interface Measurement {
  readonly protocol: Protocol
  readonly clients: number
  readonly target: TargetName
  /** One result per repetition, in the order they ran. */
  readonly runs: ReadonlyArray<PgbenchResult>
  /** Why the cell was not run. */
  readonly skipped?: string
}

export const median = (values: ReadonlyArray<number>): number => {
  const sorted = values.filter((value) => Number.isFinite(value)).sort((a, b) => a - b)
  if (sorted.length === 0) return Number.NaN
  const middle = sorted.length >> 1
  return sorted.length % 2 === 1 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2
}

const fixed = (value: number | undefined, digits: number) =>
  value === undefined || !Number.isFinite(value) ? "–" : value.toFixed(digits)

/** The per-repetition ratios a/b (the two ran back to back in each repetition). */
const pairedRatios = (
  a: Measurement | undefined,
  b: Measurement | undefined,
  metric: (result: PgbenchResult) => number | undefined
): ReadonlyArray<number> => {
  if (a === undefined || b === undefined) return []
  const ratios: Array<number> = []
  for (let i = 0; i < Math.min(a.runs.length, b.runs.length); i++) {
    const x = metric(a.runs[i]!)
    const y = metric(b.runs[i]!)
    if (x !== undefined && y !== undefined && Number.isFinite(x / y) && y > 0) ratios.push(x / y)
  }
  return ratios
}

/**
 * A distribution-free confidence interval of the median of `values`, at 95 % or a little more: the
 * order statistics x(k) and x(n+1−k) with the largest k for which a Binomial(n, ½) falls below k with
 * probability at most 2.5 %. Needs 6 values (with fewer the range itself covers less than 95 %).
 */
export const medianInterval = (values: ReadonlyArray<number>): readonly [number, number] | undefined => {
  const sorted = values.filter((value) => Number.isFinite(value)).sort((a, b) => a - b)
  const n = sorted.length
  if (n < 6) return undefined
  let k = 0
  let below = 0
  let term = 0.5 ** n
  // below = P(X ≤ k − 1) after each step, X ~ Binomial(n, ½)
  while (below + term <= 0.025) {
    below += term
    term = (term * (n - k)) / (k + 1)
    k++
  }
  // k ≥ 1 from n = 6 on (½⁶ < 2.5 %).
  return [sorted[k - 1]!, sorted[n - k]!]
}

/**
 * The median ratio, with several repetitions their range — `0.72× (0.70–0.75)` — and with six or
 * more the median's 95 % interval: `0.92× (0.80–1.10; 95 % 0.88–0.97)`.
 */
const ratioText = (ratios: ReadonlyArray<number>) => {
  if (ratios.length === 0) return ""
  const text = `${median(ratios).toFixed(2)}×`
  if (ratios.length === 1) return text
  const range = `${Math.min(...ratios).toFixed(2)}–${Math.max(...ratios).toFixed(2)}`
  const interval = medianInterval(ratios)
  return interval === undefined
    ? `${text} (${range})`
    : `${text} (${range}; 95 % ${interval[0].toFixed(2)}–${interval[1].toFixed(2)})`
}

export interface Summary {
  readonly protocol: Protocol
  readonly clients: number
  readonly target: TargetName
  readonly tps: number
  readonly meanMs: number
  readonly p99Ms: number
  readonly cpuUsPerTx: number | undefined
  readonly failed: number
  readonly aborted: number
}

export const summarize = (measurement: Measurement): Summary => {
  const cpu = measurement.runs.map((run) => run.cpuUsPerTx).filter((value) => value !== undefined)
  return {
    protocol: measurement.protocol,
    clients: measurement.clients,
    target: measurement.target,
    tps: median(measurement.runs.map((run) => run.tps)),
    meanMs: median(measurement.runs.map((run) => run.meanMs)),
    p99Ms: median(measurement.runs.map((run) => run.p99Ms)),
    cpuUsPerTx: cpu.length === 0 ? undefined : median(cpu),
    failed: measurement.runs.reduce((sum, run) => sum + run.failed, 0),
    aborted: measurement.runs.reduce((sum, run) => sum + run.aborted, 0)
  }
}

/** One line for the progress log. */
export const describeRun = (result: PgbenchResult): string =>
  [
    `${fixed(result.tps, 0)} tps`,
    `mean ${fixed(result.meanMs, 3)} ms`,
    `p99 ${fixed(result.p99Ms, 3)} ms`,
    ...(result.cpuUsPerTx === undefined ? [] : [`${fixed(result.cpuUsPerTx, 1)} µs/tx`]),
    ...(result.stackUsPerTx === undefined ? [] : [`stack ${fixed(result.stackUsPerTx, 1)} µs/tx`]),
    `over ${fixed(result.measuredS, 1)} s after ${fixed(result.connectMs / 1000, 1)} s connecting`,
    ...(result.failed > 0 ? [`${result.failed} failed`] : []),
    ...(result.aborted > 0 ? [`${result.aborted} clients aborted`] : [])
  ].join(", ")

const TARGET_LABEL: Record<TargetName, string> = {
  tidepool: "Tidepool",
  "tidepool-base": "Tidepool (base)",
  pgbouncer: "PgBouncer",
  direct: "direct",
  "node-relay": "Node relay",
  "pool-floor": "Node pool floor"
}

export interface ReportContext {
  readonly options: BenchOptions
  readonly machine: ReadonlyArray<string>
  readonly startedAt: Date
  readonly finishedAt: Date
}

export const renderReport = (measurements: ReadonlyArray<Measurement>, context: ReportContext): string => {
  const { options } = context
  const find = (protocol: Protocol, clients: number, target: TargetName) =>
    measurements.find(
      (m) => m.protocol === protocol && m.clients === clients && m.target === target && m.skipped === undefined
    )
  const withBase = options.targets.includes("tidepool-base") && options.targets.includes("tidepool")
  const rows: Array<ReadonlyArray<string>> = []
  const notes: Array<string> = []
  for (const measurement of measurements) {
    const { protocol, clients, target } = measurement
    const label = [protocol, String(clients), TARGET_LABEL[target]]
    if (measurement.skipped !== undefined) {
      rows.push([...label, "skipped", "", "", "", "", "", "", "", "", ...(withBase ? [""] : [])])
      notes.push(`${protocol}, ${clients} clients, ${TARGET_LABEL[target]}: skipped — ${measurement.skipped}`)
      continue
    }
    const summary = summarize(measurement)
    const failed = summary.failed + (summary.aborted > 0 ? ` (${summary.aborted} clients aborted)` : "")
    const pgbouncer = target === "pgbouncer" || target === "direct" ? undefined : find(protocol, clients, "pgbouncer")
    const base = target === "tidepool" ? find(protocol, clients, "tidepool-base") : undefined
    rows.push([
      ...label,
      fixed(summary.tps, 0),
      fixed(summary.meanMs, 3),
      fixed(summary.p99Ms, 3),
      fixed(summary.cpuUsPerTx, 1),
      failed,
      ratioText(pairedRatios(measurement, pgbouncer, (run) => run.tps)),
      ratioText(pairedRatios(measurement, pgbouncer, (run) => run.cpuUsPerTx)),
      ratioText(pairedRatios(measurement, pgbouncer, (run) => run.p99Ms)),
      // Transactions per stack CPU-second, Tidepool ÷ PgBouncer: PgBouncer's stack µs/tx ÷ Tidepool's.
      ratioText(
        pairedRatios(measurement, pgbouncer, (run) =>
          run.stackUsPerTx === undefined || run.stackUsPerTx <= 0 ? undefined : 1 / run.stackUsPerTx
        )
      ),
      ...(withBase ? [ratioText(pairedRatios(measurement, base, (run) => run.cpuUsPerTx))] : [])
    ])
    const where = `${protocol}, ${clients} clients, ${TARGET_LABEL[target]}`
    if (protocol === "prepared" && target === "pgbouncer") {
      notes.push(`${where}: pgbench -M extended (PgBouncer before 1.21 cannot pool named prepared statements)`)
    }
    if (protocol === "prepared" && target === "pool-floor") {
      notes.push(`${where}: pgbench -M extended (the pool floor does not pool named prepared statements)`)
    }
    for (const run of measurement.runs) {
      if (run.problem !== "") notes.push(`${where}: ${run.problem.split("\n")[0]}`)
      if (run.measuredS < 0.8 * options.duration) {
        notes.push(
          `${where}: measured over ${fixed(run.measuredS, 1)} s only; connecting the clients took ` +
            `${fixed(run.connectMs / 1000, 1)} s of pgbench's -T`
        )
      }
    }
  }

  const header = [
    "protocol",
    "clients",
    "target",
    "TPS",
    "mean ms",
    "p99 ms",
    "CPU µs/tx",
    "failed",
    "TPS vs PgBouncer",
    "CPU vs PgBouncer",
    "p99 vs PgBouncer",
    "TPS per stack CPU vs PgBouncer",
    ...(withBase ? ["CPU vs base"] : [])
  ]
  const numeric = new Set([1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
  const widths = header.map((title, i) => Math.max(title.length, ...rows.map((row) => row[i]!.length)))
  const line = (cells: ReadonlyArray<string>) =>
    `| ${cells.map((cell, i) => (numeric.has(i) ? cell.padStart(widths[i]!) : cell.padEnd(widths[i]!))).join(" | ")} |`
  const rule = `| ${widths.map((width, i) => (numeric.has(i) ? `${"-".repeat(width - 1)}:` : "-".repeat(width))).join(" | ")} |`

  const minutes = (context.finishedAt.getTime() - context.startedAt.getTime()) / 60_000
  return [
    `## pgbench -S: Tidepool vs PgBouncer vs direct`,
    "",
    `Run ${context.startedAt.toISOString()} (${minutes.toFixed(1)} min). ` +
      `pgbench -S, scale ${options.scale}, ${options.duration} s of load per run after connecting, -j ${options.threads}, ` +
      `${options.repeat === 1 ? "1 run per cell" : `median of ${options.repeat} interleaved runs per cell`}; ` +
      `pool size ${options.pool} (Tidepool and PgBouncer), pool mode ${options.mode}, ` +
      `PostgreSQL max_connections ${options.maxConnections}.`,
    "",
    ...context.machine.map((item) => `- ${item}`),
    "",
    line(header),
    rule,
    ...rows.map(line),
    "",
    "TPS excludes connection set-up (pgbench's figure). Latencies are per transaction, from pgbench's " +
      "transaction log. CPU µs/tx is the pooler process's user+system CPU time over the steady part of " +
      "the run divided by the transactions completed in it. TPS per stack CPU is the same window's " +
      "transactions over the CPU of every process the benchmark started (pgbench, PostgreSQL, the poolers): " +
      "what the TPS ratio would be on a machine of its own, CPU-bound, with other load on this one taken out. " +
      "Ratios are Tidepool ÷ PgBouncer" +
      (options.targets.includes("node-relay")
        ? " (and Node relay ÷ PgBouncer: the Node relay, bench/relayFloor.ts, gives each client a " +
          "PostgreSQL connection of its own and only copies bytes, the floor of what a Node.js relay costs)"
        : "") +
      (options.targets.includes("pool-floor")
        ? " (and Node pool floor ÷ PgBouncer: bench/loginFloor.ts with a pool of the same size, lending a " +
          "server from a client's first message to ReadyForQuery outside a transaction and copying bytes, " +
          "the floor of what a Node.js transaction pooler costs)"
        : "") +
      (withBase
        ? `; CPU vs base is Tidepool ÷ Tidepool (base), the build in ${options.baseline} on ${options.baselineNode}`
        : "") +
      (options.repeat > 1
        ? ", the median (and range) of the ratios of the runs that ran back to back in each repetition" +
          (options.repeat >= 6
            ? "; with 6 or more repetitions also a distribution-free 95 % confidence interval of that median (order statistics of the paired ratios)."
            : ".")
        : "."),
    ...(notes.length === 0 ? [] : ["", ...notes.map((note) => `- ${note}`)]),
    ""
  ].join("\n")
}
