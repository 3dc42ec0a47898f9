/** Command-line flags of `npm run bench -- …`. */
import * as fs from "node:fs"
import * as path from "node:path"
import { fileURLToPath } from "node:url"
import { parseArgs } from "node:util"
import { Console, Effect } from "effect"
import type { Protocol } from "./pgbench.ts"
import type { BenchError } from "./process.ts"
import type { BuildMode } from "./tidepool.ts"

export const TARGETS = ["tidepool", "tidepool-base", "pgbouncer", "direct", "node-relay", "pool-floor"] as const
/** What runs without `--targets`; `node-relay` (the floor of a Node.js relay) only on request. */
export const DEFAULT_TARGETS: ReadonlyArray<TargetName> = ["tidepool", "pgbouncer", "direct"]
export type TargetName = (typeof TARGETS)[number]
export type PoolMode = "transaction" | "session"

export interface BenchOptions {
  /** Seconds of load per run after its clients have connected (pgbench's -T is padded for connecting). */
  readonly duration: number
  readonly clients: ReadonlyArray<number>
  readonly protocols: ReadonlyArray<Protocol>
  readonly targets: ReadonlyArray<TargetName>
  /** Runs per (protocol, clients, target); the report shows medians. */
  readonly repeat: number
  /** Server connections per pool, the same for Tidepool and PgBouncer. */
  readonly pool: number
  /** pgbench worker threads (`-j`), capped at the number of clients. */
  readonly threads: number
  /** pgbench scale factor (`-i -s`): 100 000 rows of pgbench_accounts each. */
  readonly scale: number
  /** Tidepool port (transaction or session) and PgBouncer `pool_mode`. */
  readonly mode: PoolMode
  /** Seconds of unmeasured load per target before each protocol's runs; 0 skips it. */
  readonly warmup: number
  /** PostgreSQL `max_connections`; direct runs that would not fit are skipped. */
  readonly maxConnections: number
  /** Also write the report (markdown) to this file. */
  readonly out: string | undefined
  /** The checkout the `tidepool-base` target runs (e.g. a git worktree of the previous release). */
  readonly baseline: string | undefined
  /** The Node.js binary `tidepool-base` runs on. */
  readonly baselineNode: string
  /** TIDEPOOL_WORKERS of the `tidepool` target (docs/scale-out.md); 1 = one process. */
  readonly workers: number
  /** How both Tidepool targets run: compiled (`dist`) or from the sources (`tsx`). */
  readonly build: BuildMode
  /** Extra Node.js flags for the `tidepool` target only (`--node-flags=--optimize-for-size`). */
  readonly nodeFlags: ReadonlyArray<string>
}

export const nodeFlagsOf = (raw: string | undefined): ReadonlyArray<string> =>
  raw === undefined ? [] : raw.split(/\s+/).filter((flag) => flag !== "")

/** The Node.js that `npm ci` installs (the `node` dev dependency), if it is there. */
const devDependencyNode = fileURLToPath(new URL("../node_modules/node/bin/node", import.meta.url))

/**
 * The default Node.js for `tidepool-base`: the `node` dev dependency's (Node 24, what Tidepool
 * runs on), else the system's. A baseline on another Node measures the runtime, not the change.
 */
export const baselineNodeDefault = (): string => (fs.existsSync(devDependencyNode) ? devDependencyNode : systemNode())

export const buildMode = (raw: string | undefined): BuildMode => {
  if (raw === undefined || raw === "dist" || raw === "tsx") return raw ?? "dist"
  throw new UsageError(`--build: expected dist or tsx, got ${JSON.stringify(raw)}`)
}

/**
 * The system's `node`: the first on PATH outside any node_modules/.bin (npm run puts the `node`
 * dev dependency's binary first), else plain `node`.
 */
export const systemNode = (): string => {
  for (const dir of (process.env.PATH ?? "").split(path.delimiter)) {
    if (dir === "" || dir.includes("node_modules")) continue
    const candidate = path.join(dir, "node")
    try {
      fs.accessSync(candidate, fs.constants.X_OK)
      return candidate
    } catch {
      // not here
    }
  }
  return "node"
}

