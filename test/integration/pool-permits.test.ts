import { Effect, Exit, Scope } from "effect"
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest"
import type { PoolPermits, TenantPool } from "../../src/pool/index.ts"
import type { ServerConnection } from "../../src/upstream/index.ts"
import { appTarget, standalonePool } from "../support/pool.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"

// A pool's side of the permit ledger (docs/scale-out.md#fairness), driven directly against a real
// PostgreSQL: what the pool tells the ledger, and which servers it closes when pressed. The ledger
// is the test (it grants and directs by hand), so each step is exact.

const PASSWORD = "permits-secret"

let db: PostgresServer
let scope: Scope.Closeable
let pool: TenantPool
/** What the pool told the ledger, in order: `want n` and `release n`. */
let told: Array<string>

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: PASSWORD }] })
})

afterAll(async () => {
  if (scope !== undefined) await Effect.runPromise(Scope.close(scope, Exit.void))
  await db?.stop()
})

beforeEach(async () => {
  if (scope !== undefined) await Effect.runPromise(Scope.close(scope, Exit.void))
  scope = Effect.runSync(Scope.make())
  pool = await standalonePool(appTarget(db.host, db.port, PASSWORD), scope, {
    size: 10,
    maxClients: 100,
    checkoutTimeoutMs: 10_000
  })
  told = []
  const gate: PoolPermits = {
    want: (_size, n) => told.push(`want ${n}`),
    release: (n) => told.push(`release ${n}`),
    opened: () => undefined,
    closed: () => undefined
  }
  pool.gate = gate
})

/** Bounds every wait: a test fails here instead of hanging. */
const within = async (what: string, check: () => boolean, ms = 10_000): Promise<void> => {
  const deadline = Date.now() + ms
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 5))
  }
}

/** A checkout, as a promise of its server. */
const checkout = () =>
  new Promise<ServerConnection>((resolve, reject) =>
    pool.checkout((error, server) => (error === undefined ? resolve(server!) : reject(error)))
  )

/** Two servers open for two permits, both idle, the ledger having heard `want` for them. */
const twoServers = async () => {
  const a = checkout()
  const b = checkout()
  expect(told).toEqual(["want 1", "want 2"])
  pool.grant(2)
  const servers = await Promise.all([a, b])
  for (const s of servers) pool.release(s)
  told.length = 0
  return servers
}

describe("a pool's demand, judged over the sweep's interval", () => {
  it("says `want 0` only after a sweep interval in which no checkout queued", async () => {
    const [s1, s2] = await twoServers()
    // Three clients on two permits: the third queues, the pool asks for one more.
    const c1 = await checkout()
    const c2 = await checkout()
    const queued = checkout()
    expect(told).toEqual(["want 1"])
    pool.release(c1)
    pool.release(await queued)
    pool.release(c2)
    expect(pool.stats.waiting).toBe(0)
    // A sweep now finds nobody waiting, but a client queued within its interval: the pool's demand
    // is not over, and "want 0" would have it pressed and its servers closed as its clients came back.
    pool.maintain(Date.now())
    expect(told).toEqual(["want 1"])
    // A whole interval without a queued checkout: now it wants nothing.
    pool.maintain(Date.now())
    expect(told).toEqual(["want 1", "want 0"])
    expect(pool.counters.serverConnects).toBe(2)
    expect([s1.closed, s2.closed]).toEqual([false, false])
  })
})

describe("a permit granted when nobody waits at that instant", () => {
  it("is kept for the next checkout that queues while clients queued within the sweep interval", async () => {
    await twoServers()
    const c1 = await checkout()
    const c2 = await checkout()
    const queued = checkout()
    expect(told).toEqual(["want 1"])
    // A server comes back first and serves the waiting client; then the ledger's grant lands, with
    // nobody waiting at that instant.
    pool.release(c1)
    const c3 = await queued
    pool.grant(1)
    expect(told).toEqual(["want 1"])
    expect(pool.permits).toBe(3)
    // The next checkout that queues opens a server at once with it: no round trip to the ledger.
    const c4 = checkout()
    const opened = await c4
    expect(told).toEqual(["want 1"])
    expect(pool.counters.serverConnects).toBe(3)
    for (const s of [c2, c3, opened]) pool.release(s)
    // Its three permits back three servers: nothing goes back at the sweeps (the grant met its want).
    pool.maintain(Date.now())
    pool.maintain(Date.now())
    expect(told).toEqual(["want 1"])
    expect(pool.permits).toBe(3)
  })

  it("goes back at the sweep after an interval in which nobody queued", async () => {
    await twoServers()
    const c1 = await checkout()
    const c2 = await checkout()
    const queued = checkout()
    pool.release(c1)
    pool.release(await queued)
    pool.release(c2)
    pool.grant(1)
    expect(told).toEqual(["want 1"])
    pool.maintain(Date.now())
    expect(told).toEqual(["want 1"])
    pool.maintain(Date.now())
    expect(told).toEqual(["want 1", "release 1"])
    expect(pool.permits).toBe(2)
  })
})

describe("a pressed pool", () => {
  it("keeps servers its clients use and closes those that go unused", async () => {
    await twoServers()
    const a = await checkout()
    const b = await checkout()
    pool.release(a)
    // Pressed (another process waits, this one wants nothing): `a` just came back from a
    // transaction; closing it is what made a pool reconnect at once when its clients came back.
    pool.direct(10, true)
    expect(a.closed).toBe(false)
    // Nor is a server coming back while another is idle closed: it was just used.
    pool.release(b)
    expect(b.closed).toBe(false)
    expect(pool.stats.idle).toBe(2)
    // Unused, they go (PRESSED_IDLE_MS), and their permits go back to the ledger once closed.
    await within("the pressed pool's unused servers to close", () => a.closed && b.closed)
    await within("their permits to go back", () => told.filter((t) => t.startsWith("release")).length > 0)
    await within("every permit back", () => pool.permits === 0)
    expect(pool.counters.serverConnects).toBe(2)
  })

  it("closes idle servers unused for a while at once", async () => {
    const [s1, s2] = await twoServers()
    // Both idle since `twoServers`: made to look unused for a second.
    s1.lastUsedAt -= 1_000
    s2.lastUsedAt -= 1_000
    pool.direct(10, true)
    expect([s1.closed, s2.closed]).toEqual([true, true])
  })
})
