import { createServer } from "node:http"
import * as NodeHttpServer from "@effect/platform-node/NodeHttpServer"
import { Cause, Context, Data, Effect, Layer, Option } from "effect"
import { HttpRouter, HttpServer, HttpServerError, HttpServerRequest, HttpServerResponse } from "effect/http"
import { CircuitBreaker } from "../auth/index.ts"
import { HostViews } from "../cluster/HostViews.ts"
import { AppConfig, type AppConfigShape } from "../config/index.ts"
import { PoolRegistry } from "../pool/index.ts"
import { metricsRouter } from "../telemetry/index.ts"
import { type JwtPolicy, verifyBearer } from "./JwtAuth.ts"
import { openApiDocument } from "./OpenApi.ts"
import {
  NETWORK_BANS_CLEAR_VIEW,
  NETWORK_BANS_VIEW,
  type Route,
  routes,
  TENANT_POOLS_VIEW,
  tenantPoolRows
} from "./routes.ts"

export class ApiListenError extends Data.TaggedError("ApiListenError")<{ readonly message: string }> {}

const forbidden = HttpServerResponse.empty({ status: 403 })

/** RFC 6750's answer to a token that is well formed and signed but unacceptable. */
const unauthorized = (reason: string) =>
  HttpServerResponse.jsonUnsafe(
    { error: reason },
    { status: 401, headers: { "www-authenticate": `Bearer error="invalid_token", error_description="${reason}"` } }
  )

/**
 * Wraps a handler with bearer-token auth: a refused token is 403 with an empty body (docs/api.md#authentication);
 * a token that passes every check but its lifetime is 401 with the reason (JwtAuth says why).
 */
export const requireToken =
  (policy: JwtPolicy) =>
  <E, R>(handler: Effect.Effect<HttpServerResponse.HttpServerResponse, E, R>) =>
    Effect.flatMap(HttpServerRequest.HttpServerRequest, (request) =>
      Effect.flatMap(verifyBearer(request.headers.authorization, policy), (verdict) =>
        verdict._tag === "Accepted"
          ? handler
          : Effect.succeed(verdict._tag === "Refused" ? forbidden : unauthorized(verdict.reason))
      )
    )

/**
 * A defect in a handler is a bug: logged with its cause, answered in the API's JSON shape, never as
 * a silent empty 500.
 */
export const reportDefects = <E, R>(handler: Effect.Effect<HttpServerResponse.HttpServerResponse, E, R>) =>
  Effect.catchDefect(handler, (defect) =>
    Effect.flatMap(HttpServerRequest.HttpServerRequest, (request) =>
      Effect.as(
        Effect.logError(`API ${request.method} ${request.url} failed`, Cause.die(defect)),
        HttpServerResponse.jsonUnsafe({ error: "internal error (logged)" }, { status: 500 })
      )
    )
  )

const policyOf = (
  config: AppConfigShape,
  secret: JwtPolicy["secret"],
  blocklist: JwtPolicy["blocklist"]
): JwtPolicy => ({
  secret,
  claims: config.jwtClaimValidators,
  blocklist,
  maxLifetimeSeconds: config.jwtMaxLifetimeSeconds
})

export const apiPolicy = (config: AppConfigShape): JwtPolicy =>
  policyOf(config, config.apiJwtSecret, config.apiTokenBlocklist)

/** For GET /metrics and /metrics/:tenant: METRICS_JWT_SECRET and its own blocklist. */
export const metricsPolicy = (config: AppConfigShape): JwtPolicy =>
  policyOf(config, config.metricsJwtSecret, config.metricsTokenBlocklist)

/**
 * The management API's routes: every route of the table, plus the OpenAPI document. Values, so
 * that the OpenAPI test can list what is served; `apiRouter` registers them.
 */
export const apiRoutes = (policy: JwtPolicy, table: ReadonlyArray<Route> = routes) => [
  HttpRouter.route("GET", "/api/openapi", HttpServerResponse.jsonUnsafe(openApiDocument(table))),
  ...table.map((route) =>
    HttpRouter.route(
      route.method,
      route.path,
      reportDefects(route.public === true ? route.handler : requireToken(policy)(route.handler))
    )
  )
]

