import { Tracer } from "effect"

const TRACEPARENT = /(?:^|[^0-9a-f])([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?![0-9a-f])/

/**
 * A W3C `traceparent` a client passed to join its own trace: in `options` (`-c traceparent=…`) or
 * anywhere in `application_name` (where ORMs let users put it). Version `ff` and all-zero ids are
 * invalid per the spec and ignored.
 */
export const clientTraceParent = (startup: Readonly<Record<string, string>>): Tracer.ExternalSpan | undefined => {
  const fromOptions = /(?:^|\s)(?:-c\s*|--)?traceparent=(\S+)/i.exec(startup.options ?? "")?.[1]
  for (const text of [fromOptions, startup.application_name]) {
    const m = text === undefined ? null : TRACEPARENT.exec(text.toLowerCase())
    if (m === null || m[1] === "ff" || /^0+$/.test(m[2]!) || /^0+$/.test(m[3]!)) continue
    return Tracer.externalSpan({ traceId: m[2]!, spanId: m[3]!, sampled: (Number.parseInt(m[4]!, 16) & 1) === 1 })
  }
  return undefined
}
