import { Effect } from "effect"
import { HttpRouter } from "effect/http"
import pg from "pg"
import { afterAll, beforeAll, describe, expect, it, onTestFinished } from "vitest"
import { Metrics, metricsRouter } from "../../src/telemetry/index.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { parseExposition } from "../support/prometheus.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"

let db: PostgresServer
let tidepool: RunningTidepool

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: "app-secret" }] })
  tidepool = await startTidepool({
    tenants: ["acme", "beta"].map((id) => ({
      external_id: id,
      ...upstreamOf(db),
      users: [{ db_user: "app", db_password: "app-secret", pool_size: 1 }]
    }))
  })
})

afterAll(async () => {
  await tidepool?.stop()
  await db?.stop()
})

const render = (tenant?: string) =>
  tidepool.runtime.runPromise(Effect.map(Metrics, (m) => parseExposition(m.render(tenant))))

const connect = async (username: string, password = "app-secret") => {
  const client = new pg.Client({
    host: "127.0.0.1",
    port: tidepool.transactionPort,
    user: username,
    password,
    database: "postgres"
  })
  await client.connect()
  return client
}

const refused = (username: string, password: string) =>
  connect(username, password).then(
    (c) => c.end().then(() => "connected"),
    (e: pg.DatabaseError) => e.code
  )

const acme = { tenant: "acme", user: "app", mode: "transaction", db_name: "postgres" }

describe("/metrics", () => {
  it("counts transactions, checkout waits and errors by code under the right tenant labels", async () => {
    const a = await connect("app.acme")
    const b = await connect("app.acme")
    const other = await connect("app.beta")
    try {
      for (let i = 0; i < 3; i++) await a.query("SELECT 1")
      await other.query("SELECT 1")
      // b waits for the only server while a's transaction holds it.
      await a.query("BEGIN")
      let done = false
      const waiting = b.query("SELECT 2").then(() => {
        done = true
      })
      // Rendering is synchronous: yield to the event loop between looks, or b's query never goes out.
      while ((await render()).value("tidepool_clients_waiting", acme) !== 1) await new Promise(setImmediate)
      expect(done).toBe(false)
      await a.query("COMMIT")
      await waiting

      expect(await refused("app.acme", "wrong")).toBe("28P01")
      expect(await refused("app.nosuch", "x")).toBe("XX000")

      const m = await render()
      // 3 single statements + BEGIN…COMMIT + b's statement; beta's one.
      expect(m.value("tidepool_transactions_total", acme)).toBe(5)
      expect(m.value("tidepool_transactions_total", { ...acme, tenant: "beta" })).toBe(1)
      expect(m.value("tidepool_client_query_duration_seconds_count", acme)).toBe(5)
      const checkouts = m.value("tidepool_pool_checkouts_total", acme)!
      expect(checkouts).toBeGreaterThanOrEqual(5)
      expect(m.value("tidepool_pool_checkout_duration_seconds_count", acme)).toBe(checkouts)
      expect(m.value("tidepool_pool_checkout_duration_seconds_bucket", { ...acme, le: "+Inf" })).toBe(checkouts)
      expect(m.value("tidepool_connections_active", acme)).toBe(2)
      // Two clients of acme connected and still there: two connects, no lifetime yet.
      expect(m.value("tidepool_client_connection_duration_seconds_count", acme)).toBe(2)
      expect(m.value("tidepool_client_connection_lifetime_seconds_count", acme)).toBe(0)
      expect(m.value("tidepool_clients_waiting", acme)).toBe(0)
      expect(m.value("tidepool_pool_connections_idle", acme)).toBe(1)
      expect(m.value("tidepool_pool_size", acme)).toBe(1)

      expect(m.value("tidepool_client_errors_total", { tenant: "acme", code: "EWRONGPASSWORD" })).toBe(1)
      expect(
        m.value("tidepool_client_joins_fail_total", {
          tenant: "acme",
          method: "scram-sha-256",
          reason: "EWRONGPASSWORD"
        })
      ).toBe(1)
      expect(m.value("tidepool_client_joins_ok_total", { tenant: "acme", user: "app", method: "scram-sha-256" })).toBe(
        2
      )
      // Only the wrong password failed for acme: successful logins count no failure of any kind.
      expect(
        m.samples.filter((s) => s.name === "tidepool_client_joins_fail_total" && s.labels.tenant === "acme")
      ).toHaveLength(1)
      // An unknown tenant is counted without its name: clients cannot grow the label set.
      expect(m.value("tidepool_client_errors_total", { tenant: "", code: "ENOTFOUND" })).toBe(1)
      expect(m.samples.some((s) => s.labels.tenant === "nosuch")).toBe(false)

      expect(m.types.get("nodejs_heap_size_used_bytes")).toBe("gauge")
      expect(m.value("tidepool_open_sockets")).toBeGreaterThan(0)
      expect(m.value("tidepool_tenants_active")).toBe(2)

      const only = await render("acme")
      expect(only.samples.filter((s) => s.labels.tenant !== undefined).every((s) => s.labels.tenant === "acme")).toBe(
        true
      )
      expect(only.value("tidepool_transactions_total", acme)).toBe(5)
      expect(only.types.has("nodejs_heap_size_used_bytes")).toBe(false)
    } finally {
      await Promise.all([a.end(), b.end(), other.end()])
    }
  })

  it("serves GET /metrics and /metrics/:tenant behind the authorizer, 403 without it", async () => {
    const context = await tidepool.runtime.context()
    const router = metricsRouter((request) => Effect.succeed(request.headers.authorization === "Bearer good"))
    const { handler, dispose } = HttpRouter.toWebHandler(router, { disableLogger: true })
    onTestFinished(dispose)
    const get = (path: string, token?: string) =>
      handler(
        new Request(
          `http://tidepool${path}`,
          token === undefined ? {} : { headers: { authorization: `Bearer ${token}` } }
        ),
        context
      )

    const denied = await get("/metrics")
    expect(denied.status).toBe(403)
    expect(await denied.text()).toBe("")
    expect((await get("/metrics/acme", "bad")).status).toBe(403)

    const all = await get("/metrics", "good")
    expect(all.status).toBe(200)
    expect(all.headers.get("content-type")).toContain("text/plain; version=0.0.4")
    expect(parseExposition(await all.text()).types.get("tidepool_transactions_total")).toBe("counter")
    const one = parseExposition(await (await get("/metrics/beta", "good")).text())
    expect(one.samples.some((s) => s.labels.tenant === "acme")).toBe(false)
    expect(one.value("tidepool_connections_active", { ...acme, tenant: "beta" })).toBeDefined()
  })
})