/** The management API's router, as a layer of routes (`HttpRouter.serve` or `toWebHandler` runs it). */
export const apiRouter = (policy: JwtPolicy, table: ReadonlyArray<Route> = routes) =>
  HttpRouter.addAll(apiRoutes(policy, table))

/**
 * A request no route serves (unknown path, or a method the path does not have) gets the API's JSON
 * 404 rather than the router's empty one. Global, so it sees the router's RouteNotFound.
 */
const isRouteNotFound = (error: unknown): boolean =>
  HttpServerError.isHttpServerError(error) && error.reason._tag === "RouteNotFound"

const notFoundAsJson = <E, R>(httpEffect: Effect.Effect<HttpServerResponse.HttpServerResponse, E, R>) =>
  Effect.catchIf(httpEffect, isRouteNotFound, () =>
    Effect.succeed(HttpServerResponse.jsonUnsafe({ error: "not found" }, { status: 404 }))
  )

const notFound = HttpRouter.middleware(notFoundAsJson, { global: true })

/**
 * The HTTP API on PORT: Supavisor's tenant routes with JWT auth, and Tidepool's additions. A taken
 * port fails start-up naming PORT, like the proxy ports.
 */
export class ApiServer extends Context.Service<ApiServer, { readonly port: number }>()("tidepool/ApiServer") {
  static readonly layer = Layer.effect(
    this,
    Effect.gen(function* () {
      const config = yield* AppConfig
      const host = Option.getOrUndefined(yield* Effect.serviceOption(HostViews))
      if (host !== undefined) {
        const registry = yield* PoolRegistry
        host.provide(TENANT_POOLS_VIEW, (id) => tenantPoolRows(registry.poolsOf(id)))
        const breaker = yield* CircuitBreaker
        host.provide(NETWORK_BANS_VIEW, (id) => Effect.runSync(breaker.bans(id)))
        host.provide(NETWORK_BANS_CLEAR_VIEW, (arg) => {
          const [id, addresses] = JSON.parse(arg) as [string, ReadonlyArray<string>]
          Effect.runSync(breaker.clear(id, addresses))
          return true
        })
      }
      if (config.apiJwtSecret === undefined) {
        yield* Effect.logWarning(
          "API_JWT_SECRET is not set: every management API call except /api/health is refused (403)"
        )
      }
      // The metrics routes authorize nothing themselves: the token check wraps them as it wraps the
      // API's, so both answer a refused or over-long token the same way.
      const metrics = metricsRouter(() => Effect.succeed(true)).pipe(
        Layer.provide(
          HttpRouter.middleware((handler) => reportDefects(requireToken(metricsPolicy(config))(handler))).layer
        )
      )
      const app = Layer.mergeAll(apiRouter(apiPolicy(config)), metrics, notFound)
      const server = yield* Layer.build(
        // Neither a log line per request nor one for the address: `serve` logs the ports itself.
        HttpRouter.serve(app, { disableLogger: true, disableListenLog: true }).pipe(
          Layer.provideMerge(
            NodeHttpServer.layer(createServer, {
              host: config.listenAddr,
              port: config.apiPort,
              // Worker mode: every worker answers on the one API port, as on the proxy ports.
              ...(config.workers > 1 ? { reusePort: true } : {})
            })
          )
        )
      ).pipe(
        Effect.map(Context.get(HttpServer.HttpServer)),
        Effect.mapError(
          (e) =>
            new ApiListenError({
              message: String(e.cause).includes("EADDRINUSE")
                ? `port ${config.apiPort} on ${config.listenAddr} is already in use; set PORT to another port`
                : `cannot listen on ${config.listenAddr}:${config.apiPort} (PORT): ${String(e.cause)}`
            })
        )
      )
      const address = server.address
      return { port: address._tag === "UnixPathAddress" ? 0 : address.port }
    })
  )
}
