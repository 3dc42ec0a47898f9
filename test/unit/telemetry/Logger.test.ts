import { Effect } from "effect"
import { afterEach, describe, expect, it, vi } from "vitest"
import { loggerLayer, tenantLogLevel } from "../../../src/telemetry/index.ts"

const capture = async (effect: Effect.Effect<void>) => {
  const lines: Array<string> = []
  vi.spyOn(process.stdout, "write").mockImplementation((chunk) => {
    lines.push(String(chunk))
    return true
  })
  await Effect.runPromise(effect.pipe(Effect.provide(loggerLayer("json", "info"))))
  vi.restoreAllMocks()
  return lines.map((l) => JSON.parse(l) as Record<string, unknown>)
}

afterEach(() => {
  vi.restoreAllMocks()
})

describe("json logger", () => {
  it("carries trace_id and span_id inside a span, and neither outside", async () => {
    const [inside, outside] = await capture(
      Effect.andThen(
        Effect.logInfo("in").pipe(
          Effect.withSpan("client.session"),
          Effect.annotateLogs({ tenant: "acme", code: "EWRONGPASSWORD" })
        ),
        Effect.logInfo("out")
      )
    )
    expect(inside).toMatchObject({ msg: "in", tenant: "acme", code: "EWRONGPASSWORD" })
    expect(inside!.trace_id).toMatch(/^[0-9a-f]{32}$/)
    expect(inside!.span_id).toMatch(/^[0-9a-f]{16}$/)
    expect(outside).not.toHaveProperty("trace_id")
  })
})

describe("tenantLogLevel", () => {
  it("reads feature_flags.log_level as TIDEPOOL_LOG_LEVEL is read", () => {
    expect(tenantLogLevel({ log_level: "debug" })).toBe("Debug")
    expect(tenantLogLevel({ log_level: "WARN" })).toBe("Warn")
    expect(tenantLogLevel({ log_level: "err" })).toBe("Error")
    expect(tenantLogLevel({ log_level: "off" })).toBe("None")
    expect(tenantLogLevel({ log_level: "loud" })).toBeUndefined()
    expect(tenantLogLevel({})).toBeUndefined()
  })
})
