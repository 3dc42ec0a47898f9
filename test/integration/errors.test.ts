import * as net from "node:net"
import pg from "pg"
import { serialize } from "pg-protocol"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { cancelRequest } from "../../src/protocol/index.ts"
import { freePort } from "../support/ports.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { RawClient } from "../support/raw.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"

let db: PostgresServer
let tidepool: RunningTidepool
let deadPort: number

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: "app-secret" }] })
  deadPort = await freePort()
  tidepool = await startTidepool({
    tenants: [
      {
        external_id: "acme",
        ...upstreamOf(db),
        users: [
          { db_user: "app", db_password: "app-secret", pool_size: 2 },
          // The pooler accepts this user, but the database does not know its password.
          { db_user_alias: "stale", db_user: "app", db_password: "not-the-db-password", pool_size: 2 }
        ]
      },
      {
        external_id: "many",
        ...upstreamOf(db),
        users: [{ db_user: "app", db_password: "app-secret" }]
      },
      {
        external_id: "walled",
        ...upstreamOf(db),
        allow_list: ["10.0.0.0/8"],
        users: [{ db_user: "app", db_password: "app-secret" }]
      },
      {
        external_id: "secure",
        ...upstreamOf(db),
        enforce_ssl: true,
        users: [{ db_user: "app", db_password: "app-secret" }]
      },
      {
        external_id: "gone",
        db_host: "127.0.0.1",
        db_port: deadPort,
        db_database: "postgres",
        users: [{ db_user: "app", db_password: "app-secret", pool_size: 2 }]
      }
    ],
    // The handshake timeout stays at its default here: every test of this file logs in, and a short
    // one would fail logins on a loaded machine. EAUTHTIMEOUT has an instance of its own.
    config: { maxMessageSize: 4096, maxPoolsPerTenant: 3 }
  })
})

afterAll(async () => {
  await tidepool?.stop()
  await db?.stop()
})

const failToConnect = async (config: pg.ClientConfig) => {
  const client = new pg.Client({ host: tidepool.host, port: tidepool.sessionPort, database: "postgres", ...config })
  return client.connect().then(
    async () => {
      await client.end()
      throw new Error("connected, expected an error")
    },
    (e: pg.DatabaseError) => ({ code: e.code, message: e.message, severity: e.severity })
  )
}

/** ErrorResponse body → fields by their one-letter codes. */
const errorFields = (body: Buffer): Record<string, string> => {
  const fields: Record<string, string> = {}
  let i = 0
  while (i < body.length && body[i] !== 0) {
    const end = body.indexOf(0, i + 1)
    fields[String.fromCharCode(body[i]!)] = body.toString("utf8", i + 1, end)
    i = end + 1
  }
  return fields
}

/** Sends raw bytes as the first packet and collects the ErrorResponse fields. */
const rawError = (bytes: Buffer): Promise<Record<string, string>> =>
  new Promise((resolve, reject) => {
    const socket = net.connect(tidepool.sessionPort, "127.0.0.1", () => socket.write(bytes))
    let received = Buffer.alloc(0)
    socket.on("data", (chunk) => {
      received = Buffer.concat([received, chunk])
    })
    socket.on("error", reject)
    socket.on("close", () => {
      if (received[0] !== 0x45) return reject(new Error(`expected ErrorResponse, got ${received.toString("hex")}`))
      resolve(errorFields(received.subarray(5)))
    })
  })

/**
 * Sends a CancelRequest on a connection of its own, as libpq does: without closing our side, so the
 * close comes from Tidepool, which closes once it has dealt with the request (a client's FIN would
 * make Node close the socket at once, before the cancel went anywhere).
 */
const sendCancel = (port: number, processId: number, secretKey: Buffer): Promise<void> =>
  new Promise((resolve, reject) => {
    const socket = net.connect(port, "127.0.0.1", () => socket.write(cancelRequest(processId, secretKey)))
    socket.on("error", reject)
    socket.on("close", () => resolve())
  })

