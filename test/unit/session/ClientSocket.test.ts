import { once } from "node:events"
import * as net from "node:net"
import { Effect } from "effect"
import { afterEach, describe, expect, it } from "vitest"
import { startupMessage } from "../../../src/protocol/index.ts"
import { ClientSocket, READ_AHEAD_LIMIT } from "../../../src/session/ClientSocket.ts"
import type { ReadBuffer } from "../../../src/upstream/index.ts"

/*
 * While nobody reads (the session waits for a server, or for its refusal delay), a client that keeps
 * sending must cost a bounded buffer: reading pauses, and TCP pushes back on the sender.
 */

/** Node reads at most 64 KiB at a time, and a paused stream still fills its own buffer once. */
const NODE_READ = 64 * 1024
const HELD_AT_MOST = READ_AHEAD_LIMIT + NODE_READ
/** What a paused socket may have read: what it holds, then its stream buffer's high-water mark and the read that filled it. */
const readAtMost = (socket: net.Socket) => HELD_AT_MOST + socket.readableHighWaterMark + NODE_READ

const pattern = (size: number) => {
  const bytes = Buffer.allocUnsafe(size)
  for (let i = 0; i < size; i++) bytes[i] = (i * 7 + (i >>> 16)) & 0xff
  return bytes
}

/** Resolves when `done()` holds after a 'data' event of `socket` (read after the ClientSocket's own listener). */
const afterData = (socket: net.Socket, done: () => boolean) =>
  new Promise<void>((resolve) => {
    const check = () => {
      if (!done()) return
      socket.off("data", check)
      resolve()
    }
    socket.on("data", check)
  })

/**
 * Resolves when `done()` holds after a read of `accepted` (after the ClientSocket's own handling):
 * a 'data' event, or with `sharedReads` a read into the shared buffer (its `onread` callback).
 */
const afterRead = (client: ClientSocket, accepted: net.Socket, done: () => boolean) => {
  if (!client.sharedReads) return afterData(accepted, done)
  const kBufferCb = Object.getOwnPropertySymbols(accepted).find((s) => s.description === "kBufferCb")!
  const fields = accepted as unknown as Record<symbol, (bytes: number, buffer: Uint8Array) => boolean>
  const own = fields[kBufferCb]!
  return new Promise<void>((resolve) => {
    fields[kBufferCb] = (bytes, buffer) => {
      const result = own(bytes, buffer)
      if (done()) {
        fields[kBufferCb] = own
        resolve()
      }
      return result
    }
  })
}

describe.each([
  ["'data' events", false],
  ["the shared read buffer (no TLS possible)", true]
])("ClientSocket read-ahead, reading through %s", (_, plaintext) => {
  it("pauses at its limit while nobody reads, and the relay still gets every byte in order", async () => {
    const { accepted, peer } = await pair()
    const client = new ClientSocket(accepted, plaintext)
    expect(client.sharedReads).toBe(plaintext)
    const sent = pattern(40 * 1024 * 1024)
    const flushed = new Promise<void>((resolve) => peer.write(sent, () => resolve()))
    // Unbounded, the socket reads all 40 MB (nobody reads them); bounded, it pauses at the limit.
    await afterRead(client, accepted, () => accepted.isPaused() || accepted.bytesRead >= 8 * 1024 * 1024)
    expect(accepted.isPaused()).toBe(true)
    expect(client.readAhead).toBeGreaterThanOrEqual(READ_AHEAD_LIMIT)
    expect(client.readAhead).toBeLessThanOrEqual(HELD_AT_MOST)
    expect(accepted.bytesRead).toBeLessThanOrEqual(readAtMost(accepted))

    // The relay's turn: what was held comes first, then the rest as it arrives.
    const { readAhead, reads } = client.takeOver()
    if (plaintext) expect(client.socket).toBe(accepted)
    const received: Array<Buffer> = [Buffer.from(readAhead)]
    let total = readAhead.length
    const all = new Promise<void>((resolve) => {
      const take = (chunk: Buffer) => {
        received.push(Buffer.from(chunk))
        total += chunk.length
        if (total >= sent.length) resolve()
      }
      if (reads !== undefined) reads.sink = take
      else client.socket.on("data", take)
    })
    await all
    await flushed
    expect(Buffer.concat(received).equals(sent)).toBe(true)
  })

  it("reads again when a read needs more than the held bytes", async () => {
    const { accepted, peer } = await pair()
    const client = new ClientSocket(accepted, plaintext)
    client.stopReading()
    // A startup packet whose parameters arrive only after the socket was paused.
    peer.write(startupMessage({ user: "app.acme", database: "postgres" }))
    const packet = await Effect.runPromise(client.readStartup)
    expect(packet._tag).toBe("StartupMessage")
  })

  it("keeps the bytes it holds when the next read arrives (the shared buffer is reused by every read)", async () => {
    const { accepted, peer } = await pair()
    const client = new ClientSocket(accepted, plaintext)
    const packet = startupMessage({ user: "first-half.acme", database: "second-half" })
    const cut = 20
    // The first part is read and held; the second arrives in a later read, into the same buffer.
    const held = afterRead(client, accepted, () => client.readAhead >= cut)
    peer.write(packet.subarray(0, cut))
    await held
    peer.write(packet.subarray(cut))
    const read = await Effect.runPromise(client.readStartup)
    expect(read._tag === "StartupMessage" && read.parameters).toEqual({
      user: "first-half.acme",
      database: "second-half"
    })
  })

  it("hands the relay what arrived with the last handshake message, then the rest, through one socket", async () => {
    const { accepted, peer } = await pair()
    const client = new ClientSocket(accepted, plaintext)
    // A startup packet and the first query in one segment, as a pipelining client sends them.
    peer.write(Buffer.concat([startupMessage({ user: "app.acme" }), Buffer.from("Q-first")]))
    const packet = await Effect.runPromise(client.readStartup)
    expect(packet._tag).toBe("StartupMessage")
    const { readAhead, reads } = client.takeOver()
    expect(client.socket).toBe(accepted)
    expect(readAhead.toString()).toBe("Q-first")
    expect(reads).toBeDefined()
    const next = new Promise<string>((resolve) => {
      reads!.sink = (chunk) => resolve(chunk.toString())
    })
    peer.write("Q-second")
    expect(await next).toBe("Q-second")
  })
})

