import { once } from "node:events"
import * as net from "node:net"
import { serialize } from "pg-protocol"
import { afterEach, describe, expect, it } from "vitest"
import { TenantPool } from "../../../src/pool/index.ts"
import { errorResponse, MessageScanner, readyForQuery } from "../../../src/protocol/index.ts"
import { PreparedStatements } from "../../../src/session/PreparedStatements.ts"
import type { RelayEnd } from "../../../src/session/SessionRelay.ts"
import { shareSettings } from "../../../src/session/settings.ts"
import { TransactionRelay } from "../../../src/session/TransactionRelay.ts"
import { ServerConnection } from "../../../src/upstream/index.ts"

/*
 * The relay against real sockets on 127.0.0.1: a scripted fake backend stands in for PostgreSQL
 * (it speaks just enough of the protocol to answer what the tests send), servers are handed to a real
 * TenantPool already "logged in", and clients are raw sockets writing pg-protocol messages.
 */

const noop = () => {}

const frame = (type: string, body: Buffer = Buffer.alloc(0)): Buffer => {
  const buf = Buffer.allocUnsafe(5 + body.length)
  buf[0] = type.charCodeAt(0)
  buf.writeInt32BE(body.length + 4, 1)
  body.copy(buf, 5)
  return buf
}
const cstring = (s: string) => Buffer.from(`${s}\0`)
const commandComplete = (tag: string) => frame("C", cstring(tag))

// ---- fake backend ---------------------------------------------------------------------------------

interface Backend {
  readonly socket: net.Socket
  /** Message types received, as characters. */
  readonly received: Array<string>
  readonly queries: Array<string>
  readonly closed: Promise<void>
  framingError: string | undefined
}

const startBackend = async () => {
  const backends: Array<Backend> = []
  const server = net.createServer((socket) => {
    socket.on("error", noop)
    let status: "I" | "T" | "E" = "I"
    let copying = false
    const backend: Backend = {
      socket,
      received: [],
      queries: [],
      closed: once(socket, "close").then(noop),
      framingError: undefined
    }
    backends.push(backend)
    const reply = (...bufs: Array<Buffer>) => socket.write(Buffer.concat(bufs))
    const scanner = new MessageScanner(
      (type, length, body, start) => {
        const t = String.fromCharCode(type)
        backend.received.push(t)
        switch (t) {
          case "Q": {
            const sql = body!.toString("utf8", start, start + length - 1)
            backend.queries.push(sql)
            if (sql === "BEGIN") {
              status = "T"
              reply(commandComplete("BEGIN"), readyForQuery(status))
            } else if (sql === "COMMIT" || sql === "ROLLBACK") {
              status = "I"
              reply(commandComplete(sql), readyForQuery(status))
            } else if (sql === "FAIL") {
              if (status === "T") status = "E"
              reply(errorResponse({ severity: "ERROR", code: "42000", message: "failed" }), readyForQuery(status))
            } else if (sql.startsWith("BIG ")) {
              const rows = Number(sql.slice(4))
              const row = frame("D", Buffer.alloc(1000, 0x61))
              const out: Array<Buffer> = []
              for (let i = 0; i < rows; i++) out.push(row)
              reply(...out, commandComplete(`SELECT ${rows}`), readyForQuery(status))
            } else if (sql.startsWith("COPY")) {
              copying = true
              if (sql === "COPY SLOW") socket.pause()
              reply(frame("G", Buffer.from([0, 0, 0])))
            } else if (sql === "HANG") {
              // never answers
            } else if (sql === "DIE") {
              socket.destroy()
            } else {
              reply(commandComplete("SELECT 1"), readyForQuery(status))
            }
            break
          }
          case "P":
            reply(frame("1"))
            break
          case "B":
            reply(frame("2"))
            break
          case "D":
            reply(frame("n"))
            break
          case "E":
            reply(commandComplete("SELECT 0"))
            break
          case "S":
            reply(readyForQuery(status))
            break
          case "c":
            if (copying) {
              copying = false
              reply(commandComplete("COPY"), readyForQuery(status))
            }
            break
          case "X":
            socket.end()
            break
        }
      },
      { maxMessageSize: 0, inspect: "Q" }
    )
    socket.on("data", (chunk: Buffer) => {
      const err = scanner.feed(chunk)
      if (err !== undefined && backend.framingError === undefined) {
        backend.framingError = err.message
        socket.destroy()
      }
    })
  })
  server.listen(0, "127.0.0.1")
  await once(server, "listening")
  const port = (server.address() as net.AddressInfo).port
  return { server, port, backends }
}

