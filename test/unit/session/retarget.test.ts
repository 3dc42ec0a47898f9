import { describe, expect, it } from "@effect/vitest"
import { Redacted, Schema } from "effect"
import { Tenant } from "../../../src/config/index.ts"
import type { PoolSettings } from "../../../src/pool/index.ts"
import { retarget } from "../../../src/session/index.ts"

const tenant = (fields: Record<string, unknown> = {}, users?: Array<Record<string, unknown>>) =>
  Schema.decodeUnknownSync(Tenant)({
    external_id: "acme",
    db_host: "10.0.0.1",
    db_port: 5432,
    db_database: "app",
    users: users ?? [{ db_user: "app", db_password: "secret", pool_size: 5 }],
    ...fields
  })

const settings = (overrides: Partial<PoolSettings> = {}): PoolSettings => ({
  key: "acme\u0000app\u0000transaction\u0000app",
  tenant: "acme",
  user: "app",
  database: "app",
  mode: "transaction",
  size: 5,
  maxClients: 1000,
  checkoutTimeoutMs: 60_000,
  serverIdleTimeoutMs: 0,
  minSize: 0,
  serverLifetimeMs: 0,
  connectBackoffMs: 2500,
  target: {
    host: "10.0.0.1",
    port: 5432,
    database: "app",
    user: "app",
    password: Redacted.make("secret"),
    connectTimeoutMs: 5000
  },
  ...overrides
})

describe("retarget", () => {
  it("leaves a pool alone when nothing it uses changed", () => {
    const current = settings()
    expect(retarget(current, tenant({ default_max_clients: 1000, client_idle_timeout: 5 }))).toBe(current)
  })

  it("gives new sizes, host, port and credentials", () => {
    const next = retarget(
      settings(),
      tenant({ db_host: "10.0.0.2", db_port: 6000 }, [{ db_user: "app", db_password: "rotated", pool_size: 9 }])
    )
    expect(next).toMatchObject({ size: 9, target: { host: "10.0.0.2", port: 6000, user: "app" } })
    expect(Redacted.value(next!.target.password!)).toBe("rotated")
  })

  it("stops the pool of a user that is gone", () => {
    expect(retarget(settings(), tenant({}, [{ db_user: "other", db_password: "x" }]))).toBeUndefined()
  })

  it("keeps an auth_query pool's own credentials, taking limits from the manager", () => {
    const current = settings({ key: "acme\u0000alice\u0000transaction\u0000app", user: "alice" })
    const next = retarget(
      { ...current, target: { ...current.target, user: "alice", password: undefined } },
      tenant({ require_user: false, auth_query: "select 1" }, [
        { db_user: "manager", db_password: "m", is_manager: true, pool_size: 7 }
      ])
    )
    expect(next).toMatchObject({ size: 7, target: { user: "alice", password: undefined } })
  })
})
