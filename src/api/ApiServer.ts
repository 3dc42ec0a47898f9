import { createServer } from "node:http"
import { HttpRouter, HttpServer, HttpServerRequest, HttpServerResponse } from "@effect/platform"
import { NodeHttpServer } from "@effect/platform-node"
import { Data, Effect, Layer } from "effect"
import { AppConfig } from "../config/index.ts"
import { metricsRouter } from "../telemetry/index.ts"
import { type JwtPolicy, verifyBearer } from "./JwtAuth.ts"
import { openApiDocument } from "./OpenApi.ts"
import { type Route, type RouteEnv, routes } from "./routes.ts"

export class ApiListenError extends Data.TaggedError("ApiListenError")<{ readonly message: string }> {}

const forbidden = HttpServerResponse.empty({ status: 403 })

/** Wraps a handler with bearer-token auth: any failure is 403 with an empty body (REFERENCE §5). */
export const requireToken =
  (policy: JwtPolicy) =>
  <E, R>(handler: Effect.Effect<HttpServerResponse.HttpServerResponse, E, R>) =>
    Effect.flatMap(HttpServerRequest.HttpServerRequest, (request) =>
      Effect.flatMap(verifyBearer(request.headers.authorization, policy), (ok) =>
        ok ? handler : Effect.succeed(forbidden)
      )
    )

export const apiPolicy = (config: AppConfig["Type"]): JwtPolicy => ({
  secret: config.apiJwtSecret,
  claims: config.jwtClaimValidators,
  blocklist: config.apiTokenBlocklist
})

/** For GET /metrics and /metrics/:tenant: METRICS_JWT_SECRET and its own blocklist. */
export const metricsPolicy = (config: AppConfig["Type"]): JwtPolicy => ({
  secret: config.metricsJwtSecret,
  claims: config.jwtClaimValidators,
  blocklist: config.metricsTokenBlocklist
})

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
      route.public === true ? route.handler : requireToken(policy)(route.handler)
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
    const metrics = metricsPolicy(config)
    const app = HttpRouter.concat(
      apiRouter(apiPolicy(config)),
      metricsRouter((request) => verifyBearer(request.headers.authorization, metrics))
    ).pipe(
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
