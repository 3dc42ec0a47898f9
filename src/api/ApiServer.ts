import { createServer } from "node:http"
import { HttpRouter, HttpServer, HttpServerRequest, HttpServerResponse } from "@effect/platform"
import { NodeHttpServer } from "@effect/platform-node"
import { Cause, Data, Effect, Layer } from "effect"
import { AppConfig } from "../config/index.ts"
import { metricsRouter } from "../telemetry/index.ts"
import { type JwtPolicy, verifyBearer } from "./JwtAuth.ts"
import { openApiDocument } from "./OpenApi.ts"
import { type Route, type RouteEnv, routes } from "./routes.ts"

export class ApiListenError extends Data.TaggedError("ApiListenError")<{ readonly message: string }> {}

const forbidden = HttpServerResponse.empty({ status: 403 })

/** RFC 6750's answer to a token that is well formed and signed but unacceptable. */
const unauthorized = (reason: string) =>
  HttpServerResponse.unsafeJson(
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
  Effect.catchAllDefect(handler, (defect) =>
    Effect.flatMap(HttpServerRequest.HttpServerRequest, (request) =>
      Effect.as(
        Effect.logError(`API ${request.method} ${request.url} failed`, Cause.die(defect)),
        HttpServerResponse.unsafeJson({ error: "internal error (logged)" }, { status: 500 })
      )
    )
  )

const policyOf = (
  config: AppConfig["Type"],
  secret: JwtPolicy["secret"],
  blocklist: JwtPolicy["blocklist"]
): JwtPolicy => ({
  secret,
  claims: config.jwtClaimValidators,
  blocklist,
  maxLifetimeSeconds: config.jwtMaxLifetimeSeconds
})

export const apiPolicy = (config: AppConfig["Type"]): JwtPolicy =>
  policyOf(config, config.apiJwtSecret, config.apiTokenBlocklist)

/** For GET /metrics and /metrics/:tenant: METRICS_JWT_SECRET and its own blocklist. */
export const metricsPolicy = (config: AppConfig["Type"]): JwtPolicy =>
  policyOf(config, config.metricsJwtSecret, config.metricsTokenBlocklist)

/** The management API's router: every route of the table, plus the OpenAPI document. */
export const apiRouter = (policy: JwtPolicy, table: ReadonlyArray<Route> = routes) => {
  const document = openApiDocument(table)
  let router: HttpRouter.HttpRouter<never, RouteEnv> = HttpRouter.empty.pipe(
    HttpRouter.get("/api/openapi", Effect.succeed(HttpServerResponse.unsafeJson(document)))
  )
  for (const route of table) {
    router = HttpRouter.route(route.method)(
      router,
      route.path,
      reportDefects(route.public === true ? route.handler : requireToken(policy)(route.handler))
    )
  }
  return router
}

/**
 * The HTTP API on PORT: Supavisor's tenant routes with JWT auth, and Tidepool's additions. A taken
 * port fails start-up naming PORT, like the proxy ports.
 */
export class ApiServer extends Effect.Service<ApiServer>()("tidepool/ApiServer", {
  scoped: Effect.gen(function* () {
    const config = yield* AppConfig
    if (config.apiJwtSecret === undefined) {
      yield* Effect.logWarning(
        "API_JWT_SECRET is not set: every management API call except /api/health is refused (403)"
      )
    }
    // The metrics routes authorize nothing themselves: the token check wraps them as it wraps the
    // API's, so both answer a refused or over-long token the same way.
    const metrics = metricsRouter(() => Effect.succeed(true)).pipe(
      HttpRouter.use((handler) => reportDefects(requireToken(metricsPolicy(config))(handler)))
    )
    const app = HttpRouter.concat(apiRouter(apiPolicy(config)), metrics).pipe(
      HttpRouter.catchAll(() => Effect.succeed(HttpServerResponse.unsafeJson({ error: "not found" }, { status: 404 })))
    )
    const context = yield* Layer.build(
      NodeHttpServer.layer(createServer, { host: config.listenAddr, port: config.apiPort }).pipe(
        Layer.mapError(
          (e) =>
            new ApiListenError({
              message: String(e.cause).includes("EADDRINUSE")
                ? `port ${config.apiPort} on ${config.listenAddr} is already in use; set PORT to another port`
                : `cannot listen on ${config.listenAddr}:${config.apiPort} (PORT): ${String(e.cause)}`
            })
        )
      )
    )
    const server = yield* Effect.provide(HttpServer.HttpServer, context)
    yield* server.serve(app).pipe(Effect.provide(context))
    const address = server.address
    return { port: address._tag === "TcpAddress" ? address.port : 0 } as const
  })
}) {}
