import { once } from "node:events"
import * as net from "node:net"
import pg from "pg"
import { serialize } from "pg-protocol"
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest"
import { PoolRegistry } from "../../src/pool/index.ts"
import { startupMessage } from "../../src/protocol/index.ts"
import { READ_AHEAD_LIMIT } from "../../src/session/ClientSocket.ts"
import { EventCounters } from "../../src/telemetry/index.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"
import { loginUntilOk, Wire } from "../support/wire.ts"

/*
 * Hostile input on the login path: clients that stream while they wait, floods of refused logins,
 * and concurrent password guessing. What a connection costs is read off the pooler's own socket for
 * it (bytes read from the kernel, paused or not), not off the process's memory.
 */

let db: PostgresServer
const running: Array<RunningTidepool> = []
/** Sockets a failed test could leave streaming into a pooler that later tests share the CPU with. */
const sockets: Array<net.Socket> = []

afterEach(() => {
  for (const socket of sockets.splice(0)) socket.destroy()
})

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: "app-secret" }] })
})

afterAll(async () => {
  for (const tidepool of running) await tidepool.stop()
  await db?.stop()
})

const MiB = 1024 * 1024
/**
 * What a paused connection may have read: the read-ahead limit, the 64 KiB read that crossed it,
 * Node's stream buffer (16 KiB on Node 20, 64 KiB from Node 22) and the read that filled it, plus
 * the login's own bytes.
 */
const readBound = (pooler: net.Socket) => READ_AHEAD_LIMIT + 64 * 1024 + pooler.readableHighWaterMark + 64 * 1024 + 4096

const start = async (tenants: ReadonlyArray<Record<string, unknown>>, config: Record<string, unknown> = {}) => {
  const tidepool = await startTidepool({
    tenants: tenants.map((t) => ({ ...upstreamOf(db), ...t })),
    config,
    captureLogs: true
  })
  running.push(tidepool)
  return tidepool
}

const user = (extra: Record<string, unknown> = {}) => ({ db_user: "app", db_password: "app-secret", ...extra })

