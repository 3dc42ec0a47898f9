import { Buffer } from "node:buffer"
import * as net from "node:net"
import { TLSSocket } from "node:tls"
import { Effect } from "effect"
import { renderErrorResponse, TidepoolError, tidepoolError } from "../errors/index.ts"
import { decodeStartupPacket, ProtocolError, type StartupPacket } from "../protocol/index.ts"
import { TLS_HANDSHAKE_RECORD } from "../tls/index.ts"
import { ReadBuffer } from "../upstream/index.ts"

/** Authentication messages are small; anything bigger is not a password or SASL exchange. */
const MAX_AUTH_MESSAGE = 10_000

/**
 * Bytes held before reading pauses. Above every message the control plane reads (startup packets
 * and authentication messages are at most 10 000 bytes), so a waiting reader always has a whole
 * message or a refusal; what a client sends beyond it waits in the kernel, not in our memory, until
 * the relay takes the socket (docs/operations.md, "Limits per client").
 */
export const READ_AHEAD_LIMIT = 16 * 1024

const EMPTY = Buffer.alloc(0)

/** How long a connection we end may still read what its client sends before it is cut. */
const LINGER_MS = 1000

/**
 * A lingering close, for a connection we have just ended (`end`, our last bytes queued): closing
 * it with bytes unread makes the kernel answer with a reset, and a reset makes the client's kernel
 * drop whatever it has not read yet — our error with it (a client blocked sending a large message
 * reads only afterwards). So what the client still sends is read and dropped (the socket flows
 * with no 'data' listener of ours) until it closes its side, and for at most LINGER_MS, after
 * which the connection is cut whatever it does.
 */
const linger = (socket: net.Socket): void => {
  if (socket.destroyed) return
  const timer = setTimeout(() => socket.destroy(), LINGER_MS)
  socket.once("close", () => clearTimeout(timer))
  socket.resume()
}

/**
 * A client socket during the control-plane phase (startup, authentication, the wait for a server):
 * reads are Effects that wait for bytes. Reading pauses once `READ_AHEAD_LIMIT` bytes are held and
 * resumes only when a read needs more, so a client that streams while it waits (for a server, or for
 * its refusal) costs a bounded buffer and pushes back through TCP. When the relay takes over,
 * `takeOver` hands it whatever was read ahead.
 *
 * The reads are built when used rather than held as fields: an idle client keeps this object for
 * its whole life (its session ends through it), and should not keep five Effects with it.
 */
export class ClientSocket {
  private buffered: Buffer = EMPTY
  /**
   * Written and not yet sent: the control plane's replies go out when it next waits for the client
   * (or ends), so a login's SASLFinal, AuthenticationOk and greeting leave in one write.
   */
  private out: Buffer | Array<Buffer> | undefined = undefined
  private wake: (() => void) | undefined = undefined
  private onGone: (() => void) | undefined = undefined
  closed = false
  /** The relay has the socket (`takeOver`): the session no longer ends with its login. */
  handedOver = false
  /** An SSLRequest was answered; PostgreSQL allows one per connection. */
  sslRequested = false

  /**
   * The handshake reads through the shared `ReadBuffer` (`onread`) rather than 'data' events: set
   * when the connection cannot upgrade to TLS (no certificate when it was accepted), so its socket
   * is never wrapped. Each read is copied out of the shared buffer (a handshake's are small), and
   * none goes through the stream machinery (its push, 'data' event and next-tick read-ahead).
   */
  readonly sharedReads: boolean

  /**
   * The client's socket; after a TLS upgrade, the TLS socket wrapping the original one. With
   * `plaintext` (no TLS is possible for this connection), its reads go through the shared read
   * buffer from the start (`sharedReads`).
   */
  constructor(
    public socket: net.Socket,
    plaintext = false
  ) {
    this.sharedReads = plaintext && socket.readableLength === 0 && readInto(socket, this.onSharedRead)
    if (!this.sharedReads) socket.on("data", this.onData)
    socket.on("close", this.onClose)
    socket.on("error", this.onError)
  }

  /** The TLS socket, when the client upgraded. */
  get tls(): TLSSocket | undefined {
    return this.socket instanceof TLSSocket ? this.socket : undefined
  }

