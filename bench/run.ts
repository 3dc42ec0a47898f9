/**
 * `npm run bench`: pgbench -S through Tidepool, PgBouncer and straight to PostgreSQL, in one run.
 *
 * One PostgreSQL 17 server (the test harness's), initialised with `pgbench -i`; PgBouncer and
 * Tidepool run as child processes in front of it so their CPU time can be read from /proc. Within
 * each (protocol, clients) cell the targets run back to back, in an order that rotates from cell to
 * cell and repetition to repetition, so machine noise falls on all of them alike. Every process and
 * directory it creates is released when it finishes, fails or is interrupted (Ctrl+C).
 */
import * as fs from "node:fs/promises"
import * as os from "node:os"
import * as path from "node:path"
import * as NodeRuntime from "@effect/platform-node/NodeRuntime"
import { Cause, Console, Effect, Exit } from "effect"
import { type PostgresServer, startPostgres } from "../test/support/postgres.ts"
import { CONNECT_HELP, connections, parseConnectOptions } from "./connections.ts"
import { startLoginFloor } from "./loginFloorProcess.ts"
import { describeMachine, nodeVersion, tidepoolRevision } from "./machine.ts"
import { type BenchOptions, benchMain, HELP, parseOptions, TARGETS, type TargetName } from "./options.ts"
import { type Endpoint, initPgbench, type PgbenchResult, pgbenchVersion, runPgbench } from "./pgbench.ts"
import { pgbouncerVersion, startPgBouncer } from "./pgbouncer.ts"
import { BenchError, scopedTempDir } from "./process.ts"
import { startRelayFloor } from "./relayFloorProcess.ts"
import { describeRun, type Measurement, renderReport } from "./report.ts"
import { buildLabel, flagsLabel, startTidepool } from "./tidepool.ts"

const ROLE = "bench"
const PASSWORD = "bench"
const DATABASE = "bench"
const TENANT = "bench"
/** Connections PostgreSQL keeps free of direct runs besides the pools: superuser slots and headroom. */
const SPARE_CONNECTIONS = 10

interface Target {
  readonly name: TargetName
  readonly endpoint: Endpoint
  /** The pooler's process, whose CPU is measured; none for direct. */
  readonly pid: number | undefined
}

const progress = (line: string) => Effect.sync(() => process.stderr.write(`${line}\n`))

const query = <T>(server: PostgresServer, sql: string, params?: Array<unknown>) =>
  Effect.tryPromise({
    try: () => server.query<T>(sql, params),
    catch: (error) => new BenchError({ message: `PostgreSQL: ${(error as Error).message}` })
  })

const postgres = (options: BenchOptions) =>
  Effect.acquireRelease(
    Effect.tryPromise({
      try: () =>
        startPostgres({
          roles: [{ name: ROLE, password: PASSWORD }],
          databases: [DATABASE],
          // Scale 10 is ~160 MB; keep it in shared buffers rather than going through the page cache.
          settings: { max_connections: String(options.maxConnections), shared_buffers: "256MB" }
        }),
      catch: (error) => new BenchError({ message: `PostgreSQL: ${(error as Error).message}` })
    }),
    (server) => Effect.promise(() => server.stop())
  )

/** Why `target` does not run with `clients` clients, if it does not. */
const skipReason = (options: BenchOptions, target: TargetName, clients: number): string | undefined => {
  if (target === "direct" || target === "node-relay") {
    const pools = options.targets.filter(
      (name) => name === "tidepool" || name === "tidepool-base" || name === "pgbouncer" || name === "pool-floor"
    ).length
    const available = options.maxConnections - pools * options.pool - SPARE_CONNECTIONS
    return clients > available
      ? `${clients} clients exceed the ${available} connections PostgreSQL has left for unpooled clients ` +
          `(max_connections ${options.maxConnections}, minus ${pools} × pool ${options.pool} and ${SPARE_CONNECTIONS} spare)`
      : undefined
  }
  if (target === "pool-floor" && options.mode === "session") return "the pool floor is a transaction pooler"
  return options.mode === "session" && clients > options.pool
    ? `session mode holds a server per client, and ${clients} clients exceed the pool of ${options.pool}`
    : undefined
}

const rotate = <A>(items: ReadonlyArray<A>, by: number): ReadonlyArray<A> =>
  items.length === 0 ? items : [...items.slice(by % items.length), ...items.slice(0, by % items.length)]

