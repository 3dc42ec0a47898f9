import { Cause, Context, Layer, Logger, type LogLevel, Redacted, References, Result, Tracer } from "effect"
import { parseLogLevel } from "../config/index.ts"

export type LogFormat = "json" | "pretty"

/** Log annotation keys that may appear in a line; anything else is dropped so secrets cannot leak by accident. */
const FIELDS = ["code", "tenant", "user", "mode", "db_name", "peer_ip", "pool", "server", "port", "reason"] as const

const render = (value: unknown): unknown => (Redacted.isRedacted(value) ? "<redacted>" : value)

const fieldsOf = (annotations: Readonly<Record<string, unknown>>): Record<string, unknown> => {
  const out: Record<string, unknown> = {}
  for (const key of FIELDS) {
    const v = annotations[key]
    if (v !== undefined) out[key] = render(v)
  }
  return out
}

// Effect 4 names the level "Warn"; our lines keep saying "warning", as operators' queries expect.
const levelName = (level: LogLevel.LogLevel): string => (level === "Warn" ? "warning" : level.toLowerCase())

const messageOf = (message: unknown): string => {
  if (typeof message === "string") return message
  const parts = Array.isArray(message) ? message : [message]
  // The usual line: one string (Effect passes the log call's arguments as an array).
  if (parts.length === 1 && typeof parts[0] === "string") return parts[0]
  return parts.map((p) => (typeof p === "string" ? p : JSON.stringify(render(p)))).join(" ")
}

/** One JSON object per line: level, time, msg, then the session's fields (docs/architecture.md#telemetry). */
const jsonLogger = Logger.make(({ logLevel, message, date, cause, fiber }) => {
  const line: Record<string, unknown> = {
    level: levelName(logLevel),
    time: date.toISOString(),
    msg: messageOf(message)
  }
  // Straight into the line, not through fieldsOf's object and a spread: refused logins log a line each.
  const annotations = fiber.getRef(References.CurrentLogAnnotations)
  for (const key of FIELDS) {
    const v = annotations[key]
    // A string is never Redacted: the usual field skips the check.
    if (v !== undefined) line[key] = typeof v === "string" ? v : render(v)
  }
  if (cause.reasons.length > 0) line.cause = Cause.pretty(cause)
  // The innermost log span is the last one.
  const spans = fiber.getRef(References.CurrentLogSpans)
  if (spans.length > 0) line.span = spans[spans.length - 1]![0]
  // docs/architecture.md#telemetry: inside a span, the line names its trace, so logs and traces join up in Grafana.
  const current = Context.getOption(fiber.context, Tracer.ParentSpan)
  if (current._tag === "Some") {
    line.trace_id = current.value.traceId
    line.span_id = current.value.spanId
  }
  process.stdout.write(`${JSON.stringify(line)}\n`)
})

const prettyLogger = Logger.make(({ logLevel, message, date, cause, fiber }) => {
  const fields = Object.entries(fieldsOf(fiber.getRef(References.CurrentLogAnnotations)))
    .map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`)
    .join(" ")
  const extra = cause.reasons.length === 0 ? "" : `\n${Cause.pretty(cause)}`
  process.stdout.write(
    `${date.toISOString().slice(11, 23)} ${logLevel.toUpperCase().padEnd(7)} ${messageOf(message)}${fields ? ` ${fields}` : ""}${extra}\n`
  )
})

const levels: Record<string, LogLevel.LogLevel> = {
  trace: "Trace",
  debug: "Debug",
  info: "Info",
  warning: "Warn",
  error: "Error",
  none: "None"
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
  return Result.isSuccess(parsed) ? levels[parsed.success] : undefined
}

/** Replaces Effect's loggers with Tidepool's, and sets the node's least severe level. */
export const loggerLayer = (format: LogFormat, level: string): Layer.Layer<never> =>
  Layer.merge(
    Logger.layer([format === "json" ? jsonLogger : prettyLogger]),
    Layer.succeed(References.MinimumLogLevel, levels[level] ?? "Info")
  )
