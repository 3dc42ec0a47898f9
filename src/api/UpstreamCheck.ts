import { Effect, Result } from "effect"
import { AppConfig, type Tenant } from "../config/index.ts"
import { clientMessage } from "../errors/index.ts"
import { connect } from "../upstream/index.ts"

/**
 * A new tenant's credentials, tried against its database before it is stored (`select version()`
 * as each configured user; for an auth_query tenant, its manager). Returns why it failed, if it did.
 */
export const checkUpstream = (tenant: Tenant): Effect.Effect<string | undefined, never, AppConfig> =>
  Effect.gen(function* () {
    const config = yield* AppConfig
    for (const user of tenant.users) {
      const outcome = yield* Effect.scoped(
        Effect.gen(function* () {
          const server = yield* Effect.acquireRelease(
            connect({
              host: tenant.db_host,
              port: tenant.db_port,
              database: tenant.db_database,
              user: user.db_user,
              password: user.db_password,
              connectTimeoutMs: config.upstreamConnectTimeoutMs
            }),
            (server) => Effect.sync(() => server.close("credentials checked"))
          )
          yield* server.simpleQuery("select version()")
        })
      ).pipe(Effect.result)
      if (Result.isFailure(outcome)) return `user ${user.db_user}: ${clientMessage(outcome.failure)}`
    }
    return undefined
  }).pipe(Effect.withSpan("api.check_upstream"))