  /** Bytes received and not yet read. */
  get readAhead(): number {
    return this.buffered.length
  }

  /** The first unread byte (when `readAhead` > 0). */
  get firstByte(): number {
    return this.buffered[0]!
  }

  /** Continues the control-plane phase on `socket` (the TLS socket that wraps the detached one). */
  adopt(socket: net.Socket): void {
    this.socket = socket
    socket.on("data", this.onData)
    socket.on("close", this.onClose)
    socket.on("error", this.onError)
    // A close between the handshake's end and this call would otherwise go unheard. Data is not
    // lost: the socket buffers it until the 'data' listener above starts the flow.
    if (socket.destroyed) this.onClose()
  }

  private readonly onData = (chunk: Buffer) => {
    // Bounded by the pause below, so joining chunks stays linear in what a client sends.
    this.buffered = this.buffered.length === 0 ? chunk : Buffer.concat([this.buffered, chunk])
    if (this.buffered.length >= READ_AHEAD_LIMIT) this.socket.pause()
    this.notify()
  }
  /** `sharedReads`: a read into the shared buffer, copied out before the next read overwrites it. */
  private readonly onSharedRead = (bytes: number, buffer: Uint8Array): boolean => {
    const view = (buffer as Buffer).subarray(0, bytes)
    this.buffered = this.buffered.length === 0 ? Buffer.from(view) : Buffer.concat([this.buffered, view])
    if (this.buffered.length >= READ_AHEAD_LIMIT) this.socket.pause()
    this.notify()
    return true
  }
  /** Reads nothing more into this object (`sharedReads`): a lingering close's reads are dropped. */
  private stopSharedReads(): void {
    if (this.sharedReads) readInto(this.socket, drop)
  }
  private readonly onClose = () => {
    this.closed = true
    this.notify()
    const gone = this.onGone
    this.onGone = undefined
    gone?.()
  }
  private readonly onError = () => {
    // 'close' follows; the session reports the loss once.
  }
  private notify(): void {
    const wake = this.wake
    this.wake = undefined
    wake?.()
  }

  get remoteAddress(): string {
    return normalizeAddress(this.socket.remoteAddress ?? "")
  }

  /**
   * Resumes with `take`'s first answer (a `TidepoolError` fails the read): at once when the bytes
   * held already answer it, which is the usual case (a message has nearly always arrived whole),
   * else tried again as bytes arrive. One `Effect.callback` per read, no generator and no Effect
   * per arrival: each step of the fiber's loop is CPU a login pays for (docs/login-path.md).
   * Fails with ECLIENTSOCKETCLOSED when the client went away before `take` had its answer.
   */
  private until<A>(take: (self: ClientSocket) => A | TidepoolError | undefined): Effect.Effect<A, TidepoolError> {
    return Effect.callback<A, TidepoolError>((resume) => {
      const answered = (): boolean => {
        const result = take(this)
        if (result === undefined) return false
        resume(result instanceof TidepoolError ? Effect.fail(result) : Effect.succeed(result))
        return true
      }
      if (answered()) return
      // The client answers only what it has received.
      this.flush()
      const wait = (): boolean => {
        if (this.closed) {
          resume(Effect.fail(tidepoolError("ECLIENTSOCKETCLOSED")))
          return false
        }
        this.wake = wake
        if (this.socket.isPaused()) this.socket.resume()
        return true
      }
      const wake = (): void => {
        if (!answered()) wait()
      }
      if (!wait()) return
      return Effect.sync(() => {
        this.wake = undefined
      })
    })
  }

  /**
   * Calls `callback` once, when the client goes (at once if it has gone). Heard while reading flows:
   * a client paused at the read-ahead limit is found gone only when next read. One at a time.
   */
  whenGone(callback: () => void): void {
    if (this.closed) {
      callback()
      return
    }
    this.onGone = callback
  }

  forgetGone(): void {
    this.onGone = undefined
  }

  /** The first unread byte, waiting for it if need be (a TLS ClientHello starts with 0x16). */
  get peek(): Effect.Effect<number, TidepoolError> {
    return this.until(takeFirstByte)
  }

  get readStartup(): Effect.Effect<StartupPacket, TidepoolError> {
    return this.until(takeStartup)
  }

