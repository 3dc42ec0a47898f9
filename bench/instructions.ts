/**
 * `npm run bench:instructions`: the pooler's instructions per transaction and per login, counted by
 * valgrind's callgrind. CPU time on a shared two-core machine moves ±20 % from run to run; an
 * instruction count of the same work moves about 1–2 %, so it resolves a hot-path change of a few
 * percent that CPU time cannot. It counts user-space instructions only (not the kernel's socket
 * work, about half of a relay's CPU) and weighs them all alike, whether they run at six to a cycle
 * in a tight loop or stall on a cache miss or a runtime call: read it beside the CPU benchmarks,
 * never instead of them (docs/benchmarks.md, "Instructions per transaction").
 *
 * Each target runs alone under `valgrind --tool=callgrind --instr-atstart=no`: warmed up with the
 * same load first (the JIT's tiers follow call counts, so the code measured is the optimised code),
 * then counted around each measured pgbench run only (`callgrind_control -i on/off`, a dump per run).
 * Node.js writes a perf map (`--perf-basic-prof`) so the report can name JIT-compiled functions.
 */
import * as fs from "node:fs/promises"
import * as path from "node:path"
import { parseArgs } from "node:util"
import * as NodeRuntime from "@effect/platform-node/NodeRuntime"
import { Cause, Console, Effect, Exit, type Scope } from "effect"
import { startLoginFloor } from "./loginFloorProcess.ts"
import { tidepoolRevision } from "./machine.ts"
import { benchMain, UsageError } from "./options.ts"
import { clientEnv, connectionArgs, type Endpoint, initPgbench } from "./pgbench.ts"
import { BenchError, benchPostgres, runChecked, runProcess, scopedTempDir } from "./process.ts"
import { median } from "./report.ts"
import { startTidepool } from "./tidepool.ts"

const HELP = `npm run bench:instructions -- [options]

Instructions per transaction (pgbench -S, more clients than servers) and per login (pgbench -S -C)
of Tidepool, counted by valgrind's callgrind; needs valgrind and pgbench on the PATH.

  --baseline DIR      also measure the Tidepool checkout in DIR (e.g. a git worktree of main)
  --floor             also measure the Node.js pool floor (bench/loginFloor.ts)
  --runs N            measured pgbench runs per target and kind (default 3)
  --clients N         pgbench clients (default 20)
  --pool N            server connections (default 2)
  --transactions N    transactions per client per run (default 1000)
  --protocol MODE     pgbench -M for the transactions: simple, extended or prepared (default simple;
                      the pool floor runs extended for prepared)
  --logins N          logins per run, pgbench -C with 4 clients; 0 skips them (default 400)
  --top N             functions listed per target, by instructions (default 15; 0: none)
  --help              this text
`

const ROLE = "bench"
const PASSWORD = "bench"
const DATABASE = "bench"

interface Options {
  readonly baseline: string | undefined
  readonly floor: boolean
  readonly runs: number
  readonly clients: number
  readonly pool: number
  readonly transactions: number
  readonly protocol: "simple" | "extended" | "prepared"
  readonly logins: number
  readonly top: number
}

const parse = (): Options | undefined => {
  const { values } = parseArgs({
    args: process.argv.slice(2),
    options: {
      baseline: { type: "string" },
      floor: { type: "boolean", default: false },
      runs: { type: "string", default: "3" },
      clients: { type: "string", default: "20" },
      pool: { type: "string", default: "2" },
      transactions: { type: "string", default: "1000" },
      protocol: { type: "string", default: "simple" },
      logins: { type: "string", default: "400" },
      top: { type: "string", default: "15" },
      help: { type: "boolean", default: false }
    }
  })
  if (values.help) return undefined
  const count = (name: string, value: string, min: number) => {
    const n = Number(value)
    if (!Number.isInteger(n) || n < min) throw new UsageError(`--${name} must be an integer ≥ ${min}, not ${value}`)
    return n
  }
  const protocol = values.protocol
  if (protocol !== "simple" && protocol !== "extended" && protocol !== "prepared") {
    throw new UsageError(`--protocol must be simple, extended or prepared, not ${protocol}`)
  }
  return {
    protocol,
    baseline: values.baseline,
    floor: values.floor,
    runs: count("runs", values.runs, 1),
    clients: count("clients", values.clients, 1),
    pool: count("pool", values.pool, 1),
    transactions: count("transactions", values.transactions, 1),
    logins: Math.ceil(count("logins", values.logins, 0) / 4) * 4,
    top: count("top", values.top, 0)
  }
}