/*
 * `takeOver` moves a plaintext client's handle to a socket that reads into the shared ReadBuffer.
 * Real sockets on 127.0.0.1: the accepted side is the client socket the pooler holds.
 */

const cleanups: Array<() => void> = []
afterEach(() => {
  for (const cleanup of cleanups.splice(0)) cleanup()
})

/** A connected pair: `accepted` as the pooler sees it, `peer` as the client. */
const pair = async () => {
  const server = net.createServer()
  server.listen(0, "127.0.0.1")
  await once(server, "listening")
  const peer = net.connect((server.address() as net.AddressInfo).port, "127.0.0.1")
  const [accepted] = (await once(server, "connection")) as [net.Socket]
  await once(peer, "connect")
  cleanups.push(() => {
    peer.destroy()
    accepted.destroy()
    server.close()
  })
  return { accepted, peer }
}

describe("ClientSocket.takeOver", () => {
  /** Reads through the ReadBuffer, writes, and hears the client's close. */
  const relays = async (client: ClientSocket, peer: net.Socket, reads: ReadBuffer | undefined) => {
    expect(reads).toBeDefined()
    const received: Array<string> = []
    // A 'data' listener would put the socket back into stream reads: none here.
    reads!.sink = (chunk) => received.push(chunk.toString())
    peer.write("ping")
    const echoed = once(peer, "data")
    client.socket.write("pong")
    expect(String((await echoed)[0])).toBe("pong")
    const closed = once(client.socket, "close")
    peer.end()
    await closed
    expect(received.join("")).toBe("ping")
  }

  it("switches a plaintext connection's own socket to ReadBuffer reads: one socket per client", async () => {
    const { accepted, peer } = await pair()
    const client = new ClientSocket(accepted)
    const { readAhead, reads } = client.takeOver()
    expect(readAhead.length).toBe(0)
    expect(client.socket).toBe(accepted)
    await relays(client, peer, reads)
  })

  it("moves the handle to a new socket made with onread when this Node keeps no onread fields where expected", async () => {
    const { accepted, peer } = await pair()
    // What a Node whose sockets do not start with these fields at null looks like to takeOver.
    const kBuffer = Object.getOwnPropertySymbols(accepted).find((s) => s.description === "kBuffer")!
    ;(accepted as unknown as Record<symbol, unknown>)[kBuffer] = undefined
    const client = new ClientSocket(accepted)
    const { reads } = client.takeOver()
    expect(client.socket).not.toBe(accepted)
    expect(accepted.destroyed).toBe(true)
    await relays(client, peer, reads)
  })

  it("hands a socket reading through the shared buffer since the accept to the relay with writes still queued", async () => {
    const { accepted, peer } = await pair()
    const client = new ClientSocket(accepted, true)
    expect(client.sharedReads).toBe(true)
    // The client does not read: the greeting (here 32 MiB) stays queued in the pooler's socket.
    peer.pause()
    client.write(Buffer.alloc(32 * 1024 * 1024))
    const { reads } = client.takeOver()
    expect(accepted.writableLength).toBeGreaterThan(0)
    expect(reads).toBeDefined()
    const received: Array<string> = []
    const got = new Promise<void>((resolve) => {
      reads!.sink = (chunk) => {
        received.push(chunk.toString())
        if (received.join("") === "ping") resolve()
      }
    })
    peer.write("ping")
    await got
    peer.destroy()
  })

  it("keeps the socket (and 'data' events) when the client has already ended its side", async () => {
    const { accepted, peer } = await pair()
    const client = new ClientSocket(accepted)
    peer.end()
    // Right at the client's end, before the pooler's socket has closed: a moved handle would never
    // report the end, and the session would wait forever.
    await once(accepted, "end")
    expect(accepted.destroyed).toBe(false)
    const { reads } = client.takeOver()
    expect(reads).toBeUndefined()
    expect(client.socket).toBe(accepted)
    await once(accepted, "close")
  })
})
