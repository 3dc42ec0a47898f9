import { once } from "node:events"
import * as http from "node:http"
import type { AddressInfo } from "node:net"
import * as jose from "jose"
import pg from "pg"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { makeTestCerts, type TestCerts } from "../support/certs.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"

/*
 * JIT access end to end: a real HTTP server plays the tenant's JIT API, and the upstream PostgreSQL
 * stands in for PAM with roles whose passwords are the test tokens.
 */

const PAT = "sbp_0123456789abcdef0123456789abcdef01234567"
const REAL_PASSWORD = "dev-real-password"
let JWT = ""

let certs: TestCerts
let db: PostgresServer
let tidepool: RunningTidepool
let api: http.Server
/** What the API was asked: bearer token and body. */
const asked: Array<{ token: string; body: { rhost: string; role: string } }> = []
/** The API's answer per token. */
const grants = new Map<string, { status: number; role?: string } | "hang">()

beforeAll(async () => {
  certs = await makeTestCerts()
  JWT = await new jose.SignJWT({ sub: "someone" })
    .setProtectedHeader({ alg: "HS256" })
    .setExpirationTime("1h")
    .sign(new TextEncoder().encode("the API's own signing key, 32+ bytes"))
  db = await startPostgres({
    roles: [
      { name: "tidepool_manager", password: "manager-pw", superuser: true },
      { name: "pat_user", password: PAT },
      { name: "jwt_user", password: JWT },
      { name: "dev", password: REAL_PASSWORD }
    ],
    settings: { ssl: "on", ssl_cert_file: certs.rsa.cert, ssl_key_file: certs.rsa.key }
  })
  api = http.createServer(async (req, res) => {
    let raw = ""
    for await (const chunk of req) raw += chunk
    const token = (req.headers.authorization ?? "").replace(/^Bearer /, "")
    asked.push({ token, body: JSON.parse(raw) })
    const grant = grants.get(token) ?? { status: 401 }
    if (grant === "hang") return
    res.writeHead(grant.status, { "content-type": "application/json" })
    res.end(JSON.stringify(grant.role === undefined ? {} : { user_role: { role: grant.role } }))
  })
  api.listen(0, "127.0.0.1")
  await once(api, "listening")
  tidepool = await startTidepool({
    tenants: [
      {
        external_id: "jit",
        ...upstreamOf(db),
        require_user: false,
        auth_query: "SELECT rolname, rolpassword FROM pg_authid WHERE rolname=$1",
        users: [{ db_user: "tidepool_manager", db_password: "manager-pw", is_manager: true, pool_size: 3 }],
        use_jit: true,
        jit_api_url: `http://127.0.0.1:${(api.address() as AddressInfo).port}/v1/jit`
      }
    ],
    config: { downstreamCertPath: certs.rsa.cert, downstreamKeyPath: certs.rsa.key, jitTimeoutMs: 500 }
  })
})

afterAll(async () => {
  await tidepool?.stop()
  api?.closeAllConnections()
  api?.close()
  await db?.stop()
  await certs?.remove()
})

const connect = async (user: string, password: string, options: { tls?: boolean; jit?: boolean } = {}) => {
  const c = new pg.Client({
    host: "127.0.0.1",
    port: tidepool.transactionPort,
    user: `${user}.jit`,
    password,
    database: "postgres",
    ...(options.tls === false ? {} : { ssl: { ca: certs.ca.certPem } }),
    ...(options.jit === true ? { options: "--jit=true" } : {})
  })
  await c.connect()
  return c
}

const failure = (user: string, password: string, options?: { tls?: boolean; jit?: boolean }) =>
  connect(user, password, options).then(
    async (c) => {
      await c.end()
      return undefined
    },
    (e: Error & { code?: string }) => ({ code: e.code, message: e.message })
  )

const whoAmI = async (c: pg.Client) =>
  (
    await c.query<{ user: string; ssl: boolean }>(
      "SELECT current_user AS user, (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()) AS ssl"
    )
  ).rows[0]!

describe("JIT access", () => {
  it("a TLS client logs in with a PAT and with a JWT; the API saw {rhost, role} and the bearer", async () => {
    grants.set(PAT, { status: 200, role: "pat_user" })
    grants.set(JWT, { status: 200, role: "jwt_user" })
    asked.length = 0
    const pat = await connect("pat_user", PAT, { jit: true })
    // The token is the upstream password, and the upstream hop is encrypted like the client's.
    expect(await whoAmI(pat)).toEqual({ user: "pat_user", ssl: true })
    const jwt = await connect("jwt_user", JWT)
    expect(await whoAmI(jwt)).toEqual({ user: "jwt_user", ssl: true })
    expect(asked).toEqual([
      { token: PAT, body: { rhost: "127.0.0.1", role: "pat_user" } },
      { token: JWT, body: { rhost: "127.0.0.1", role: "jwt_user" } }
    ])
    await pat.end()
    await jwt.end()
  })

  it("the role's real password works over TLS, checked against its SCRAM verifier without the API", async () => {
    asked.length = 0
    const c = await connect("dev", REAL_PASSWORD)
    expect((await whoAmI(c)).user).toBe("dev")
    expect(asked).toEqual([])
    await c.end()
    expect(await failure("dev", "not-the-password")).toMatchObject({ code: "28P01" })
  })

  it("a revoked token fails the next login with 28P01 while connected clients keep working", async () => {
    grants.set(PAT, { status: 200, role: "pat_user" })
    const connected = await connect("pat_user", PAT)
    grants.set(PAT, { status: 401 })
    expect(await failure("pat_user", PAT)).toEqual({
      code: "28P01",
      message: 'password authentication failed for user "pat_user"'
    })
    expect((await whoAmI(connected)).user).toBe("pat_user")
    await connected.end()
  })

  it("each token has its own pools: another token of the same role never rides on a server opened with the first", async () => {
    const OTHER = "sbp_another0123456789abcdef0123456789abcdef"
    grants.set(PAT, { status: 200, role: "pat_user" })
    grants.set(OTHER, { status: 200, role: "pat_user" })
    const first = await connect("pat_user", PAT)
    // The API grants OTHER, but the database (standing in for PAM) knows only PAT: were the pools
    // shared, this login would be served by PAT's servers and succeed.
    expect(await failure("pat_user", OTHER)).toMatchObject({ code: "28P01" })
    await first.end()
  })

  it("a grant for another role is 28P01", async () => {
    grants.set(PAT, { status: 200, role: "someone_else" })
    expect(await failure("pat_user", PAT)).toMatchObject({ code: "28P01" })
  })

  it("an API answering 500, or not answering in time, is EJITREQUESTFAILED", async () => {
    grants.set(PAT, { status: 500 })
    expect(await failure("pat_user", PAT)).toEqual({
      code: "XX000",
      message: '(EJITREQUESTFAILED) failed to reach JIT provider for user "pat_user"'
    })
    grants.set(PAT, "hang")
    expect(await failure("pat_user", PAT)).toMatchObject({ code: "XX000", message: /EJITREQUESTFAILED/ })
  })

  it("plaintext: --jit=true is ESSLREQUIRED; without it SCRAM works", async () => {
    expect(await failure("pat_user", PAT, { tls: false, jit: true })).toMatchObject({
      message: /^\(ESSLREQUIRED\)/
    })
    const c = await connect("dev", REAL_PASSWORD, { tls: false })
    expect(await whoAmI(c)).toEqual({ user: "dev", ssl: false })
    await c.end()
  })
})
