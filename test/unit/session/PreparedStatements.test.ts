import { once } from "node:events"
import * as net from "node:net"
import { serialize } from "pg-protocol"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { renderErrorResponse, tidepoolError } from "../../../src/errors/index.ts"
import { TenantPool } from "../../../src/pool/index.ts"
import { errorResponse, readyForQuery } from "../../../src/protocol/index.ts"
import { defaultPreparedStatementOptions, PreparedStatements } from "../../../src/session/PreparedStatements.ts"
import { ServerConnection } from "../../../src/upstream/index.ts"

/*
 * The server→client half of statement rewriting, byte-exact: replies are fed to a ServerConnection
 * split at every possible offset (as TCP may deliver them), and what reaches the client must be the
 * same whatever the split — swallowed replies never leak, made-up ones land in the right place.
 */

const frame = (type: string, body: Buffer = Buffer.alloc(0)): Buffer => {
  const buf = Buffer.allocUnsafe(5 + body.length)
  buf[0] = type.charCodeAt(0)
  buf.writeInt32BE(body.length + 4, 1)
  body.copy(buf, 5)
  return buf
}
const PARSE_COMPLETE = frame("1")
const BIND_COMPLETE = frame("2")
const CLOSE_COMPLETE = frame("3")
const SELECT_1 = frame("C", Buffer.from("SELECT 1\0"))
const READY = readyForQuery("I")

let listener: net.Server
const accepted: Array<net.Socket> = []

beforeAll(async () => {
  listener = net.createServer((s) => accepted.push(s))
  listener.listen(0, "127.0.0.1")
  await once(listener, "listening")
})
afterAll(() => {
  for (const s of accepted) s.destroy()
  listener.close()
})

/** A connected socket and its peer. */
const pair = async () => {
  const socket = net.connect((listener.address() as net.AddressInfo).port, "127.0.0.1")
  await once(socket, "connect")
  while (accepted.length === 0) await once(listener, "connection")
  return { socket, peer: accepted.shift()! }
}

const setup = async () => {
  const pool = new TenantPool(
    {
      key: "k",
      tenant: "t",
      user: "u",
      database: "db",
      mode: "transaction",
      size: 1,
      maxClients: 1,
      checkoutTimeoutMs: 1000,
      serverIdleTimeoutMs: 0,
      minSize: 0,
      serverLifetimeMs: 0,
      connectBackoffMs: 1000,
      target: { host: "127.0.0.1", port: 1, database: "db", user: "u", password: undefined, connectTimeoutMs: 1000 }
    },
    () => {}
  )
  const client = await pair()
  const received: Array<Buffer> = []
  client.peer.on("data", (b: Buffer) => received.push(b))
  const statements = new PreparedStatements(client.socket, pool, defaultPreparedStatementOptions)
  const newServer = async () => {
    const { socket } = await pair()
    const server = new ServerConnection(socket, pool.settings.target)
    server.handler = { onData: (chunk) => statements.forward(server, chunk), onClose: () => {} }
    statements.attach(server)
    return server
  }
  /** Everything the client received since the last call, once `length` bytes have arrived. */
  const take = async (length: number) => {
    while (received.reduce((n, b) => n + b.length, 0) < length) await once(client.peer, "data")
    const all = Buffer.concat(received.splice(0))
    return all
  }
  return { pool, statements, newServer, take }
}

/** Feeds `reply` to the server in two chunks split at `at`, as the socket would. */
const deliver = (server: ServerConnection, reply: Buffer, at: number) => {
  if (at > 0) server.socket.emit("data", reply.subarray(0, at))
  if (at < reply.length) server.socket.emit("data", reply.subarray(at))
}

const parse = (name: string, text: string) => serialize.parse({ name, text, types: [] })
const bindExecuteSync = (statement: string) =>
  Buffer.concat([serialize.bind({ statement }), serialize.execute(), serialize.sync()])

