/** Tidepool as a child process (`tidepool serve --config FILE`), so its CPU time is its own. */

import { execFile, spawn } from "node:child_process"
import { randomBytes } from "node:crypto"
import { existsSync, rmSync } from "node:fs"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import { fileURLToPath } from "node:url"
import { Effect, type Scope } from "effect"
import { freePort } from "../test/support/ports.ts"
import type { PoolMode } from "./options.ts"
import type { Endpoint } from "./pgbench.ts"
import { BenchError, scopedTempDir, terminate } from "./process.ts"
import { waitUntilServing } from "./ready.ts"

export interface TidepoolOptions {
  readonly upstream: Endpoint
  readonly tenant: string
  readonly poolSize: number
  readonly maxClients: number
  readonly mode: PoolMode
  /** The checkout to run (`--baseline`); this one by default. */
  readonly dir?: string
  /** The Node.js binary to run it with (`--baseline-node`); this process's own by default. */
  readonly node?: string
  /** Names it in messages. */
  readonly label?: string
  /** Extra environment (e.g. TIDEPOOL_MAX_HANDSHAKES for a storm), over the defaults below. */
  readonly env?: Readonly<Record<string, string>>
  /** Extra Node.js flags (e.g. `--cpu-prof`), before the entry point. */
  readonly nodeFlags?: ReadonlyArray<string>
  /**
   * A command and its arguments that run Node.js (e.g. valgrind, `bench/instructions.ts`): the child is
   * `launcher… node nodeFlags… entry…`, and it is given longer to start.
   */
  readonly launcher?: ReadonlyArray<string>
  /** TIDEPOOL_WORKERS (`--workers`); 1 = one process. */
  readonly workers?: number
  /**
   * `dist` (default): compiled with the checkout's `tsconfig.build.json`, as `npm run build` and
   * the Docker image run it; `tsx`: the TypeScript sources through tsx, as `npm run serve` does.
   */
  readonly build?: BuildMode
}

export type BuildMode = "dist" | "tsx"

/** How the report names the tidepool target's extra Node.js flags. */
export const flagsLabel = (flags: ReadonlyArray<string>): string =>
  flags.length === 0 ? "" : ` with node ${flags.join(" ")}`

/** How the report names a build mode. */
export const buildLabel = (build: BuildMode): string =>
  build === "dist" ? "(compiled: tsc to dist/, as the Docker image runs it)" : "(from the sources through tsx)"

export interface RunningTidepool {
  readonly endpoint: Endpoint
  readonly pid: number
}

const configFile = (options: TidepoolOptions) => {
  const { upstream } = options
  return JSON.stringify(
    {
      tenants: [
        {
          external_id: options.tenant,
          db_host: upstream.host,
          db_port: upstream.port,
          db_database: upstream.database,
          default_pool_size: options.poolSize,
          default_max_clients: options.maxClients,
          users: [
            {
              db_user: upstream.user,
              db_password: upstream.password,
              pool_size: options.poolSize,
              max_clients: options.maxClients
            }
          ]
        }
      ]
    },
    null,
    2
  )
}

/**
 * Where a checkout's compiled build goes: `.tmp/` is git-ignored, and `dist/` is left alone (bin/tidepool.js
 * prefers a `dist/` when there is one, so a bench run must not leave one behind). The build's
 * `package.json` sits beside its `dist/`, where `src/version.ts` looks for it; packages resolve
 * from the checkout's `node_modules` above. One per bench process (two runs at once in one
 * checkout must not rebuild under each other), removed when it exits.
 */
const buildDir = (checkout: string) => path.join(checkout, ".tmp", "bench-build", String(process.pid))

const builds = new Map<string, Promise<string>>()

/**
 * Compiles `checkout` once per bench process (fresh each run, so never a stale build): its own
 * TypeScript, its own `tsconfig.build.json`. Resolves with the entry point (`…/dist/main.js`).
 */
export const buildTidepool = (dir: string): Promise<string> => {
  // One build per checkout however it is named (`--baseline .` is this one).
  const checkout = path.resolve(dir)
  const known = builds.get(checkout)
  if (known !== undefined) return known
  const built = (async () => {
    const out = buildDir(checkout)
    const tsc = path.join(checkout, "node_modules", "typescript", "bin", "tsc")
    if (!existsSync(path.join(checkout, "tsconfig.build.json")) || !existsSync(tsc)) {
      throw new Error(`${checkout} has no tsconfig.build.json or TypeScript to build it with (use --build tsx)`)
    }
    await fs.rm(out, { recursive: true, force: true })
    await fs.mkdir(out, { recursive: true })
    process.once("exit", () => rmSync(out, { recursive: true, force: true }))
    await fs.copyFile(path.join(checkout, "package.json"), path.join(out, "package.json"))
    const failure = await new Promise<string | undefined>((resolve) =>
      execFile(
        process.execPath,
        [tsc, "-p", "tsconfig.build.json", "--outDir", path.join(out, "dist"), "--sourceMap", "false"],
        { cwd: checkout, maxBuffer: 16 * 1024 * 1024 },
        (error, stdout) => resolve(error === null ? undefined : `${stdout}`.slice(0, 2000))
      )
    )
    const main = path.join(out, "dist", "main.js")
    // tsc emits despite type errors (someone's change in progress); only a missing build is fatal.
    if (!existsSync(main)) throw new Error(`building ${checkout} failed:\n${failure ?? ""}`)
    if (failure !== undefined) process.stderr.write(`bench: ${checkout} built with type errors:\n${failure}\n`)
    return main
  })()
  builds.set(checkout, built)
  return built
}

