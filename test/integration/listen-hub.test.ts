import * as net from "node:net"
import { Effect, Exit, Redacted, Scope } from "effect"
import pg from "pg"
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest"
import type { TidepoolError } from "../../src/errors/index.ts"
import { ListenHub, type ListenSubscriber, type TenantPool } from "../../src/pool/index.ts"
import type { UpstreamTarget } from "../../src/upstream/index.ts"
import { standalonePool } from "../support/pool.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"

// The pool's listening connection, driven directly (docs/session-state.md#listen--notify): a real
// PostgreSQL behind a proxy that records what the hub sends, NOTIFY from an ordinary pg client.

const PASSWORD = "listen-secret"

let db: PostgresServer
let proxy: net.Server
let notifier: pg.Client
/** Simple-query texts the hub's connections sent, in order. */
const sent: Array<string> = []
/** Upstream connections through the proxy that are still open. */
const open = new Set<net.Socket>()
let connections = 0

/** Records Query messages; the first packet of a connection is the untyped startup packet. */
const recordQueries = (socket: net.Socket) => {
  let buffered = Buffer.alloc(0)
  let startup = true
  socket.on("data", (chunk: Buffer) => {
    buffered = Buffer.concat([buffered, chunk])
    for (;;) {
      const header = startup ? 0 : 1
      if (buffered.length < header + 4) return
      const end = header + buffered.readInt32BE(header)
      if (buffered.length < end) return
      if (!startup && buffered[0] === 0x51) sent.push(buffered.toString("utf8", 5, end - 1))
      startup = false
      buffered = buffered.subarray(end)
    }
  })
}

const target = (port: number): UpstreamTarget => ({
  host: "127.0.0.1",
  port,
  database: "postgres",
  user: "app",
  password: Redacted.make(PASSWORD),
  connectTimeoutMs: 5_000
})

const proxyPort = () => (proxy.address() as net.AddressInfo).port

/** For hubs made outside a pool: their connects run as plain fibers. */
const runFork = (effect: Effect.Effect<unknown, unknown>) => {
  Effect.runFork(effect)
}

let scope: Scope.Closeable
let pool: TenantPool

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: PASSWORD }] })
  proxy = net.createServer((inbound) => {
    connections++
    const outbound = net.connect(db.port, db.host)
    open.add(outbound)
    recordQueries(inbound)
    inbound.pipe(outbound).pipe(inbound)
    inbound.on("error", () => outbound.destroy())
    outbound.on("error", () => inbound.destroy())
    outbound.on("close", () => {
      open.delete(outbound)
      inbound.destroy()
    })
    inbound.on("close", () => outbound.destroy())
  })
  await new Promise<void>((resolve) => proxy.listen(0, "127.0.0.1", resolve))
  notifier = new pg.Client({ connectionString: db.url() })
  await notifier.connect()
  scope = Effect.runSync(Scope.make())
  pool = await standalonePool(target(proxyPort()), scope)
})

afterAll(async () => {
  await Effect.runPromise(Scope.close(scope, Exit.void))
  await notifier?.end()
  proxy?.close()
  await db?.stop()
})

/** Bounds every wait: a test fails here instead of hanging. */
const within = async (what: string, check: () => boolean, ms = 10_000): Promise<void> => {
  const deadline = Date.now() + ms
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => setImmediate(resolve))
  }
}

interface Recorder extends ListenSubscriber {
  readonly messages: Array<Buffer>
  readonly lost: Array<TidepoolError>
  /** channel, payload of each message */
  readonly seen: () => Array<[string, string]>
}

const recorder = (): Recorder => {
  const messages: Array<Buffer> = []
  const lost: Array<TidepoolError> = []
  return {
    messages,
    lost,
    onNotification: (m) => messages.push(m),
    onLost: (e) => lost.push(e),
    seen: () =>
      messages.map((m) => {
        const nameEnd = m.indexOf(0, 9)
        return [m.toString("utf8", 9, nameEnd), m.toString("utf8", nameEnd + 1, m.length - 1)]
      })
  }
}

/** Subscribes and waits for the LISTEN to be in effect. */
const listen = (hub: ListenHub, channel: string, subscriber: ListenSubscriber): Promise<void> =>
  new Promise((resolve, reject) => hub.listen(channel, subscriber, (error) => (error ? reject(error) : resolve())))

const notify = (channel: string, payload: string) => notifier.query("SELECT pg_notify($1, $2)", [channel, payload])

afterEach(() => {
  // Every test starts with no subscriber (the connection may linger).
  expect(pool.listenHub.subscriberCount).toBe(0)
})

