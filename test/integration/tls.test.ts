import { createHash, X509Certificate } from "node:crypto"
import * as fs from "node:fs/promises"
import * as net from "node:net"
import * as path from "node:path"
import * as tls from "node:tls"
import pg from "pg"
import postgres from "postgres"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { cancelRequest, sslRequest, startupMessage } from "../../src/protocol/index.ts"
import { makeTestCerts, type TestCerts } from "../support/certs.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { RawClient } from "../support/raw.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"
import { hasTool, run } from "../support/tools.ts"

const hasPsql = await hasTool("psql")
if (!hasPsql) console.log("tls.test: `psql` is not on PATH, so the psql checks are skipped")

let certs: TestCerts
let db: PostgresServer
/** RSA and ECDSA certificates. */
let tidepool: RunningTidepool
/** Only the ECDSA certificate (signed with SHA-384): channel binding must hash with SHA-384. */
let ecdsaOnly: RunningTidepool
/** No certificate: SSLRequest is answered N. */
let plain: RunningTidepool

const user = (name: string) => ({ db_user: "app", db_user_alias: name, db_password: "app-secret" })

const tenants = (dbServer: PostgresServer) => [
  { external_id: "acme", ...upstreamOf(dbServer), users: [user("app")] },
  { external_id: "secure", ...upstreamOf(dbServer), enforce_ssl: true, users: [user("app")] },
  { external_id: "bysni", ...upstreamOf(dbServer), sni_hostname: "localhost", users: [user("sni")] },
  { external_id: "other", ...upstreamOf(dbServer), sni_hostname: "other.example", users: [user("sni")] }
]

beforeAll(async () => {
  ;[certs, db] = await Promise.all([
    makeTestCerts(),
    startPostgres({ roles: [{ name: "app", password: "app-secret" }] })
  ])
  ;[tidepool, ecdsaOnly, plain] = await Promise.all([
    startTidepool({
      tenants: tenants(db),
      captureLogs: true,
      config: {
        downstreamCertPath: `${certs.rsa.cert},${certs.ecdsa.cert}`,
        downstreamKeyPath: `${certs.rsa.key},${certs.ecdsa.key}`
      }
    }),
    startTidepool({
      tenants: tenants(db),
      config: { downstreamCertPath: certs.ecdsa.cert, downstreamKeyPath: certs.ecdsa.key }
    }),
    startTidepool({ tenants: tenants(db) })
  ])
})

afterAll(async () => {
  await Promise.all([tidepool?.stop(), ecdsaOnly?.stop(), plain?.stop()])
  await db?.stop()
  await certs?.remove()
})

const PORTS = ["sessionPort", "transactionPort"] as const

const connectPg = async (config: pg.ClientConfig) => {
  const client = new pg.Client({ host: "127.0.0.1", port: tidepool.sessionPort, database: "postgres", ...config })
  client.on("error", () => undefined)
  await client.connect()
  return client
}

const failPg = (config: pg.ClientConfig) =>
  connectPg(config).then(
    async (client) => {
      await client.end()
      throw new Error("connected, expected an error")
    },
    (e: pg.DatabaseError) => ({ code: e.code, message: e.message })
  )

/** The TLS socket under a connected node-postgres client. */
const tlsOf = (client: pg.Client) => (client as unknown as { connection: { stream: tls.TLSSocket } }).connection.stream

const psqlUrl = (port: number, params: Record<string, string>, host = "127.0.0.1", username = "app.acme") =>
  `postgresql://${username}:app-secret@${host}:${port}/postgres?${new URLSearchParams(params)}`

const psql = (url: string, sql: string) =>
  run("psql", [url, "-XAtc", sql], { env: { ...process.env, PGCONNECT_TIMEOUT: "10" } })

const outcome = <A>(p: Promise<A>) =>
  p.then(
    () => ({ ok: true as const, stderr: "" }),
    (e: { stderr?: string; message: string }) => ({ ok: false as const, stderr: e.stderr ?? e.message })
  )

