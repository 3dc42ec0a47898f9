import { once } from "node:events"
import { serialize } from "pg-protocol"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { decodeErrorFields } from "../../src/protocol/index.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { RawClient, type RawMessage } from "../support/raw.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"

/*
 * On the transaction port Parse, Bind, Describe and Close may be rewritten, so the relay holds them
 * back until it has what it needs of them. What one client can make Tidepool hold must stay bounded:
 * a large Bind or unnamed Parse streams once its head is here; a named Parse is held whole only up to
 * the client's prepared-statement memory. Tidepool runs in this process, so its memory is ours to read.
 */

const PASSWORD = "app-secret"
const MB = 1024 * 1024
let db: PostgresServer
let tidepool: RunningTidepool

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: PASSWORD, superuser: true }] })
  tidepool = await startTidepool({
    tenants: [
      { external_id: "acme", ...upstreamOf(db), users: [{ db_user: "app", db_password: PASSWORD, pool_size: 1 }] }
    ],
    config: { maxPreparedMemory: MB }
  })
})

afterAll(async () => {
  await tidepool?.stop()
  await db?.stop()
})

/** Every message until the connection closes (a FATAL error closes it). */
const untilClosed = async (client: RawClient): Promise<Array<RawMessage>> => {
  const out: Array<RawMessage> = []
  for (;;) {
    try {
      out.push(await client.next())
    } catch {
      return out
    }
  }
}
const raw = () => RawClient.connect(tidepool.transactionPort, "app.acme", PASSWORD)
const types = (messages: ReadonlyArray<RawMessage>) => messages.map((m) => m.type).join("")
const errorOf = (messages: ReadonlyArray<RawMessage>) => {
  const e = messages.find((m) => m.type === "E")!
  return decodeErrorFields(e.body, 0, e.body.length)
}
const firstValue = (messages: ReadonlyArray<RawMessage>) => {
  const row = messages.find((m) => m.type === "D")!.body
  return row.toString("utf8", 6, 6 + row.readInt32BE(2))
}

/** Writes `total` bytes of zeros in 1 MB pieces with backpressure; returns the most memory held in buffers meanwhile. */
const pump = async (client: RawClient, total: number): Promise<number> => {
  const piece = Buffer.alloc(MB)
  let peak = 0
  for (let sent = 0; sent < total; sent += piece.length) {
    const part = total - sent < piece.length ? piece.subarray(0, total - sent) : piece
    if (!client.socket.write(part)) await once(client.socket, "drain")
    peak = Math.max(peak, process.memoryUsage().arrayBuffers)
  }
  return peak
}

/** Bind of `statement` with one binary parameter of `size` bytes, header and fixed fields only (the value follows). */
const bindHead = (statement: string, size: number) => {
  const name = Buffer.from(`${statement}\0`)
  const before = Buffer.alloc(1 + 4 + 1 + name.length + 2 + 2 + 2 + 4)
  let at = 0
  before[at++] = 0x42
  const length = 4 + 1 + name.length + 2 + 2 + 2 + 4 + size + 2
  before.writeInt32BE(length, at)
  at += 4
  before[at++] = 0 // unnamed portal
  at += name.copy(before, at)
  before.writeInt16BE(1, at) // one parameter format code…
  before.writeInt16BE(1, at + 2) // …binary
  before.writeInt16BE(1, at + 4) // one parameter
  before.writeInt32BE(size, at + 6)
  return before
}
const bindTail = Buffer.from([0, 0]) // no result format codes

describe("held messages are bounded", () => {
  it("a 256 MB Bind of a named statement streams through (the relay holds its head, not its value)", async () => {
    const c = await raw()
    c.socket.write(
      Buffer.concat([serialize.parse({ name: "len", text: "SELECT length($1::bytea)", types: [] }), serialize.sync()])
    )
    expect(types(await c.untilReady())).toBe("1Z")
    const size = 256 * MB
    const before = process.memoryUsage().arrayBuffers
    c.socket.write(bindHead("len", size))
    const peak = await pump(c, size)
    c.socket.write(Buffer.concat([bindTail, serialize.execute(), serialize.sync()]))
    const done = await c.untilReady()
    expect(types(done)).toBe("2DCZ")
    expect(firstValue(done)).toBe(String(size))
    // Held whole, the value alone would be 256 MB; streamed, what is in flight is sockets' buffers.
    expect(peak - before).toBeLessThan(96 * MB)
    c.close()
  }, 120_000)

  it("a 4 MB unnamed Parse streams; a named one beyond the client's statement memory is refused at once", async () => {
    const c = await raw()
    const text = `SELECT length('${"x".repeat(4 * MB)}') AS n`
    c.socket.write(
      Buffer.concat([serialize.parse({ text, types: [] }), serialize.bind({}), serialize.execute(), serialize.sync()])
    )
    const ran = await c.untilReady()
    expect(types(ran)).toBe("12DCZ")
    expect(firstValue(ran)).toBe(String(4 * MB))
    // Only the header and the first bytes of the name are sent: the refusal does not wait for the rest.
    const declared = 512 * MB
    const head = Buffer.alloc(8)
    head[0] = 0x50
    head.writeInt32BE(declared, 1)
    head.write("big", 5)
    c.socket.write(head)
    const refused = await untilClosed(c)
    const error = errorOf(refused)
    expect(error.M).toMatch(/^\(EMESSAGETOOLARGE\) message too large: 536870912 bytes/)
    c.close()
  }, 60_000)

  it("a Describe larger than 64 kB is refused as a protocol error", async () => {
    const c = await raw()
    const head = Buffer.alloc(6 + 1024)
    head[0] = 0x44
    head.writeInt32BE(5 + 100 * MB, 1)
    head[5] = 0x53
    c.socket.write(head)
    await pump(c, MB).catch(() => 0) // the connection may close before all of it is written
    const refused = await untilClosed(c)
    expect(errorOf(refused).M).toMatch(/^\(EPROTOCOL\)/)
    c.close()
  }, 60_000)
})
