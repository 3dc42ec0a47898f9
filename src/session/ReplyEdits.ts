/**
 * The edits of one server chunk on its way to the client: ranges to drop (replies to the pooler's
 * own requests) and messages to insert (replies it made up, errors it replaces), recorded in offset
 * order while the server's observer scans the chunk, then applied in one corked pass that forwards
 * everything else as views of the chunk. A reply message that may have to be dropped but is not
 * complete yet is held back (`withheld`) until its end arrives and its fate is known.
 *
 * It also holds a ParameterDescription back (`params`) while the Describe it answers may still be
 * run again (`FirstUseRetry`): written only once the Describe's RowDescription or NoData shows it
 * succeeded, dropped otherwise, so a retried Describe does not answer twice.
 */
import { Buffer } from "node:buffer"
import type * as net from "node:net"
import { Backend } from "../protocol/index.ts"
import type { ServerConnection } from "../upstream/index.ts"

const {
  ParseComplete: PARSE_COMPLETE,
  CloseComplete: CLOSE_COMPLETE,
  ErrorResponse: ERROR,
  ParameterDescription: PARAMETER_DESCRIPTION,
  RowDescription: ROW_DESCRIPTION,
  NoData: NO_DATA
} = Backend

/** In the edit list: where the held ParameterDescription is taken from (a drop), or written (an insert). */
const PARAMS_MARK = Buffer.alloc(0)
/** In the edit list: a dropped range kept as the answer to the pooler's own Describe (`takeCaptured`). */
const CAPTURE_MARK = Buffer.alloc(0)

/** What becomes of the held-back start of a message once it is complete (`releaseWithheld`). */
export enum Withheld {
  Forward = 0,
  Drop = 1,
  /** Held as the ParameterDescription of a Describe that may run again. */
  Params = 2,
  /** Kept as the answer to the pooler's own Describe. */
  Capture = 3
}

export class ReplyEdits {
  // Drops [at, end) and inserts (end = -1) of the chunk being scanned, in offset order. Parallel
  // arrays reused from chunk to chunk: recording an edit allocates nothing.
  private readonly opAt: Array<number> = []
  private readonly opEnd: Array<number> = []
  private readonly opBuf: Array<Buffer | undefined> = []
  /** Bytes of a reply message that may have to be dropped, held back until it is complete. */
  private readonly withheld: Array<Buffer> = []
  /** A ParameterDescription held back (see above). */
  private params: Buffer | undefined = undefined
  /** A ParameterDescription is being held back, or about to be. */
  paramsWanted = false
  /** Answers to the pooler's own Describes, whole messages in order, until `takeCaptured`. */
  private readonly captured: Array<Buffer> = []

  /** Whether part of a reply message is held back, so nothing made up may be written before it. */
  get holding(): boolean {
    return this.withheld.length > 0
  }

  /** `message` goes to the client at offset `at` of the chunk. */
  insert(at: number, message: Buffer): void {
    this.opAt.push(at)
    this.opEnd.push(-1)
    this.opBuf.push(message)
  }

  /** [at, end) of the chunk does not reach the client. */
  drop(at: number, end: number): void {
    this.opAt.push(at)
    this.opEnd.push(end)
    this.opBuf.push(undefined)
  }

  /** [at, end) of the chunk is a ParameterDescription to hold back. */
  dropIntoParams(at: number, end: number): void {
    this.opAt.push(at)
    this.opEnd.push(end)
    this.opBuf.push(PARAMS_MARK)
  }

  /** [at, end) of the chunk answers the pooler's own Describe: kept, not forwarded. */
  dropIntoCapture(at: number, end: number): void {
    this.opAt.push(at)
    this.opEnd.push(end)
    this.opBuf.push(CAPTURE_MARK)
  }

  /** Whether answers to the pooler's Describes were kept since the last `takeCaptured`. */
  get hasCaptured(): boolean {
    return this.captured.length > 0
  }