interface Started {
  readonly endpoint: Endpoint
  readonly pid: number
}

interface Measured {
  readonly label: string
  /** Instructions per transaction, one per measured run. */
  readonly perTransaction: ReadonlyArray<number>
  /** Instructions per login, one per measured run (empty with --logins 0). */
  readonly perLogin: ReadonlyArray<number>
  /** The top functions of the last transaction run: instructions per transaction and name. */
  readonly top: ReadonlyArray<readonly [number, string]>
}

const pgbench = (endpoint: Endpoint, args: ReadonlyArray<string>) =>
  runChecked("pgbench", ["-n", "-S", ...args, ...connectionArgs(endpoint)], {
    env: clientEnv(endpoint),
    limit: "30 minutes"
  })

const control = (pid: number, ...args: Array<string>) =>
  runChecked("callgrind_control", [...args, String(pid)], { limit: "2 minutes" })

/**
 * The newest dump callgrind wrote after dump number `after` (`outBase.N`), once complete (its
 * `totals:` line): its number, file and instruction total.
 */
const nextDump = (outBase: string, after: number) =>
  Effect.gen(function* () {
    const dir = path.dirname(outBase)
    const prefix = `${path.basename(outBase)}.`
    for (let i = 0; i < 600; i++) {
      const names = yield* Effect.promise(() => fs.readdir(dir).catch(() => [] as Array<string>))
      const newest = Math.max(
        -1,
        ...names
          .filter((name) => name.startsWith(prefix))
          .map((name) => Number(name.slice(prefix.length)))
          .filter(Number.isInteger)
      )
      if (newest > after) {
        const file = `${outBase}.${newest}`
        const text = yield* Effect.promise(() => fs.readFile(file, "utf8").catch(() => ""))
        const match = text.match(/^totals: (\d+)/m)
        if (match !== null) return { number: newest, file, total: Number(match[1]) }
      }
      yield* Effect.sleep("100 millis")
    }
    return yield* new BenchError({ message: `callgrind wrote no dump after ${outBase}.${after}` })
  })

interface Counted {
  /** Instructions per unit of work, one per run. */
  readonly counts: ReadonlyArray<number>
  /** The last run's dump, and the number of the last dump so far. */
  readonly lastFile: string
  readonly lastNumber: number
}

/**
 * Counts the instructions of the process `pid` (under callgrind, writing `outBase.N`) during each of
 * `runs` runs of `load`, divided by `per` (transactions or logins in one run).
 */
const countRuns = (
  label: string,
  pid: number,
  outBase: string,
  after: number,
  runs: number,
  per: number,
  load: Effect.Effect<unknown, BenchError>
) =>
  Effect.gen(function* () {
    const counts: Array<number> = []
    let last = { number: after, file: "" }
    for (let r = 0; r < runs; r++) {
      yield* control(pid, "-i", "on")
      yield* load
      yield* control(pid, "-i", "off")
      yield* control(pid, "-d")
      const dump = yield* nextDump(outBase, last.number)
      counts.push(dump.total / per)
      yield* Console.error(`${label}: ${Math.round(dump.total / per)} (dump ${dump.number})`)
      last = dump
    }
    return { counts, lastFile: last.file, lastNumber: last.number } satisfies Counted
  })

