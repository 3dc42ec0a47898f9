import * as net from "node:net"
import { Effect } from "effect"
import pg from "pg"
import { serialize } from "pg-protocol"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { tidepoolError } from "../../src/errors/index.ts"
import { Listeners } from "../../src/listener/index.ts"
import { PoolRegistry } from "../../src/pool/index.ts"
import { ScramClient, startupMessage } from "../../src/protocol/index.ts"
import { SessionRegistry } from "../../src/session/index.ts"
import { EventCounters } from "../../src/telemetry/index.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"
import { errorFields, Wire } from "../support/wire.ts"

// Review of the login/session-lifetime rewrite (docs/login-path.md): the ways a login or a session
// ends that hold, or free too late, something a reconnecting client or the shutdown waits for.

const PASSWORD = "review-secret"

let db: PostgresServer

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: PASSWORD }] })
})

afterAll(async () => {
  await db?.stop()
})

const tenant = (poolSize: number) => ({
  external_id: "acme",
  ...upstreamOf(db),
  users: [{ db_user: "app", db_password: PASSWORD, pool_size: poolSize }]
})

/** Rejects after `ms` naming what was awaited: a hang becomes a failure that says what hung. */
const within = <A>(what: string, promise: Promise<A>, ms = 15_000): Promise<A> => {
  let timer: ReturnType<typeof setTimeout> | undefined
  return Promise.race([
    promise,
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms)
    })
  ]).finally(() => clearTimeout(timer))
}

/** The next message, or undefined once the connection has closed. */
const nextOrEnd = (wire: Wire) => wire.next().catch(() => undefined)

/** The SQLSTATE of the next ErrorResponse before the connection closes, if any. */
const errorCode = async (wire: Wire): Promise<string | undefined> => {
  for (;;) {
    const m = await nextOrEnd(wire)
    if (m === undefined) return undefined
    if (m.type === "E") return errorFields(m.body).C
  }
}

/**
 * Logs in with SCRAM up to the server's first SASL message, then waits for `resume` before sending
 * the client's first SASL message; ends at ReadyForQuery ("ready") or at the refusal's SQLSTATE.
 */
const loginPausedInScram = async (
  port: number,
  user: string,
  password: string,
  database: string,
  extra: Record<string, string> = {}
) => {
  const wire = await Wire.connect(port)
  wire.socket.write(startupMessage({ user, database, ...extra }))
  const scram = new ScramClient({ password })
  let paused: () => void = () => {}
  const atSasl = new Promise<void>((resolve) => {
    paused = resolve
  })
  let go: () => void = () => {}
  const resumed = new Promise<void>((resolve) => {
    go = resolve
  })
  const outcome = (async (): Promise<string> => {
    for (;;) {
      const m = await nextOrEnd(wire)
      if (m === undefined) return "closed"
      if (m.type === "E") return errorFields(m.body).C ?? "error"
      if (m.type === "Z") return "ready"
      if (m.type !== "R") continue
      const code = m.body.readInt32BE(0)
      if (code === 10) {
        paused()
        await resumed
        wire.socket.write(serialize.sendSASLInitialResponseMessage("SCRAM-SHA-256", scram.clientFirst()))
      } else if (code === 11) {
        const final = scram.handleServerFirst(m.body.subarray(4).toString())
        if (typeof final !== "string") throw new Error("bad server-first")
        wire.socket.write(serialize.sendSCRAMClientFinalMessage(final))
      }
    }
  })()
  await within("the server's SASL request", atSasl)
  return { wire, resume: go, outcome }
}

const holdings = (tidepool: RunningTidepool) =>
  tidepool.runtime.runPromise(
    Effect.gen(function* () {
      const pools = (yield* PoolRegistry).all()
      const { admission } = yield* EventCounters
      return {
        open: admission.open,
        handshaking: admission.handshaking,
        registered: (yield* SessionRegistry).all().length,
        clients: pools.reduce((n, p) => n + p.stats.clients, 0),
        waiting: pools.reduce((n, p) => n + p.stats.waiting, 0),
        busyServers: pools.reduce((n, p) => n + p.stats.busy, 0)
      }
    })
  )

