import pg from "pg"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { EventCounters } from "../../src/telemetry/index.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"

/*
 * Refused logins are made cheap (docs/login-path.md, "Fifth round"): a refusal's error is made once
 * per distinct error and shared, and its connection is closed without a lingering close. What a
 * refusal tells the client, the operator and the breaker must not change with it: each refusal,
 * the same one again included, gets its own coded error, warning line and metric, and a wrong
 * password still counts toward the address's block.
 */

let db: PostgresServer
let tidepool: RunningTidepool

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: "app-secret" }] })
  tidepool = await startTidepool({
    tenants: [
      { external_id: "acme", ...upstreamOf(db), users: [{ db_user: "app", db_password: "app-secret" }] },
      { external_id: "guarded", ...upstreamOf(db), users: [{ db_user: "app", db_password: "app-secret" }] }
    ],
    captureLogs: true
  })
})

afterAll(async () => {
  await tidepool?.stop()
  await db?.stop()
})

/** The refusal's code, "ok" for a login that got in. */
const attempt = async (user: string, password: string) => {
  const client = new pg.Client({ connectionString: tidepool.url({ user, password }) })
  client.on("error", () => undefined)
  try {
    await client.connect()
    await client.end()
    return "ok"
  } catch (e) {
    const message = (e as Error).message
    return message.match(/^\((E[A-Z]+)\)/)?.[1] ?? (e as pg.DatabaseError).code ?? message
  }
}

const warnings = (code: string) =>
  tidepool.logs.filter((l) => l.level === "WARN" && l.code === code).map((l) => l.message)

describe("refused logins", () => {
  it("each keep their coded error, warning line and metric, the same refusal again included", async () => {
    const outcomes: Array<string> = []
    for (const [user, password] of [
      ["app.acme", "wrong"],
      ["app.acme", "wrong"],
      ["other.acme", "wrong"],
      ["app.nowhere", "app-secret"],
      ["app.nowhere", "app-secret"],
      ["app.elsewhere", "app-secret"],
      ["ghost.acme", "app-secret"],
      ["ghost.acme", "app-secret"]
    ] as const)
      outcomes.push(await attempt(user, password))
    // pg reports EWRONGPASSWORD by its SQLSTATE (its message has no code prefix).
    expect(outcomes).toEqual([
      "28P01",
      "28P01",
      "ENOTFOUND",
      "ENOTFOUND",
      "ENOTFOUND",
      "ENOTFOUND",
      "ENOTFOUND",
      "ENOTFOUND"
    ])
    expect(warnings("EWRONGPASSWORD")).toEqual([
      'password authentication failed for user "app"',
      'password authentication failed for user "app"'
    ])
    expect(warnings("ENOTFOUND")).toEqual([
      "tenant/user other.acme not found",
      "tenant/user app.nowhere not found",
      "tenant/user app.nowhere not found",
      "tenant/user app.elsewhere not found",
      "tenant/user ghost.acme not found",
      "tenant/user ghost.acme not found"
    ])
    const events = await tidepool.runtime.runPromise(EventCounters)
    expect(events.joinsFail.get("acme\u0000scram-sha-256\u0000EWRONGPASSWORD")).toBe(2)
    expect(events.errors.get("acme\u0000EWRONGPASSWORD")).toBe(2)
    // Unknown tenants count under no tenant label, so made-up names cannot grow the label set.
    expect(events.joinsFail.get("\u0000none\u0000ENOTFOUND")).toBe(3)
    expect(events.joinsFail.get("acme\u0000none\u0000ENOTFOUND")).toBe(3)
  })

  it("count a wrong password toward the address's block, which then refuses the right one too", async () => {
    const outcomes: Array<string> = []
    for (let i = 0; i < 10; i++) outcomes.push(await attempt("app.guarded", "wrong"))
    expect(outcomes).toEqual(Array.from({ length: 10 }, () => "28P01"))
    expect(await attempt("app.guarded", "app-secret")).toBe("ECIRCUITBREAKER")
    expect(await attempt("app.guarded", "wrong")).toBe("ECIRCUITBREAKER")
    expect(warnings("ECIRCUITBREAKER")).toEqual(["127.0.0.1 blocked for 120 s after 10 failed logins"])
    // Another tenant from the same address is judged on its own.
    expect(await attempt("app.acme", "app-secret")).toBe("ok")
  })
})
