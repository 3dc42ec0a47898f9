import * as net from "node:net"
import { serialize } from "pg-protocol"
import { ScramClient, startupMessage } from "../../src/protocol/index.ts"

export interface RawMessage {
  readonly type: string
  readonly body: Buffer
}

/**
 * A hand-driven protocol connection for tests that need exact control of what goes on the wire
 * (pipelining, split writes). Logs in with SCRAM-SHA-256 and stops after the first ReadyForQuery.
 */
export class RawClient {
  private buffered = Buffer.alloc(0)
  private readonly messages: Array<RawMessage> = []
  private wake: (() => void) | undefined
  closed = false
  /** When set, messages go here as they arrive instead of being queued for `next()`. */
  onMessage: ((message: RawMessage) => void) | undefined = undefined

  private constructor(readonly socket: net.Socket) {
    socket.on("data", (chunk: Buffer) => {
      this.buffered = Buffer.concat([this.buffered, chunk])
      while (this.buffered.length >= 5) {
        const length = this.buffered.readInt32BE(1)
        if (this.buffered.length < 1 + length) break
        const message = {
          type: String.fromCharCode(this.buffered[0]!),
          body: Buffer.from(this.buffered.subarray(5, 1 + length))
        }
        if (this.onMessage !== undefined) this.onMessage(message)
        else this.messages.push(message)
        this.buffered = this.buffered.subarray(1 + length)
      }
      this.wake?.()
    })
    socket.on("close", () => {
      this.closed = true
      this.wake?.()
    })
    socket.on("error", () => {})
  }

  static async connect(port: number, user: string, password: string, database = "postgres"): Promise<RawClient> {
    const socket = net.connect(port, "127.0.0.1")
    await new Promise<void>((resolve, reject) => {
      socket.once("connect", resolve)
      socket.once("error", reject)
    })
    return RawClient.login(socket, user, password, database)
  }

  /** Logs in on an already connected (possibly TLS) socket. */
  static async login(socket: net.Socket, user: string, password: string, database = "postgres"): Promise<RawClient> {
    const client = new RawClient(socket)
    socket.write(startupMessage({ user, database }))
    const scram = new ScramClient({ password })
    for (;;) {
      const m = await client.next()
      if (m.type === "E") throw new Error(`login failed: ${m.body.toString("latin1")}`)
      if (m.type === "Z") return client
      if (m.type !== "R") continue
      const code = m.body.readInt32BE(0)
      if (code === 10) socket.write(serialize.sendSASLInitialResponseMessage("SCRAM-SHA-256", scram.clientFirst()))
      else if (code === 11) {
        const final = scram.handleServerFirst(m.body.subarray(4).toString())
        if (typeof final !== "string") throw new Error("bad server-first")
        socket.write(serialize.sendSCRAMClientFinalMessage(final))
      }
    }
  }

  /** The next message; rejects if the connection closes first. */
  async next(): Promise<RawMessage> {
    for (;;) {
      const m = this.messages.shift()
      if (m !== undefined) return m
      if (this.closed) throw new Error("connection closed")
      await new Promise<void>((resolve) => {
        this.wake = resolve
      })
      this.wake = undefined
    }
  }

  /** Reads messages until `count` ReadyForQuery have arrived; returns everything read. */
  async untilReady(count = 1): Promise<Array<RawMessage>> {
    const out: Array<RawMessage> = []
    let seen = 0
    while (seen < count) {
      const m = await this.next()
      out.push(m)
      if (m.type === "Z") seen++
    }
    return out
  }

  write(data: Buffer): void {
    this.socket.write(data)
  }

  close(): void {
    this.socket.end(serialize.end())
  }
}
