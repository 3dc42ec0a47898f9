import {
  Cause,
  Context,
  Either,
  FiberRef,
  FiberRefs,
  HashMap,
  Layer,
  List,
  Logger,
  LogLevel,
  Redacted,
  Tracer
} from "effect"
import { parseLogLevel } from "../config/index.ts"

export type LogFormat = "json" | "pretty"

/** Log annotation keys that may appear in a line; anything else is dropped so secrets cannot leak by accident. */
const FIELDS = ["code", "tenant", "user", "mode", "db_name", "peer_ip", "pool", "server", "port", "reason"] as const

const render = (value: unknown): unknown => (Redacted.isRedacted(value) ? "<redacted>" : value)

const fieldsOf = (annotations: HashMap.HashMap<string, unknown>): Record<string, unknown> => {
  const out: Record<string, unknown> = {}
  for (const key of FIELDS) {
    const v = HashMap.get(annotations, key)
    if (v._tag === "Some" && v.value !== undefined) out[key] = render(v.value)
  }
  return out
}

const messageOf = (message: unknown): string => {
  const parts = Array.isArray(message) ? message : [message]
  return parts.map((p) => (typeof p === "string" ? p : JSON.stringify(render(p)))).join(" ")
}

/** One JSON object per line: level, time, msg, then the session's fields (docs/architecture.md#telemetry). */
const jsonLogger = Logger.make(({ logLevel, message, annotations, date, cause, spans, context }) => {
  const line: Record<string, unknown> = {
    level: logLevel._tag.toLowerCase(),
    time: date.toISOString(),
    msg: messageOf(message),
    ...fieldsOf(annotations)
  }
  if (!Cause.isEmpty(cause)) line.cause = Cause.pretty(cause, { renderErrorCause: true })
  const span = List.head(spans)
  if (span._tag === "Some") line.span = span.value.label
  // docs/architecture.md#telemetry: inside a span, the line names its trace, so logs and traces join up in Grafana.
  const current = Context.getOption(FiberRefs.getOrDefault(context, FiberRef.currentContext), Tracer.ParentSpan)
  if (current._tag === "Some") {
    line.trace_id = current.value.traceId
    line.span_id = current.value.spanId
  }
  process.stdout.write(`${JSON.stringify(line)}\n`)
})

const prettyLogger = Logger.make(({ logLevel, message, annotations, date, cause }) => {
  const fields = Object.entries(fieldsOf(annotations))
    .map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`)
    .join(" ")
  const extra = Cause.isEmpty(cause) ? "" : `\n${Cause.pretty(cause)}`
  process.stdout.write(
    `${date.toISOString().slice(11, 23)} ${logLevel.label.padEnd(7)} ${messageOf(message)}${fields ? ` ${fields}` : ""}${extra}\n`
  )
})

const levels: Record<string, LogLevel.LogLevel> = {
  trace: LogLevel.Trace,
  debug: LogLevel.Debug,
  info: LogLevel.Info,
  warning: LogLevel.Warning,
  error: LogLevel.Error,
  none: LogLevel.None
}

/**
 * A tenant's own log level (`feature_flags.log_level`, e.g. `debug`), for debugging one tenant without
 * raising the whole node's level; undefined when unset or not a level name.
 */
export const tenantLogLevel = (featureFlags: Readonly<Record<string, unknown>>): LogLevel.LogLevel | undefined => {
  const level = featureFlags.log_level
  if (typeof level !== "string") return undefined
  // The same spellings TIDEPOOL_LOG_LEVEL takes (`warn`, `err`, any case).
  const parsed = parseLogLevel(level)
  return Either.isRight(parsed) ? levels[parsed.right] : undefined
}

/** Replaces Effect's default logger with Tidepool's. */
export const loggerLayer = (format: LogFormat, level: string): Layer.Layer<never> =>
  Layer.merge(
    Logger.replace(Logger.defaultLogger, format === "json" ? jsonLogger : prettyLogger),
    Logger.minimumLogLevel(levels[level] ?? LogLevel.Info)
  )
