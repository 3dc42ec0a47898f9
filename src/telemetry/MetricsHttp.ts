import { Effect, Layer } from "effect"
import { HttpRouter, HttpServerRequest, HttpServerResponse } from "effect/http"
import { Metrics, PROMETHEUS_CONTENT_TYPE } from "./Metrics.ts"

/**
 * Decides whether a scrape may read metrics (the API server checks the `METRICS_JWT_SECRET` bearer
 * token). Refusals answer 403 with an empty body, as every API route (docs/api.md#authentication), or
 * 401 with the reason for a token expiring too far ahead (decided by `ApiServer`'s `requireToken`).
 */
export type MetricsAuthorizer = (request: HttpServerRequest.HttpServerRequest) => Effect.Effect<boolean>

const forbidden = HttpServerResponse.empty({ status: 403 })

/**
 * `GET /metrics` (every tenant plus process metrics) and `GET /metrics/:tenant` (that tenant's
 * series), as route layers for the API server's router. In worker mode, of every worker of the host.
 */
export const metricsRouter = (authorize: MetricsAuthorizer) =>
  Layer.mergeAll(
    HttpRouter.add(
      "GET",
      "/metrics",
      Effect.gen(function* () {
        if (!(yield* authorize(yield* HttpServerRequest.HttpServerRequest))) return forbidden
        const metrics = yield* Metrics
        return HttpServerResponse.text(yield* metrics.scrape(), { contentType: PROMETHEUS_CONTENT_TYPE })
      })
    ),
    HttpRouter.add(
      "GET",
      "/metrics/:tenant",
      Effect.gen(function* () {
        if (!(yield* authorize(yield* HttpServerRequest.HttpServerRequest))) return forbidden
        const { tenant } = yield* HttpRouter.params
        const metrics = yield* Metrics
        return HttpServerResponse.text(yield* metrics.scrape(tenant ?? ""), { contentType: PROMETHEUS_CONTENT_TYPE })
      })
    )
  )