/** Until a target has shown how fast it takes connections: SCRAM plus a backend fork, pessimistically. */
const DEFAULT_CONNECT_MS_PER_CLIENT = 15

/**
 * How many seconds of pgbench's -T connecting will eat (see PgbenchRun.connectAllowanceS), per
 * target: 1.25 × the longest connection time seen at this client count; else twice the per-client
 * time seen at the largest count so far (it grows faster than linearly); else a pessimistic default.
 */
const connectEstimator = () => {
  const exact = new Map<string, number>()
  const largest = new Map<TargetName, { readonly clients: number; readonly msPerClient: number }>()
  return {
    allowanceS: (target: TargetName, clients: number): number => {
      const seen = exact.get(`${target} ${clients}`)
      if (seen !== undefined) return (1.25 * seen) / 1000
      return (2 * (largest.get(target)?.msPerClient ?? DEFAULT_CONNECT_MS_PER_CLIENT) * clients) / 1000
    },
    record: (target: TargetName, clients: number, result: PgbenchResult): void => {
      if (!Number.isFinite(result.connectMs) || result.transactions === 0) return
      const key = `${target} ${clients}`
      exact.set(key, Math.max(exact.get(key) ?? 0, result.connectMs))
      if (clients >= (largest.get(target)?.clients ?? 0)) {
        largest.set(target, { clients, msPerClient: result.connectMs / clients })
      }
    }
  }
}

const plural = (count: number, noun: string) => `${count} ${noun}${count === 1 ? "" : "s"}`

const runMatrix = (options: BenchOptions, targets: ReadonlyArray<Target>, workDir: string) =>
  Effect.gen(function* () {
    const connecting = connectEstimator()
    const bench = (target: Target, protocol: BenchOptions["protocols"][number], clients: number, durationS: number) =>
      Effect.gen(function* () {
        const result = yield* runPgbench({
          endpoint: target.endpoint,
          protocol,
          ...(protocol === "prepared" && (target.name === "pgbouncer" || target.name === "pool-floor")
            ? { pgbenchProtocol: "extended" as const }
            : {}),
          clients,
          threads: options.threads,
          durationS,
          connectAllowanceS: connecting.allowanceS(target.name, clients),
          workDir,
          cpuPid: target.pid
        })
        connecting.record(target.name, clients, result)
        return result
      })
    const cells = options.protocols.flatMap((protocol) => options.clients.map((clients) => ({ protocol, clients })))
    const total =
      options.repeat *
      cells.reduce(
        (sum, { clients }) =>
          sum + targets.filter((target) => skipReason(options, target.name, clients) === undefined).length,
        0
      )
    yield* progress(
      `${total} measured runs of ${options.duration} s` +
        (options.warmup > 0 ? `, plus ${options.warmup} s of warm-up per target and protocol` : "") +
        ` (about ${Math.ceil((total * (options.duration + 2) + options.protocols.length * targets.length * (options.warmup + 1)) / 60)} min)`
    )
    const measurements: Array<Measurement> = []
    let done = 0
    for (const protocol of options.protocols) {
      if (options.warmup > 0) {
        for (const target of targets) {
          const result = yield* bench(target, protocol, Math.min(10, options.pool), options.warmup)
          yield* progress(`warm-up, ${protocol}, ${target.name}: ${describeRun(result)}`)
        }
      }
      for (const [cellIndex, clients] of options.clients.entries()) {
        const runnable = targets.filter((target) => skipReason(options, target.name, clients) === undefined)
        const runs = new Map<TargetName, Array<PgbenchResult>>(runnable.map((target) => [target.name, []]))
        for (let repetition = 0; repetition < options.repeat; repetition++) {
          for (const target of rotate(runnable, cellIndex + repetition)) {
            const result = yield* bench(target, protocol, clients, options.duration)
            runs.get(target.name)!.push(result)
            done++
            yield* progress(
              `[${done}/${total}] ${protocol}, ${plural(clients, "client")}, ${target.name}: ${describeRun(result)}`
            )
          }
        }
        for (const target of targets) {
          const skipped = skipReason(options, target.name, clients)
          measurements.push({
            protocol,
            clients,
            target: target.name,
            runs: runs.get(target.name) ?? [],
            ...(skipped === undefined ? {} : { skipped })
          })
        }
      }
    }
    return measurements
  })

