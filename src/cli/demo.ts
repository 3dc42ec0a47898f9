import { randomBytes } from "node:crypto"
import * as fs from "node:fs/promises"
import { tmpdir } from "node:os"
import * as path from "node:path"
import { Console, Context, Effect, Layer, Redacted, Schema } from "effect"
import { SignJWT } from "jose"
import { AdminControl } from "../admin/index.ts"
import { ApiServer } from "../api/index.ts"
import { AppConfig, type AppConfigShape, Tenant } from "../config/index.ts"
import { Listeners } from "../listener/index.ts"
import { tidepoolLayer } from "../Tidepool.ts"
import * as EmbeddedPostgres from "./EmbeddedPostgres.ts"
import { installSignals, runtimeLayer } from "./serve.ts"

/**
 * Where the demo's cluster lives: `demo-postgres` in the data dir, kept between runs. As root the
 * server runs as another OS user, which may not reach the data dir (a checkout in a 0700 directory);
 * then a directory of ours in the temp dir, one per user.
 */
const demoDataDir = (rt: EmbeddedPostgres.Runtime, configured: string) =>
  Effect.gen(function* () {
    const preferred = path.resolve(configured, "demo-postgres")
    const parent = path.dirname(preferred)
    const problem = yield* Effect.promise(() =>
      fs.mkdir(parent, { recursive: true }).then(
        () => undefined,
        (error: Error) => `cannot create ${parent} (${error.message})`
      )
    )
    const why =
      problem ??
      ((yield* EmbeddedPostgres.canReach(rt, parent))
        ? undefined
        : `the OS user ${rt.user?.name} that runs PostgreSQL cannot reach ${parent}`)
    if (why === undefined) return { dataDir: preferred, fallback: undefined }
    for (const base of [tmpdir(), "/tmp"]) {
      if (yield* EmbeddedPostgres.canReach(rt, base)) {
        return { dataDir: path.join(base, `tidepool-demo-postgres-${process.getuid?.() ?? 0}`), fallback: why }
      }
    }
    return { dataDir: preferred, fallback: undefined }
  })

/** An embedded PostgreSQL (superuser postgres, password postgres), stopped with the demo's scope. */
const embeddedPostgres = (configured: string) =>
  Effect.gen(function* () {
    const rt = yield* EmbeddedPostgres.runtime
    const { dataDir, fallback } = yield* demoDataDir(rt, configured)
    if (fallback !== undefined) yield* Console.log(`${fallback}: keeping the PostgreSQL data in ${dataDir} instead`)
    const server = yield* EmbeddedPostgres.start({
      dataDir,
      init: { superuser: "postgres", password: "postgres", auth: "scram-sha-256" },
      host: "127.0.0.1",
      // TCP only: no socket file to collide with another server's in /tmp.
      settings: { unix_socket_directories: "" }
    })
    return server
  })

/**
 * A secret the demo keeps in its data dir (0600), made on first run: the vault key and the API's
 * JWT secret, so tenants stored by one run decrypt in the next. Set in the environment, they win.
 */
const keptSecret = (dataDir: string, name: string, make: () => string) =>
  Effect.promise(async () => {
    const file = path.resolve(dataDir, name)
    try {
      return (await fs.readFile(file, "utf8")).trim()
    } catch {
      const value = make()
      await fs.mkdir(path.dirname(file), { recursive: true })
      await fs.writeFile(file, `${value}\n`, { mode: 0o600 })
      return value
    }
  })

const demoSecrets = (config: AppConfigShape) =>
  Effect.gen(function* () {
    const vaultEncKey =
      config.vaultEncKey ??
      Redacted.make(yield* keptSecret(config.dataDir, "demo-vault.key", () => randomBytes(32).toString("base64")))
    const apiJwtSecret =
      config.apiJwtSecret ??
      Redacted.make(
        yield* keptSecret(config.dataDir, "demo-api-jwt.secret", () => randomBytes(32).toString("base64url"))
      )
    return { ...config, vaultEncKey, apiJwtSecret }
  })

/** `tidepool demo`: the pooler in front of an embedded PostgreSQL registered as tenant `demo`. */
export const demo = Effect.gen(function* () {
  const config = yield* demoSecrets(yield* AppConfig)
  // The demo is one process around its own PostgreSQL: workers (and cluster mode) are `serve`'s.
  if (config.workers > 1 || config.cluster)
    yield* Console.log(
      "tidepool demo runs one process: TIDEPOOL_WORKERS and TIDEPOOL_CLUSTER apply to tidepool serve only"
    )
  yield* Console.log("starting embedded PostgreSQL …")
  const { port, dataDir } = yield* embeddedPostgres(config.dataDir)
  const tenant = yield* Schema.decodeUnknownEffect(Tenant)({
    external_id: "demo",
    db_host: "127.0.0.1",
    db_port: port,
    db_database: "postgres",
    users: [{ db_user: "postgres", db_password: "postgres", pool_size: 10 }]
  }).pipe(Effect.orDie)
  const node = yield* Layer.build(tidepoolLayer([tenant]).pipe(Layer.provide(Layer.succeed(AppConfig, config))))
  const ports = Context.get(node, Listeners)
  const api = Context.get(node, ApiServer)
  const token = yield* Effect.promise(() =>
    new SignJWT({ role: "demo" })
      .setProtectedHeader({ alg: "HS256" })
      .setExpirationTime("24h")
      .sign(new TextEncoder().encode(Redacted.value(config.apiJwtSecret)))
  )
  const host = config.listenAddr === "0.0.0.0" || config.listenAddr === "::" ? "127.0.0.1" : config.listenAddr
  yield* Console.log(
    [
      "",
      `Tidepool is running in front of an embedded PostgreSQL on port ${port} (tenant "demo", user postgres, password postgres).`,
      `PostgreSQL data (kept between runs): ${dataDir}`,
      "",
      "  transaction mode (a server per transaction; what most applications want):",
      `    psql 'postgresql://postgres.demo:postgres@${host}:${ports.transactionPort}/postgres'`,
      "  session mode (a server per connection):",
      `    psql 'postgresql://postgres.demo:postgres@${host}:${ports.sessionPort}/postgres'`,
      "  HTTP API (token valid 24 h; see docs/api.md):",
      `    curl -H 'authorization: Bearer ${token}' http://${host}:${api.port}/api/tenants/demo`,
      "",
      "Press Ctrl+C to stop.",
      ""
    ].join("\n")
  )
  const context = yield* Effect.context<never>()
  installSignals((level, message) =>
    Effect.runSyncWith(context)(level === "info" ? Effect.logInfo(message) : Effect.logWarning(message))
  )
  // Until Ctrl+C, or SHUTDOWN from the admin console (TIDEPOOL_ADMIN_USERS), as `serve`.
  yield* Context.get(node, AdminControl).shutdownRequested.pipe(Effect.onInterrupt(() => ports.shutdown))
}).pipe(
  Effect.scoped,
  Effect.catchTag("EmbeddedPostgresError", (e) =>
    Effect.andThen(
      Console.error(`tidepool demo: ${e.message}`),
      Effect.sync(() => process.exit(1))
    )
  ),
  Effect.provide(runtimeLayer(undefined))
)