/** Polls `condition` until it holds; a deadline turns a hang into a failure that says what was awaited. */
const until = async (what: string, condition: () => boolean, deadlineMs = 20_000) => {
  const deadline = Date.now() + deadlineMs
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`gave up waiting for: ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 5))
  }
}

/** The pooler's end of `client`'s connection (Tidepool runs in this process). */
const poolerSideOf = async (client: net.Socket): Promise<net.Socket> => {
  let found: net.Socket | undefined
  await until("the pooler to accept the connection", () => {
    const handles = (process as unknown as { _getActiveHandles(): Array<unknown> })._getActiveHandles()
    found = handles.find(
      (h): h is net.Socket =>
        h instanceof net.Socket && h.remotePort === client.localPort && h.localPort === client.remotePort
    )
    return found !== undefined
  })
  return found!
}

const connectRaw = async (port: number) => {
  const wire = await Wire.connect(port)
  sockets.push(wire.socket)
  return wire
}

/** The pool of tenant `acme`'s user `app` in transaction mode. */
const acmePool = async (tidepool: RunningTidepool) => {
  const pools = (await tidepool.runtime.runPromise(PoolRegistry)).all()
  const pool = pools.find((p) => p.settings.tenant === "acme" && p.settings.mode === "transaction")
  if (pool === undefined) throw new Error("no pool for acme")
  return pool
}

const attempt = async (url: string) => {
  const client = new pg.Client({ connectionString: url })
  client.on("error", () => undefined)
  try {
    await client.connect()
    await client.query("SELECT 1")
    await client.end()
    return "ok"
  } catch (e) {
    const message = (e as pg.DatabaseError).message
    return message.match(/^\((E[A-Z]+)\)/)?.[1] ?? (e as pg.DatabaseError).code ?? message
  }
}

const tally = (outcomes: ReadonlyArray<string>) => {
  const counts: Record<string, number> = {}
  for (const o of outcomes) counts[o] = (counts[o] ?? 0) + 1
  return counts
}

describe("a client that sends while its login waits for a server", () => {
  it("is paused at the read-ahead limit, others are served, and its bytes reach the server once one is free", async () => {
    const tidepool = await start([{ external_id: "acme", users: [user({ pool_size: 1 })] }])
    const holder = new pg.Client({
      connectionString: tidepool.url({ user: "app.acme", password: "app-secret", mode: "transaction" })
    })
    holder.on("error", () => undefined)
    await holder.connect()
    await holder.query("BEGIN") // holds the pool's only server
    // A setting no server of the pool has accepted yet must be tried on one: the login waits.
    const wire = await connectRaw(tidepool.transactionPort)
    await loginUntilOk(wire, "app.acme", "app-secret", { application_name: "streamer" })
    const pooler = await poolerSideOf(wire.socket)
    const literal = "x".repeat(MiB)
    const queries = Array.from({ length: 40 }, () => serialize.query(`SELECT length('${literal}') AS n`))
    wire.socket.write(Buffer.concat(queries))
    // Unbounded, the pooler reads the 40 MiB nobody consumes; bounded, it pauses at the limit.
    await until("the pooler to pause or read 8 MiB", () => pooler.isPaused() || pooler.bytesRead > 8 * MiB)
    expect(pooler.isPaused()).toBe(true)
    expect(pooler.bytesRead).toBeLessThanOrEqual(readBound(pooler))
    expect((await holder.query("SELECT 2 AS two")).rows).toEqual([{ two: 2 }])
    expect(pooler.bytesRead).toBeLessThanOrEqual(readBound(pooler))

    await holder.query("COMMIT")
    const lengths: Array<string> = []
    let ready = 0
    while (ready < 41) {
      const m = await wire.next()
      if (m.type === "E") throw new Error(m.body.toString("latin1"))
      if (m.type === "D") lengths.push(m.body.toString("latin1", 6))
      if (m.type === "Z") ready++
    }
    expect(lengths).toEqual(Array.from({ length: 40 }, () => String(MiB)))
    wire.socket.end(serialize.end())
    await holder.end()
  })

  it("gives up its place in the queue when the client leaves", async () => {
    const tidepool = await start([{ external_id: "acme", users: [user({ pool_size: 1 })] }])
    const holder = new pg.Client({
      connectionString: tidepool.url({ user: "app.acme", password: "app-secret", mode: "transaction" })
    })
    holder.on("error", () => undefined)
    await holder.connect()
    await holder.query("BEGIN")
    const pool = await acmePool(tidepool)
    const wire = await connectRaw(tidepool.transactionPort)
    await loginUntilOk(wire, "app.acme", "app-secret", { application_name: "leaver" })
    await until("the login to wait for a server", () => pool.stats.waiting === 1)
    wire.socket.destroy()
    await until("the waiting login to leave the queue", () => pool.stats.waiting === 0)
    await holder.query("COMMIT")
    await holder.end()
  })

  it("waits at most the user's pool_checkout_timeout, not forever and not the handshake timeout", async () => {
    const tidepool = await start([{ external_id: "acme", users: [user({ pool_size: 1, pool_checkout_timeout: 300 })] }])
    const holder = new pg.Client({
      connectionString: tidepool.url({ user: "app.acme", password: "app-secret", mode: "transaction" })
    })
    holder.on("error", () => undefined)
    await holder.connect()
    await holder.query("BEGIN")
    const url = tidepool.url({ user: "app.acme", password: "app-secret", mode: "transaction" })
    expect(await attempt(`${url}?application_name=latecomer`)).toBe("ECHECKOUTTIMEOUT")
    await holder.query("COMMIT")
    expect(await attempt(`${url}?application_name=latecomer`)).toBe("ok")
    await holder.end()
  })
})

describe("refused logins", () => {
  it("read nothing past the refusal while they wait out the failure delay", async () => {
    const tidepool = await start([{ external_id: "acme", users: [user()] }], { authFailureDelayMs: 500 })
    const wire = await connectRaw(tidepool.sessionPort)
    const socket = wire.socket
    const pooler = await poolerSideOf(socket)
    socket.write(startupMessage({ user: "app.nowhere", database: "postgres" }))
    socket.write(Buffer.alloc(40 * MiB, 0x51))
    await once(pooler, "close")
    expect(pooler.bytesRead).toBeLessThanOrEqual(readBound(pooler))
    socket.destroy()
    expect(wire.closed || socket.destroyed).toBe(true)
  })

  it("count toward the address's breaker when they name tenants or users that do not exist", async () => {
    const tidepool = await start([
      { external_id: "acme", users: [user()] },
      { external_id: "other", users: [user()] }
    ])
    const url = (name: string) => tidepool.url({ user: name, password: "app-secret" })
    const made_up = await Promise.all(Array.from({ length: 10 }, (_, i) => attempt(url(`app.nowhere${i}`))))
    expect(tally(made_up)).toEqual({ ENOTFOUND: 10 })
    // Blocked for every made-up name now; tenants that exist are judged on their own.
    expect(await attempt(url("app.nowhere-else"))).toBe("ECIRCUITBREAKER")
    expect(await attempt(url("app.acme"))).toBe("ok")

    const users = await Promise.all(Array.from({ length: 10 }, (_, i) => attempt(url(`nobody${i}.other`))))
    expect(tally(users)).toEqual({ ENOTFOUND: 10 })
    expect(await attempt(url("app.other"))).toBe("ECIRCUITBREAKER")
    expect(await attempt(url("app.acme"))).toBe("ok")
    // One warning per block, not one per refusal.
    const blocks = tidepool.logs.filter((l) => l.code === "ECIRCUITBREAKER" && l.level === "WARN")
    expect(blocks.map((l) => l.message)).toEqual([
      "127.0.0.1 blocked for 120 s after 10 failed logins naming tenants that do not exist",
      "127.0.0.1 blocked for 120 s after 10 failed logins"
    ])
  })
})

describe("concurrent password guessing from one address", () => {
  it("runs at most the breaker's threshold of password checks: 100 at once get 10 checks", async () => {
    const tidepool = await start([{ external_id: "guarded", users: [user()] }], { authFailureDelayMs: 100 })
    const url = tidepool.url({ user: "app.guarded", password: "wrong" })
    const outcomes = await Promise.all(Array.from({ length: 100 }, () => attempt(url)))
    expect(tally(outcomes)).toEqual({ "28P01": 10, ECIRCUITBREAKER: 90 })
    const events = await tidepool.runtime.runPromise(EventCounters)
    expect(events.joinsFail.get("guarded\u0000scram-sha-256\u0000EWRONGPASSWORD")).toBe(10)
    expect(events.joinsFail.get("guarded\u0000scram-sha-256\u0000ECIRCUITBREAKER")).toBe(90)
  })

  it("lets more concurrent logins with the right password than the threshold all in (they wait their turn)", async () => {
    const tidepool = await start([{ external_id: "busy", users: [user({ pool_size: 2 })] }])
    const url = tidepool.url({ user: "app.busy", password: "app-secret", mode: "transaction" })
    const outcomes = await Promise.all(Array.from({ length: 40 }, () => attempt(url)))
    expect(tally(outcomes)).toEqual({ ok: 40 })
  })
})