/** Opens a TCP connection and sends `bytes`; resolves with everything received until close. */
const exchange = (port: number, bytes: Buffer) =>
  new Promise<Buffer>((resolve) => {
    const chunks: Array<Buffer> = []
    const socket = net.connect(port, "127.0.0.1", () => socket.write(bytes))
    socket.on("data", (c) => chunks.push(c))
    socket.on("error", () => undefined)
    socket.on("close", () => resolve(Buffer.concat(chunks)))
  })

/** SSLRequest, `S`, then a TLS client on the same socket. */
const sslConnect = (port: number, options: tls.ConnectionOptions = {}) =>
  new Promise<tls.TLSSocket>((resolve, reject) => {
    const socket = net.connect(port, "127.0.0.1", () => socket.write(sslRequest()))
    socket.once("error", reject)
    socket.once("data", (answer) => {
      if (answer.toString() !== "S") return reject(new Error(`answer ${answer.toString()}`))
      const secure = tls.connect({ socket, rejectUnauthorized: false, ...options }, () => resolve(secure))
      secure.once("error", reject)
    })
  })

/** A direct TLS connection (PostgreSQL 17's sslnegotiation=direct). */
const directConnect = (port: number, options: tls.ConnectionOptions = {}) =>
  new Promise<tls.TLSSocket>((resolve, reject) => {
    const secure = tls.connect({ port, host: "127.0.0.1", rejectUnauthorized: false, ...options }, () =>
      resolve(secure)
    )
    secure.once("error", reject)
  })

const serialOf = (socket: tls.TLSSocket) => socket.getPeerX509Certificate()?.serialNumber

