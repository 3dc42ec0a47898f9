import { Effect, Exit, Scope } from "effect"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import type { TenantPool } from "../../src/pool/index.ts"
import type { ServerConnection } from "../../src/upstream/index.ts"
import { appTarget, standalonePool } from "../support/pool.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"

// A server handed from waiter to waiter (TenantPool's `lend`), against a real PostgreSQL. A waiter
// may give its server back inside its callback — a login that only needed to learn the pool's
// parameters does — which lends it to the next waiter. Those hand-offs once nested, each callback
// inside the previous one's: a long enough queue overflowed the stack, and every waiter past that
// point was never called back while the server stayed lent out.

const PASSWORD = "handoff-secret"
const WAITERS = 20_000

let db: PostgresServer
let scope: Scope.Closeable
let pool: TenantPool

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: PASSWORD }] })
  scope = Effect.runSync(Scope.make())
  pool = await standalonePool(appTarget(db.host, db.port, PASSWORD), scope, {
    maxClients: WAITERS,
    checkoutTimeoutMs: 30_000
  })
})

afterAll(async () => {
  if (scope !== undefined) await Effect.runPromise(Scope.close(scope, Exit.void))
  await db?.stop()
})

describe("a server handed from waiter to waiter", () => {
  it(`reaches each of ${WAITERS} waiters that give it back in their callback, in order`, async () => {
    // Paused, the pool opens nothing: every checkout queues, then one server serves them all.
    pool.pause()
    const served: Array<number> = []
    const errors: Array<string> = []
    const servers = new Set<ServerConnection>()
    for (let i = 0; i < WAITERS; i++) {
      pool.checkout((error, server) => {
        if (error !== undefined) {
          errors.push(error.code)
          return
        }
        served.push(i)
        servers.add(server!)
        pool.release(server!)
      })
    }
    expect(pool.stats.waiting).toBe(WAITERS)
    let raised: unknown
    try {
      pool.resume()
    } catch (cause) {
      raised = cause
    }
    // The server opens; every hand-off then happens within the tick it is released in.
    const deadline = Date.now() + 20_000
    while (served.length + errors.length < WAITERS && Date.now() < deadline && raised === undefined) {
      await new Promise((resolve) => setTimeout(resolve, 10))
    }
    expect(raised).toBeUndefined()
    expect(errors).toEqual([])
    expect(served.length).toBe(WAITERS)
    expect(served.every((n, i) => n === i)).toBe(true)
    expect(servers.size).toBe(1)
    expect(pool.stats).toMatchObject({ busy: 0, idle: 1, waiting: 0 })
  })

  it("goes back to the pool when the next waiter was cancelled after its turn came, before its delivery", async () => {
    // The first waiter gives the server back, which makes it the second's turn; then, still inside
    // the first callback, the second is cancelled (its client left, its login was interrupted):
    // its callback must not run (nobody would keep the server), and the server must not stay lent.
    pool.pause()
    const heard: Array<string> = []
    let second: ReturnType<TenantPool["checkout"]>
    pool.checkout((error, server) => {
      heard.push(error?.code ?? "first")
      pool.release(server!)
      pool.cancel(second!)
    })
    second = pool.checkout((error) => {
      heard.push(error?.code ?? "second")
    })
    pool.resume()
    const deadline = Date.now() + 20_000
    while (heard.length === 0 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 10))
    expect(heard).toEqual(["first"])
    expect(pool.stats).toMatchObject({ busy: 0, idle: 1, waiting: 0 })
  })
})