// ---- harness --------------------------------------------------------------------------------------

interface Options {
  readonly servers?: number
  readonly checkoutTimeoutMs?: number
  readonly maxMessageSize?: number
}

interface Relayed {
  readonly relay: TransactionRelay
  readonly socket: net.Socket
  readonly ended: Promise<RelayEnd>
}

interface Client {
  readonly socket: net.Socket
  /** Backend message types received, as characters. */
  readonly types: Array<string>
  /** Resolves once `n` messages of `type` have arrived in total. */
  count(type: string, n: number): Promise<void>
}

const cleanups: Array<() => void> = []
afterEach(() => {
  for (const c of cleanups.splice(0).reverse()) c()
})

const setup = async (options: Options = {}) => {
  const backend = await startBackend()
  cleanups.push(() => backend.server.close())
  const n = options.servers ?? 1
  const target = {
    host: "127.0.0.1",
    port: backend.port,
    database: "db",
    user: "u",
    password: undefined,
    connectTimeoutMs: 1000
  }
  let connectAttempts = 0
  const pool = new TenantPool(
    {
      key: "k",
      tenant: "t",
      user: "u",
      database: "db",
      mode: "transaction",
      size: n,
      maxClients: 100,
      checkoutTimeoutMs: options.checkoutTimeoutMs ?? 30_000,
      serverIdleTimeoutMs: 60_000,
      minSize: 0,
      serverLifetimeMs: 0,
      connectBackoffMs: 1000,
      target
    },
    () => {
      connectAttempts++
    }
  )
  cleanups.push(() => pool.close())
  const servers: Array<ServerConnection> = []
  for (let i = 0; i < n; i++) {
    const socket = net.connect(backend.port, "127.0.0.1")
    await once(socket, "connect")
    const server = new ServerConnection(socket, target)
    servers.push(server)
    pool.release(server)
    cleanups.push(() => socket.destroy())
  }

  // Count checkouts so a test can wait until a client's request reached the pool.
  const checkouts: Array<() => void> = []
  let checkoutCount = 0
  const checkout = pool.checkout.bind(pool)
  pool.checkout = (cb) => {
    const w = checkout(cb)
    checkoutCount++
    for (const f of checkouts.splice(0)) f()
    return w
  }
  const checkedOut = (n: number) =>
    new Promise<void>((resolve) => {
      const check = () => (checkoutCount >= n ? resolve() : checkouts.push(check))
      check()
    })

  let readAhead: Buffer = Buffer.alloc(0)
  const accepted: Array<(r: Relayed) => void> = []
  const front = net.createServer((socket) => {
    socket.on("error", noop) // as ClientSocket does
    cleanups.push(() => socket.destroy())
    let onEnd!: (end: RelayEnd) => void
    const ended = new Promise<RelayEnd>((resolve) => {
      onEnd = resolve
    })
    let calls = 0
    const relay = new TransactionRelay(
      socket,
      pool,
      options.maxMessageSize ?? 1 << 20,
      shareSettings(new Map()),
      (end) => {
        calls++
        expect(calls).toBe(1)
        onEnd(end)
      }
    )
    const first = readAhead
    readAhead = Buffer.alloc(0)
    relay.start(first)
    accepted.shift()?.({ relay, socket, ended })
  })
  front.listen(0, "127.0.0.1")
  await once(front, "listening")
  cleanups.push(() => front.close())
  const frontPort = (front.address() as net.AddressInfo).port

  const connectClient = async (ahead?: Buffer): Promise<Client & { relayed: Relayed }> => {
    if (ahead !== undefined) readAhead = ahead
    const relayed = new Promise<Relayed>((resolve) => accepted.push(resolve))
    const socket = net.connect(frontPort, "127.0.0.1")
    socket.on("error", noop)
    cleanups.push(() => socket.destroy())
    const waits: Array<() => void> = []
    const client: Client = {
      socket,
      types: [],
      count: (type, n) =>
        new Promise<void>((resolve) => {
          const check = () => (client.types.filter((t) => t === type).length >= n ? resolve() : waits.push(check))
          check()
        })
    }
    const scanner = new MessageScanner(
      (type) => {
        client.types.push(String.fromCharCode(type))
        for (const w of waits.splice(0)) w()
      },
      { maxMessageSize: 0, inspect: "" }
    )
    socket.on("data", (chunk: Buffer) => {
      scanner.feed(chunk)
    })
    await once(socket, "connect")
    return { ...client, relayed: await relayed }
  }

  return { backend, pool, servers, connectClient, checkedOut, connectAttempts: () => connectAttempts }
}