/** The top `n` functions of a dump by self instructions, JIT-compiled ones named from Node's perf map. */
const topFunctions = (dump: string, perfMap: string, n: number, per: number) =>
  Effect.gen(function* () {
    if (n === 0) return []
    // Into a file: a whole profile runs to megabytes, more than runChecked keeps of a command's
    // output (its tail, which would hold only the smallest functions).
    // Not named after the dump: `nextDump` takes every `callgrind.<label>.<n>` file for a dump.
    const listing = path.join(path.dirname(dump), `annotated-${path.basename(dump)}.txt`)
    yield* runChecked("sh", ["-c", 'exec callgrind_annotate --threshold=100 "$1" > "$2"', "sh", dump, listing], {
      limit: "2 minutes"
    })
    const annotated = yield* Effect.promise(() => fs.readFile(listing, "utf8"))
    const map = yield* Effect.promise(() => fs.readFile(perfMap, "utf8").catch(() => ""))
    const ranges = map
      .split("\n")
      .filter((line) => line.length > 0)
      .map((line) => {
        const [start, size, ...name] = line.split(" ")
        return {
          start: Number.parseInt(start!, 16),
          end: Number.parseInt(start!, 16) + Number.parseInt(size!, 16),
          name: name.join(" ")
        }
      })
      .sort((a, b) => a.start - b.start)
    const nameOf = (address: number) => {
      let lo = 0
      let hi = ranges.length - 1
      while (lo <= hi) {
        const mid = (lo + hi) >> 1
        const range = ranges[mid]!
        if (address < range.start) hi = mid - 1
        else if (address >= range.end) lo = mid + 1
        else return range.name
      }
      return undefined
    }
    const rows: Array<readonly [number, string]> = []
    for (const line of annotated.split("\n")) {
      const match = line.match(/^\s*([\d,]+) \([\s\d.]+%\)\s+(.*)$/)
      if (match === null || match[2]!.startsWith("PROGRAM TOTALS")) continue
      let name = match[2]!
      const address = name.match(/0x([0-9a-f]{8,16})/)
      if (address !== null) name = nameOf(Number.parseInt(address[1]!, 16)) ?? name
      name = name
        .replace(/^\?\?\?:/, "")
        .replace(/ \[[^\]]*\]$/, "")
        .replace(/file:\/\/\S*?\/(?=(dist|node_modules|bench)\/)/, "")
      rows.push([Number(match[1]!.replaceAll(",", "")) / per, name.length > 110 ? `${name.slice(0, 110)}…` : name])
      if (rows.length === n) break
    }
    return rows
  })

const VALGRIND = ["valgrind", "--tool=callgrind", "--smc-check=all-non-file", "--instr-atstart=no"]
// Flags that would otherwise be added by re-executing Node (YoungGeneration.ts): a re-executed
// process would leave valgrind behind.
const NODE_FLAGS = ["--max-semi-space-size=2", "--perf-basic-prof"]

const measure = (
  label: string,
  options: Options,
  start: (launcher: ReadonlyArray<string>) => Effect.Effect<Started, BenchError, Scope.Scope>,
  dir: string
) =>
  Effect.gen(function* () {
    const outBase = path.join(dir, `callgrind.${label.replace(/\W+/g, "-")}`)
    yield* Console.error(`starting ${label} under callgrind`)
    const { endpoint, pid } = yield* start([...VALGRIND, `--callgrind-out-file=${outBase}`])
    const perfMap = `/tmp/perf-${pid}.map`
    yield* Effect.addFinalizer(() => Effect.promise(() => fs.rm(perfMap, { force: true })))
    const transactions = options.clients * options.transactions
    const relay = pgbench(endpoint, [
      "-M",
      options.protocol,
      "-c",
      String(options.clients),
      "-j",
      "1",
      "-t",
      String(options.transactions)
    ])
    const logins = pgbench(endpoint, ["-C", "-c", "4", "-j", "1", "-t", String(options.logins / 4)])
    yield* Console.error(`${label}: warming up`)
    for (let i = 0; i < 2; i++) yield* relay
    // A login runs through far more code than a transaction, and tiers up later.
    if (options.logins > 0) for (let i = 0; i < 3; i++) yield* logins
    yield* Console.error(`${label}: counting ${options.runs} × ${transactions} transactions`)
    const relayRuns = yield* countRuns(
      `${label}: instructions per transaction`,
      pid,
      outBase,
      0,
      options.runs,
      transactions,
      relay
    )
    const top = yield* topFunctions(relayRuns.lastFile, perfMap, options.top, transactions)
    let perLogin: ReadonlyArray<number> = []
    if (options.logins > 0) {
      yield* Console.error(`${label}: counting ${options.runs} × ${options.logins} logins`)
      perLogin = (yield* countRuns(
        `${label}: instructions per login`,
        pid,
        outBase,
        relayRuns.lastNumber,
        options.runs,
        options.logins,
        logins
      )).counts
    }
    return { label, perTransaction: relayRuns.counts, perLogin, top } satisfies Measured
  }).pipe(Effect.scoped)

const cell = (xs: ReadonlyArray<number>) =>
  xs.length === 0
    ? "–"
    : `${Math.round(median(xs)).toLocaleString("en")} (${xs.map((x) => Math.round(x).toLocaleString("en")).join(", ")})`

const ratio = (a: ReadonlyArray<number>, b: ReadonlyArray<number> | undefined) =>
  b === undefined || a.length === 0 || b.length === 0 ? "" : `${(median(a) / median(b)).toFixed(2)}×`

