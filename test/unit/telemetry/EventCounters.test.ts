import { Effect, Layer } from "effect"
import { describe, expect, it } from "vitest"
import type { Tenant } from "../../../src/config/index.ts"
import { EventCounters } from "../../../src/telemetry/index.ts"
import { TenantRegistry } from "../../../src/tenants/index.ts"

describe("EventCounters", () => {
  it("labels only known tenants and drops a deleted tenant's series", async () => {
    const tenants = new Map<string, Tenant>([["acme", { external_id: "acme" } as Tenant]])
    const registry = Layer.succeed(TenantRegistry, {
      get: (id) => tenants.get(id),
      bySni: () => undefined,
      all: () => [...tenants.values()]
    })
    const events = await Effect.runPromise(
      EventCounters.pipe(Effect.provide(EventCounters.layer.pipe(Layer.provide(registry))))
    )
    events.error("acme", "EWRONGPASSWORD")
    events.error("acme", "EWRONGPASSWORD")
    events.error("made-up", "ENOTFOUND")
    events.loginSucceeded("acme", "app", "scram-sha-256")
    events.loginFailed("made-up", "none", "ENOTFOUND")
    expect(Object.fromEntries(events.errors)).toEqual({
      "acme\u0000EWRONGPASSWORD": 2,
      "\u0000ENOTFOUND": 1
    })
    events.prune()
    expect(events.errors.size).toBe(2)

    tenants.delete("acme")
    events.prune()
    expect(Object.fromEntries(events.errors)).toEqual({ "\u0000ENOTFOUND": 1 })
    expect(events.joinsOk.size).toBe(0)
    expect(Object.fromEntries(events.joinsFail)).toEqual({ "\u0000none\u0000ENOTFOUND": 1 })
  })
})