const q = (sql: string) => serialize.query(sql)
const lastZ = (c: Client) => c.types.lastIndexOf("Z")

// ---- tests ----------------------------------------------------------------------------------------

describe("TransactionRelay", () => {
  it("lends a server per query and returns it after the final ReadyForQuery", async () => {
    const t = await setup()
    const c = await t.connectClient()
    expect(c.relayed.relay.server).toBeUndefined()
    c.socket.write(q("SELECT 1"))
    await c.count("Z", 1)
    expect(c.types).toEqual(["C", "Z"])
    expect(t.pool.stats).toMatchObject({ idle: 1, busy: 0 })
    expect(c.relayed.relay.server).toBeUndefined()
    c.socket.write(q("SELECT 2"))
    await c.count("Z", 2)
    expect(t.pool.stats).toMatchObject({ idle: 1, busy: 0 })
    expect(t.backend.backends[0]!.queries).toEqual(["SELECT 1", "SELECT 2"])
  })

  it("holds the server through a transaction ('T' and 'E' keep it)", async () => {
    const t = await setup()
    const c = await t.connectClient()
    c.socket.write(q("BEGIN"))
    await c.count("Z", 1)
    expect(t.pool.stats).toMatchObject({ idle: 0, busy: 1 })
    expect(c.relayed.relay.server).toBe(t.servers[0])
    c.socket.write(q("FAIL"))
    await c.count("Z", 2)
    expect(t.pool.stats).toMatchObject({ idle: 0, busy: 1 })
    c.socket.write(q("ROLLBACK"))
    await c.count("Z", 3)
    expect(t.pool.stats).toMatchObject({ idle: 1, busy: 0 })
  })

  it("relays a pipelined batch of 50 queries and releases after the last", async () => {
    const t = await setup()
    const c = await t.connectClient()
    const batch: Array<Buffer> = []
    for (let i = 0; i < 50; i++) batch.push(q(`SELECT ${i}`))
    c.socket.write(Buffer.concat(batch))
    await c.count("Z", 50)
    expect(t.backend.backends[0]!.queries).toHaveLength(50)
    expect(t.pool.stats).toMatchObject({ idle: 1, busy: 0 })
  })

  it("keeps the server across an extended-protocol batch ended by Flush until Sync", async () => {
    const t = await setup()
    const c = await t.connectClient()
    c.socket.write(
      Buffer.concat([
        serialize.parse({ text: "SELECT 1" }),
        serialize.bind({}),
        serialize.describe({ type: "P" }),
        serialize.execute({}),
        serialize.flush()
      ])
    )
    await c.count("C", 1)
    expect(c.types).toEqual(["1", "2", "n", "C"])
    expect(t.pool.stats).toMatchObject({ idle: 0, busy: 1 })
    c.socket.write(serialize.sync())
    await c.count("Z", 1)
    expect(t.pool.stats).toMatchObject({ idle: 1, busy: 0 })
  })

  it("releases after a COPY FROM STDIN whose data and CopyDone follow the Query", async () => {
    const t = await setup()
    const c = await t.connectClient()
    c.socket.write(q("COPY t FROM STDIN"))
    await c.count("G", 1)
    expect(t.pool.stats).toMatchObject({ busy: 1 })
    c.socket.write(Buffer.concat([serialize.copyData(Buffer.from("1\n")), serialize.copyDone()]))
    await c.count("Z", 1)
    expect(t.pool.stats).toMatchObject({ idle: 1, busy: 0 })
  })

  it("answers a bare Sync locally without touching a server", async () => {
    const t = await setup()
    const c = await t.connectClient()
    c.socket.write(Buffer.concat([serialize.sync(), serialize.sync()]))
    await c.count("Z", 2)
    expect(t.backend.backends[0]!.received).toEqual([])
    expect(t.pool.stats).toMatchObject({ idle: 1, busy: 0 })
    c.socket.write(q("SELECT 1"))
    await c.count("Z", 3)
    expect(t.backend.backends[0]!.queries).toEqual(["SELECT 1"])
  })

  it("frames a message split between the handshake's read-ahead and the next read", async () => {
    const t = await setup()
    const msg = q("SELECT split")
    const c = await t.connectClient(msg.subarray(0, 7))
    expect(t.pool.stats).toMatchObject({ busy: 1 }) // the first bytes borrowed a server
    c.socket.write(msg.subarray(7))
    await c.count("Z", 1)
    expect(t.backend.backends[0]!.queries).toEqual(["SELECT split"])
    expect(t.pool.stats).toMatchObject({ idle: 1, busy: 0 })
  })

  it("ends on Terminate without letting it reach the pooled server", async () => {
    const t = await setup()
    const c = await t.connectClient()
    c.socket.write(q("SELECT 1"))
    await c.count("Z", 1)
    c.socket.write(serialize.end())
    expect(await c.relayed.ended).toEqual({ _tag: "ClientTerminated" })
    expect(t.backend.backends[0]!.received).toEqual(["Q"])
    expect(t.pool.stats).toMatchObject({ idle: 1, busy: 0 })
    expect(t.servers[0]!.closed).toBe(false)
  })

  it("runs what preceded Terminate, then closes that server politely", async () => {
    const t = await setup()
    const c = await t.connectClient()
    c.socket.write(Buffer.concat([q("INSERT"), serialize.end()]))
    expect(await c.relayed.ended).toEqual({ _tag: "ClientTerminated" })
    const b = t.backend.backends[0]!
    await b.closed
    // The query ran; the one Terminate is the pooler's own, sent after it.
    expect(b.received).toEqual(["Q", "X"])
    expect(b.queries).toEqual(["INSERT"])
    expect(t.pool.stats).toMatchObject({ idle: 0, busy: 0 })
  })

  it("never forwards a Terminate whose first bytes arrive before the rest", async () => {
    const t = await setup()
    const x = serialize.end()
    const c = await t.connectClient(Buffer.concat([q("BEGIN"), x.subarray(0, 2)]))
    await c.count("Z", 1)
    c.socket.write(x.subarray(2))
    expect(await c.relayed.ended).toEqual({ _tag: "ClientTerminated" })
    const b = t.backend.backends[0]!
    await b.closed
    expect(b.framingError).toBeUndefined()
    expect(b.received).toEqual(["Q", "X"])
    expect(t.pool.stats).toMatchObject({ idle: 0, busy: 0 })
  })

  it("ends at once on a lone Terminate with no server held", async () => {
    const t = await setup()
    const c = await t.connectClient(serialize.end())
    expect(await c.relayed.ended).toEqual({ _tag: "ClientTerminated" })
    expect(t.pool.stats).toMatchObject({ idle: 1, busy: 0 })
  })

  it("queues a client while every server is busy, then serves it", async () => {
    const t = await setup()
    const a = await t.connectClient()
    const b = await t.connectClient()
    a.socket.write(q("BEGIN"))
    await a.count("Z", 1)
    b.socket.write(q("SELECT waited"))
    await t.checkedOut(2)
    expect(t.pool.stats).toMatchObject({ busy: 1, waiting: 1 })
    expect(b.relayed.relay.server).toBeUndefined()
    a.socket.write(q("COMMIT"))
    await b.count("Z", 1)
    expect(b.types).toEqual(["C", "Z"])
    expect(t.backend.backends[0]!.queries).toEqual(["BEGIN", "COMMIT", "SELECT waited"])
    expect(t.pool.stats).toMatchObject({ idle: 1, busy: 0, waiting: 0 })
  })

  it("fails a waiting client with ECHECKOUTTIMEOUT", async () => {
    const t = await setup({ checkoutTimeoutMs: 50 })
    const a = await t.connectClient()
    const b = await t.connectClient()
    a.socket.write(q("BEGIN"))
    await a.count("Z", 1)
    b.socket.write(q("SELECT 1"))
    const end = await b.relayed.ended
    expect(end._tag).toBe("ClientError")
    expect(end._tag === "ClientError" && end.error.code).toBe("ECHECKOUTTIMEOUT")
    expect(t.pool.stats).toMatchObject({ busy: 1, waiting: 0 })
  })

  it("cancels a waiting checkout when the client goes away", async () => {
    const t = await setup()
    const a = await t.connectClient()
    const b = await t.connectClient()
    a.socket.write(q("BEGIN"))
    await a.count("Z", 1)
    b.socket.write(q("SELECT 1"))
    await t.checkedOut(2)
    b.socket.destroy()
    expect(await b.relayed.ended).toEqual({ _tag: "ClientClosed" })
    a.socket.write(q("COMMIT"))
    await a.count("Z", 2)
    expect(t.pool.stats).toMatchObject({ idle: 1, busy: 0, waiting: 0 })
  })

  it("discards a server whose client vanished mid-transaction", async () => {
    const t = await setup()
    const c = await t.connectClient()
    c.socket.write(q("BEGIN"))
    await c.count("Z", 1)
    c.socket.destroy()
    expect(await c.relayed.ended).toEqual({ _tag: "ClientClosed" })
    await t.backend.backends[0]!.closed
    expect(t.pool.stats).toMatchObject({ idle: 0, busy: 0 })
  })

  it("discards the server on a client protocol error mid-request", async () => {
    const t = await setup()
    const c = await t.connectClient()
    c.socket.write(q("HANG"))
    await t.checkedOut(1)
    c.socket.write(Buffer.from([0x51, 0, 0, 0, 2]))
    const end = await c.relayed.ended
    expect(end._tag === "ClientError" && end.error.code).toBe("EPROTOCOL")
    await t.backend.backends[0]!.closed
    expect(t.pool.stats).toMatchObject({ idle: 0, busy: 0 })
  })

  it("rejects an oversized message with EMESSAGETOOLARGE and keeps an idle server", async () => {
    const t = await setup({ maxMessageSize: 1000 })
    const c = await t.connectClient()
    c.socket.write(q("x".repeat(2000)))
    const end = await c.relayed.ended
    expect(end._tag === "ClientError" && end.error.code).toBe("EMESSAGETOOLARGE")
    expect(t.pool.stats).toMatchObject({ idle: 1, busy: 0 })
  })

  it("ends with ServerClosed when the held server dies", async () => {
    const t = await setup()
    const c = await t.connectClient()
    c.socket.write(q("DIE"))
    const end = await c.relayed.ended
    expect(end._tag).toBe("ServerClosed")
    expect(t.pool.stats).toMatchObject({ idle: 0, busy: 0 })
  })

  it("drains at once with no server held", async () => {
    const t = await setup()
    const c = await t.connectClient()
    c.relayed.relay.drain()
    expect(await c.relayed.ended).toEqual({ _tag: "Drained" })
    expect(t.pool.stats).toMatchObject({ idle: 1, busy: 0 })
  })

  it("drains at the end of the current transaction, after releasing its server", async () => {
    const t = await setup()
    const c = await t.connectClient()
    c.socket.write(q("BEGIN"))
    await c.count("Z", 1)
    c.relayed.relay.drain()
    expect(t.pool.stats).toMatchObject({ busy: 1 })
    c.socket.write(q("COMMIT"))
    expect(await c.relayed.ended).toEqual({ _tag: "Drained" })
    await c.count("Z", 2)
    expect(t.pool.stats).toMatchObject({ idle: 1, busy: 0 })
  })

  it("aborts mid-transaction: ends now and discards the server", async () => {
    const t = await setup()
    const c = await t.connectClient()
    c.socket.write(q("BEGIN"))
    await c.count("Z", 1)
    c.relayed.relay.abort()
    expect(await c.relayed.ended).toEqual({ _tag: "Drained" })
    await t.backend.backends[0]!.closed
    expect(t.pool.stats).toMatchObject({ idle: 0, busy: 0 })
  })

  it("pauses the server while the client is not reading, and releases after the last byte", async () => {
    const t = await setup()
    const c = await t.connectClient()
    c.socket.pause()
    c.socket.write(q("BIG 20000")) // ~20 MB
    await once(t.servers[0]!.socket, "pause")
    expect(t.pool.stats).toMatchObject({ busy: 1 })
    c.socket.resume()
    await c.count("Z", 1)
    expect(c.types.filter((x) => x === "D")).toHaveLength(20000)
    expect(lastZ(c)).toBe(c.types.length - 1)
    expect(t.pool.stats).toMatchObject({ idle: 1, busy: 0 })
    expect(t.servers[0]!.socket.isPaused()).toBe(false)
  })

  it("pauses the client while the server is not reading", async () => {
    const t = await setup()
    const c = await t.connectClient()
    c.socket.write(q("COPY SLOW"))
    await c.count("G", 1)
    const chunk = serialize.copyData(Buffer.alloc(64 * 1024, 0x62))
    const paused = once(c.relayed.socket, "pause")
    const writeMore = () => {
      for (let i = 0; i < 400; i++) c.socket.write(chunk)
    }
    writeMore()
    await paused
    const b = t.backend.backends[0]!
    b.socket.resume()
    c.socket.write(serialize.copyDone())
    await c.count("Z", 1)
    expect(b.received.filter((x) => x === "d")).toHaveLength(400)
    expect(t.pool.stats).toMatchObject({ idle: 1, busy: 0 })
  })

  it("builds no prepared-statement state for a client that stays idle; a client's first query builds it", async () => {
    const t = await setup()
    const before = PreparedStatements.made
    const idle = [await t.connectClient(), await t.connectClient(), await t.connectClient()]
    const busy = await t.connectClient()
    busy.socket.write(q("SELECT 1"))
    await busy.count("Z", 1)
    busy.socket.write(q("SELECT 2"))
    await busy.count("Z", 2)
    // One for the client that queried (once, not per transaction), none for the three idle ones.
    expect(PreparedStatements.made - before).toBe(1)
    // The idle ones still work when they do speak.
    idle[0]!.socket.write(q("SELECT 3"))
    await idle[0]!.count("Z", 1)
    expect(PreparedStatements.made - before).toBe(2)
  })

  it("leaves no listeners behind", async () => {
    const t = await setup()
    const c = await t.connectClient()
    const s = c.relayed.socket
    const before = { data: s.listenerCount("data"), close: s.listenerCount("close") }
    c.socket.write(q("BEGIN"))
    await c.count("Z", 1)
    c.socket.write(serialize.end())
    await c.relayed.ended
    expect(s.listenerCount("data")).toBe(before.data - 1)
    expect(s.listenerCount("close")).toBe(before.close - 1)
    expect(s.listenerCount("drain")).toBe(0)
    expect(t.servers[0]!.handler).toBeUndefined()
    expect(t.connectAttempts()).toBe(0)
  })
})
