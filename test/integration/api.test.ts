import { createHash } from "node:crypto"
import { Cause, Effect, Layer, Logger, Redacted } from "effect"
import { HttpRouter } from "effect/http"
import { generateKeyPair, SignJWT } from "jose"
import pg from "pg"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import {
  apiRouter,
  apiRoutes,
  type openApiDocument,
  openApiPath,
  type Route,
  routes,
  verifyBearer
} from "../../src/api/index.ts"
import { CircuitBreaker } from "../../src/auth/index.ts"
import { callApi, mintToken } from "../support/api.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { type RunningTidepool, startTidepool, TEST_JWT_SECRET, upstreamOf } from "../support/tidepool.ts"
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

describe("API token lifetime", () => {
  const DAY = 86_400
  const now = () => Math.floor(Date.now() / 1000)

  it("refuses a token expiring more than TIDEPOOL_JWT_MAX_LIFETIME ahead with 401 and the reason", async () => {
    for (const [path, secret] of [
      ["/api/tenants", undefined],
      ["/metrics", METRICS_SECRET]
    ] as const) {
      const eternal = await mintToken(claims, { exp: 1e20, ...(secret !== undefined ? { secret } : {}) })
      const answer = await callApi(tidepool, "GET", path, { token: eternal })
      expect({ path, status: answer.status }).toEqual({ path, status: 401 })
      expect(answer.json.error).toMatch(
        /^token expires too far ahead: exp is \d+ days from now, and tokens may expire at most 366 days ahead \(TIDEPOOL_JWT_MAX_LIFETIME\); mint one that expires sooner$/
      )
      expect(answer.headers.get("www-authenticate")).toBe(
        `Bearer error="invalid_token", error_description="${answer.json.error}"`
      )
    }
    // The default admits a token minted for "1y" (365.25 days), not one for two years.
    expect(
      (
        await callApi(tidepool, "GET", "/api/tenants", {
          token: await mintToken(claims, { exp: now() + 365.25 * DAY })
        })
      ).status
    ).toBe(200)
    expect(
      (await callApi(tidepool, "GET", "/api/tenants", { token: await mintToken(claims, { exp: now() + 730 * DAY }) }))
        .status
    ).toBe(401)
  })

  it("says why only to a token that passes every other check: anything else stays 403 with an empty body", async () => {
    for (const token of [
      await mintToken({ role: "anon" }, { exp: 1e20 }),
      await mintToken(claims, { exp: 1e20, secret: "another-secret-another-secret-1234" })
    ]) {
      const answer = await callApi(tidepool, "GET", "/api/tenants", { token })
      expect({ status: answer.status, body: answer.text }).toEqual({ status: 403, body: "" })
    }
  })

  it("follows the setting: a tighter bound refuses sooner, 0 lifts it", async () => {
    const policy = { secret: Redacted.make(TEST_JWT_SECRET), claims: {}, blocklist: [] }
    const verdict = async (maxLifetimeSeconds: number, exp: number) =>
      (
        await Effect.runPromise(
          verifyBearer(`Bearer ${await mintToken({}, { exp })}`, { ...policy, maxLifetimeSeconds })
        )
      )._tag
    expect(await verdict(3600, now() + 1800)).toBe("Accepted")
    expect(await verdict(3600, now() + 7200)).toBe("Unacceptable")
    expect(await verdict(0, 1e20)).toBe("Accepted")
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
    expect(answer.json).toEqual({ result: "success", disconnected: 1, reach: "this_node" })
    expect((await ended).code).toBe("57P01")
    expect((await callApi(tidepool, "GET", "/api/tenants/term/pools", { token })).json.data).toEqual([])
    expect(await connectFails("term")).toBeUndefined()
  })

  it("network_bans lists the circuit breaker's blocks and DELETE clears them", async () => {
    const token = await good()
    await callApi(tidepool, "PUT", "/api/tenants/guarded", { token, body: tenantBody() })
    await tidepool.runtime.runPromise(
      Effect.flatMap(CircuitBreaker, (breaker) =>
        Effect.repeat(breaker.authFailed("guarded", "10.1.2.3"), { times: 9 })
      )
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

describe("hostile input", () => {
  it("keys named like Object.prototype's members are field errors (422), at the top level and in users", async () => {
    const token = await good()
    const text = JSON.stringify(tenantBody())
    for (const key of ["__proto__", "constructor", "toString", "hasOwnProperty", "valueOf"]) {
      for (const [body, path] of [
        [text.replace('{"tenant":{', `{"tenant":{"${key}":1,`), key],
        [text.replace('"users":[{', `"users":[{"${key}":1,`), `users[0].${key}`]
      ] as const) {
        const answer = await callApi(tidepool, "PUT", "/api/tenants/protokeys", { token, body })
        expect({ path, status: answer.status }).toEqual({ path, status: 422 })
        expect(Object.keys(answer.json.errors)).toEqual([path])
        expect(answer.json.errors[path][0]).toMatch(/^unknown field/)
      }
      const ban = await callApi(tidepool, "PATCH", "/api/tenants/protokeys", {
        token,
        body: `{"banned":false,"${key}":1}`
      })
      expect({ key, status: ban.status, errors: Object.keys(ban.json.errors) }).toEqual({
        key,
        status: 422,
        errors: [key]
      })
    }
    expect((await callApi(tidepool, "GET", "/api/tenants/protokeys", { token })).status).toBe(404)
  })

  it("tenant ids are ASCII letters, digits, _ and -: any other id is refused with 422", async () => {
    const token = await good()
    // a/b: the admin console reads `SHOW POOLS a/b` as tenant a, database b, so it could never name it.
    for (const id of [
      "a%2Fb",
      "a%20b",
      "%C3%A9t%C3%A9",
      "a%3Bb",
      "a'b",
      "a%22b",
      "a:b",
      "a%25b",
      "-lead",
      "_lead",
      "x".repeat(64)
    ]) {
      const answer = await callApi(tidepool, "PUT", `/api/tenants/${id}`, { token, body: tenantBody() })
      expect({ id, status: answer.status, fields: Object.keys(answer.json?.errors ?? {}) }).toEqual({
        id,
        status: 422,
        fields: ["external_id"]
      })
    }
    const ok = await callApi(tidepool, "PUT", "/api/tenants/Acme_2-x", { token, body: tenantBody() })
    expect(ok.status).toBe(201)
    expect((await callApi(tidepool, "DELETE", "/api/tenants/Acme_2-x", { token })).status).toBe(204)
  })

  it("a body over 1 MiB is 413 with the error JSON, whether its length is declared or it is chunked", async () => {
    const token = await good()
    const url = `http://127.0.0.1:${tidepool.apiPort}/api/tenants/big`
    const headers = { authorization: `Bearer ${token}`, "content-type": "application/json" }
    const tooLarge = { error: "request body too large (at most 1048576 bytes)" }
    // Valid JSON padded with spaces: exactly at the limit it is read (and refused for its fields).
    const padded = (size: number) => {
      const text = JSON.stringify({ tenant: { db_host: "127.0.0.1" } })
      return text + " ".repeat(size - text.length)
    }
    expect((await callApi(tidepool, "PUT", "/api/tenants/big", { token, body: padded(1_048_576) })).status).toBe(422)
    for (const size of [1_048_577, 8 * 1_048_576]) {
      const answer = await fetch(url, { method: "PUT", headers, body: padded(size) })
      expect({ size, status: answer.status, body: await answer.json() }).toEqual({ size, status: 413, body: tooLarge })
    }
    const chunk = new Uint8Array(256 * 1024).fill(0x20)
    let sent = 0
    const stream = new ReadableStream<Uint8Array>({
      pull(controller) {
        if (sent++ < 12) controller.enqueue(chunk)
        else controller.close()
      }
    })
    const chunked = await fetch(url, { method: "PUT", headers, body: stream, duplex: "half" } as RequestInit)
    expect({ status: chunked.status, body: await chunked.json() }).toEqual({ status: 413, body: tooLarge })
    expect((await callApi(tidepool, "GET", "/api/health", { token: null })).status).toBe(204)
  })

  it("a handler's defect is answered 500 with the error JSON, and logged with its cause", async () => {
    const logged: Array<string> = []
    const capture = Logger.layer([
      Logger.make(({ message, cause }) => logged.push(`${String(message)}\n${Cause.pretty(cause)}`))
    ])
    const boom: Route = {
      method: "GET",
      path: "/api/boom",
      summary: "dies",
      public: true,
      responses: {},
      handler: Effect.die(new Error("kaboom"))
    }
    const app = apiRouter({ secret: undefined, claims: {}, blocklist: [], maxLifetimeSeconds: 0 }, [boom])
    // Merged, so the handler's fiber logs through `capture`; no request logger, as before.
    const { handler, dispose } = HttpRouter.toWebHandler(app.pipe(Layer.provideMerge(capture)), {
      disableLogger: true
    })
    try {
      // Only `boom` is requested, and it needs none of the services the other routes do.
      const answer = await (handler as (request: Request) => Promise<Response>)(new Request("http://tidepool/api/boom"))
      expect({ status: answer.status, body: await answer.json() }).toEqual({
        status: 500,
        body: { error: "internal error (logged)" }
      })
      expect(logged.join("\n")).toMatch(/API GET \/api\/boom failed[\s\S]*kaboom/)
    } finally {
      await dispose()
    }
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
    // The routes `apiRouter` registers: an Effect 4 router, built by layers, does not list them itself.
    const routed = apiRoutes({ secret: undefined, claims: {}, blocklist: [], maxLifetimeSeconds: 0 })
      .map((r) => `${r.method} ${openApiPath(r.path)}`)
      .filter((r) => r !== "GET /api/openapi")
    expect(new Set(documented)).toEqual(new Set(routed))
    expect(routed).toHaveLength(routes.length)
    const input = doc.components.schemas.TenantInput as { required: Array<string>; properties: object }
    expect(input.required).toEqual(["db_host", "db_port", "db_database", "users"])
    expect(Object.keys(input.properties)).not.toContain("ban_reason")
  })
})