describe("PreparedStatements: replies split anywhere", () => {
  it("swallows the ParseComplete of a hidden re-prepare", async () => {
    const t = await setup()
    const first = await t.newServer()
    t.statements.write(first, Buffer.concat([parse("s", "SELECT 1"), bindExecuteSync("s")]))
    deliver(first, Buffer.concat([PARSE_COMPLETE, BIND_COMPLETE, SELECT_1, READY]), 0)
    expect(await t.take(PARSE_COMPLETE.length + BIND_COMPLETE.length + SELECT_1.length + READY.length)).toEqual(
      Buffer.concat([PARSE_COMPLETE, BIND_COMPLETE, SELECT_1, READY])
    )
    t.statements.detach(first)

    const reply = Buffer.concat([PARSE_COMPLETE, BIND_COMPLETE, SELECT_1, READY])
    const expected = Buffer.concat([BIND_COMPLETE, SELECT_1, READY])
    for (let at = 0; at <= reply.length; at++) {
      const other = await t.newServer() // lacks "s": a hidden Parse goes first
      t.statements.write(other, bindExecuteSync("s"))
      deliver(other, reply, at)
      expect(await t.take(expected.length)).toEqual(expected)
      t.statements.detach(other)
    }
    expect(t.pool.counters.statementsReprepared).toBe(reply.length + 1)
  })

  it("makes up the ParseComplete of a Parse the server already has, in its place", async () => {
    const t = await setup()
    const server = await t.newServer()
    t.statements.write(server, Buffer.concat([parse("a", "SELECT 1"), serialize.sync()]))
    deliver(server, Buffer.concat([PARSE_COMPLETE, READY]), 0)
    await t.take(PARSE_COMPLETE.length + READY.length)

    const reply = Buffer.concat([BIND_COMPLETE, SELECT_1, READY])
    const expected = Buffer.concat([BIND_COMPLETE, SELECT_1, PARSE_COMPLETE, BIND_COMPLETE, SELECT_1, READY])
    for (let at = 0; at <= reply.length; at++) {
      // Same text under a new client name: the server has it, so only Bind/Execute go out for it.
      const name = `b${at}`
      t.statements.write(
        server,
        Buffer.concat([
          serialize.bind({ statement: "a" }),
          serialize.execute(),
          parse(name, "SELECT 1"),
          serialize.bind({ statement: name }),
          serialize.execute(),
          serialize.sync()
        ])
      )
      deliver(server, Buffer.concat([BIND_COMPLETE, SELECT_1, reply]), BIND_COMPLETE.length + SELECT_1.length + at)
      expect(await t.take(expected.length)).toEqual(expected)
    }
  })

  it("replaces the server's error with the client's own, and answers Close itself", async () => {
    const t = await setup()
    const server = await t.newServer()
    t.statements.write(server, Buffer.concat([parse("d", "SELECT 1"), serialize.sync()]))
    deliver(server, Buffer.concat([PARSE_COMPLETE, READY]), 0)
    await t.take(PARSE_COMPLETE.length + READY.length)

    const serverError = errorResponse({
      severity: "ERROR",
      code: "26000",
      message: "prepared statement does not exist"
    })
    const reply = Buffer.concat([serverError, READY])
    for (let at = 0; at <= reply.length; at++) {
      t.statements.write(server, Buffer.concat([parse("d", "SELECT 2"), bindExecuteSync("d")]))
      deliver(server, reply, at)
      const expected = Buffer.concat([renderErrorResponse(tidepoolError("EPREPAREDDUP", "d")), READY])
      expect(await t.take(expected.length)).toEqual(expected)
    }
    // Close is answered without the server; the next Parse of the name is the client's own again.
    t.statements.write(server, Buffer.concat([serialize.close({ type: "S", name: "d" }), serialize.sync()]))
    deliver(server, READY, 0)
    expect(await t.take(CLOSE_COMPLETE.length + READY.length)).toEqual(Buffer.concat([CLOSE_COMPLETE, READY]))
  })
})
