import type * as net from "node:net"
import type { TidepoolError } from "../errors/index.ts"
import { tidepoolError } from "../errors/index.ts"
import type { PoolCounters } from "../pool/index.ts"
import { ClientMessage, classifyClientMessage, MessageScanner } from "../protocol/index.ts"
import { type ReadBuffer, type ServerConnection, writeChunk } from "../upstream/index.ts"

export type RelayEnd =
  | { readonly _tag: "ClientTerminated" }
  | { readonly _tag: "ClientClosed" }
  | { readonly _tag: "ClientError"; readonly error: TidepoolError }
  | { readonly _tag: "ServerClosed"; readonly reason: string }
  | { readonly _tag: "Drained" }
  /** An exception in the pooler's own code: the session ends with EINTERNAL, its server is discarded. */
  | { readonly _tag: "Fault"; readonly cause: unknown }

const { Producer, Sync, Terminate, Opens } = ClientMessage

const ignore = (_chunk: Buffer): void => {}

/**
 * Session-mode data plane: plain callbacks that forward chunks both ways untouched, with backpressure.
 * The client side is framed only to count the ReadyForQuery messages owed (so the session knows
 * whether its server is idle) and to keep the client's Terminate from closing a pooled server.
 */
export class SessionRelay {
  private readonly scanner: MessageScanner
  private terminateSeen = false
  private terminateAt = 0
  private ended = false
  private draining = false
  private reads: ReadBuffer | undefined = undefined
  private readonly toServer = (chunk: Buffer): boolean => this.server.write(chunk)
  private readonly toClient = (chunk: Buffer): boolean => this.client.write(chunk)

  constructor(
    private readonly client: net.Socket,
    private readonly server: ServerConnection,
    maxMessageSize: number,
    private readonly counters: PoolCounters,
    private readonly onEnd: (end: RelayEnd) => void
  ) {
    this.scanner = new MessageScanner(this.onClientMessage, { maxMessageSize, inspect: "" })
  }

  /**
   * Takes over the client socket; `readAhead` holds bytes the handshake read past its end, `reads`
   * is the socket's ReadBuffer when it reads into one (else 'data' events).
   */
  start(readAhead: Buffer, reads?: ReadBuffer): void {
    this.server.handler = { onData: this.onServerData, onClose: this.onServerClose, onFault: this.onServerFault }
    this.reads = reads
    if (reads !== undefined) reads.sink = this.onClientData
    else this.client.on("data", this.onClientData)
    this.client.on("close", this.onClientClose)
    if (readAhead.length > 0) this.onClientData(readAhead)
    if (this.client.destroyed) this.onClientClose()
  }

  /** Ends the session at the next transaction boundary (now, if the server is idle). */
  drain(): void {
    this.draining = true
    if (this.server.isIdle) this.end({ _tag: "Drained" })
  }

  /** Ends now (the session is being interrupted); the session's finalizer decides the server's fate. */
  abort(): void {
    this.end({ _tag: "Drained" })
  }

  private readonly onClientMessage = (type: number): void => {
    if (this.terminateSeen) return
    const kind = classifyClientMessage(type)
    if (kind === Producer || kind === Sync) {
      this.server.pending++
      this.server.inBatch = false
      this.counters.queries++
    } else if (kind === Opens) {
      // Parse, Bind, Describe, Execute, Close…: the server waits for a Sync (see TransactionRelay).
      this.server.inBatch = true
    } else if (kind === Terminate) {
      this.terminateSeen = true
      this.terminateAt = this.scanner.messageStart
    }
  }

  // Socket callbacks are guarded: an exception of ours ends this session alone (see `fault`).
  private readonly onClientData = (chunk: Buffer): void => {
    try {
      this.clientData(chunk)
    } catch (cause) {
      this.fault(cause)
    }
  }

  private clientData(chunk: Buffer): void {
    if (this.ended) return
    this.counters.clientBytes += chunk.length
    const error = this.scanner.feed(chunk)
    if (error !== undefined) {
      this.end({
        _tag: "ClientError",
        error:
          error.reason === "MessageTooLarge"
            ? tidepoolError("EMESSAGETOOLARGE", error.size ?? 0, error.max ?? 0)
            : tidepoolError("EPROTOCOL", error.message)
      })
      return
    }
    if (this.terminateSeen) {
      if (this.terminateAt > 0)
        writeChunk(this.server.socket, chunk.subarray(0, this.terminateAt), this.reads, this.toServer)
      // A Terminate whose first byte went out with an earlier chunk has reached the server: it is closing.
      else if (this.terminateAt < 0) this.server.destroy("client Terminate split across reads")
      this.end({ _tag: "ClientTerminated" })
      return
    }
    if (!writeChunk(this.server.socket, chunk, this.reads, this.toServer)) {
      this.client.pause()
      this.server.socket.once("drain", this.resumeClient)
    }
  }

  private readonly onServerData = (chunk: Buffer): void => {
    try {
      this.serverData(chunk)
    } catch (cause) {
      this.fault(cause)
    }
  }

  private serverData(chunk: Buffer): void {
    if (this.ended) return
    this.counters.serverBytes += chunk.length
    if (!writeChunk(this.client, chunk, this.server.reads, this.toClient)) {
      this.server.socket.pause()
      this.client.once("drain", this.resumeServer)
    }
    if (this.draining && this.server.isIdle) this.end({ _tag: "Drained" })
  }

  private readonly resumeClient = (): void => {
    if (!this.ended) this.client.resume()
  }
  private readonly resumeServer = (): void => {
    this.server.socket.resume()
  }

  private readonly onServerFault = (cause: unknown): void => this.fault(cause)
  private readonly onClientClose = (): void => this.end({ _tag: "ClientClosed" })
  private readonly onServerClose = (reason: string): void => this.end({ _tag: "ServerClosed", reason })

  /** An exception in our own code: the server, in a state nobody can vouch for, is destroyed, never reset and reused. */
  private fault(cause: unknown): void {
    if (this.ended) return
    this.server.destroy("internal error in the relay")
    this.end({ _tag: "Fault", cause })
  }

  private end(end: RelayEnd): void {
    if (this.ended) return
    this.ended = true
    if (this.reads !== undefined) this.reads.sink = ignore
    this.client.off("data", this.onClientData)
    this.client.off("close", this.onClientClose)
    this.client.off("drain", this.resumeServer)
    this.server.socket.off("drain", this.resumeClient)
    this.server.handler = undefined
    this.server.socket.resume()
    this.onEnd(end)
  }
}