const bench = (options: BenchOptions) =>
  Effect.gen(function* () {
    const startedAt = new Date()
    const loadAtStart = os.loadavg()[0]!
    // Read now: the source Tidepool is about to load, not what it may have become an hour later.
    const revision =
      options.baseline === undefined
        ? `${tidepoolRevision()} ${buildLabel(options.build)}${flagsLabel(options.nodeFlags)}`
        : `${tidepoolRevision()} ${buildLabel(options.build)}${flagsLabel(options.nodeFlags)}; base: ${tidepoolRevision(options.baseline)} on Node ${nodeVersion(options.baselineNode)}`
    const pgbench = yield* pgbenchVersion
    const pgbouncer = options.targets.includes("pgbouncer") ? yield* pgbouncerVersion : undefined
    const workDir = yield* scopedTempDir("tidepool-bench-")

    yield* progress("starting PostgreSQL")
    const server = yield* postgres(options)
    const [{ server_version }] = yield* query<{ server_version: string }>(server, "SHOW server_version")
    const direct: Endpoint = {
      host: server.host,
      port: server.port,
      user: ROLE,
      password: PASSWORD,
      database: DATABASE
    }
    yield* progress(`pgbench -i -s ${options.scale}`)
    yield* initPgbench(direct, options.scale)

    // Room for the largest run plus the readiness probes and some slack.
    const maxClients = Math.max(1100, Math.max(...options.clients) + 100)
    const targets: Array<Target> = []
    for (const name of TARGETS.filter((target) => options.targets.includes(target))) {
      if (name === "tidepool") {
        yield* progress(`starting Tidepool (${options.mode} mode)`)
        const tidepool = yield* startTidepool({
          upstream: direct,
          tenant: TENANT,
          poolSize: options.pool,
          maxClients,
          mode: options.mode,
          workers: options.workers,
          build: options.build,
          nodeFlags: options.nodeFlags
        })
        targets.push({ name, ...tidepool })
      } else if (name === "tidepool-base") {
        yield* progress(`starting Tidepool (base) from ${options.baseline} on ${options.baselineNode}`)
        const tidepool = yield* startTidepool({
          upstream: direct,
          tenant: TENANT,
          poolSize: options.pool,
          maxClients,
          mode: options.mode,
          dir: options.baseline!,
          node: options.baselineNode,
          label: "Tidepool (base)",
          build: options.build
        })
        targets.push({ name, ...tidepool })
      } else if (name === "pgbouncer") {
        yield* progress(`starting PgBouncer (pool_mode ${options.mode})`)
        const [{ rolpassword }] = yield* query<{ rolpassword: string }>(
          server,
          "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
          [ROLE]
        )
        const running = yield* startPgBouncer({
          upstream: direct,
          authSecret: rolpassword,
          poolSize: options.pool,
          maxClients,
          mode: options.mode
        })
        targets.push({ name, ...running })
      } else if (name === "pool-floor") {
        yield* progress("starting the Node.js pool floor")
        const floor = yield* startLoginFloor(ROLE, PASSWORD, DATABASE, 500, "shared", {
          endpoint: direct,
          pool: options.pool
        })
        targets.push({ name, ...floor })
      } else if (name === "node-relay") {
        yield* progress("starting the Node.js relay (floor)")
        targets.push({ name, ...(yield* startRelayFloor(direct)) })
      } else {
        targets.push({ name, endpoint: direct, pid: undefined })
      }
    }

    const measurements = yield* runMatrix(options, targets, workDir)
    const report = renderReport(measurements, {
      options,
      machine: describeMachine({ tidepool: revision, postgres: server_version, pgbouncer, pgbench }, [
        loadAtStart,
        os.loadavg()[0]!
      ]),
      startedAt,
      finishedAt: new Date()
    })
    yield* Console.log(report)
    if (options.out !== undefined) {
      const out = path.resolve(options.out)
      yield* Effect.tryPromise({
        try: async () => {
          await fs.mkdir(path.dirname(out), { recursive: true })
          await fs.writeFile(out, report)
        },
        catch: (error) => new BenchError({ message: `--out: ${(error as Error).message}` })
      })
      yield* progress(`report written to ${out}`)
    }
  }).pipe(Effect.scoped)

const main = process.argv.includes("--connect")
  ? benchMain(() => parseConnectOptions(process.argv.slice(2)), CONNECT_HELP, connections)
  : benchMain(() => parseOptions(process.argv.slice(2)), HELP, bench)

NodeRuntime.runMain(main, {
  teardown: (exit, onExit) => onExit(Exit.isSuccess(exit) ? 0 : Cause.hasInterruptsOnly(exit.cause) ? 130 : 1)
})