const launch = async (dir: string, options: TidepoolOptions) => {
  const config = path.join(dir, "tidepool.json")
  await fs.writeFile(config, configFile(options))
  const [session, transaction, api] = [await freePort(), await freePort(), await freePort()]
  const checkout = options.dir ?? ROOT
  // As users run it: compiled (the Docker image's `node bin/tidepool.js` runs dist/), or, with
  // --build tsx, as `npm run serve` (and the suite's runCli) start it, from the sources.
  const entry =
    (options.build ?? "dist") === "dist" ? [await buildTidepool(checkout)] : ["--import", "tsx", "src/main.ts"]
  const node = options.node ?? process.execPath
  const args = [...(options.nodeFlags ?? []), ...entry, "serve", "--config", config]
  const [command, ...launcherArgs] = options.launcher ?? [node]
  const child = spawn(command!, options.launcher === undefined ? args : [...launcherArgs, node, ...args], {
    cwd: checkout,
    env: {
      ...process.env,
      TIDEPOOL_LOG_FORMAT: "json",
      ...tidepoolEnv(dir, session, transaction, api),
      ...options.env,
      // One process unless asked: a TIDEPOOL_WORKERS in the bench's own environment (as
      // `npm run test:e2e:workers` sets) would otherwise measure a supervisor that serves nothing.
      TIDEPOOL_WORKERS: String(options.workers ?? 1),
      // The supervisor says when every worker listens, at info level.
      ...((options.workers ?? 1) > 1 ? { TIDEPOOL_LOG_LEVEL: "info" } : {})
    },
    stdio: ["ignore", "pipe", "pipe"]
  })
  let output = ""
  const keep = (chunk: Buffer) => {
    output = (output + chunk.toString()).slice(-16_000)
  }
  child.stdout!.on("data", keep)
  child.stderr!.on("data", keep)
  let finished: string | undefined
  child.once("exit", (code, signal) => {
    finished = `exit ${code ?? signal}\n${output.slice(-8000)}`
  })
  child.once("error", (error) => {
    finished = `${options.node ?? process.execPath}: ${error.message}`
  })
  let all = ""
  const allListening = new Promise<void>((resolve) => {
    if ((options.workers ?? 1) <= 1) return resolve()
    const look = (chunk: Buffer) => {
      all += chunk.toString()
      if (/workers listening/.test(all)) {
        child.stdout!.off("data", look)
        resolve()
      }
    }
    child.stdout!.on("data", look)
  })
  return {
    child,
    port: options.mode === "transaction" ? transaction : session,
    exited: () => finished,
    allListening
  }
}

const ROOT = fileURLToPath(new URL("..", import.meta.url))

const tidepoolEnv = (dir: string, session: number, transaction: number, api: number) => ({
  PROXY_PORT_SESSION: String(session),
  PROXY_PORT_TRANSACTION: String(transaction),
  PORT: String(api),
  TIDEPOOL_LISTEN_ADDR: "127.0.0.1",
  TIDEPOOL_LOG_LEVEL: "warning",
  TIDEPOOL_DATA_DIR: path.join(dir, "data"),
  // The tenant's password is stored in the tenant store, encrypted under a key of this run's own.
  VAULT_ENC_KEY: randomBytes(32).toString("hex"),
  TIDEPOOL_SHUTDOWN_TIMEOUT: "2000"
})

/** Tidepool with one tenant in front of `upstream`, for the enclosing scope. */
export const startTidepool = (options: TidepoolOptions): Effect.Effect<RunningTidepool, BenchError, Scope.Scope> =>
  Effect.gen(function* () {
    const dir = yield* scopedTempDir("tidepool-bench-tidepool-")
    const launched = yield* Effect.acquireRelease(
      Effect.tryPromise({
        try: () => launch(dir, options),
        catch: (error) => new BenchError({ message: (error as Error).message })
      }),
      // SIGTERM starts a graceful shutdown, bounded by TIDEPOOL_SHUTDOWN_TIMEOUT below.
      (running) => Effect.promise(() => terminate(running.child, 10_000))
    )
    const endpoint: Endpoint = {
      ...options.upstream,
      host: "127.0.0.1",
      port: launched.port,
      user: `${options.upstream.user}.${options.tenant}`
    }
    // Start-up is logged at info, which we keep quiet; a query answered is the better signal anyway.
    yield* waitUntilServing(
      `${options.label ?? "Tidepool"} (${options.mode} port ${launched.port})`,
      endpoint,
      launched.exited,
      options.launcher === undefined ? 60_000 : 300_000
    ).pipe(
      Effect.mapError((error) =>
        options.mode === "transaction"
          ? new BenchError({
              message: `${error.message}\n(if this Tidepool build has no transaction-mode listener yet, try --mode session)`
            })
          : error
      )
    )
    // Worker mode: worker 1 answers first; the run starts once every worker listens.
    yield* Effect.promise(() => launched.allListening).pipe(
      Effect.timeoutOrElse({
        duration: 120_000,
        orElse: () => Effect.fail(new BenchError({ message: "Tidepool's workers did not all start within 120 s" }))
      })
    )
    return { endpoint, pid: launched.child.pid! }
  })
