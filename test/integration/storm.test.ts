import { once } from "node:events"
import * as net from "node:net"
import { Effect } from "effect"
import pg from "pg"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { LeanClient, ScramKeyCache, ServerError } from "../../bench/leanClient.ts"
import { defaultMaxClientConnections } from "../../src/config/AppConfig.ts"
import { startupMessage } from "../../src/protocol/index.ts"
import { EventCounters } from "../../src/telemetry/index.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"
import { hasTool, openFilesLimit, run } from "../support/tools.ts"
import { errorFields, loginUntilOk, Wire } from "../support/wire.ts"

// Connection storms: thousands of concurrent SCRAM logins all succeed; beyond the node's limits
// (TIDEPOOL_MAX_HANDSHAKES, TIDEPOOL_MAX_CLIENT_CONNECTIONS) new connections get their coded
// refusal at once while the sessions already running are undisturbed. The clients are the lean
// raw-socket SCRAM clients of bench/leanClient.ts (keys derived once), so the test's own CPU goes
// to the pooler, not to 2,000 PBKDF2 derivations.

const PASSWORD = "storm-secret"
const hasPsql = await hasTool("psql")

// Both ends of every connection are in this process (Tidepool runs in-process): two descriptors per
// client. A CI machine whose hard limit is the old 1024 default runs a smaller storm, said in the
// test's name, rather than fail on EMFILE.
const STORM = Math.min(2000, Math.floor((openFilesLimit() - 300) / 2))

let db: PostgresServer
let roomy: RunningTidepool
let tight: RunningTidepool

const HANDSHAKES = 20
const CLIENTS = 60

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: PASSWORD }] })
  const tenants = [
    {
      external_id: "storm",
      ...upstreamOf(db),
      default_max_clients: 5000,
      users: [{ db_user: "app", db_password: PASSWORD, pool_size: 4, max_clients: 5000 }]
    }
  ]
  // The defaults, but for the client cap: this process's descriptor limit is shared by both ends.
  roomy = await startTidepool({ tenants })
  tight = await startTidepool({ tenants, config: { maxHandshakes: HANDSHAKES, maxClientConnections: CLIENTS } })
})

afterAll(async () => {
  await roomy?.stop()
  await tight?.stop()
  await db?.stop()
})

const target = (tidepool: RunningTidepool) => ({
  host: tidepool.host,
  port: tidepool.transactionPort,
  user: "app.storm",
  password: PASSWORD,
  database: "postgres"
})

const admission = (tidepool: RunningTidepool) =>
  tidepool.runtime.runPromise(Effect.map(EventCounters, (events) => ({ ...events.admission })))

/**
 * What a refused connection receives for its StartupMessage: the ErrorResponse, then the close,
 * with no authentication request before it (the packet itself is never parsed).
 */
const refusalOf = async (port: number): Promise<Record<string, string>> => {
  const wire = await Wire.connect(port)
  wire.socket.write(startupMessage({ user: "app.storm", database: "postgres" }))
  const message = await wire.next()
  expect(message.type).toBe("E")
  await expect(wire.next()).rejects.toThrow("connection closed")
  return errorFields(message.body)
}

describe("TIDEPOOL_MAX_CLIENT_CONNECTIONS's default", () => {
  it("is the open-files limit less a reserve, bounded by the heap at 64 kB a client, at least 100", () => {
    const GB = 1024 ** 3
    expect(defaultMaxClientConnections(20_000, 4 * GB)).toBe(20_000 - 1024)
    expect(defaultMaxClientConnections(1_048_576, 4 * GB)).toBe(65_536)
    expect(defaultMaxClientConnections(1024, 4 * GB)).toBe(768)
    expect(defaultMaxClientConnections(Number.POSITIVE_INFINITY, 2 * GB)).toBe(32_768)
    expect(defaultMaxClientConnections(256, 4 * GB)).toBe(192)
    expect(defaultMaxClientConnections(64, 4 * GB)).toBe(100)
  })
})