  /**
   * The connection's first packet, or `DIRECT_TLS` when its first byte opens a TLS handshake
   * (PostgreSQL 17's direct TLS; nothing is consumed then): one read for what `peek` and
   * `readStartup` would take two for.
   */
  get readFirst(): Effect.Effect<StartupPacket | typeof DIRECT_TLS, TidepoolError> {
    return this.until(takeFirst)
  }

  /** Reads one typed message during authentication (PasswordMessage/SASL responses are all 'p'). */
  get readMessage(): Effect.Effect<{ readonly type: number; readonly body: Buffer }, TidepoolError> {
    return this.until(takeMessage)
  }

  /** `readStartup`'s step: a whole packet from the bytes held, an error, or undefined for more. */
  takeStartup(): StartupPacket | TidepoolError | undefined {
    const result = decodeStartupPacket(this.buffered)
    if (result === undefined) return undefined
    if (result instanceof ProtocolError) {
      return result.reason === "StartupPacketTooLarge"
        ? tidepoolError("ESTARTUPPACKETTOOLARGE", result.size ?? 0, result.max ?? 0)
        : tidepoolError("ESTARTUPMESSAGE", result.message)
    }
    this.buffered = this.buffered.subarray(result.consumed)
    return result.packet
  }

  /** `readMessage`'s step. */
  takeMessage(): { readonly type: number; readonly body: Buffer } | TidepoolError | undefined {
    const buffered = this.buffered
    if (buffered.length < 5) return undefined
    const length = buffered.readInt32BE(1)
    if (length < 4 || length > MAX_AUTH_MESSAGE) {
      return tidepoolError("EAUTHPROTOCOL", `invalid message length ${length}`)
    }
    if (buffered.length < 1 + length) return undefined
    this.buffered = buffered.subarray(1 + length)
    return { type: buffered[0]!, body: buffered.subarray(5, 1 + length) }
  }

  /** Queues `data`; it is sent with whatever else is queued when the session next waits for the client. */
  write(data: Buffer): void {
    const out = this.out
    if (out === undefined) this.out = data
    else if (Array.isArray(out)) out.push(data)
    else this.out = [out, data]
  }

  /** Sends what is queued, in one write. */
  flush(): void {
    const out = this.out
    if (out === undefined) return
    this.out = undefined
    if (!this.closed && this.socket.writable) this.socket.write(Array.isArray(out) ? Buffer.concat(out) : out)
  }

  /**
   * Reads nothing more until a read asks for it: a refused client's bytes stay in the kernel (and
   * its sends block) rather than being read only to be thrown away.
   */
  stopReading(): void {
    this.socket.pause()
  }

  /** Sends the error (unless it is log-only) and closes the connection, lingering (see `linger`). */
  fail(error: TidepoolError): void {
    this.flush()
    const socket = this.socket
    if (!this.closed && socket.writable && error.severity !== "LOG") socket.end(rendered(error))
    else socket.end()
    socket.off("data", this.onData)
    this.stopSharedReads()
    linger(socket)
  }

  /**
   * A login's end without a session (refused, failed, timed out): the error (unless log-only) and
   * our FIN. No lingering close, unlike `fail`: the login's fiber ends next and destroys the
   * connection as soon as these are sent (`destroySoon` at 'finish'), which a lingering close's
   * reads, timer and close listener would not outlast (docs/login-path.md, "Fifth round"). A refused
   * client was told nothing more is read (`stopReading`) and nothing more is.
   */
  refuse(error: TidepoolError): void {
    this.flush()
    const socket = this.socket
    if (!this.sharedReads) socket.off("data", this.onData)
    this.stopSharedReads()
    if (!this.closed && socket.writable && error.severity !== "LOG") socket.end(rendered(error))
    else socket.end()
  }

