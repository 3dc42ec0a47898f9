import { once } from "node:events"
import * as net from "node:net"
import { serialize } from "pg-protocol"
import { ScramClient, startupMessage } from "../../src/protocol/index.ts"
import type { RawMessage } from "./raw.ts"

/**
 * A raw connection whose login is driven step by step, for tests that act in the middle of one
 * (stream while the pooler looks for a server, shut down before the proof). Backend messages are
 * queued in order for `next()`.
 */
export class Wire {
  private buffered = Buffer.alloc(0)
  private readonly queue: Array<RawMessage> = []
  private wake: (() => void) | undefined
  closed = false

  constructor(readonly socket: net.Socket) {
    socket.on("data", (chunk: Buffer) => {
      this.buffered = Buffer.concat([this.buffered, chunk])
      while (this.buffered.length >= 5) {
        const length = this.buffered.readInt32BE(1)
        if (this.buffered.length < 1 + length) break
        this.queue.push({
          type: String.fromCharCode(this.buffered[0]!),
          body: Buffer.from(this.buffered.subarray(5, 1 + length))
        })
        this.buffered = this.buffered.subarray(1 + length)
      }
      this.wake?.()
    })
    socket.on("close", () => {
      this.closed = true
      this.wake?.()
    })
    socket.on("error", () => undefined)
  }

  static async connect(port: number): Promise<Wire> {
    const socket = net.connect(port, "127.0.0.1")
    await once(socket, "connect")
    return new Wire(socket)
  }

  /** The next message; rejects if the connection closes first. */
  async next(): Promise<RawMessage> {
    for (;;) {
      const m = this.queue.shift()
      if (m !== undefined) return m
      if (this.closed) throw new Error("connection closed")
      await new Promise<void>((resolve) => {
        this.wake = resolve
      })
      this.wake = undefined
    }
  }
}

/** An ErrorResponse's fields by their one-letter code (`C` SQLSTATE, `M` message, …). */
export const errorFields = (body: Buffer): Record<string, string> => {
  const fields: Record<string, string> = {}
  let at = 0
  while (at < body.length && body[at] !== 0) {
    const end = body.indexOf(0, at + 1)
    fields[String.fromCharCode(body[at]!)] = body.toString("utf8", at + 1, end)
    at = end + 1
  }
  return fields
}

/**
 * Logs in with SCRAM-SHA-256 and returns right after AuthenticationOk, before the greeting: the
 * pooler may still be looking for a server. `beforeProof` runs before the client's proof is sent.
 */
export const loginUntilOk = async (
  wire: Wire,
  username: string,
  password: string,
  parameters: Readonly<Record<string, string>> = {},
  beforeProof: () => Promise<void> = async () => undefined
): Promise<void> => {
  wire.socket.write(startupMessage({ user: username, database: "postgres", ...parameters }))
  const scram = new ScramClient({ password })
  for (;;) {
    const m = await wire.next()
    if (m.type === "E") throw new Error(`login failed: ${errorFields(m.body).M}`)
    if (m.type !== "R") continue
    const code = m.body.readInt32BE(0)
    if (code === 0) return
    if (code === 10) wire.socket.write(serialize.sendSASLInitialResponseMessage("SCRAM-SHA-256", scram.clientFirst()))
    else if (code === 11) {
      const final = scram.handleServerFirst(m.body.subarray(4).toString())
      if (typeof final !== "string") throw new Error("bad server-first")
      await beforeProof()
      wire.socket.write(serialize.sendSCRAMClientFinalMessage(final))
    }
  }
}