describe("client-visible errors", () => {
  it("EWRONGPASSWORD", async () => {
    expect(await failToConnect({ user: "app.acme", password: "wrong" })).toMatchObject({
      code: "28P01",
      message: 'password authentication failed for user "app"'
    })
  })

  it("ENOTFOUND for an unknown tenant and an unknown user", async () => {
    expect(await failToConnect({ user: "app.nobody", password: "x" })).toMatchObject({
      code: "XX000",
      message: "(ENOTFOUND) tenant/user app.nobody not found"
    })
    expect(await failToConnect({ user: "ghost.acme", password: "x" })).toMatchObject({
      message: "(ENOTFOUND) tenant/user ghost.acme not found"
    })
  })

  it("ENOIDENTIFIER", async () => {
    expect(await failToConnect({ user: "app", password: "x" })).toMatchObject({
      code: "XX000",
      message: "(ENOIDENTIFIER) no tenant identifier provided (external_id or sni_hostname required)"
    })
  })

  it("EINVALIDUSERINFO", async () => {
    expect(await failToConnect({ user: `${"u".repeat(64)}.acme`, password: "x" })).toMatchObject({
      code: "XX000",
      message: '(EINVALIDUSERINFO) Authentication error, reason: "Invalid format for user or db_name"'
    })
  })

  it("resolves the tenant from options=reference", async () => {
    const client = new pg.Client({
      host: tidepool.host,
      port: tidepool.sessionPort,
      user: "app",
      password: "app-secret",
      database: "postgres",
      options: "-c reference=acme"
    })
    await client.connect()
    expect((await client.query("SELECT current_user AS u")).rows[0].u).toBe("app")
    await client.end()
  })

  it("EAUTHTIMEOUT when the client stalls in the handshake", async () => {
    const impatient = await startTidepool({
      tenants: [{ external_id: "acme", ...upstreamOf(db), users: [{ db_user: "app", db_password: "app-secret" }] }],
      config: { handshakeTimeoutMs: 300 }
    })
    // A startup packet, then silence where the SASL response should be.
    const startup = Buffer.from("\0\0\0\0\0\x03\0\0user\0app.acme\0database\0postgres\0\0", "latin1")
    startup.writeInt32BE(startup.length, 0)
    const fields = await new Promise<string>((resolve, reject) => {
      const socket = net.connect(impatient.sessionPort, "127.0.0.1", () => socket.write(startup))
      let received = Buffer.alloc(0)
      socket.on("data", (c) => {
        received = Buffer.concat([received, c])
      })
      socket.on("error", reject)
      socket.on("close", () => resolve(received.toString("latin1")))
    }).finally(() => impatient.stop())
    expect(fields).toContain("C08006")
    expect(fields).toContain("(EAUTHTIMEOUT) timeout while waiting for message")
  })

  it("ESTARTUPPACKETTOOLARGE", async () => {
    const header = Buffer.alloc(8)
    header.writeInt32BE(20_000, 0)
    header.writeInt32BE(196608, 4)
    const fields = await rawError(header)
    expect(fields.C).toBe("08P01")
    expect(fields.M).toBe("(ESTARTUPPACKETTOOLARGE) Startup packet too large: 20000 bytes (max 10000 bytes)")
  })

  it("ESTARTUPMESSAGE", async () => {
    const packet = Buffer.alloc(8)
    packet.writeInt32BE(8, 0)
    packet.writeInt32BE(0x00020000, 4) // protocol 2.0
    const fields = await rawError(packet)
    expect(fields.C).toBe("08P01")
    expect(fields.M).toMatch(/^\(ESTARTUPMESSAGE\) Invalid startup message: /)
  })

  it("ECHECKOUTFAILED: an unreachable upstream answers 08006 at once", async () => {
    expect(await failToConnect({ user: "app.gone", password: "app-secret" })).toMatchObject({
      code: "08006",
      message: "Failed to connect to database: connection refused"
    })
  })

  it("ECHECKOUTFAILED: the upstream's own login error is passed on", async () => {
    expect(await failToConnect({ user: "stale.acme", password: "not-the-db-password" })).toMatchObject({
      code: "28P01",
      message: 'password authentication failed for user "app"'
    })
  })

  it("EADDRNOTALLOWED", async () => {
    expect(await failToConnect({ user: "app.walled", password: "app-secret" })).toMatchObject({
      code: "XX000",
      message: "(EADDRNOTALLOWED) address not in tenant allow_list: 127.0.0.1"
    })
  })

  it("EMAXPOOLSREACHED", async () => {
    await db.query("CREATE DATABASE extra_one")
    await db.query("CREATE DATABASE extra_two")
    for (const database of ["postgres", "extra_one", "extra_two"]) {
      const c = new pg.Client({
        connectionString: tidepool.url({ user: "app.many", password: "app-secret", database })
      })
      await c.connect()
      await c.end()
    }
    expect(await failToConnect({ user: "app.many", password: "app-secret", database: "template1" })).toMatchObject({
      code: "XX000",
      message: "(EMAXPOOLSREACHED) max pools count reached"
    })
  })

  it("EAUTHPROTOCOL when the client answers SASL with something else", async () => {
    const startup = Buffer.from("\0\0\0\0\0\x03\0\0user\0app.acme\0database\0postgres\0\0", "latin1")
    startup.writeInt32BE(startup.length, 0)
    const text = await new Promise<string>((resolve, reject) => {
      const socket = net.connect(tidepool.sessionPort, "127.0.0.1", () => socket.write(startup))
      let received = Buffer.alloc(0)
      socket.on("data", (c) => {
        received = Buffer.concat([received, c])
        // After AuthenticationSASL, send a Query instead of a SASLInitialResponse.
        if (received[0] === 0x52 && received.length >= 9 && !socket.writableEnded) {
          socket.write(serialize.query("SELECT 1"))
        }
      })
      socket.on("error", reject)
      socket.on("close", () => resolve(received.toString("latin1")))
    })
    expect(text).toContain("C08P01")
    expect(text).toContain("(EAUTHPROTOCOL) protocol violation during authentication")
  })

  it("ESSLREQUIRED", async () => {
    expect(await failToConnect({ user: "app.secure", password: "app-secret" })).toMatchObject({
      code: "XX000",
      message: "(ESSLREQUIRED) SSL connection is required for user: app"
    })
  })

  for (const port of ["sessionPort", "transactionPort"] as const) {
    it(`EMESSAGETOOLARGE and EPROTOCOL after login (${port})`, async () => {
      const big = await RawClient.connect(tidepool[port], "app.acme", "app-secret")
      big.write(serialize.query(`SELECT '${"x".repeat(5000)}'`))
      const tooLarge = await big.next()
      expect(tooLarge.type).toBe("E")
      expect(errorFields(tooLarge.body)).toMatchObject({ C: "08P01" })
      expect(errorFields(tooLarge.body).M).toMatch(
        /^\(EMESSAGETOOLARGE\) message too large: \d+ bytes \(max 4096 bytes\)$/
      )

      const bad = await RawClient.connect(tidepool[port], "app.acme", "app-secret")
      bad.write(Buffer.from([0x51, 0, 0, 0, 2]))
      const invalid = await bad.next()
      expect(invalid.type).toBe("E")
      expect(errorFields(invalid.body)).toMatchObject({ C: "08P01" })
      expect(errorFields(invalid.body).M).toMatch(/^\(EPROTOCOL\) invalid frontend message: /)
    })
  }

  it("ESERVERCLOSED when the server dies under a session", async () => {
    const raw = await RawClient.connect(tidepool.sessionPort, "app.acme", "app-secret")
    raw.write(serialize.query("SELECT pg_backend_pid()"))
    const reply = await raw.untilReady(1)
    const pid = Number(reply.find((m) => m.type === "D")!.body.toString("latin1", 6))
    await db.query("SELECT pg_terminate_backend($1)", [pid])
    const errors: Array<Record<string, string>> = []
    while (!raw.closed || errors.length < 2) {
      const m = await raw.next().catch(() => undefined)
      if (m === undefined) break
      if (m.type === "E") errors.push(errorFields(m.body))
    }
    // PostgreSQL's own FATAL is passed on first; then Tidepool says why the session ends.
    expect(errors.map((e) => e.C)).toEqual(["57P01", "08006"])
    expect(errors[1]!.M).toMatch(/^\(ESERVERCLOSED\) server connection lost: /)
  })

  it("keeps serving others after garbage", async () => {
    await rawError(Buffer.from("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
    const client = new pg.Client({ connectionString: tidepool.url({ user: "app.acme", password: "app-secret" }) })
    await client.connect()
    expect((await client.query("SELECT 1 AS one")).rows[0].one).toBe(1)
    await client.end()
  })

  for (const port of ["sessionPort", "transactionPort"] as const) {
    it(`a CancelRequest with a wrong key cancels nothing; the right key cancels (${port})`, async () => {
      // Work that only ends when the test says so: blocked on an advisory lock a direct connection
      // holds (the victim's is a transaction lock, so no pooled server keeps it). A pg_sleep would end
      // by itself, and a cancel that arrived too late would go unseen.
      const lock = port === "sessionPort" ? 71_001 : 71_002
      const holder = new pg.Client({ connectionString: db.url() })
      await holder.connect()
      const victim = new pg.Client({
        connectionString: tidepool.url({
          user: "app.acme",
          password: "app-secret",
          mode: port === "sessionPort" ? "session" : "transaction"
        })
      })
      await victim.connect()
      try {
        // Resolves once the query waits on the lock, with its outcome still to come.
        const blocked = async (): Promise<{ outcome: Promise<string> }> => {
          const sql = `SELECT pg_advisory_xact_lock(${lock}), 'done' AS state`
          const outcome = victim.query(sql).then(
            (r) => r.rows[0].state as string,
            (e: { code?: string }) => `error ${e.code}`
          )
          for (;;) {
            const rows = await db.query(
              "SELECT 1 FROM pg_stat_activity WHERE query = $1 AND wait_event_type = 'Lock'",
              [sql]
            )
            if (rows.length > 0) return { outcome }
          }
        }
        await holder.query("SELECT pg_advisory_lock($1)", [lock])
        const { processID, secretKey } = victim as unknown as { processID: number; secretKey: number }
        const right = Buffer.alloc(4)
        right.writeInt32BE(secretKey)
        const wrong = Buffer.from(right)
        wrong[3]! ^= 1
        const first = (await blocked()).outcome
        // Tidepool closes a cancel connection once the cancel is dispatched, and a dispatched cancel
        // is done when PostgreSQL has taken it: whatever these would cancel is cancelled by now.
        await sendCancel(tidepool[port], processID, wrong)
        await sendCancel(tidepool[port], processID ^ 1, right)
        // A protocol 3.2 key that starts with the right four bytes is still not the key.
        await sendCancel(tidepool[port], processID, Buffer.concat([right, Buffer.alloc(28, 7)]))
        await holder.query("SELECT pg_advisory_unlock($1)", [lock])
        expect(await first).toBe("done")

        await holder.query("SELECT pg_advisory_lock($1)", [lock])
        const second = (await blocked()).outcome
        await sendCancel(tidepool[port], processID, right)
        expect(await second).toBe("error 57014")
      } finally {
        await victim.end()
        await holder.end()
      }
    })
  }
})