/** Polls until `condition` holds; the deadline turns a leak into a failure that says what was seen. */
const until = async <A>(what: string, read: () => Promise<A>, condition: (a: A) => boolean) => {
  const deadline = Date.now() + 10_000
  for (;;) {
    const value = await read()
    if (condition(value)) return value
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; last seen ${JSON.stringify(value)}`)
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
}

const nothingHeld = (h: Awaited<ReturnType<typeof holdings>>) =>
  h.open === 0 && h.handshaking === 0 && h.registered === 0 && h.clients === 0 && h.busyServers === 0

describe("an admin console login that completes while the pooler drains", () => {
  it("is refused with 57P01 and does not hold the shutdown for the drain timeout", async () => {
    const tidepool = await startTidepool({
      tenants: [tenant(1)],
      // Two minutes: a drain that waited for this console would outlast the test's deadline.
      config: { adminUsers: [{ name: "ops", secret: "ops-secret" }], shutdownTimeoutMs: 120_000 }
    })
    try {
      const login = await loginPausedInScram(tidepool.sessionPort, "ops", "ops-secret", "pgbouncer")
      const shutdown = tidepool.runtime.runPromise(Effect.flatMap(Listeners, (l) => l.shutdown))
      // The drain has begun (every server closed to new connections) before the login completes.
      await within(
        "the drain to begin",
        (async () => {
          for (;;) {
            const refused = await new Promise<boolean>((resolve) => {
              const probe = net.connect(tidepool.sessionPort, "127.0.0.1")
              probe.once("connect", () => {
                probe.destroy()
                resolve(false)
              })
              probe.once("error", () => resolve(true))
            })
            if (refused) return
            await new Promise((resolve) => setTimeout(resolve, 20))
          }
        })()
      )
      login.resume()
      expect(await within("the console login's outcome", login.outcome)).toBe("57P01")
      await within("the shutdown", shutdown)
      expect(await holdings(tidepool)).toMatchObject({ open: 0, handshaking: 0, registered: 0 })
    } finally {
      await tidepool.stop()
    }
  })
})

describe("a client that reconnects the moment it hears why its session ended", () => {
  it("finds its connection slot free at TIDEPOOL_MAX_CLIENT_CONNECTIONS", async () => {
    const tidepool = await startTidepool({ tenants: [tenant(1)], config: { maxClientConnections: 1 } })
    try {
      const url = tidepool.url({ user: "app.acme", password: PASSWORD })
      for (let i = 0; i < 20; i++) {
        const client = new pg.Client({ connectionString: url })
        const ended = new Promise<string | undefined>((resolve) => {
          client.on("error", (error: Error & { code?: string }) => resolve(error.code))
        })
        await client.connect()
        await tidepool.runtime.runPromise(
          Effect.flatMap(SessionRegistry, (s) => s.kickTenant("acme", () => tidepoolError("EADMINSHUTDOWN")))
        )
        expect(await within("the kick's error", ended)).toBe("57P01")
        const again = new pg.Client({ connectionString: url })
        await again.connect()
        await again.end()
      }
      // Counted out once each, not twice: the count comes back to exactly zero.
      await until("every connection to be counted out", () => holdings(tidepool), nothingHeld)
    } finally {
      await tidepool.stop()
    }
  })

  it("after a refused login finds its connection slot free", async () => {
    const tidepool = await startTidepool({ tenants: [tenant(1)], config: { maxClientConnections: 1 } })
    try {
      for (let i = 0; i < 20; i++) {
        const wrong = new pg.Client({ connectionString: tidepool.url({ user: "app.acme", password: "wrong" }) })
        await expect(wrong.connect()).rejects.toMatchObject({ code: "28P01" })
        const right = new pg.Client({ connectionString: tidepool.url({ user: "app.acme", password: PASSWORD }) })
        await right.connect()
        await right.end()
      }
      await until("every connection to be counted out", () => holdings(tidepool), nothingHeld)
    } finally {
      await tidepool.stop()
    }
  })
})

describe("a session-mode client that ends and reconnects at once (pgbench -C)", () => {
  it("finds its place in a pool of one free", async () => {
    const tidepool = await startTidepool({ tenants: [tenant(1)] })
    try {
      const url = tidepool.url({ user: "app.acme", password: PASSWORD })
      for (let i = 0; i < 30; i++) {
        const client = new pg.Client({ connectionString: url })
        await client.connect()
        // The server was reset before it was lent again, though the place was freed before the reset.
        expect((await client.query("SHOW application_name")).rows[0].application_name).not.toBe("dirty")
        await client.query("SET application_name = 'dirty'")
        await client.end()
      }
      await until("every connection to be counted out", () => holdings(tidepool), nothingHeld)
    } finally {
      await tidepool.stop()
    }
  })
})

describe("a login that ends before its greeting gives back what it took", () => {
  it("when its client leaves while it waits for a server, and when its handshake times out", async () => {
    const tidepool = await startTidepool({ tenants: [tenant(1)], config: { handshakeTimeoutMs: 1000 } })
    try {
      const holder = new pg.Client({
        connectionString: tidepool.url({ user: "app.acme", password: PASSWORD, mode: "transaction" })
      })
      await holder.connect()
      await holder.query("BEGIN")
      // A setting no server of the pool has accepted yet: the login checks it on a server, and the
      // only one is in the holder's transaction.
      const waiter = await loginPausedInScram(tidepool.transactionPort, "app.acme", PASSWORD, "postgres", {
        application_name: "waiter"
      })
      waiter.resume()
      await until(
        "the login to wait for a server",
        () => holdings(tidepool),
        (h) => h.waiting === 1
      )
      expect(await holdings(tidepool)).toMatchObject({ open: 2, handshaking: 0, clients: 2 })
      waiter.wire.socket.destroy()
      await until(
        "the login to give back its place and stop waiting",
        () => holdings(tidepool),
        (h) => h.waiting === 0 && h.clients === 1 && h.open === 1
      )
      await holder.query("COMMIT")
      await holder.end()
      await until(
        "the holder's session to end",
        () => holdings(tidepool),
        (h) => h.open === 0 && h.clients === 0 && h.busyServers === 0 && h.registered === 0
      )

      // Stalled in SCRAM until the handshake's deadline: told so, and nothing is left counting.
      const stalled = await loginPausedInScram(tidepool.transactionPort, "app.acme", PASSWORD, "postgres")
      // Never resumed: its messages are read here, not by its login loop.
      expect(await within("the handshake timeout", errorCode(stalled.wire))).toBe("08006")
      await until(
        "the timed-out login to give back its slots",
        () => holdings(tidepool),
        (h) => h.open === 0 && h.handshaking === 0
      )
    } finally {
      await tidepool.stop()
    }
  })
})
