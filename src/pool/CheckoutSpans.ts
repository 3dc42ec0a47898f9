import { Context, Exit, Option, type Tracer } from "effect"
import type { TidepoolError } from "../errors/index.ts"
import type { PoolSettings } from "./TenantPool.ts"

const nanos = (ms: number): bigint => BigInt(ms) * 1_000_000n

/**
 * docs/architecture.md#telemetry: a `pool.checkout` span for each checkout that had to wait (none for the common, immediate
 * case: no span per transaction). Made from the pool's callback code, so it is opened and closed at
 * once with the wait's real start time; it is its own trace root, since a relay has no span.
 */
export const checkoutSpans =
  (tracer: Tracer.Tracer, settings: PoolSettings) =>
  (since: number, ended: number, queued: number, error: TidepoolError | undefined): void => {
    const span = tracer.span({
      name: "pool.checkout",
      parent: Option.none(),
      annotations: Context.empty(),
      links: [],
      startTime: nanos(since),
      kind: "internal",
      root: true,
      sampled: true
    })
    span.attribute("tidepool.tenant", settings.tenant)
    span.attribute("db.user", settings.user)
    span.attribute("db.name", settings.database)
    span.attribute("tidepool.mode", settings.mode)
    span.attribute("tidepool.wait_ms", ended - since)
    span.attribute("tidepool.queue_length", queued)
    span.attribute("tidepool.outcome", error === undefined ? "ok" : "fail")
    if (error !== undefined) span.attribute("error.code", error.code)
    span.end(nanos(ended), error === undefined ? Exit.void : Exit.fail(error))
  }