export const HELP = `npm run bench -- [flags]

Runs pgbench -S (select-only) through Tidepool, PgBouncer and straight to PostgreSQL, one
PostgreSQL 17 server for all three, and prints a markdown table (TPS, mean and p99 latency,
pooler CPU per transaction, Tidepool/PgBouncer ratios). Everything it starts it stops.

  --duration, -T SECONDS   load per run once its clients have connected (default 10)
  --clients LIST           client counts (default 1,10,50,200,1000)
  --protocols LIST         simple, extended, prepared (default all three; PgBouncer runs
                           -M extended in the prepared rows: 1.18 cannot pool named statements)
  --targets LIST           tidepool, pgbouncer, direct (default: these three), node-relay (the
                           floor of a Node.js relay: bench/relayFloor.ts, no pooling, a
                           server connection per client), pool-floor (the floor of a Node.js
                           transaction pooler: bench/loginFloor.ts with a pool of --pool
                           PostgreSQL connections), tidepool-base (Tidepool from
                           --baseline DIR on --baseline-node, started like tidepool)
  --baseline DIR           checkout of another Tidepool build for tidepool-base, e.g. a git
                           worktree of main with its node_modules (required by tidepool-base)
  --baseline-node PATH     Node.js binary for tidepool-base (default: the node dev dependency,
                           node_modules/node/bin/node, else the system's node)
  --build MODE             dist (default): both Tidepool targets compiled with tsc first, as
                           the Docker image runs them; tsx: from the TypeScript sources
  --node-flags="FLAGS"     extra Node.js flags for the tidepool target only (not tidepool-base),
                           e.g. "--optimize-for-size"; with --baseline . the same build without them
  --repeat N               runs per cell, interleaved across targets; medians reported (default 1)
  --pool N                 server connections per pool, Tidepool and PgBouncer alike (default 20)
  --threads, -j N          pgbench threads (default 2)
  --scale N                pgbench scale factor (default 10)
  --mode MODE              transaction (default) or session: Tidepool's port and PgBouncer's pool_mode;
                           in session mode pooled runs with more clients than --pool are skipped
  --warmup SECONDS         unmeasured warm-up per target and protocol (default 3; 0 = none)
  --max-connections N      PostgreSQL max_connections (default 300); direct and node-relay runs
                           above N - 2 * pool - 10 clients are skipped
  --workers N              TIDEPOOL_WORKERS for the tidepool target (default 1): a supervisor and
                           N workers sharing the pool; CPU is the supervisor's plus its workers'
  --out FILE               also write the report to FILE
  --connect                login costs instead of the matrix: CPU per new connection
                           (pgbench -S -C), per refused login, RSS per idle client
                           (npm run bench -- --connect --help)
  --help, -h               this text
`

export class UsageError extends Error {}

const positiveInteger = (flag: string, value: string): number => {
  const number = Number(value)
  if (!/^\d+$/.test(value.trim()) || !Number.isSafeInteger(number) || number < 1) {
    throw new UsageError(`--${flag}: expected a positive integer, got ${JSON.stringify(value)}`)
  }
  return number
}

const list = <A extends string>(flag: string, value: string, allowed: ReadonlyArray<A>): ReadonlyArray<A> => {
  const items = value
    .split(",")
    .map((item) => item.trim())
    .filter((item) => item !== "")
  for (const item of items) {
    if (!allowed.includes(item as A)) {
      throw new UsageError(`--${flag}: unknown value ${JSON.stringify(item)} (expected ${allowed.join(", ")})`)
    }
  }
  if (items.length === 0) throw new UsageError(`--${flag}: expected at least one of ${allowed.join(", ")}`)
  return [...new Set(items as Array<A>)]
}

