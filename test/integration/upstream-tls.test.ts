import * as net from "node:net"
import pg from "pg"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { cancelWhileBusy } from "../support/cancel.ts"
import { makeTestCerts, type TestCerts } from "../support/certs.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { type RunningTidepool, startTidepool } from "../support/tidepool.ts"
import { tlsOnlyFront } from "../support/tlsFront.ts"

let certs: TestCerts
/** ssl = on with a certificate for `localhost` only; role `app` may only log in over TLS. */
let db: PostgresServer
/** ssl = off. */
let plainDb: PostgresServer
let tidepool: RunningTidepool
/** Same tenants, no GLOBAL_UPSTREAM_CA_PATH. */
let noGlobalCa: RunningTidepool
/** A TLS-only front for `db`: connections whose first packet is not an SSLRequest are dropped. */
let gate: net.Server
let gateRefused: Array<number> = []
/** Answers an SSLRequest with `S` followed by injected plaintext. */
let injector: net.Server

const portOf = (server: net.Server) => (server.address() as net.AddressInfo).port
const listen = (server: net.Server) =>
  new Promise<net.Server>((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)))

const users = [{ db_user: "app", db_password: "app-secret", pool_size: 2 }]
const upstream = (host: string, port: number, tls: Record<string, unknown>) => ({
  db_host: host,
  db_port: port,
  db_database: "postgres",
  users,
  ...tls
})

beforeAll(async () => {
  certs = await makeTestCerts()
  ;[db, plainDb] = await Promise.all([
    startPostgres({
      roles: [{ name: "app", password: "app-secret" }],
      settings: { ssl: "on", ssl_cert_file: certs.localhostOnly.cert, ssl_key_file: certs.localhostOnly.key },
      hba: ["hostssl all app 127.0.0.1/32 scram-sha-256", "hostnossl all app 127.0.0.1/32 reject"]
    }),
    startPostgres({ roles: [{ name: "app", password: "app-secret" }] })
  ])
  const front = await tlsOnlyFront(db.port)
  gate = front.server
  gateRefused = front.refused
  injector = await listen(
    net.createServer((socket) => {
      socket.on("error", () => undefined)
      socket.once("data", () => socket.end("SXXXX"))
    })
  )
  const verified = { upstream_ssl: true, upstream_verify: "peer" }
  const tenants = [
    upstream("localhost", db.port, { external_id: "verified", ...verified, upstream_tls_ca: certs.ca.certPem }),
    upstream("localhost", db.port, { external_id: "globalca", ...verified }),
    upstream("localhost", db.port, { external_id: "wrongca", ...verified, upstream_tls_ca: certs.otherCa.certPem }),
    upstream("127.0.0.1", db.port, { external_id: "wronghost", ...verified, upstream_tls_ca: certs.ca.certPem }),
    upstream("127.0.0.1", db.port, { external_id: "unverified", upstream_ssl: true, upstream_verify: "none" }),
    upstream("127.0.0.1", db.port, { external_id: "plaintext" }),
    upstream("127.0.0.1", plainDb.port, { external_id: "nossl", upstream_ssl: true }),
    upstream("127.0.0.1", portOf(gate), { external_id: "gated", upstream_ssl: true }),
    upstream("127.0.0.1", portOf(injector), { external_id: "injected", upstream_ssl: true })
  ]
  ;[tidepool, noGlobalCa] = await Promise.all([
    startTidepool({ tenants, config: { upstreamCaPath: certs.ca.cert } }),
    startTidepool({ tenants })
  ])
})

afterAll(async () => {
  await Promise.all([tidepool?.stop(), noGlobalCa?.stop()])
  gate?.close()
  injector?.close()
  await Promise.all([db?.stop(), plainDb?.stop()])
  await certs?.remove()
})

const connect = async (tenant: string, mode: "session" | "transaction" = "session", server = tidepool) => {
  const client = new pg.Client({
    connectionString: server.url({ user: `app.${tenant}`, password: "app-secret", mode })
  })
  client.on("error", () => undefined)
  await client.connect()
  return client
}

const sslInUse = async (client: pg.Client) =>
  (await client.query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")).rows[0].ssl as boolean

const failure = (tenant: string, server = tidepool) =>
  connect(tenant, "session", server).then(
    async (client) => {
      await client.end()
      throw new Error("connected, expected an error")
    },
    (e: pg.DatabaseError) => ({ code: e.code, message: e.message })
  )

describe("upstream TLS", () => {
  for (const mode of ["session", "transaction"] as const) {
    it(`upstream_verify: peer verifies chain and host name, then serves (${mode})`, async () => {
      const client = await connect("verified", mode)
      expect(await sslInUse(client)).toBe(true)
      await client.end()
    })
  }

  it("takes the CA from GLOBAL_UPSTREAM_CA_PATH when the tenant has none", async () => {
    const client = await connect("globalca")
    expect(await sslInUse(client)).toBe(true)
    await client.end()
  })

  it("upstream_verify: none encrypts without verifying", async () => {
    const client = await connect("unverified")
    expect(await sslInUse(client)).toBe(true)
    await client.end()
  })

  it("without upstream_ssl the hostssl-only role is refused by the database itself", async () => {
    expect(await failure("plaintext")).toMatchObject({
      code: "28000",
      message: expect.stringContaining("no encryption")
    })
  })

  it("a wrong CA fails with ECHECKOUTFAILED (08006)", async () => {
    expect(await failure("wrongca")).toMatchObject({
      code: "08006",
      message: expect.stringMatching(/^Failed to connect to database: SSL handshake failed: .*certificate/)
    })
  })

  it("a host name the certificate does not name fails with ECHECKOUTFAILED (08006)", async () => {
    expect(await failure("wronghost")).toMatchObject({
      code: "08006",
      message: expect.stringMatching(/^Failed to connect to database: SSL handshake failed: .*altnames.*127\.0\.0\.1/)
    })
  })

  it("peer without any CA fails rather than connect unverified", async () => {
    expect(await failure("globalca", noGlobalCa)).toEqual({
      code: "08006",
      message:
        "Failed to connect to database: upstream_verify is peer but no CA is configured (upstream_tls_ca or GLOBAL_UPSTREAM_CA_PATH)"
    })
  })

  it("a server that answers N is an error, never a plaintext fallback", async () => {
    expect(await failure("nossl")).toEqual({
      code: "08006",
      message: "Failed to connect to database: the server does not accept SSL connections (upstream_ssl is set)"
    })
  })

  it("plaintext injected after the server's S is refused", async () => {
    expect(await failure("injected")).toEqual({
      code: "08006",
      message: "Failed to connect to database: received unencrypted data after SSL response"
    })
  })

  it("cancels reach a TLS-only upstream over TLS", async () => {
    const victim = await connect("gated")
    const bystander = await connect("gated")
    try {
      const outcome = await cancelWhileBusy({ db, port: tidepool.sessionPort, victim, bystander })
      expect(outcome).toEqual({ victimCode: "57014", bystanderState: "done" })
      expect(gateRefused).toEqual([])
    } finally {
      await Promise.all([victim.end(), bystander.end()])
    }
  })
})