describe("client TLS", () => {
  for (const port of PORTS) {
    it(`node-postgres ssl with the test CA (${port})`, async () => {
      const client = await connectPg({
        port: tidepool[port],
        user: "app.acme",
        password: "app-secret",
        ssl: { ca: certs.ca.certPem }
      })
      expect(tlsOf(client).encrypted).toBe(true)
      expect(tlsOf(client).getProtocol()).toMatch(/^TLSv1\.[23]$/)
      expect((await client.query("SELECT 'over tls' AS v")).rows[0].v).toBe("over tls")
      await client.end()
    })

    it(`postgres.js ssl: 'require' (${port})`, async () => {
      const sql = postgres({
        host: "127.0.0.1",
        port: tidepool[port],
        user: "app.acme",
        password: "app-secret",
        database: "postgres",
        ssl: "require",
        max: 1
      })
      try {
        expect((await sql`SELECT ${"js"}::text AS v`)[0]?.v).toBe("js")
      } finally {
        await sql.end()
      }
    })

    it.skipIf(!hasPsql)(`psql sslmode=require and verify-full (${port})`, async () => {
      const required = await psql(psqlUrl(tidepool[port], { sslmode: "require" }), "\\conninfo")
      expect(required.stdout).toMatch(/SSL connection \(protocol: TLSv1\.[23]/)
      for (const host of ["127.0.0.1", "localhost"]) {
        const full = await psql(
          psqlUrl(tidepool[port], { sslmode: "verify-full", sslrootcert: certs.ca.cert }, host),
          "SELECT 'verified'"
        )
        expect(full.stdout.trim()).toBe("verified")
      }
      const wrongCa = await outcome(
        psql(psqlUrl(tidepool[port], { sslmode: "verify-full", sslrootcert: certs.otherCa.cert }), "SELECT 1")
      )
      expect(wrongCa).toMatchObject({ ok: false, stderr: expect.stringMatching(/certificate verify failed/) })
    })

    it(`node-postgres direct TLS with ALPN (${port})`, async () => {
      const client = await connectPg({
        port: tidepool[port],
        user: "app.acme",
        password: "app-secret",
        ssl: { ca: certs.ca.certPem },
        sslnegotiation: "direct"
      })
      expect(tlsOf(client).alpnProtocol).toBe("postgresql")
      expect((await client.query("SELECT 2 AS v")).rows[0].v).toBe(2)
      await client.end()
    })
  }

  it("answers N without a certificate, and direct TLS is closed unanswered", async () => {
    const answer = await new Promise<string>((resolve) => {
      const socket = net.connect(plain.sessionPort, "127.0.0.1", () => socket.write(sslRequest()))
      socket.once("data", (b) => {
        resolve(b.toString())
        socket.destroy()
      })
    })
    expect(answer).toBe("N")
    // libpq's sslmode=prefer (its default) carries on in plaintext on the same connection.
    if (hasPsql) {
      const { stdout } = await psql(psqlUrl(plain.sessionPort, { sslmode: "prefer" }), "\\conninfo")
      expect(stdout).not.toContain("SSL connection")
      expect(stdout).toContain('as user "app.acme"')
      const required = await outcome(psql(psqlUrl(plain.sessionPort, { sslmode: "require" }), "SELECT 1"))
      expect(required).toMatchObject({ ok: false, stderr: expect.stringMatching(/server does not support SSL/) })
    }
    await expect(directConnect(plain.sessionPort, { ALPNProtocols: ["postgresql"] })).rejects.toThrow()
  })

  it("RSA and ECDSA certificates side by side, the client's cipher suites choosing", async () => {
    const rsa = await sslConnect(tidepool.sessionPort, {
      maxVersion: "TLSv1.2",
      ciphers: "ECDHE-RSA-AES128-GCM-SHA256"
    })
    expect(serialOf(rsa)).toBe(new X509Certificate(certs.rsa.certPem).serialNumber)
    rsa.destroy()
    const ec = await sslConnect(tidepool.sessionPort, {
      maxVersion: "TLSv1.2",
      ciphers: "ECDHE-ECDSA-AES128-GCM-SHA256"
    })
    expect(serialOf(ec)).toBe(new X509Certificate(certs.ecdsa.certPem).serialNumber)
    ec.destroy()
  })

  it("refuses TLS below 1.2; ESSLHANDSHAKE is logged and the pooler keeps serving", async () => {
    const handshakeFailures = () =>
      tidepool.logs.filter((l) => l.code === "ESSLHANDSHAKE" && l.message.includes("unsupported protocol")).length
    const before = handshakeFailures()
    await expect(
      sslConnect(tidepool.sessionPort, { minVersion: "TLSv1", maxVersion: "TLSv1.1", ciphers: "DEFAULT@SECLEVEL=0" })
    ).rejects.toThrow()
    await expect.poll(handshakeFailures).toBe(before + 1)
    const client = await connectPg({ user: "app.acme", password: "app-secret", ssl: { rejectUnauthorized: false } })
    await client.end()
  })

  it("direct TLS without ALPN postgresql gets ESSLHANDSHAKE over TLS", async () => {
    const socket = await directConnect(tidepool.sessionPort)
    const received = await new Promise<Buffer>((resolve) => {
      const chunks: Array<Buffer> = []
      socket.on("data", (c) => chunks.push(c))
      socket.on("error", () => undefined)
      socket.on("close", () => resolve(Buffer.concat(chunks)))
    })
    expect(received[0]).toBe(0x45) // ErrorResponse
    expect(received.toString()).toContain("(ESSLHANDSHAKE) SSL handshake failed: direct TLS connection without ALPN")
  })

  it("refuses bytes sent after SSLRequest before the answer (CVE-2021-23214), others unaffected", async () => {
    const received = await exchange(
      tidepool.sessionPort,
      Buffer.concat([sslRequest(), startupMessage({ user: "app.acme", database: "postgres" })])
    )
    expect(received[0]).toBe(0x45)
    expect(received.toString()).toContain(
      "(ESTARTUPMESSAGE) Invalid startup message: received unencrypted data after SSL request"
    )
    const client = await connectPg({ user: "app.acme", password: "app-secret", ssl: { rejectUnauthorized: false } })
    expect((await client.query("SELECT 1 AS v")).rows[0].v).toBe(1)
    await client.end()
  })

  it("garbage instead of a ClientHello after S is a clean close, others unaffected", async () => {
    const logged = tidepool.logs.filter((l) => l.code === "ESSLHANDSHAKE").length
    const received = await new Promise<Buffer>((resolve) => {
      const chunks: Array<Buffer> = []
      const socket = net.connect(tidepool.sessionPort, "127.0.0.1", () => socket.write(sslRequest()))
      socket.once("data", () => {
        socket.on("data", (c) => chunks.push(c))
        socket.write("GET / HTTP/1.1\r\nHost: tidepool\r\n\r\n")
      })
      socket.on("error", () => undefined)
      socket.on("close", () => resolve(Buffer.concat(chunks)))
    })
    // A TLS alert at most; never a plaintext ErrorResponse into what the client thinks is TLS.
    expect(received[0] === undefined || received[0] === 0x15).toBe(true)
    await expect.poll(() => tidepool.logs.filter((l) => l.code === "ESSLHANDSHAKE").length).toBeGreaterThan(logged)
    const client = await connectPg({ user: "app.acme", password: "app-secret", ssl: { rejectUnauthorized: false } })
    await client.end()
  })

  it("a second SSLRequest over TLS is refused", async () => {
    const socket = await sslConnect(tidepool.sessionPort)
    const received = await new Promise<Buffer>((resolve) => {
      const chunks: Array<Buffer> = []
      socket.on("data", (c) => chunks.push(c))
      socket.on("error", () => undefined)
      socket.on("close", () => resolve(Buffer.concat(chunks)))
      socket.write(sslRequest())
    })
    expect(received.toString()).toContain(
      "(ESTARTUPMESSAGE) Invalid startup message: unsupported frontend protocol 1234.5679"
    )
  })

  it.each(PORTS)("a large result reaches a TLS client intact (%s)", async (port) => {
    // What the pooler relays from the server is a view of a reused read buffer (src/upstream/
    // ReadBuffer.ts), handed to the TLS socket; a buffer overwritten too soon would show in the rows.
    const client = await connectPg({
      port: tidepool[port],
      user: "app.acme",
      password: "app-secret",
      ssl: { rejectUnauthorized: false }
    })
    const { rows } = await client.query<{ i: number; h: string }>(
      "SELECT i, md5(i::text) AS h FROM generate_series(1, 100000) i"
    )
    const wrong = rows.findIndex(
      (row, index) =>
        row.i !== index + 1 ||
        row.h !==
          createHash("md5")
            .update(String(index + 1))
            .digest("hex")
    )
    expect(wrong).toBe(-1)
    expect(rows).toHaveLength(100000)
    await client.end()
  })

  it("caps TLS records at 8 KB so libpq's async API never stalls on a large result", async () => {
    // A relay between client and pooler that reads the TLS record headers the pooler sends.
    const sizes: Array<number> = []
    const relay = net.createServer((inbound) => {
      const outbound = net.connect(tidepool.transactionPort, "127.0.0.1")
      let pending = Buffer.alloc(0)
      let plaintextAnswer = true
      outbound.on("data", (chunk: Buffer) => {
        inbound.write(chunk)
        pending = Buffer.concat([pending, chunk])
        if (plaintextAnswer) {
          pending = pending.subarray(1) // the `S`
          plaintextAnswer = false
        }
        while (pending.length >= 5 && pending.length >= 5 + pending.readUInt16BE(3)) {
          sizes.push(pending.readUInt16BE(3))
          pending = pending.subarray(5 + pending.readUInt16BE(3))
        }
      })
      inbound.pipe(outbound)
      inbound.on("error", () => outbound.destroy())
      outbound.on("error", () => inbound.destroy())
      inbound.on("close", () => outbound.destroy())
    })
    await new Promise<void>((resolve) => relay.listen(0, "127.0.0.1", resolve))
    try {
      const client = await connectPg({
        port: (relay.address() as net.AddressInfo).port,
        user: "app.acme",
        password: "app-secret",
        ssl: { rejectUnauthorized: false }
      })
      const { rows } = await client.query("SELECT repeat('x', 200000) AS big FROM generate_series(1, 5)")
      expect(rows.map((r) => r.big.length)).toEqual([200000, 200000, 200000, 200000, 200000])
      await client.end()
    } finally {
      relay.close()
    }
    // 1 MB went through: without the cap the records would be 16 KB.
    expect(sizes.length).toBeGreaterThan(100)
    expect(Math.max(...sizes)).toBeLessThanOrEqual(8192 + 256)
  })
})

describe("SCRAM-SHA-256-PLUS", () => {
  it.skipIf(!hasPsql)("channel_binding=require works over TLS with RSA+ECDSA and ECDSA/SHA-384", async () => {
    for (const server of [tidepool, ecdsaOnly]) {
      for (const port of PORTS) {
        const { stdout } = await psql(
          psqlUrl(server[port], { sslmode: "require", channel_binding: "require" }),
          "SELECT 'bound'"
        )
        expect(stdout.trim()).toBe("bound")
      }
    }
  })

  it.skipIf(!hasPsql)("channel_binding=require fails cleanly over plaintext; the pooler keeps serving", async () => {
    const result = await outcome(
      psql(psqlUrl(tidepool.sessionPort, { sslmode: "disable", channel_binding: "require" }), "SELECT 1")
    )
    expect(result).toMatchObject({ ok: false, stderr: expect.stringMatching(/channel binding/) })
    const { stdout } = await psql(psqlUrl(tidepool.sessionPort, { sslmode: "disable" }), "SELECT 'still here'")
    expect(stdout.trim()).toBe("still here")
  })

  it("offers SCRAM-SHA-256-PLUS first over TLS and only SCRAM-SHA-256 in plaintext", async () => {
    const mechanisms = async (socket: net.Socket) => {
      socket.write(startupMessage({ user: "app.acme", database: "postgres" }))
      const body = await new Promise<Buffer>((resolve) => socket.once("data", resolve))
      socket.destroy()
      expect(body[0]).toBe(0x52)
      return body
        .toString("utf8", 9)
        .split("\0")
        .filter((m) => m !== "")
    }
    expect(await mechanisms(await sslConnect(tidepool.sessionPort))).toEqual(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])
    const plainSocket = net.connect(tidepool.sessionPort, "127.0.0.1")
    await new Promise((resolve) => plainSocket.once("connect", resolve))
    expect(await mechanisms(plainSocket)).toEqual(["SCRAM-SHA-256"])
  })
})