/** Parses argv (without node and the script); `undefined` means help was asked for. */
export const parseOptions = (argv: ReadonlyArray<string>): BenchOptions | undefined => {
  let parsed: ReturnType<typeof parse>
  try {
    parsed = parse(argv)
  } catch (error) {
    throw new UsageError((error as Error).message)
  }
  const { values, positionals } = parsed
  if (values.help === true) return undefined
  if (positionals.length > 0) throw new UsageError(`unexpected argument ${JSON.stringify(positionals[0])}`)
  const mode = values.mode ?? "transaction"
  if (mode !== "transaction" && mode !== "session") {
    throw new UsageError(`--mode: expected transaction or session, got ${JSON.stringify(mode)}`)
  }
  const warmup =
    values.warmup === undefined ? 3 : values.warmup.trim() === "0" ? 0 : positiveInteger("warmup", values.warmup)
  const clients = (values.clients ?? "1,10,50,200,1000")
    .split(",")
    .filter((item) => item.trim() !== "")
    .map((item) => positiveInteger("clients", item))
  if (clients.length === 0) throw new UsageError("--clients: expected a comma-separated list of client counts")
  return checkBaseline({
    duration: positiveInteger("duration", values.duration ?? "10"),
    clients: [...new Set(clients)],
    protocols: list("protocols", values.protocols ?? "simple,extended,prepared", ["simple", "extended", "prepared"]),
    targets: list("targets", values.targets ?? DEFAULT_TARGETS.join(","), TARGETS),
    repeat: positiveInteger("repeat", values.repeat ?? "1"),
    pool: positiveInteger("pool", values.pool ?? "20"),
    threads: positiveInteger("threads", values.threads ?? "2"),
    scale: positiveInteger("scale", values.scale ?? "10"),
    mode,
    warmup,
    maxConnections: positiveInteger("max-connections", values["max-connections"] ?? "300"),
    out: values.out,
    baseline: values.baseline === undefined ? undefined : path.resolve(values.baseline),
    baselineNode: values["baseline-node"] ?? baselineNodeDefault(),
    workers: positiveInteger("workers", values.workers ?? "1"),
    build: buildMode(values.build),
    nodeFlags: nodeFlagsOf(values["node-flags"])
  })
}

/** Checks what tidepool-base needs; returns the options unchanged. */
export const checkBaseline = (options: BenchOptions): BenchOptions => {
  const wanted = options.targets.includes("tidepool-base")
  if (wanted && options.baseline === undefined) {
    throw new UsageError("--targets tidepool-base needs --baseline DIR (a checkout of the build to compare with)")
  }
  if (options.baseline !== undefined && !fs.existsSync(path.join(options.baseline, "src", "main.ts"))) {
    throw new UsageError(`--baseline: ${options.baseline} has no src/main.ts`)
  }
  if (options.baseline !== undefined && !fs.existsSync(path.join(options.baseline, "node_modules"))) {
    throw new UsageError(`--baseline: ${options.baseline} has no node_modules (npm ci there, or symlink one)`)
  }
  return options
}

const parse = (argv: ReadonlyArray<string>) =>
  parseArgs({
    args: [...argv],
    allowPositionals: true,
    strict: true,
    options: {
      duration: { type: "string", short: "T" },
      clients: { type: "string" },
      protocols: { type: "string" },
      targets: { type: "string" },
      repeat: { type: "string" },
      pool: { type: "string" },
      threads: { type: "string", short: "j" },
      scale: { type: "string" },
      mode: { type: "string" },
      warmup: { type: "string" },
      "max-connections": { type: "string" },
      out: { type: "string" },
      baseline: { type: "string" },
      "baseline-node": { type: "string" },
      workers: { type: "string" },
      build: { type: "string" },
      "node-flags": { type: "string" },
      help: { type: "boolean", short: "h" }
    }
  })

/**
 * A bench command's main: its flags parsed by `parse` (a UsageError is printed with `help`, exit
 * status 2; undefined means --help), then `run`, whose BenchError is printed with exit status 1.
 */
export const benchMain = <O>(
  parse: () => O | undefined,
  help: string,
  run: (options: O) => Effect.Effect<void, BenchError>
): Effect.Effect<void> =>
  Effect.suspend(() => {
    let options: O | undefined
    try {
      options = parse()
    } catch (error) {
      if (!(error instanceof UsageError)) throw error
      return Console.error(`${error.message}\n\n${help}`).pipe(
        Effect.andThen(
          Effect.sync(() => {
            process.exitCode = 2
          })
        )
      )
    }
    if (options === undefined) return Console.log(help)
    return run(options).pipe(
      Effect.catchTag("BenchError", (error) =>
        Console.error(`bench: ${error.message}`).pipe(
          Effect.andThen(
            Effect.sync(() => {
              process.exitCode = 1
            })
          )
        )
      )
    )
  })
