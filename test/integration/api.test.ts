import { createHash } from "node:crypto"
import { Effect, Redacted } from "effect"
import { generateKeyPair, SignJWT } from "jose"
import pg from "pg"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { apiRouter, type openApiDocument, openApiPath, routes } from "../../src/api/index.ts"
import { CircuitBreaker } from "../../src/auth/index.ts"
import { callApi, mintToken } from "../support/api.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"
import { hasTool, run } from "../support/tools.ts"

const hasPsql = await hasTool("psql")
if (!hasPsql) console.log("api.test: `psql` is not on PATH, so the psql check is skipped")

const METRICS_SECRET = "test-metrics-jwt-secret-0123456789abcdef"

let db: PostgresServer
let tidepool: RunningTidepool
let revoked: string

const claims = { role: "service_role" }

const tenantBody = (overrides: Record<string, unknown> = {}, user: Record<string, unknown> = {}) => ({
  tenant: {
    ...upstreamOf(db),
    default_pool_size: 2,
    users: [{ db_user: "app", db_password: "app-secret", pool_checkout_timeout: 3000, ...user }],
    ...overrides
  }
})

const connect = async (tenant: string, mode: "session" | "transaction" = "transaction", user = "app") => {
  const client = new pg.Client({
    connectionString: tidepool.url({ user: `${user}.${tenant}`, password: "app-secret", mode })
  })
  const errors: Array<Error> = []
  client.on("error", (e) => errors.push(e))
  await client.connect()
  return Object.assign(client, { errors })
}

const connectFails = async (tenant: string) => {
  const client = new pg.Client({ connectionString: tidepool.url({ user: `app.${tenant}`, password: "app-secret" }) })
  client.on("error", () => {})
  return client.connect().then(
    async () => {
      await client.end()
      return undefined
    },
    (e: Error) => e.message
  )
}

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: "app-secret" }] })
  revoked = await mintToken({ ...claims, jti: "revoked" })
  tidepool = await startTidepool({
    tenants: [],
    api: true,
    config: {
      jwtClaimValidators: claims,
      apiTokenBlocklist: [createHash("sha256").update(revoked).digest("hex")],
      metricsJwtSecret: Redacted.make(METRICS_SECRET)
    }
  })
})

afterAll(async () => {
  await tidepool?.stop()
  await db?.stop()
})

const good = () => mintToken(claims)