const report = (options: Options, results: ReadonlyArray<Measured>, valgrind: string) => {
  const [tidepool, ...others] = results
  const base = others.find((m) => m.label.startsWith("Tidepool (base"))
  const floor = others.find((m) => m.label === "Node pool floor")
  const lines = [
    "## Instructions per transaction and per login (callgrind)",
    "",
    `Run ${new Date().toISOString()}; ${tidepoolRevision()}${options.baseline === undefined ? "" : `, base ${tidepoolRevision(options.baseline)}`}; ${valgrind}.`,
    `Transactions: pgbench -S -M ${options.protocol} -c ${options.clients} -j 1 -t ${options.transactions} on a pool of ${options.pool} ` +
      `(${options.clients * options.transactions} per run). Logins: pgbench -S -C -c 4, ${options.logins} per run, ` +
      "each with its transaction and teardown. User-space instructions of the pooler's process; median (runs)." +
      (floor !== undefined && options.protocol === "prepared" ? " The pool floor ran -M extended." : ""),
    "",
    "| target | instructions per transaction | per login | transaction vs base | login vs base | transaction vs floor | login vs floor |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ...results.map((m) =>
      [
        "",
        m.label,
        cell(m.perTransaction),
        cell(m.perLogin),
        m === tidepool ? ratio(m.perTransaction, base?.perTransaction) : "",
        m === tidepool ? ratio(m.perLogin, base?.perLogin) : "",
        m === floor ? "" : ratio(m.perTransaction, floor?.perTransaction),
        m === floor ? "" : ratio(m.perLogin, floor?.perLogin),
        ""
      ]
        .join(" | ")
        .trim()
    )
  ]
  for (const m of results) {
    if (m.top.length === 0) continue
    lines.push("", `### ${m.label}: where a transaction's instructions go (self, per transaction)`, "", "```")
    for (const [count, name] of m.top) lines.push(`${Math.round(count).toString().padStart(7)}  ${name}`)
    lines.push("```")
  }
  return lines.join("\n")
}

const program = (options: Options) =>
  Effect.gen(function* () {
    const valgrind = yield* runProcess("valgrind", ["--version"], { limit: "10 seconds" }).pipe(
      Effect.filterOrFail(
        (finished) => finished.code === 0,
        () => new BenchError({ message: "valgrind is not installed (Debian: apt-get install valgrind)" })
      ),
      Effect.map((finished) => finished.stdout.trim())
    )
    const dir = yield* scopedTempDir("tidepool-bench-instructions-")
    const server = yield* benchPostgres({ roles: [{ name: ROLE, password: PASSWORD }], databases: [DATABASE] })
    const upstream: Endpoint = {
      host: "127.0.0.1",
      port: server.port,
      user: ROLE,
      password: PASSWORD,
      database: DATABASE
    }
    yield* initPgbench(upstream, 1)
    const tidepool = (checkout: string | undefined, label: string) => (launcher: ReadonlyArray<string>) =>
      startTidepool({
        upstream,
        tenant: "bench",
        poolSize: options.pool,
        maxClients: 1000,
        mode: "transaction",
        launcher,
        nodeFlags: NODE_FLAGS,
        label,
        ...(checkout === undefined ? {} : { dir: checkout })
      })
    const results: Array<Measured> = []
    results.push(yield* measure("Tidepool", options, tidepool(undefined, "Tidepool"), dir))
    if (options.baseline !== undefined) {
      const label = "Tidepool (base)"
      results.push(yield* measure(label, options, tidepool(options.baseline, label), dir))
    }
    if (options.floor) {
      const floor = (launcher: ReadonlyArray<string>) =>
        startLoginFloor(
          ROLE,
          PASSWORD,
          DATABASE,
          500,
          "shared",
          { endpoint: upstream, pool: options.pool },
          NODE_FLAGS,
          launcher
        )
      // The floor cannot pool named statements: it runs -M extended in their place, as in `npm run bench`.
      const floorOptions: Options = options.protocol === "prepared" ? { ...options, protocol: "extended" } : options
      results.push(yield* measure("Node pool floor", floorOptions, floor, dir))
    }
    return report(options, results, valgrind)
  })

const main = benchMain(parse, HELP, (options) =>
  program(options).pipe(
    Effect.flatMap((text) => Console.log(text)),
    Effect.scoped
  )
)

NodeRuntime.runMain(main, {
  teardown: (exit, onExit) => onExit(Exit.isSuccess(exit) ? 0 : Cause.hasInterruptsOnly(exit.cause) ? 130 : 1)
})