  /**
   * Ends the control-plane phase: returns the bytes read ahead, which belong to the relay, and how
   * the relay reads from now on. A plaintext connection's socket switches, in place, to reading into
   * the shared `ReadBuffer` (the relay then copies what it keeps): Node's net.Server cannot make
   * its sockets that way, so the socket is given what the `onread` option would have given it
   * (`useReadBuffer`). Safe only while nothing is queued in the socket's stream and neither side has
   * ended. Otherwise (TLS, bytes queued, a client already gone) the socket stays as it is and 'data'
   * events carry the reads (`reads` undefined) — unless it has read through the shared buffer since
   * the accept (`sharedReads`): then only the reads' receiver changes, in any state.
   *
   * Still Node internals on Node 24 (checked on 24.21): `net.createServer` takes no `onread`, and
   * no public API turns an accepted socket's reads into `onread` reads. So the socket's own `onread`
   * fields (`kBuffer`, `kBufferCb`) and its handle's `useUserBuffer` are used, guarded: a Node
   * without them moves the handle to a new `net.Socket` made with `onread` (one more socket per
   * client), and a Node whose handle has no `readStop` keeps the 'data' path
   * (test/unit/session/ClientSocket.test.ts covers the paths).
   */
  takeOver(): { readonly readAhead: Buffer; readonly reads: ReadBuffer | undefined } {
    this.handedOver = true
    const readAhead = this.detach()
    const old = this.socket as net.Socket & { _handle?: NodeHandle | null }
    // Reading through the shared buffer since the accept: the reads only change hands, whatever is
    // queued to write or whether the client has ended (its end reaches the socket as before). The
    // 'data' path below would hear nothing, since `detach` left the socket reading into `drop`.
    if (this.sharedReads && !old.destroyed) {
      const reads = ReadBuffer.shared()
      if (readInto(old, reads.onread.callback)) {
        // Paused at the read-ahead limit: the relay reads on from here.
        if (old.isPaused()) old.resume()
        return { readAhead, reads }
      }
    }
    const handle = old._handle
    if (
      old instanceof TLSSocket ||
      old.destroyed ||
      // The client's end already arrived (a shutdown may be in flight on the handle): the moved
      // socket would never hear of it.
      old.readableEnded ||
      old.writableEnded ||
      old.readableLength > 0 ||
      old.writableLength > 0 ||
      typeof handle?.readStop !== "function"
    ) {
      // Paused while it waited (read-ahead limit): the relay's 'data' listener would not restart
      // the flow by itself.
      if (old.isPaused()) old.resume()
      return { readAhead, reads: undefined }
    }
    const reads = ReadBuffer.shared()
    if (useReadBuffer(old, handle, reads)) return { readAhead, reads }
    const moved = new net.Socket({ handle, onread: reads.onread } as net.SocketConstructorOpts)
    // The old socket lets go of the handle (destroying it now closes nothing) and, being destroyed,
    // no longer counts as one of its server's connections.
    old._handle = null
    old.destroy()
    moved.on("error", this.onError)
    this.socket = moved
    return { readAhead, reads }
  }

  /**
   * Stops the control-plane reader and returns the bytes read ahead, which belong to the relay (or
   * the TLS socket). What was written is sent first.
   */
  detach(): Buffer {
    // Before the TLS handshake (its `S`) or the relay's first write (the greeting).
    this.flush()
    this.socket.off("data", this.onData)
    this.stopSharedReads()
    this.socket.off("close", this.onClose)
    // An empty view still holds the chunk it was cut from, which the relay would keep alive.
    const rest = this.buffered.length === 0 ? EMPTY : this.buffered
    this.buffered = EMPTY
    return rest
  }
}

/**
 * Refusals' ErrorResponses, rendered once per distinct error: a guessing client gets the same
 * wrong-password or unknown-name error again and again. Bounded (cleared when full); errors with a
 * detail or hint (an upstream's own) are rendered each time.
 */
const renderedErrors = new Map<string, Buffer>()
const RENDERED_ERRORS_MAX = 1000

const rendered = (error: TidepoolError): Buffer => {
  if (error.detail !== undefined || error.hint !== undefined) return renderErrorResponse(error)
  const key = `${error.code}\u0000${error.sqlstate}\u0000${error.severity}\u0000${error.message}`
  let response = renderedErrors.get(key)
  if (response === undefined) {
    response = renderErrorResponse(error)
    if (renderedErrors.size >= RENDERED_ERRORS_MAX) renderedErrors.clear()
    renderedErrors.set(key, response)
  }
  return response
}

