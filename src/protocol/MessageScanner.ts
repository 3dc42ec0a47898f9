import { Buffer } from "node:buffer"
import { readInt32 } from "./bytes.ts"
import { ProtocolError } from "./ProtocolError.ts"

/**
 * Called once per complete message. `length` is the body length (the length word minus its own 4
 * bytes). For inspected types `body[bodyStart .. bodyStart + length)` is the body: the caller's own
 * chunk when the body arrived in one read, otherwise a fresh Buffer holding it (bodyStart 0). For
 * other types `body` is undefined. A chunk body is only the caller's Buffer, so it stays valid as
 * long as the caller keeps that chunk.
 */
export type MessageCallback = (type: number, length: number, body: Buffer | undefined, bodyStart: number) => void

export interface MessageScannerOptions {
  /** Largest accepted length word (it counts its own 4 bytes, not the type byte); 0 = no cap. */
  readonly maxMessageSize: number
  /** Message types whose bodies the callback reads, as characters, e.g. "ZSEK". */
  readonly inspect: string
  /**
   * Inspected bodies longer than this that span reads are not gathered: the callback gets `body`
   * undefined, as for other types (so a huge message costs no copy). Default: no limit.
   */
  readonly inspectMax?: number
  /**
   * Message types (as characters) never consumed while incomplete at the end of a chunk: `feed`
   * stops at the start of such a message and reports it in `held`/`heldLength`, and the caller feeds
   * those bytes again with more data. A split header is always held then, whatever its type. For
   * callers that rewrite some messages and so must see them whole; others still stream.
   */
  readonly hold?: string
}

const HEADER = 0
const SKIP = 1
const COPY = 2

const typeName = (type: number): string =>
  type >= 0x20 && type < 0x7f ? `"${String.fromCharCode(type)}"` : `0x${type.toString(16).padStart(2, "0")}`

/**
 * Incremental framer for typed protocol messages (everything after the startup packet, in both
 * directions). It keeps only offsets: a message inside one chunk costs a header read and a
 * callback; a skipped body spanning chunks costs a subtraction per chunk, however large it is.
 * Only inspected bodies split across reads are copied, because only they must be contiguous.
 */
export class MessageScanner {
  /** Offset in the current chunk of the current message's type byte, or -1 if it began in an earlier chunk. Valid during the callback. */
  messageStart = -1
  /** Offset in the current chunk just past the current message's last byte. Valid during the callback. */
  messageEnd = -1
  /**
   * After `feed`, when the chunk ended inside a message: its type and the offset of its type byte in
   * that chunk (-1 if it began in an earlier chunk). Lets a caller withhold a message it will drop.
   */
  incompleteType = 0
  incompleteStart = -1
  /** Hold mode: offset of the incomplete message `feed` stopped at, or -1 when it consumed everything. */
  held = -1
  /** Hold mode: total bytes of the held message (type byte included), or 0 while its header is incomplete. */
  heldLength = 0
  /**
   * Hold mode: the next `feed` streams the message starting at its first byte even if it is of a held
   * type (the caller has what it needs of it: its head). Cleared by that `feed`.
   */
  streamFirst = false

  private readonly onMessage: MessageCallback
  /** Shared with every scanner of the same `inspect` until `setInspected` gives it its own. */
  private inspected: Uint8Array
  private ownInspected = false
  private readonly maxMessageSize: number
  private readonly inspectMax: number
  private readonly hold: boolean
  private readonly holdTypes: Uint8Array
  private phase = HEADER
  /** Header bytes of a message whose 5-byte header is split across chunks (0 when none). */
  private headerHave = 0
  private type = 0
  /** The length word of the current message (counts itself). */
  private length = 0
  /** Body bytes still to arrive, in SKIP and COPY. */
  private remaining = 0
  private partial: Buffer | undefined = undefined
  private error: ProtocolError | undefined = undefined

  constructor(onMessage: MessageCallback, options: MessageScannerOptions) {
    this.onMessage = onMessage
    this.maxMessageSize = options.maxMessageSize
    this.inspectMax = options.inspectMax ?? Number.POSITIVE_INFINITY
    this.hold = options.hold !== undefined
    this.holdTypes = typeTable(options.hold ?? "")
    this.inspected = typeTable(options.inspect)
  }

  /** Starts or stops handing bodies of `type` to the callback (for a reply the caller wants to read). */
  setInspected(type: number, on: boolean): void {
    if (!this.ownInspected) {
      this.inspected = new Uint8Array(this.inspected)
      this.ownInspected = true
    }
    this.inspected[type] = on ? 1 : 0
  }

  /** True between messages: no header or body is partly received. */
  get atBoundary(): boolean {
    return this.phase === HEADER && this.headerHave === 0 && this.error === undefined
  }

