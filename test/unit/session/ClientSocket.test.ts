import { once } from "node:events"
import * as net from "node:net"
import { afterEach, describe, expect, it } from "vitest"
import { ClientSocket } from "../../../src/session/ClientSocket.ts"

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
  it("moves a plaintext connection to a ReadBuffer socket that reads, writes and hears the close", async () => {
    const { accepted, peer } = await pair()
    const client = new ClientSocket(accepted)
    const { readAhead, reads } = client.takeOver()
    expect(readAhead.length).toBe(0)
    expect(reads).toBeDefined()
    expect(client.socket).not.toBe(accepted)
    const received: Array<string> = []
    reads!.sink = (chunk) => received.push(chunk.toString())
    peer.write("ping")
    const echoed = once(peer, "data")
    client.socket.write("pong")
    expect(String((await echoed)[0])).toBe("pong")
    const closed = once(client.socket, "close")
    peer.end()
    await closed
    expect(received.join("")).toBe("ping")
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
