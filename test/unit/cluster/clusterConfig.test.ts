import { Result } from "effect"
import { describe, expect, it } from "vitest"
import { advertisedHost } from "../../../src/cluster/index.ts"
import { parseSettings } from "../../../src/config/index.ts"

/** TIDEPOOL_CLUSTER's rules (docs/configuration.md): refused where it would silently be one host's pooler. */
describe("cluster settings", () => {
  const problems = (raw: Parameters<typeof parseSettings>[0]) => {
    const parsed = parseSettings(raw)
    return Result.isFailure(parsed) ? parsed.failure.map((p) => p.path) : []
  }

  it("needs a PostgreSQL store, a fixed transaction port, and at most 63 workers per host", () => {
    expect(problems({ cluster: "on", transactionPort: "0" })).toEqual(["TIDEPOOL_CLUSTER", "PROXY_PORT_TRANSACTION"])
    expect(problems({ cluster: "on", databaseUrl: "postgres://h/db", workers: "2" })).toEqual([])
    expect(problems({ cluster: "on", databaseUrl: "postgres://h/db", workers: "64" })).toEqual(["TIDEPOOL_WORKERS"])
    expect(problems({ workers: "64" })).toEqual([])
    expect(problems({ cluster: "on", databaseUrl: "postgres://h/db" })).toEqual([])
    expect(problems({ cluster: "maybe" })).toEqual(["TIDEPOOL_CLUSTER"])
    const parsed = parseSettings({ cluster: "off", leaseMs: "2s" })
    expect(Result.isSuccess(parsed) && parsed.success.leaseMs).toBe(2000)
    expect(Result.isSuccess(parsed) && parsed.success.cluster).toBe(false)
  })

  it("with workers, caps each worker's client connections to what its process ids can number", () => {
    const withWorkers = { cluster: "on", databaseUrl: "postgres://h/db", workers: "4" } as const
    const parsed = parseSettings(withWorkers)
    expect(Result.isSuccess(parsed) && parsed.success.maxClientConnections).toBeLessThanOrEqual(12_288)
    expect(problems({ ...withWorkers, maxClientConnections: "12288" })).toEqual([])
    expect(problems({ ...withWorkers, maxClientConnections: "20000" })).toEqual(["TIDEPOOL_MAX_CLIENT_CONNECTIONS"])
    expect(problems({ ...withWorkers, workers: "1", maxClientConnections: "20000" })).toEqual([])
  })

  it("advertises the listen address, or the host name for a wildcard", () => {
    expect(advertisedHost("", "10.0.0.5")).toBe("10.0.0.5")
    expect(advertisedHost("pooler-3.internal", "0.0.0.0")).toBe("pooler-3.internal")
    expect(advertisedHost("", "0.0.0.0")).not.toBe("0.0.0.0")
  })
})