describe("ListenHub", () => {
  it("delivers a notification as PostgreSQL's own NotificationResponse, on an exactly quoted channel", async () => {
    const hub = pool.listenHub
    const a = recorder()
    const channel = 'Mixed "Case" ch'
    await listen(hub, channel, a)
    expect(sent.at(-1)).toBe('LISTEN "Mixed ""Case"" ch"')
    expect(hub.channels(a)).toEqual([channel])
    await notify(channel, "hello")
    await within("the notification", () => a.messages.length === 1)
    const m = a.messages[0]!
    expect(String.fromCharCode(m[0]!)).toBe("A")
    expect(m.readInt32BE(1)).toBe(m.length - 1)
    const { rows } = await notifier.query<{ pid: number }>("SELECT pg_backend_pid() AS pid")
    expect(m.readInt32BE(5)).toBe(rows[0]!.pid)
    expect(a.seen()).toEqual([[channel, "hello"]])
    // The listening connection is not one of the pool's pool_size servers.
    expect(pool.stats.busy + pool.stats.idle).toBe(0)
    hub.unlistenAll(a)
  })

  it("shares one LISTEN and one Buffer between subscribers; UNLISTEN goes out when the last one leaves", async () => {
    const hub = pool.listenHub
    const [a, b, sentinel] = [recorder(), recorder(), recorder()]
    await listen(hub, "shared", a)
    await listen(hub, "shared", b)
    await listen(hub, "sentinel", sentinel)
    expect(sent.filter((q) => q === 'LISTEN "shared"')).toHaveLength(1)
    await notify("shared", "one")
    await within("both deliveries", () => a.messages.length === 1 && b.messages.length === 1)
    expect(a.messages[0]).toBe(b.messages[0])

    hub.unlisten("shared", a)
    expect(sent.filter((q) => q === 'UNLISTEN "shared"')).toHaveLength(0)
    await notify("shared", "two")
    await within("b's delivery", () => b.messages.length === 2)
    expect(a.messages).toHaveLength(1)

    hub.unlisten("shared", b)
    await within("the UNLISTEN", () => sent.at(-1) === 'UNLISTEN "shared"')
    // Notifications of one sender arrive in commit order: once the sentinel's is in, "shared"'s would be.
    await notify("shared", "three")
    await notify("sentinel", "after")
    await within("the sentinel", () => sentinel.messages.length === 1)
    expect(b.seen()).toEqual([
      ["shared", "one"],
      ["shared", "two"]
    ])
    expect(sent.filter((q) => q === 'UNLISTEN "shared"')).toHaveLength(1)
    hub.unlistenAll(sentinel)
    await within("the last UNLISTEN", () => sent.at(-1) === 'UNLISTEN "sentinel"')
  })

  it("keeps the connection for a LISTEN right after the last subscriber left, and frames split and batched messages", async () => {
    const hub = pool.listenHub
    const a = recorder()
    await listen(hub, "batch", a)
    const server = hub.connection
    expect(server).toBeDefined()
    hub.unlistenAll(a)
    await listen(hub, "batch", a)
    expect(hub.connection).toBe(server)
    // Payloads near PostgreSQL's largest (8000 bytes), several times, among many small ones in one
    // transaction (distinct: PostgreSQL drops a transaction's duplicate notifications).
    const payload = (i: number) => (i % 10 === 0 ? `${i}`.padEnd(7990, "x") : `${i}`)
    await notifier.query(
      `SELECT pg_notify('batch', CASE WHEN i % 10 = 0 THEN rpad(i::text, 7990, 'x') ELSE i::text END) FROM generate_series(1, 200) AS i`
    )
    await within("200 notifications", () => a.messages.length === 200)
    expect(a.seen().map(([, p]) => p)).toEqual(Array.from({ length: 200 }, (_, i) => payload(i + 1)))
    hub.unlistenAll(a)
  })

  it("uses the name PostgreSQL uses for a channel longer than an identifier", async () => {
    const hub = pool.listenHub
    const a = recorder()
    const long = `é${"n".repeat(70)}`
    await listen(hub, long, a)
    // NOTIFY's identifier is truncated by PostgreSQL to 63 bytes, on a character boundary.
    await notifier.query(`NOTIFY "${long}", 'long'`)
    await within("the notification", () => a.messages.length === 1)
    expect(Buffer.byteLength(a.seen()[0]![0])).toBe(63)
    expect(hub.channels(a)).toEqual([a.seen()[0]![0]])
    hub.unlistenAll(a)
  })

  it("tells every subscriber ELISTENLOST when the connection is killed, and the next LISTEN reconnects", async () => {
    const hub = pool.listenHub
    const [a, b] = [recorder(), recorder()]
    await listen(hub, "k1", a)
    await listen(hub, "k2", a)
    await listen(hub, "k2", b)
    const pid = hub.connection!.backendPid
    await notifier.query("SELECT pg_terminate_backend($1)", [pid])
    await within("onLost", () => a.lost.length > 0 && b.lost.length > 0)
    expect(a.lost).toHaveLength(1)
    expect(b.lost).toHaveLength(1)
    expect(a.lost[0]).toMatchObject({ code: "ELISTENLOST", sqlstate: "08006", severity: "FATAL" })
    expect(a.lost[0]!.message).toBe(
      "listening connection lost, notifications may have been missed: terminating connection due to administrator command"
    )
    expect(hub.subscriberCount).toBe(0)
    expect(hub.channels(a)).toEqual([])

    const before = connections
    await listen(hub, "k1", a)
    expect(connections).toBe(before + 1)
    expect(hub.connection!.backendPid).not.toBe(pid)
    await notify("k2", "not listened any more")
    await notify("k1", "again")
    await within("the notification after reconnecting", () => a.messages.length === 1)
    expect(a.seen()).toEqual([["k1", "again"]])
    expect(b.messages).toHaveLength(0)
    hub.unlistenAll(a)
  })

  it("fails a LISTEN in flight when the connection is lost before PostgreSQL answered it", async () => {
    const hub = pool.listenHub
    const a = recorder()
    await listen(hub, "first", a)
    const server = hub.connection!
    const results: Array<TidepoolError | undefined> = []
    hub.listen("second", a, (error) => results.push(error))
    // Before the LISTEN's reply can arrive: the pending one fails, the one in effect is lost.
    server.destroy("test")
    await within("the results", () => results.length === 1 && a.lost.length === 1)
    expect(results[0]).toMatchObject({ code: "ELISTENLOST" })
    expect(hub.subscriberCount).toBe(0)
  })

  it("gives the connection up when the pool's tenant moves to another database address, and keeps it otherwise", async () => {
    let current = target(proxyPort())
    const hub = new ListenHub(() => current, runFork)
    const a = recorder()
    await listen(hub, "moving", a)
    const server = hub.connection
    current = { ...target(proxyPort()), password: Redacted.make("a new password") }
    hub.retarget()
    expect(hub.connection).toBe(server)
    expect(a.lost).toHaveLength(0)
    // The same database reached directly, not through the proxy: another address, as after a failover.
    current = target(db.port)
    hub.retarget()
    expect(a.lost).toMatchObject([{ code: "ELISTENLOST" }])
    expect(a.lost[0]!.message).toContain("the tenant's database settings changed")
    const before = connections
    await listen(hub, "moving", a)
    expect(connections).toBe(before)
    expect(hub.connection!.target.port).toBe(db.port)
    await notify("moving", "at the new address")
    await within("the notification", () => a.messages.length === 1)
    hub.close()
  })

  it("closes the connection when the last subscriber has been gone for the linger time", async () => {
    const hub = new ListenHub(() => target(proxyPort()), runFork, 50)
    const a = recorder()
    await listen(hub, "linger", a)
    const upstream = [...open].at(-1)!
    hub.unlistenAll(a)
    await within("the connection to close", () => !open.has(upstream))
    expect(hub.connection).toBeUndefined()
    hub.close()
  })

  it("answers ELISTENFAILED when the listening connection cannot be opened", async () => {
    const closed = net.createServer()
    await new Promise<void>((resolve) => closed.listen(0, "127.0.0.1", resolve))
    const port = (closed.address() as net.AddressInfo).port
    await new Promise<void>((resolve) => closed.close(() => resolve()))
    const hub = new ListenHub(() => target(port), runFork)
    const a = recorder()
    const error = await listen(hub, "nowhere", a).then(
      () => undefined,
      (e: TidepoolError) => e
    )
    expect(error).toMatchObject({ code: "ELISTENFAILED", sqlstate: "08006", severity: "FATAL" })
    expect(error!.message).toContain("could not open the listening connection")
    expect(hub.subscriberCount).toBe(0)
    hub.close()
  })

  it("fails LISTENs still in flight with ESERVERCLOSED when its pool closes", async () => {
    const hub = new ListenHub(() => target(proxyPort()), runFork)
    const results: Array<TidepoolError | undefined> = []
    hub.listen("closing", recorder(), (error) => results.push(error))
    hub.close()
    expect(results).toHaveLength(1)
    expect(results[0]).toMatchObject({ code: "ESERVERCLOSED" })
    hub.listen("closing", recorder(), (error) => results.push(error))
    expect(results[1]).toMatchObject({ code: "ESERVERCLOSED" })
  })
})
