/** PgBouncer from the system package, in a directory of its own, run as the `postgres` OS user when root. */
import { execFile, spawn } from "node:child_process"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import { promisify } from "node:util"
import { Effect, type Scope } from "effect"
import { freePort } from "../test/support/ports.ts"
import type { PoolMode } from "./options.ts"
import type { Endpoint } from "./pgbench.ts"
import { BenchError, runChecked, scopedTempDir, terminate } from "./process.ts"
import { waitUntilServing } from "./ready.ts"

export interface PgBouncerOptions {
  readonly upstream: Endpoint
  /**
   * What the auth_file holds for the user: the role's SCRAM verifier from pg_authid, as in production.
   * PgBouncer then checks clients without deriving a key per login, and logs in to PostgreSQL with
   * the keys the client's own SCRAM exchange proved (it has no password to log in with otherwise).
   */
  readonly authSecret: string
  readonly poolSize: number
  readonly maxClients: number
  readonly mode: PoolMode
}

export interface RunningPgBouncer {
  readonly endpoint: Endpoint
  readonly pid: number
}

const OS_USER = "postgres"
const LOG_TAIL = 16_384

export const pgbouncerVersion = runChecked("pgbouncer", ["--version"], { limit: "10 seconds" }).pipe(
  Effect.map((finished) => finished.stdout.split("\n")[0]!.trim()),
  Effect.mapError(
    (error) =>
      new BenchError({ message: `PgBouncer is required (Debian: apt-get install pgbouncer): ${error.message}` })
  )
)

// PgBouncer refuses to run as root. The PostgreSQL harness has made sure the `postgres` user exists.
const runAs = async (): Promise<{ uid: number; gid: number } | undefined> => {
  if (process.getuid?.() !== 0) return undefined
  const id = promisify(execFile)
  try {
    const [uid, gid] = await Promise.all([id("id", ["-u", OS_USER]), id("id", ["-g", OS_USER])])
    return { uid: Number(uid.stdout.trim()), gid: Number(gid.stdout.trim()) }
  } catch {
    throw new Error(`running as root, but there is no \`${OS_USER}\` OS user to run PgBouncer as`)
  }
}

const quote = (value: string) => `"${value.replaceAll('"', '""')}"`

const iniFile = (dir: string, port: number, options: PgBouncerOptions) => {
  const { upstream } = options
  return [
    "[databases]",
    `${upstream.database} = host=${upstream.host} port=${upstream.port} dbname=${upstream.database}`,
    "",
    "[pgbouncer]",
    `listen_addr = 127.0.0.1`,
    `listen_port = ${port}`,
    "unix_socket_dir =",
    "auth_type = scram-sha-256",
    `auth_file = ${path.join(dir, "userlist.txt")}`,
    `pool_mode = ${options.mode}`,
    `default_pool_size = ${options.poolSize}`,
    "min_pool_size = 0",
    "reserve_pool_size = 0",
    `max_client_conn = ${options.maxClients}`,
    // As deep as Tidepool's (src/listener): PgBouncer's default 128 would reset a storm's connections.
    "listen_backlog = 4096",
    "ignore_startup_parameters = extra_float_digits,options",
    // Logging to stderr, which we keep a tail of; nothing per connection.
    "logfile =",
    "syslog = 0",
    "log_connections = 0",
    "log_disconnections = 0",
    "stats_period = 3600",
    ""
  ].join("\n")
}

const launch = async (dir: string, options: PgBouncerOptions) => {
  const user = await runAs()
  const port = await freePort()
  await fs.writeFile(path.join(dir, "userlist.txt"), `${quote(options.upstream.user)} ${quote(options.authSecret)}\n`)
  await fs.writeFile(path.join(dir, "pgbouncer.ini"), iniFile(dir, port, options))
  if (user !== undefined) {
    for (const file of ["", "userlist.txt", "pgbouncer.ini"]) await fs.chown(path.join(dir, file), user.uid, user.gid)
  }
  const child = spawn("pgbouncer", [path.join(dir, "pgbouncer.ini")], {
    ...(user ?? {}),
    cwd: dir,
    env: { PATH: process.env.PATH ?? "/usr/bin:/bin", LANG: "C" },
    stdio: ["ignore", "ignore", "pipe"]
  })
  let log = ""
  child.stderr?.setEncoding("utf8").on("data", (chunk: string) => {
    log = (log + chunk).slice(-LOG_TAIL)
  })
  let spawnError: Error | undefined
  child.once("error", (error) => {
    spawnError = error
  })
  const exited = () =>
    spawnError !== undefined
      ? spawnError.message
      : child.exitCode !== null || child.signalCode !== null
        ? `exit ${child.exitCode ?? child.signalCode}\n${log}`
        : undefined
  return { child, port, exited }
}

/** A PgBouncer in front of `upstream` for the enclosing scope. */
export const startPgBouncer = (options: PgBouncerOptions): Effect.Effect<RunningPgBouncer, BenchError, Scope.Scope> =>
  Effect.gen(function* () {
    const dir = yield* scopedTempDir("tidepool-bench-pgbouncer-")
    const launched = yield* Effect.acquireRelease(
      Effect.tryPromise({
        try: () => launch(dir, options),
        catch: (error) => new BenchError({ message: `PgBouncer: ${(error as Error).message}` })
      }),
      (running) => Effect.promise(() => terminate(running.child))
    )
    const endpoint: Endpoint = { ...options.upstream, host: "127.0.0.1", port: launched.port }
    yield* waitUntilServing("PgBouncer", endpoint, launched.exited)
    return { endpoint, pid: launched.child.pid! }
  })
