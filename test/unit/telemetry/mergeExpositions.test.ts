import { describe, expect, it } from "vitest"
import { mergeExpositions } from "../../../src/telemetry/Metrics.ts"
import { parseExposition } from "../../support/prometheus.ts"

/** Worker mode's /metrics (docs/observability.md#worker-mode): every worker's exposition as one valid one. */
const worker = (n: number, active: number) =>
  [
    "# HELP tidepool_connections_active Clients attached to the pool.",
    "# TYPE tidepool_connections_active gauge",
    `tidepool_connections_active{tenant="acme",user="app",mode="transaction",db_name="app"} ${active}`,
    "# HELP tidepool_pool_checkout_duration_seconds Time a checkout waited.",
    "# TYPE tidepool_pool_checkout_duration_seconds histogram",
    `tidepool_pool_checkout_duration_seconds_bucket{tenant="acme",le="+Inf"} ${n}`,
    `tidepool_pool_checkout_duration_seconds_sum{tenant="acme"} 0`,
    `tidepool_pool_checkout_duration_seconds_count{tenant="acme"} ${n}`,
    "# HELP process_resident_memory_bytes Resident memory size in bytes.",
    "# TYPE process_resident_memory_bytes gauge",
    `process_resident_memory_bytes ${n * 1000}`,
    ""
  ].join("\n")

describe("mergeExpositions", () => {
  it("labels every sample with its worker, declares each family once and keeps its samples together", () => {
    const text = mergeExpositions({
      parts: [
        { worker: 1, pid: 11, data: worker(1, 3) },
        { worker: 2, pid: 12, data: worker(2, 5) },
        { worker: 3, pid: 13, data: undefined }
      ],
      workers: [1, 2, 3].map((w) => ({
        worker: w,
        pid: 10 + w,
        ready: w !== 3,
        startedAt: 0,
        restarts: w === 3 ? 1 : 0,
        hangs: 0,
        beatAgeMs: 100
      }))
    })
    // The strict parser throws on a family declared twice, a sample outside its family or a repeated series.
    const m = parseExposition(text)
    const acme = { tenant: "acme", user: "app", mode: "transaction", db_name: "app" }
    expect(m.value("tidepool_connections_active", { worker: "1", ...acme })).toBe(3)
    expect(m.value("tidepool_connections_active", { worker: "2", ...acme })).toBe(5)
    expect(m.value("process_resident_memory_bytes", { worker: "2" })).toBe(2000)
    expect(m.value("tidepool_pool_checkout_duration_seconds_count", { worker: "2", tenant: "acme" })).toBe(2)
    expect(m.value("tidepool_worker_up", { worker: "3" })).toBe(0)
    expect(m.value("tidepool_worker_up", { worker: "1" })).toBe(1)
    expect(m.value("tidepool_worker_restarts_total", { worker: "3" })).toBe(1)
  })
})
