import { Layer } from "effect"
import { FetchHttpClient } from "effect/http"
import { OtlpSerialization, OtlpTracer } from "effect/observability"
import { VERSION } from "../version.ts"

/** `k=v,k2=v2` (values URL-encoded), as the OTEL_*_HEADERS and OTEL_RESOURCE_ATTRIBUTES variables are written. */
const keyValues = (raw: string | undefined): Record<string, string> => {
  const out: Record<string, string> = {}
  for (const item of (raw ?? "").split(",")) {
    const eq = item.indexOf("=")
    if (eq <= 0) continue
    try {
      out[decodeURIComponent(item.slice(0, eq).trim())] = decodeURIComponent(item.slice(eq + 1).trim())
    } catch {
      // A malformed entry is skipped rather than failing start-up over telemetry.
    }
  }
  return out
}

/** Where traces go, from the standard variables; undefined when tracing is off. */
export const tracesEndpoint = (env: Readonly<Record<string, string | undefined>>): string | undefined => {
  if (env.OTEL_SDK_DISABLED === "true" || env.OTEL_TRACES_EXPORTER === "none") return undefined
  const traces = env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT?.trim()
  if (traces) return traces
  const base = env.OTEL_EXPORTER_OTLP_ENDPOINT?.trim()
  return base ? `${base.replace(/\/+$/, "")}/v1/traces` : undefined
}

/**
 * OTLP/HTTP trace export configured by the standard `OTEL_*` variables (endpoint, headers, protocol
 * `http/protobuf` (default) or `http/json`, service name, resource attributes). With no endpoint set
 * this is the empty layer: Effect's built-in tracer stays, and nothing leaves the process.
 */
export const tracingLayer = (
  env: Readonly<Record<string, string | undefined>> = process.env,
  serviceVersion = VERSION
): Layer.Layer<never> => {
  const url = tracesEndpoint(env)
  if (url === undefined) return Layer.empty
  const protocol = env.OTEL_EXPORTER_OTLP_TRACES_PROTOCOL ?? env.OTEL_EXPORTER_OTLP_PROTOCOL ?? "http/protobuf"
  return OtlpTracer.layer({
    url,
    resource: {
      serviceName: env.OTEL_SERVICE_NAME ?? "tidepool",
      serviceVersion,
      attributes: keyValues(env.OTEL_RESOURCE_ATTRIBUTES)
    },
    headers: { ...keyValues(env.OTEL_EXPORTER_OTLP_HEADERS), ...keyValues(env.OTEL_EXPORTER_OTLP_TRACES_HEADERS) },
    exportInterval: "2 seconds"
  }).pipe(
    Layer.provide(protocol === "http/json" ? OtlpSerialization.layerJson : OtlpSerialization.layerProtobuf),
    Layer.provide(FetchHttpClient.layer)
  )
}