describe("login storms", () => {
  it(`${STORM} clients logging in at once all succeed, then each runs a query`, async () => {
    const keys = new ScramKeyCache()
    const clients = await Promise.all(Array.from({ length: STORM }, () => LeanClient.login(target(roomy), keys)))
    expect(clients).toHaveLength(STORM)
    // Idle after the storm, every one of them still answers.
    await Promise.all(clients.map((client) => client.query("select 1")))
    expect(await admission(roomy)).toMatchObject({ handshaking: 0, refusedClients: 0, refusedHandshakes: 0 })
    for (const client of clients) client.terminate()
  })

  it("a storm beyond the handshake cap is refused with EMAXHANDSHAKES; running and idle sessions are undisturbed", async () => {
    const keys = new ScramKeyCache()
    const runner = new pg.Client({ ...target(tight), port: tight.transactionPort })
    runner.on("error", () => undefined)
    await runner.connect()
    const idle = await Promise.all(Array.from({ length: 10 }, () => LeanClient.login(target(tight), keys)))

    // HANDSHAKES connections in their handshake: each asked for TLS and got `N`, so the pooler has
    // accepted and counted it, and none has logged in.
    const pending = await Promise.all(
      Array.from({ length: HANDSHAKES }, async () => {
        const socket = net.connect(tight.transactionPort, "127.0.0.1")
        socket.write(Buffer.from([0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]))
        const [answer] = (await once(socket, "data")) as [Buffer]
        expect(answer.toString()).toBe("N")
        return new Wire(socket)
      })
    )

    // A session running queries throughout the storm.
    let storming = true
    let ran = 0
    const running = (async () => {
      while (storming) {
        await runner.query("select pg_backend_pid()")
        ran++
      }
    })()
    const outcomes = await Promise.all(
      Array.from({ length: 200 }, () =>
        LeanClient.login(target(tight), keys).then(
          () => "logged in",
          (error: unknown) => (error instanceof ServerError ? `${error.sqlstate} ${error.message}` : String(error))
        )
      )
    )
    const silent = await refusalOf(tight.transactionPort)
    // libpq asks for TLS first (sslmode=prefer): the refusal is its answer, and psql reports it.
    const psql = hasPsql
      ? await run("psql", [
          `postgresql://app.storm:${PASSWORD}@127.0.0.1:${tight.transactionPort}/postgres?sslmode=prefer`,
          "-c",
          "select 1"
        ]).then(
          () => "connected",
          (error: { stderr: string }) => error.stderr
        )
      : undefined
    storming = false
    await running

    expect(new Set(outcomes)).toEqual(
      new Set([
        `53300 (EMAXHANDSHAKES) too many connections logging in at once (this node's limit: ${HANDSHAKES}); retry shortly`
      ])
    )
    expect(silent).toMatchObject({ S: "FATAL", C: "53300" })
    expect(silent.M).toMatch(/^\(EMAXHANDSHAKES\)/)
    if (psql !== undefined) expect(psql).toContain("(EMAXHANDSHAKES) too many connections logging in at once")
    expect(ran).toBeGreaterThan(0)
    expect((await runner.query("select 1 as one")).rows[0].one).toBe(1)
    await Promise.all(idle.map((client) => client.query("select 1")))
    expect(await admission(tight)).toMatchObject({ handshaking: HANDSHAKES, refusedHandshakes: hasPsql ? 202 : 201 })

    // A login that succeeds frees its slot before its AuthenticationOk is sent: after these, the
    // cap has room again, with no waiting on the pooler.
    for (const wire of pending) {
      await loginUntilOk(wire, "app.storm", PASSWORD)
    }
    const after = await LeanClient.login(target(tight), keys)
    await after.query("select 1")

    // Client cap: runner, idle, pending and `after` are open; fill up to the cap, then one more.
    const open = 1 + idle.length + pending.length + 1
    const more = await Promise.all(Array.from({ length: CLIENTS - open }, () => LeanClient.login(target(tight), keys)))
    const refused = await refusalOf(tight.sessionPort)
    expect(refused).toMatchObject({ S: "FATAL", C: "53300" })
    expect(refused.M).toBe(`(EMAXCLIENTCONNS) sorry, too many clients already (this node's limit: ${CLIENTS})`)
    expect(await admission(tight)).toMatchObject({ open: CLIENTS, handshaking: 0, refusedClients: 1 })
    // Everyone already in still answers.
    await Promise.all([...idle, ...more, after].map((client) => client.query("select 1")))
    expect((await runner.query("select 1 as one")).rows[0].one).toBe(1)

    for (const client of [...idle, ...more, after]) client.terminate()
    for (const wire of pending) wire.socket.destroy()
    await runner.end()
  })
})