describe("tenant rules over TLS", () => {
  it("enforce_ssl: ESSLREQUIRED in plaintext, served over TLS", async () => {
    expect(await failPg({ user: "app.secure", password: "app-secret" })).toEqual({
      code: "XX000",
      message: "(ESSLREQUIRED) SSL connection is required for user: app"
    })
    const client = await connectPg({ user: "app.secure", password: "app-secret", ssl: { rejectUnauthorized: false } })
    expect((await client.query("SELECT 'secure' AS v")).rows[0].v).toBe("secure")
    await client.end()
  })

  it("a username without a tenant reaches the tenant whose sni_hostname the client sent", async () => {
    const client = await connectPg({
      user: "sni",
      password: "app-secret",
      ssl: { ca: certs.ca.certPem, servername: "other.example", checkServerIdentity: () => undefined }
    })
    expect((await client.query("SELECT 'by sni' AS v")).rows[0].v).toBe("by sni")
    await client.end()
    // No SNI match, no tenant in the username.
    expect(
      await failPg({
        user: "sni",
        password: "app-secret",
        ssl: { rejectUnauthorized: false, servername: "nobody.example" }
      })
    ).toMatchObject({ message: "(ENOIDENTIFIER) no tenant identifier provided (external_id or sni_hostname required)" })
    // Plaintext carries no SNI.
    expect(await failPg({ user: "sni", password: "app-secret" })).toMatchObject({
      message: expect.stringContaining("ENOIDENTIFIER")
    })
  })

  it.skipIf(!hasPsql)("psql to host localhost sends SNI and reaches the sni_hostname tenant", async () => {
    const { stdout } = await psql(
      psqlUrl(tidepool.transactionPort, { sslmode: "verify-full", sslrootcert: certs.ca.cert }, "localhost", "sni"),
      "SELECT 'sni via psql'"
    )
    expect(stdout.trim()).toBe("sni via psql")
  })
})

