import { once } from "node:events"
import * as net from "node:net"
import { Effect } from "effect"
import { afterEach, describe, expect, it } from "vitest"
import { tidepoolError } from "../../../src/errors/index.ts"
import { ClientSocket } from "../../../src/session/ClientSocket.ts"

/*
 * The control plane's replies are queued and leave in one write when the login next waits for the
 * client, ends, or hands the socket on: a SCRAM login's SASLFinal, AuthenticationOk and greeting
 * are one write (docs/login-path.md), and nothing queued is ever lost or reordered.
 */

const cleanups: Array<() => void> = []
afterEach(() => {
  for (const cleanup of cleanups.splice(0)) cleanup()
})

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

/** Counts the socket's writes (instrumentation only: the bytes still go out). */
const countWrites = (socket: net.Socket) => {
  const counter = { writes: 0 }
  const write = socket.write.bind(socket) as (...args: Array<unknown>) => boolean
  socket.write = ((...args: Array<unknown>) => {
    counter.writes++
    return write(...args)
  }) as typeof socket.write
  return counter
}

/** The peer's bytes until it has `length` of them. */
const receive = (peer: net.Socket, length: number) =>
  new Promise<Buffer>((resolve) => {
    const chunks: Array<Buffer> = []
    let total = 0
    const take = (chunk: Buffer) => {
      chunks.push(chunk)
      total += chunk.length
      if (total < length) return
      peer.off("data", take)
      resolve(Buffer.concat(chunks))
    }
    peer.on("data", take)
  })

/** Until the peer's side has closed, with everything it received. */
const receiveAll = (peer: net.Socket) =>
  new Promise<Buffer>((resolve) => {
    const chunks: Array<Buffer> = []
    peer.on("data", (chunk: Buffer) => chunks.push(chunk))
    peer.once("close", () => resolve(Buffer.concat(chunks)))
  })

const message = (type: string, body: string) => {
  const bytes = Buffer.alloc(5 + body.length)
  bytes.write(type, 0, "latin1")
  bytes.writeInt32BE(4 + body.length, 1)
  bytes.write(body, 5, "latin1")
  return bytes
}

describe("ClientSocket writes", () => {
  it("queues replies and sends them in one write when it next waits for the client", async () => {
    const { accepted, peer } = await pair()
    const client = new ClientSocket(accepted)
    const counter = countWrites(accepted)
    const replies = [message("R", "final"), message("R", "ok"), message("Z", "I")]
    for (const reply of replies) client.write(reply)
    expect(counter.writes).toBe(0)

    const expected = Buffer.concat(replies)
    const received = receive(peer, expected.length)
    const read = Effect.runPromise(client.readMessage)
    expect(counter.writes).toBe(1)
    expect(await received).toEqual(expected)

    // The peer answers what it was sent; the read completes with it.
    peer.write(message("p", "proof"))
    expect((await read).body.toString("latin1")).toBe("proof")
    expect(counter.writes).toBe(1)
  })

  it("sends what is queued before a refusal, then closes", async () => {
    const { accepted, peer } = await pair()
    const client = new ClientSocket(accepted)
    const all = receiveAll(peer)
    const queued = message("R", "sasl")
    client.write(queued)
    client.fail(tidepoolError("EWRONGPASSWORD", "app"))
    const received = await all
    expect(received.subarray(0, queued.length)).toEqual(queued)
    expect(String.fromCharCode(received[queued.length]!)).toBe("E")
    expect(received.toString("latin1")).toContain("28P01")
  })

  it("sends the queued greeting before the relay has the socket", async () => {
    const { accepted, peer } = await pair()
    const client = new ClientSocket(accepted)
    const greeting = Buffer.concat([message("K", "12345678"), message("Z", "I")])
    client.write(greeting)
    const received = receive(peer, greeting.length + 4)
    client.takeOver()
    // The relay's first write comes after it.
    client.socket.write("pong")
    expect(await received).toEqual(Buffer.concat([greeting, Buffer.from("pong")]))
  })
})