describe("API auth (JWT)", () => {
  it("serves /metrics on the API port with METRICS_JWT_SECRET tokens only", async () => {
    const metricsToken = await mintToken(claims, { secret: METRICS_SECRET })
    const page = await callApi(tidepool, "GET", "/metrics", { token: metricsToken })
    expect(page.status).toBe(200)
    expect(page.headers.get("content-type")).toMatch(/^text\/plain/)
    expect(page.text).toMatch(/^# (HELP|TYPE) /m)
    expect((await callApi(tidepool, "GET", "/metrics")).status).toBe(403) // an API token is not a metrics token
    expect((await callApi(tidepool, "GET", "/metrics", { token: null })).status).toBe(403)
    expect((await callApi(tidepool, "GET", "/metrics/acme", { token: metricsToken })).status).toBe(200)
  })

  it("answers health without a token", async () => {
    expect((await callApi(tidepool, "GET", "/api/health", { token: null })).status).toBe(204)
  })

  it("refuses every bad token with 403 and an empty body, and accepts a good one", async () => {
    const now = Math.floor(Date.now() / 1000)
    const { privateKey } = await generateKeyPair("ES256")
    const es256 = await new SignJWT(claims)
      .setProtectedHeader({ alg: "ES256" })
      .setExpirationTime(now + 3600)
      .sign(privateKey)
    const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString("base64url")
    const none = `${b64({ alg: "none", typ: "JWT" })}.${b64({ ...claims, exp: now + 3600 })}.`
    const bad: Record<string, string | null> = {
      missing: null,
      "bad signature": await mintToken(claims, { secret: "another-secret-another-secret-1234" }),
      expired: await mintToken(claims, { exp: now - 60 }),
      "missing exp": await mintToken(claims, { exp: null }),
      "alg none": none,
      "wrong algorithm": es256,
      blocklisted: revoked,
      "claim mismatch": await mintToken({ role: "anon" }),
      "claim missing": await mintToken({}),
      garbage: "not.a.token"
    }
    for (const [name, token] of Object.entries(bad)) {
      const answer = await callApi(tidepool, "GET", "/api/tenants", { token })
      expect({ name, status: answer.status, body: answer.text }).toEqual({ name, status: 403, body: "" })
    }
    for (const alg of ["HS256", "HS384", "HS512"] as const) {
      expect((await callApi(tidepool, "GET", "/api/tenants", { token: await mintToken(claims, { alg }) })).status).toBe(
        200
      )
    }
  })
})

describe("tenants through the API", () => {
  it("PUT creates a tenant clients can use at once; GET shows it without any password", async () => {
    const put = await callApi(tidepool, "PUT", "/api/tenants/fresh", { token: await good(), body: tenantBody() })
    expect(put.status).toBe(201)
    expect(put.headers.get("location")).toBe("/api/tenants/fresh")
    expect(put.text).not.toContain("app-secret")
    const client = await connect("fresh")
    expect((await client.query("select current_user as u")).rows[0].u).toBe("app")
    await client.end()
    if (hasPsql) {
      const { stdout } = await run(
        "psql",
        [
          tidepool.url({ user: "app.fresh", password: "app-secret", mode: "transaction" }),
          "--no-psqlrc",
          "-tAc",
          "select 42"
        ],
        { env: { ...process.env, PGCONNECT_TIMEOUT: "10" } }
      )
      expect(stdout.trim()).toBe("42")
    }
    const get = await callApi(tidepool, "GET", "/api/tenants/fresh", { token: await good() })
    expect(get.status).toBe(200)
    expect(get.json.data.external_id).toBe("fresh")
    expect(get.json.data.users[0]).toMatchObject({ db_user: "app", db_user_alias: "app" })
    expect(get.text).not.toContain("app-secret")
    expect(get.text).not.toContain("db_password")
    const list = await callApi(tidepool, "GET", "/api/tenants?limit=10", { token: await good() })
    expect(list.json.data.map((t: { external_id: string }) => t.external_id)).toContain("fresh")
    expect(list.text).not.toContain("app-secret")
    expect((await callApi(tidepool, "GET", "/api/tenants/nobody", { token: await good() })).json).toEqual({
      error: "not found"
    })
  })

  it("PUT of a new tenant with wrong upstream credentials is 400 with the reason, and stores nothing", async () => {
    const put = await callApi(tidepool, "PUT", "/api/tenants/wrong", {
      token: await good(),
      body: tenantBody({}, { db_password: "not-the-password" })
    })
    expect(put.status).toBe(400)
    expect(put.json.error).toMatch(/password authentication failed for user "app"/)
    expect((await callApi(tidepool, "GET", "/api/tenants/wrong", { token: await good() })).status).toBe(404)
  })

  it("invalid fields are 422 naming each field", async () => {
    const put = await callApi(tidepool, "PUT", "/api/tenants/broken", {
      token: await good(),
      body: {
        tenant: { db_host: "127.0.0.1", db_port: 99999, db_database: "postgres", users: [{ db_password: "x" }] }
      }
    })
    expect(put.status).toBe(422)
    expect(Object.keys(put.json.errors)).toEqual(expect.arrayContaining(["db_port", "users[0].db_user"]))
    const ban = await callApi(tidepool, "PUT", "/api/tenants/broken", {
      token: await good(),
      body: tenantBody({ ban_reason: "no" })
    })
    expect(ban.status).toBe(422)
    expect(Object.keys(ban.json.errors)).toEqual(["ban_reason"])
    expect((await callApi(tidepool, "PUT", "/api/tenants/broken", { token: await good(), body: "{nope" })).status).toBe(
      400
    )
  })

  it("PUT changing pool_size drains gracefully: a transaction in flight completes, later ones get the new size", async () => {
    const token = await good()
    expect(
      (await callApi(tidepool, "PUT", "/api/tenants/resize", { token, body: tenantBody({}, { pool_size: 1 }) })).status
    ).toBe(201)
    const a = await connect("resize")
    await a.query("begin")
    const oldPid = (await a.query("select pg_backend_pid() as pid")).rows[0].pid as number
    const sleeping = a.query("select pg_sleep(1) as slept")
    const put = await callApi(tidepool, "PUT", "/api/tenants/resize", { token, body: tenantBody({}, { pool_size: 3 }) })
    expect(put.status).toBe(200)
    expect((await sleeping).rows).toHaveLength(1)
    await a.query("commit")
    expect(a.errors).toEqual([])
    // The server opened under the old settings was closed at release, not pooled again.
    expect((await a.query("select pg_backend_pid() as pid")).rows[0].pid).not.toBe(oldPid)
    // Three transactions open at once: only possible with three servers (the checkout timeout would
    // fail the third under the old size of 1).
    const clients = [a, await connect("resize"), await connect("resize")]
    for (const c of clients) await c.query("begin")
    const pools = await callApi(tidepool, "GET", "/api/tenants/resize/pools", { token })
    expect(pools.json.data).toEqual([
      expect.objectContaining({ pool_size: 3, servers_active: 3, clients_active: 3, clients_waiting: 0 })
    ])
    for (const c of clients) {
      await c.query("commit")
      await c.end()
    }
  })

  it("PUT moving a tenant to another server: connected clients stay, later transactions run on the new one; a removed user is disconnected", async () => {
    const other = await startPostgres({ roles: [{ name: "app", password: "app-secret" }] })
    try {
      const token = await good()
      const users = [
        { db_user: "app", db_password: "app-secret" },
        { db_user: "app", db_user_alias: "second", db_password: "app-secret" }
      ]
      const body = (server: PostgresServer, list: Array<Record<string, unknown>>) => ({
        tenant: { ...upstreamOf(server), users: list }
      })
      expect((await callApi(tidepool, "PUT", "/api/tenants/moving", { token, body: body(db, users) })).status).toBe(201)
      const client = await connect("moving")
      const second = await connect("moving", "transaction", "second")
      const port = async () => (await client.query("select inet_server_port() as p")).rows[0].p as number
      expect(await port()).toBe(db.port)
      expect(
        (await callApi(tidepool, "PUT", "/api/tenants/moving", { token, body: body(other, [users[0]!]) })).status
      ).toBe(200)
      expect(await port()).toBe(other.port)
      expect(client.errors).toEqual([])
      // An idle client hears it at once, as an error event.
      const kicked = second.errors[0] ?? (await new Promise<Error>((resolve) => second.once("error", resolve)))
      expect(kicked.message).toBe("(ENOTFOUND) tenant/user second.moving not found")
      await client.end()
    } finally {
      await other.stop()
    }
  })

  it("ban with a reason ends clients mid-query and refuses new ones; unban and banned_until in the past restore", async () => {
    const token = await good()
    await callApi(tidepool, "PUT", "/api/tenants/banme", { token, body: tenantBody() })
    const tx = await connect("banme", "transaction")
    const session = await connect("banme", "session")
    await tx.query("begin")
    const sleeping = tx.query("select pg_sleep(5)").then(
      () => "completed",
      (e: Error) => e.message
    )
    const sessionSleeping = session.query("select pg_sleep(5)").then(
      () => "completed",
      (e: Error) => e.message
    )
    // Both queries are running upstream before the ban lands.
    const sleepers = async (): Promise<void> => {
      const rows = await db.query(
        "select count(*)::int as n from pg_stat_activity where query = 'select pg_sleep(5)' and state = 'active'"
      )
      if (rows[0].n < 2) return sleepers()
    }
    await sleepers()
    expect((await callApi(tidepool, "PATCH", "/api/tenants/banme", { token, body: { banned: true } })).status).toBe(422)
    const ban = await callApi(tidepool, "PATCH", "/api/tenants/banme", {
      token,
      body: { banned: true, ban_reason: "abuse" }
    })
    expect(ban.status).toBe(200)
    expect(ban.json.data.ban_reason).toBe("abuse")
    expect(await sleeping).toBe("(EBANNED) tenant is banned: abuse")
    expect(await sessionSleeping).toBe("(EBANNED) tenant is banned: abuse")
    expect(await connectFails("banme")).toBe("(EBANNED) tenant is banned: abuse")

    expect((await callApi(tidepool, "PATCH", "/api/tenants/banme", { token, body: { banned: false } })).status).toBe(
      200
    )
    expect(await connectFails("banme")).toBeUndefined()

    const past = new Date(Date.now() - 60_000).toISOString()
    await callApi(tidepool, "PATCH", "/api/tenants/banme", {
      token,
      body: { banned: true, ban_reason: "over", banned_until: past }
    })
    expect(await connectFails("banme")).toBeUndefined()
  })

  it("a ban cancels the query its clients were running upstream, not just their connection", async () => {
    const token = await good()
    await callApi(tidepool, "PUT", "/api/tenants/longrun", { token, body: tenantBody() })
    const sql = "select pg_sleep(3600) /* longrun */"
    const running = async (want: number): Promise<void> => {
      const rows = await db.query("select count(*)::int as n from pg_stat_activity where query = $1", [sql])
      if (rows[0].n !== want) return running(want)
    }
    const clients = [await connect("longrun", "transaction"), await connect("longrun", "session")]
    const outcomes = clients.map((c) =>
      c.query(sql).then(
        () => "completed",
        (e: Error) => e.message
      )
    )
    await running(2)
    await callApi(tidepool, "PATCH", "/api/tenants/longrun", { token, body: { banned: true, ban_reason: "runaway" } })
    expect(await Promise.all(outcomes)).toEqual([
      "(EBANNED) tenant is banned: runaway",
      "(EBANNED) tenant is banned: runaway"
    ])
    // Without the cancel, the backends would sleep for an hour (and this would time out).
    await running(0)
  })

  it("a client between its login and its first server when the ban lands is refused too", async () => {
    const token = await good()
    await callApi(tidepool, "PUT", "/api/tenants/racy", { token, body: tenantBody({}, { pool_size: 1 }) })
    const holder = await connect("racy")
    await holder.query("begin")
    // A setting no server of the pool has accepted yet: this login must borrow the busy server first.
    const late = new pg.Client({
      connectionString: tidepool.url({ user: "app.racy", password: "app-secret", mode: "transaction" }),
      application_name: "late"
    })
    late.on("error", () => {})
    const lateOutcome = late.connect().then(
      () => "connected",
      (e: Error) => e.message
    )
    const waiting = async (): Promise<void> => {
      const pools = await callApi(tidepool, "GET", "/api/tenants/racy/pools", { token })
      if (pools.json.data[0]?.clients_waiting !== 1) return waiting()
    }
    await waiting()
    await callApi(tidepool, "PATCH", "/api/tenants/racy", { token, body: { banned: true, ban_reason: "late" } })
    expect(await lateOutcome).toBe("(EBANNED) tenant is banned: late")
    await late.end().catch(() => {})
  })

  it("DELETE stops the tenant: its clients get ENOTFOUND, then 404", async () => {
    const token = await good()
    await callApi(tidepool, "PUT", "/api/tenants/doomed", { token, body: tenantBody() })
    const client = await connect("doomed", "session")
    const ended = new Promise<Error>((resolve) => client.once("error", resolve))
    expect((await callApi(tidepool, "DELETE", "/api/tenants/doomed", { token })).status).toBe(204)
    expect((await ended).message).toBe("(ENOTFOUND) tenant/user app.doomed not found")
    expect(await connectFails("doomed")).toBe("(ENOTFOUND) tenant/user app.doomed not found")
    expect((await callApi(tidepool, "DELETE", "/api/tenants/doomed", { token })).status).toBe(404)
  })

  it("terminate stops the tenant's pools; its clients get 57P01 and may reconnect", async () => {
    const token = await good()
    await callApi(tidepool, "PUT", "/api/tenants/term", { token, body: tenantBody() })
    const client = await connect("term", "session")
    const ended = new Promise<Error & { code?: string }>((resolve) => client.once("error", resolve))
    const answer = await callApi(tidepool, "GET", "/api/tenants/term/terminate", { token })
    expect(answer.json).toEqual({ result: "success" })
    expect((await ended).code).toBe("57P01")
    expect((await callApi(tidepool, "GET", "/api/tenants/term/pools", { token })).json.data).toEqual([])
    expect(await connectFails("term")).toBeUndefined()
  })

  it("network_bans lists the circuit breaker's blocks and DELETE clears them", async () => {
    const token = await good()
    await callApi(tidepool, "PUT", "/api/tenants/guarded", { token, body: tenantBody() })
    await tidepool.runtime.runPromise(
      Effect.flatMap(CircuitBreaker, (breaker) => Effect.repeatN(breaker.authFailed("guarded", "10.1.2.3"), 9))
    )
    const listed = await callApi(tidepool, "GET", "/api/tenants/guarded/network_bans", { token })
    expect(listed.status).toBe(200)
    expect(listed.json.banned_ipv4_addresses).toEqual([
      { banned_address: "10.1.2.3", banned_until: expect.any(Number) }
    ])
    expect(listed.json.banned_ipv4_addresses[0].banned_until).toBeGreaterThan(Date.now() / 1000)
    expect((await callApi(tidepool, "DELETE", "/api/tenants/guarded/network_bans", { token, body: {} })).status).toBe(
      422
    )
    const cleared = await callApi(tidepool, "DELETE", "/api/tenants/guarded/network_bans", {
      token,
      body: { ipv4_addresses: ["10.1.2.3"] }
    })
    expect(cleared.status).toBe(200)
    expect(cleared.json.banned_ipv4_addresses).toEqual([])
  })

  it("update_auth_credentials rotates an auth_query tenant's manager; 400 for require_user tenants, 422 on missing fields", async () => {
    const token = await good()
    const put = await callApi(tidepool, "PUT", "/api/tenants/aq", {
      token,
      body: tenantBody(
        { require_user: false, auth_query: "SELECT rolname, rolpassword FROM pg_authid WHERE rolname=$1" },
        { is_manager: true }
      )
    })
    expect(put.status).toBe(201)
    const path = "/api/tenants/aq/update_auth_credentials"
    expect(
      (await callApi(tidepool, "POST", path, { token, body: { db_user: "manager2" } })).json.errors
    ).toHaveProperty("db_password")
    const rotated = await callApi(tidepool, "POST", path, {
      token,
      body: { db_user: "manager2", db_password: "rotated-secret" }
    })
    expect(rotated.status).toBe(204)
    const get = await callApi(tidepool, "GET", "/api/tenants/aq", { token })
    expect(get.json.data.users[0]).toMatchObject({ db_user: "manager2", is_manager: true })
    expect(get.text).not.toContain("rotated-secret")
    const refused = await callApi(tidepool, "POST", "/api/tenants/fresh/update_auth_credentials", {
      token,
      body: { db_user: "x", db_password: "y" }
    })
    expect(refused.status).toBe(400)
  })
})

describe("API listener", () => {
  it("fails start-up naming PORT when the port is taken", async () => {
    await expect(startTidepool({ tenants: [], api: true, config: { apiPort: tidepool.apiPort } })).rejects.toThrow(
      /port \d+ on 127\.0\.0\.1 is already in use; set PORT to another port/
    )
  })
})

describe("OpenAPI", () => {
  it("documents exactly the routes the router serves", async () => {
    const served = await callApi(tidepool, "GET", "/api/openapi", { token: null })
    expect(served.status).toBe(200)
    const doc = served.json as ReturnType<typeof openApiDocument>
    const documented = Object.entries(doc.paths).flatMap(([path, methods]) =>
      Object.keys(methods).map((m) => `${m.toUpperCase()} ${path}`)
    )
    const router = apiRouter({ secret: undefined, claims: {}, blocklist: [] })
    const routed = [...router.routes]
      .map((r) => `${r.method} ${openApiPath(r.path)}`)
      .filter((r) => r !== "GET /api/openapi")
    expect(new Set(documented)).toEqual(new Set(routed))
    expect(routed).toHaveLength(routes.length)
    const input = doc.components.schemas.TenantInput as { required: Array<string>; properties: object }
    expect(input.required).toEqual(["db_host", "db_port", "db_database", "users"])
    expect(Object.keys(input.properties)).not.toContain("ban_reason")
  })
})