  /** The kept answers to the pooler's Describes, as one buffer of whole messages. */
  takeCaptured(): Buffer {
    const bytes = this.captured.length === 1 ? this.captured[0]! : Buffer.concat(this.captured)
    while (this.captured.length > 0) this.captured.pop()
    return bytes
  }

  /** The held ParameterDescription goes to the client at `at`: its Describe succeeded. */
  insertParams(at: number): void {
    this.insert(at, PARAMS_MARK)
  }

  /** The Describe will run again: the ParameterDescription held for it is not the client's. */
  discardParams(): void {
    this.params = undefined
    this.paramsWanted = false
  }

  /** The message whose start was held back ended in this chunk: its held bytes go as `fate` says. */
  releaseWithheld(fate: Withheld): void {
    const withheld = this.withheld
    if (withheld.length === 0) return
    if (fate === Withheld.Params) this.params = Buffer.concat(withheld)
    else if (fate === Withheld.Capture) this.captured.push(Buffer.concat(withheld))
    else if (fate === Withheld.Forward) for (let i = 0; i < withheld.length; i++) this.insert(0, withheld[i]!)
    while (withheld.length > 0) withheld.pop()
  }

  /** The server is gone or returned: nothing of its replies is pending. */
  reset(): void {
    while (this.opAt.length > 0) this.opAt.pop()
    while (this.opEnd.length > 0) this.opEnd.pop()
    while (this.opBuf.length > 0) this.opBuf.pop()
    while (this.withheld.length > 0) this.withheld.pop()
    while (this.captured.length > 0) this.captured.pop()
    this.discardParams()
  }

  /**
   * Writes `chunk` (the held server's, already scanned) to `client` with its edits applied; returns
   * `socket.write`'s answer. `holdDescriptions`: a watched exchange may run again, or the pooler's own
   * Describe is answering, so an incomplete ParameterDescription, RowDescription or NoData may yet be
   * dropped.
   */
  apply(client: net.Socket, server: ServerConnection, chunk: Buffer, holdDescriptions: boolean): boolean {
    let limit = chunk.length
    const incomplete = server.incompleteType
    if (
      incomplete === PARSE_COMPLETE ||
      incomplete === CLOSE_COMPLETE ||
      incomplete === ERROR ||
      ((holdDescriptions || this.paramsWanted) &&
        (incomplete === PARAMETER_DESCRIPTION || incomplete === ROW_DESCRIPTION || incomplete === NO_DATA))
    ) {
      const from = Math.max(server.incompleteStart, 0)
      this.withheld.push(Buffer.from(chunk.subarray(from)))
      limit = from
    }
    const opAt = this.opAt
    if (opAt.length === 0) {
      if (limit === chunk.length) return client.write(chunk)
      return limit > 0 ? client.write(chunk.subarray(0, limit)) : true
    }
    const opEnd = this.opEnd
    const opBuf = this.opBuf
    let ok = true
    let pos = 0
    client.cork()
    for (let i = 0; i < opAt.length; i++) {
      const at = opAt[i]!
      if (at > pos) ok = client.write(chunk.subarray(pos, at))
      if (at > pos) pos = at
      const end = opEnd[i]!
      const buf = opBuf[i]
      if (buf === CAPTURE_MARK) {
        if (end > at) this.captured.push(Buffer.from(chunk.subarray(at, end)))
      } else if (buf === PARAMS_MARK) {
        if (end >= 0 && this.paramsWanted) {
          const tail = chunk.subarray(at, end)
          this.params = this.params === undefined ? Buffer.from(tail) : Buffer.concat([this.params, tail])
        } else if (end < 0 && this.params !== undefined) {
          ok = client.write(this.params)
          this.params = undefined
          this.paramsWanted = false
        }
      } else if (end < 0) {
        ok = client.write(buf!)
      }
      if (end >= 0) pos = end
    }
    if (limit > pos) ok = client.write(chunk.subarray(pos, limit))
    client.uncork()
    while (opAt.length > 0) opAt.pop()
    while (opEnd.length > 0) opEnd.pop()
    while (opBuf.length > 0) opBuf.pop()
    return ok
  }
}
