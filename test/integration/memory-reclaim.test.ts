import { Effect } from "effect"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { Metrics } from "../../src/telemetry/index.ts"
import { parseExposition } from "../support/prometheus.ts"
import { type RunningTidepool, startTidepool } from "../support/tidepool.ts"

/**
 * `TIDEPOOL_MEMORY_RECLAIM` in a serving node (docs/operations.md#memory-after-a-burst): the node's
 * layer starts it from AppConfig, logs its steps, and /metrics counts them.
 */
describe("memory reclaim", () => {
  let tidepool: RunningTidepool

  beforeAll(async () => {
    // 1 byte: any growth of the committed heap since start makes a quiet process reclaim.
    tidepool = await startTidepool({ tenants: [], config: { memoryReclaimBytes: 1 }, captureLogs: true })
  })

  afterAll(async () => {
    await tidepool?.stop()
  })

  it("runs in a quiet node: its step is logged and counted in /metrics", async () => {
    // Some garbage, so the committed heap grows past the start's.
    let keep: Array<Buffer | string> = []
    for (let i = 0; i < 200_000; i++) keep.push(`garbage ${i}`)
    keep = []
    const deadline = Date.now() + 20_000
    const steps = async () => {
      const m = parseExposition(await tidepool.runtime.runPromise(Effect.map(Metrics, (x) => x.render())))
      return ["minor", "major"].reduce(
        (s, kind) => s + (m.value("tidepool_memory_reclaim_steps_total", { kind }) ?? 0),
        0
      )
    }
    while ((await steps()) === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 200))
    expect(keep).toEqual([])
    expect(await steps()).toBeGreaterThan(0)
    expect(tidepool.logs.some((l) => /^memory reclaim: (minor|major) collection while quiet/.test(l.message))).toBe(
      true
    )
  }, 30_000)
})