describe("cancel requests from TLS clients", () => {
  it("cancels the TLS client's query, by a plaintext cancel and by one sent over TLS", async () => {
    for (const overTls of [false, true]) {
      const victim = await connectPg({ user: "app.acme", password: "app-secret", ssl: { rejectUnauthorized: false } })
      const running = victim.query("SELECT pg_sleep(30)").then(
        () => undefined,
        (e: { code?: string }) => e.code
      )
      for (;;) {
        const rows = await db.query(
          "SELECT 1 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'"
        )
        if (rows.length > 0) break
      }
      const { processID, secretKey } = victim as unknown as { processID: number; secretKey: number }
      const socket = overTls ? await sslConnect(tidepool.sessionPort) : net.connect(tidepool.sessionPort, "127.0.0.1")
      if (!overTls) await new Promise((resolve) => socket.once("connect", resolve))
      await new Promise<void>((resolve) => {
        socket.on("error", () => undefined)
        socket.on("close", () => resolve())
        socket.end(cancelRequest(processID, secretKey))
      })
      expect(await running).toBe("57014")
      await victim.end()
    }
  })
})

describe("certificate reload", () => {
  it("serves a renewed certificate without a restart and keeps the last good one on a broken write", async () => {
    const dir = await fs.mkdtemp(path.join(certs.dir, "reload-"))
    const cert = path.join(dir, "server.crt")
    const key = path.join(dir, "server.key")
    await fs.copyFile(certs.rsa.cert, cert)
    await fs.copyFile(certs.rsa.key, key)
    const reloading = await startTidepool({
      tenants: tenants(db),
      captureLogs: true,
      config: { downstreamCertPath: cert, downstreamKeyPath: key }
    })
    try {
      const served = async () => {
        const socket = await sslConnect(reloading.sessionPort)
        const serial = serialOf(socket)
        socket.destroy()
        return serial
      }
      expect(await served()).toBe(new X509Certificate(certs.rsa.certPem).serialNumber)
      expect(reloading.logs.map((l) => l.message)).toContain(
        `TLS for clients: rsa CN=localhost until ${new X509Certificate(certs.rsa.certPem).validTo}`
      )
      // As a renewal does: new files moved into place.
      await fs.copyFile(certs.renewed.cert, `${cert}.new`)
      await fs.copyFile(certs.renewed.key, `${key}.new`)
      await fs.rename(`${key}.new`, key)
      await fs.rename(`${cert}.new`, cert)
      const renewed = new X509Certificate(certs.renewed.certPem).serialNumber
      await expect.poll(served, { timeout: 10_000 }).toBe(renewed)

      // SIGHUP reloads too (nothing changed here, so the same certificate).
      const reloads = () => reloading.logs.filter((l) => l.message.startsWith("TLS certificate reloaded")).length
      const before = reloads()
      process.emit("SIGHUP", "SIGHUP")
      await expect.poll(reloads).toBe(before + 1)
      expect(await served()).toBe(renewed)

      await fs.writeFile(key, "not a key")
      await expect
        .poll(() => reloading.logs.some((l) => l.message.includes("TLS certificate reload failed")), {
          timeout: 10_000
        })
        .toBe(true)
      expect(await served()).toBe(renewed)
      const client = new pg.Client({
        host: "127.0.0.1",
        port: reloading.sessionPort,
        user: "app.acme",
        password: "app-secret",
        database: "postgres",
        ssl: { ca: certs.ca.certPem }
      })
      await client.connect()
      await client.end()
    } finally {
      await reloading.stop()
    }
  })

  it("refuses to start with a certificate that does not match its key", async () => {
    await expect(
      startTidepool({
        tenants: [],
        config: { downstreamCertPath: certs.rsa.cert, downstreamKeyPath: certs.ecdsa.key }
      })
    ).rejects.toThrow(/GLOBAL_DOWNSTREAM_CERT_PATH: invalid certificate or key/)
  })
})

// Not a test of Tidepool: a guard that the RawClient helper works over TLS, used by other suites.
describe("RawClient over TLS", () => {
  it("logs in on an upgraded socket", async () => {
    const raw = await RawClient.login(await sslConnect(tidepool.sessionPort), "app.acme", "app-secret")
    raw.close()
  })
})
