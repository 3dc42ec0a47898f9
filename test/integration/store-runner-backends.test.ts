import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { type BackendRef, type PermitHolder, StoreRunner } from "../../src/cluster/StoreRunner.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"

/**
 * The store's record of a runner's open servers (`tidepool_backends`), which a reclaimer uses to
 * cancel a dead runner's statements before its permits go elsewhere (docs/scale-out.md#lease-timing).
 * With several workers per host, their opened/closed reports reach the runner over separate channels:
 * a new server that got a closed one's pid can be reported before the old one's close.
 */
describe("StoreRunner: recorded backends", () => {
  let db: PostgresServer
  let runner: StoreRunner

  beforeAll(async () => {
    db = await startPostgres()
    runner = await StoreRunner.start({
      url: db.url(),
      leaseMs: 3_000,
      address: "127.0.0.1:1",
      timeoutMs: 2_000,
      log: () => undefined
    })
  }, 60_000)

  afterAll(async () => {
    await runner?.stop(1_000)
    await db?.stop()
  })

  const recorded = async (deadlineMs: number, done: (rows: ReadonlyArray<Record<string, unknown>>) => boolean) => {
    const until = Date.now() + deadlineMs
    for (;;) {
      const rows = await db.query("SELECT pid, secret FROM tidepool_backends ORDER BY pid")
      if (done(rows)) return rows
      if (Date.now() > until) return rows
      await new Promise((r) => setImmediate(r))
    }
  }

  it("an old server's close reported after a new server with its pid opened keeps the new one", async () => {
    const holder: PermitHolder = {
      settings: { key: "acme\u0000app\u0000transaction\u0000postgres", size: 2 },
      isClosed: false,
      grant: () => undefined,
      direct: () => undefined
    }
    const line = runner.attachHolder(holder)
    const old: BackendRef = { host: "127.0.0.1", port: 5432, pid: 4242, secret: "0000000a" }
    const reused: BackendRef = { ...old, secret: "0000000b" }
    line.opened(old)
    await recorded(10_000, (rows) => rows.length === 1)
    // Worker B's report of the new server arrives before worker A's report of the old one's close.
    line.opened(reused)
    line.closed(old)
    // A marker after both: once it is written, so are they (one queue, in order).
    line.opened({ ...old, pid: 4243, secret: "0000000c" })
    const rows = await recorded(10_000, (r) => r.length === 2)
    expect(rows).toEqual([
      { pid: 4242, secret: "0000000b" },
      { pid: 4243, secret: "0000000c" }
    ])
  }, 30_000)

  it("a backend reported twice in one batch (a re-registration queues every open backend again) is written once", async () => {
    const holder: PermitHolder = {
      settings: { key: "acme\u0000app\u0000transaction\u0000twice", size: 2 },
      isClosed: false,
      grant: () => undefined,
      direct: () => undefined
    }
    const line = runner.attachHolder(holder)
    const first: BackendRef = { host: "127.0.0.1", port: 5432, pid: 5151, secret: "0000000d" }
    line.opened(first)
    line.opened({ ...first, secret: "0000000e" })
    line.opened({ ...first, pid: 5152, secret: "0000000f" })
    const rows = await recorded(10_000, (r) => r.some((row) => row.pid === 5152))
    expect(rows.filter((row) => Number(row.pid) >= 5151)).toEqual([
      { pid: 5151, secret: "0000000e" },
      { pid: 5152, secret: "0000000f" }
    ])
  }, 30_000)
})