/** `::ffff:1.2.3.4` → `1.2.3.4`, so allow lists and logs speak IPv4 for IPv4 clients. */
export const normalizeAddress = (address: string): string =>
  address.startsWith("::ffff:") && address.includes(".") ? address.slice(7) : address

/** `ClientSocket.readFirst`: the connection opens with a TLS handshake record. */
export const DIRECT_TLS = "direct TLS" as const

// Module-level, so a read allocates no closure for its step.
const takeFirstByte = (self: ClientSocket): number | undefined => (self.readAhead === 0 ? undefined : self.firstByte)
const takeStartup = (self: ClientSocket) => self.takeStartup()
const takeMessage = (self: ClientSocket) => self.takeMessage()
const takeFirst = (self: ClientSocket): StartupPacket | typeof DIRECT_TLS | TidepoolError | undefined =>
  self.readAhead === 0 ? undefined : self.firstByte === TLS_HANDSHAKE_RECORD ? DIRECT_TLS : self.takeStartup()

/** What `takeOver` uses of a socket's native handle. */
interface NodeHandle {
  readonly readStop?: unknown
  readonly useUserBuffer?: unknown
  readonly reading?: boolean
}

/**
 * The fields a `net.Socket` made with the `onread` option keeps it in (Node's `kBuffer` and
 * `kBufferCb` symbols, found by their descriptions on a socket made for the purpose), or undefined
 * on a Node that has none.
 */
const onreadFields = ((): { readonly buffer: symbol; readonly callback: symbol } | undefined => {
  const symbols = Object.getOwnPropertySymbols(new net.Socket())
  const buffer = symbols.find((s) => s.description === "kBuffer")
  const callback = symbols.find((s) => s.description === "kBufferCb")
  return buffer === undefined || callback === undefined ? undefined : { buffer, callback }
})()

/**
 * Makes `socket` read into `reads` from now on, as if it had been made with `reads.onread`: what
 * Node's Socket constructor and `initSocketHandle` do with that option, done to an accepted socket
 * (one `net.Socket` per client instead of a second one made at `takeOver`). False, changing
 * nothing, when this Node does not keep them where expected.
 */
const useReadBuffer = (socket: net.Socket, handle: NodeHandle, reads: ReadBuffer): boolean => {
  const fields = onreadFields
  if (fields === undefined || typeof handle.useUserBuffer !== "function") return false
  const fieldsOf = socket as unknown as Record<symbol, unknown>
  if (fieldsOf[fields.buffer] !== null || fieldsOf[fields.callback] !== null) return false
  const { buffer, callback } = reads.onread
  fieldsOf[fields.buffer] = buffer
  fieldsOf[fields.callback] = callback
  ;(handle.useUserBuffer as (buffer: Uint8Array) => void).call(handle, buffer as Uint8Array)
  // A socket paused at the read-ahead limit may have stopped its handle's reads; `resume` on a
  // socket with `onread` fields starts them again. One still reading (a socket just accepted) is
  // left alone: `resume` would cost it a next-tick flow for nothing.
  if (handle.reading !== true) socket.resume()
  return true
}

const drop = (_bytes: number, _buffer: Uint8Array): boolean => true

/**
 * Reads of `socket` go to `callback`, through the shared read buffer: the first call switches an
 * accepted socket to it (`useReadBuffer`), later ones only change who gets the reads (the relay at
 * `takeOver`, nobody once the login has ended). False, changing nothing, when this Node does not
 * keep a socket's `onread` fields where expected.
 */
const readInto = (socket: net.Socket, callback: (bytes: number, buffer: Uint8Array) => boolean): boolean => {
  const fields = onreadFields
  if (fields === undefined) return false
  const fieldsOf = socket as unknown as Record<symbol, unknown>
  if (fieldsOf[fields.buffer] !== null) {
    fieldsOf[fields.callback] = callback
    return true
  }
  const handle = (socket as net.Socket & { _handle?: NodeHandle | null })._handle
  if (handle === undefined || handle === null || typeof handle.readStop !== "function") return false
  const reads = ReadBuffer.shared()
  // The callback is set before the switch, which is the one `useReadBuffer` gives the socket.
  if (!useReadBuffer(socket, handle, reads)) return false
  fieldsOf[fields.callback] = callback
  return true
}