  /** Frames `chunk`, calling back for every message it completes. After an error every feed returns it. */
  feed(chunk: Buffer): ProtocolError | undefined {
    if (this.error !== undefined) return this.error
    const end = chunk.length
    let pos = 0
    this.held = -1
    const streamFirst = this.streamFirst
    this.streamFirst = false
    if (this.phase !== HEADER || this.headerHave !== 0) {
      this.incompleteStart = -1
      pos = this.resume(chunk)
      if (pos < 0) return this.error
    }
    while (pos < end) {
      this.type = chunk[pos]
      this.incompleteType = this.type
      this.incompleteStart = pos
      if (end - pos < 5) {
        if (this.hold) {
          this.held = pos
          this.heldLength = 0
          return undefined
        }
        // Header split across reads: assemble the length word a byte at a time in resume().
        this.length = 0
        this.headerHave = 1
        for (pos++; pos < end; pos++, this.headerHave++) this.length = (this.length << 8) | chunk[pos]
        return undefined
      }
      this.length = readInt32(chunk, pos + 1)
      pos = this.begin(chunk, pos + 5, streamFirst && pos === 0 ? -1 : pos)
      if (pos === -2) return undefined
      if (pos < 0) return this.error
    }
    return undefined
  }

  /** Continues a message started in an earlier chunk; returns where the next message starts, or -1. */
  private resume(chunk: Buffer): number {
    const end = chunk.length
    if (this.phase === HEADER) {
      let pos = 0
      for (; this.headerHave < 5 && pos < end; pos++, this.headerHave++) {
        this.length = (this.length << 8) | chunk[pos]
      }
      if (this.headerHave < 5) return end
      this.headerHave = 0
      return this.begin(chunk, pos, -1)
    }
    const take = Math.min(this.remaining, end)
    const partial = this.partial
    if (partial !== undefined) chunk.copy(partial, partial.length - this.remaining, 0, take)
    this.remaining -= take
    if (this.remaining > 0) return end
    this.phase = HEADER
    this.partial = undefined
    this.messageStart = -1
    this.messageEnd = take
    this.onMessage(this.type, this.length - 4, partial, 0)
    return take
  }

  /** Handles a complete header whose body starts at `bodyPos`; returns where the next message starts, or -1. */
  private begin(chunk: Buffer, bodyPos: number, start: number): number {
    const length = this.length
    if (length < 4)
      return this.fail("InvalidMessage", `invalid message length ${length} for message type ${typeName(this.type)}`)
    if (this.maxMessageSize > 0 && length > this.maxMessageSize) {
      return this.fail(
        "MessageTooLarge",
        `message of type ${typeName(this.type)} too large: ${length} bytes (max ${this.maxMessageSize} bytes)`
      )
    }
    const bodyLength = length - 4
    const bodyEnd = bodyPos + bodyLength
    const end = chunk.length
    const inspected = this.inspected[this.type] === 1
    if (bodyEnd <= end) {
      this.messageStart = start
      this.messageEnd = bodyEnd
      this.onMessage(this.type, bodyLength, inspected ? chunk : undefined, bodyPos)
      return bodyEnd
    }
    if (this.hold && start >= 0 && this.holdTypes[this.type] === 1) {
      this.held = start
      this.heldLength = length + 1
      return -2
    }
    if (inspected && bodyLength <= this.inspectMax) {
      const partial = Buffer.allocUnsafe(bodyLength)
      chunk.copy(partial, 0, bodyPos, end)
      this.partial = partial
      this.phase = COPY
    } else {
      this.phase = SKIP
    }
    this.remaining = bodyEnd - end
    return end
  }

  private fail(reason: "InvalidMessage" | "MessageTooLarge", message: string): number {
    this.error =
      reason === "MessageTooLarge"
        ? new ProtocolError({ reason, message, size: this.length, max: this.maxMessageSize })
        : new ProtocolError({ reason, message })
    return -1
  }
}

/**
 * A 256-entry table with 1 for each type in `types`, made once per distinct `types` and shared: a
 * scanner per client would otherwise carry two of its own (some 900 bytes with their ArrayBuffers).
 * Never written once made (`setInspected` copies first).
 */
const typeTable = (types: string): Uint8Array => {
  let table = typeTables.get(types)
  if (table === undefined) {
    table = new Uint8Array(256)
    for (let i = 0; i < types.length; i++) {
      const code = types.charCodeAt(i)
      if (code < 256) table[code] = 1
    }
    typeTables.set(types, table)
  }
  return table
}

const typeTables = new Map<string, Uint8Array>()

/** Whether an inspected body, as handed to a MessageCallback, starts with `prefix` (e.g. a statement name). */
export const bodyStartsWith = (body: Buffer, bodyStart: number, length: number, prefix: Buffer): boolean =>
  prefix.length <= length && body.compare(prefix, 0, prefix.length, bodyStart, bodyStart + prefix.length) === 0
