import { Effect, Fiber, Layer } from "effect"
import { describe, expect, it } from "vitest"
import { AppConfig } from "../../../src/config/index.ts"
import { PoolRegistry, type PoolSettings, type TenantPool } from "../../../src/pool/index.ts"
import { SeatGate } from "../../../src/pool/SeatGate.ts"

/**
 * Worker mode's client seats as PoolRegistry.get takes them (docs/scale-out.md#max_clients-across-workers),
 * with the supervisor played by the test: it answers a pool's `want` when the test says so. No
 * server is ever opened (no warm minimum, no checkout).
 */
const settings: PoolSettings = {
  key: "acme\u0000app\u0000transaction\u0000postgres",
  tenant: "acme",
  user: "app",
  database: "postgres",
  mode: "transaction",
  size: 1,
  maxClients: 4,
  checkoutTimeoutMs: 1000,
  serverIdleTimeoutMs: 0,
  minSize: 0,
  serverLifetimeMs: 0,
  connectBackoffMs: 2500,
  target: { host: "127.0.0.1", port: 1, database: "postgres", user: "app", password: undefined, connectTimeoutMs: 1000 }
}

const supervisor = () => {
  const asked: Array<{ readonly pool: TenantPool; readonly need: number }> = []
  const layer = Layer.succeed(SeatGate, {
    attach: (pool) => ({
      want: (_limit, need) => {
        asked.push({ pool, need })
      },
      release: () => {}
    })
  })
  return { asked, layer }
}

/** Until `condition` holds, yielding to the pool's fibers; the deadline fails the test. */
const until = (what: string, condition: () => boolean) =>
  Effect.gen(function* () {
    const deadline = Date.now() + 5000
    while (!condition()) {
      if (Date.now() > deadline) return yield* Effect.die(new Error(`timed out waiting for ${what}`))
      yield* Effect.sleep(5)
    }
  })

describe("PoolRegistry.get in worker mode", () => {
  it("does not hand a login a pool that closed while it waited for its seat", async () => {
    const { asked, layer } = supervisor()
    const program = Effect.gen(function* () {
      const registry = yield* PoolRegistry
      const login = yield* Effect.forkChild(registry.get(settings))
      yield* until("the first pool to ask for a seat", () => asked.length === 1)
      const first = asked[0]!.pool
      // The pool goes (its tenant's pools stopped, or the sweep) while the login waits for the supervisor.
      yield* registry.stopTenant("acme")
      expect(first.isClosed).toBe(true)
      // The login asks again, of the pool that serves the key now; the supervisor grants a seat.
      yield* until("a new pool to ask for a seat", () => asked.length === 2)
      asked[1]!.pool.seatsGranted(asked[1]!.need, 0)
      const pool = yield* Fiber.join(login)
      expect(pool.isClosed).toBe(false)
      expect(pool.admit()).toBeUndefined()
      expect(pool.stats.clients).toBe(1)
    })
    await Effect.runPromise(
      program.pipe(
        Effect.provide(PoolRegistry.layer.pipe(Layer.provide(layer), Layer.provide(AppConfig.layerFrom()))),
        Effect.scoped
      )
    )
  })

  it("a login whose seat never comes is refused at its checkout deadline, not kept waiting", async () => {
    const { asked, layer } = supervisor()
    const program = Effect.gen(function* () {
      const registry = yield* PoolRegistry
      // The supervisor (or the store) never answers.
      const login = yield* Effect.forkChild(Effect.result(registry.get({ ...settings, checkoutTimeoutMs: 50 })))
      yield* until("the pool to ask for a seat", () => asked.length === 1)
      const outcome = yield* Fiber.join(login)
      expect(outcome._tag).toBe("Failure")
      expect((outcome as { failure?: { code?: string } }).failure?.code).toBe("EMAXCONN")
      // Nothing is left waiting: a late answer serves nobody and the seat is given back as unused.
      expect(asked[0]!.pool.stats.clients).toBe(0)
    })
    await Effect.runPromise(
      program.pipe(
        Effect.provide(PoolRegistry.layer.pipe(Layer.provide(layer), Layer.provide(AppConfig.layerFrom()))),
        Effect.scoped
      )
    )
  })
})
