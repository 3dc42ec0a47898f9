/**
 * What each request written to the held server expects back, in order, and what to do with the
 * reply: pass it on, swallow it (the pooler's own request), make one up (a request the pooler
 * answered itself), or put the pooler's error in place of the server's.
 *
 * Requests flow at message rate, so the queue is a ring of reused `Expectation` records: a request
 * costs no allocation once the ring is large enough for the deepest pipeline it has seen (it doubles
 * when full and never shrinks for the client's life). Which fields of an entry mean something
 * depends on its kind; the `push…` methods take exactly the fields their kinds carry, so an entry
 * is never read through a cast.
 */
import type { Statement } from "./ClientStatements.ts"

export enum Expect {
  /** Query or FunctionCall: everything up to its ReadyForQuery. */
  Query = 1,
  Sync = 2,
  /** The client's own Parse: ParseComplete goes to the client. */
  Parse = 3,
  /** A Parse the pooler inserted: its ParseComplete is swallowed. */
  HiddenParse = 4,
  /** A Parse the server did not need (it has the statement): ParseComplete is made up in its place. */
  SyntheticParse = 5,
  Bind = 6,
  Describe = 7,
  Execute = 8,
  Close = 9,
  HiddenClose = 10,
  /** A Close of a client statement: the server keeps it for others; CloseComplete is made up. */
  SyntheticClose = 11,
  /** A request made to fail on purpose so the server's state matches PostgreSQL's; the error is replaced. */
  Fail = 12,
  /** Bind/Describe of a name the client never prepared: a 26000 from the server is replaced by ours. */
  UnknownBind = 13,
  UnknownDescribe = 14,
  /** CopyDone or CopyFail: no reply of its own; marks where a COPY's data ends in the stream. */
  CopyEnd = 15,
  /** A Sync whose ReadyForQuery belongs to the pooler (an exchange it runs again, see `FirstUseRetry`). */
  HiddenSync = 16,
  /**
   * A Describe the pooler sent behind its Parse of a client's statement: its ParameterDescription and
   * RowDescription (or NoData) are swallowed and kept as the copy's description.
   */
  HiddenDescribe = 17
}

/** Kinds whose entry carries nothing but the kind. */
export type PlainExpect =
  | Expect.Query
  | Expect.Sync
  | Expect.Execute
  | Expect.Close
  | Expect.CopyEnd
  | Expect.HiddenSync
/** Kinds about a client statement: `statement` is it, or undefined for an unnamed or not renamed one. */
export type StatementExpect =
  | Expect.Parse
  | Expect.SyntheticParse
  | Expect.Bind
  | Expect.Describe
  | Expect.SyntheticClose
  | Expect.HiddenDescribe
/** The pooler's own Parse or Close: `serverName` is the server-side name, "" for the unnamed statement. */
export type HiddenExpect = Expect.HiddenParse | Expect.HiddenClose
/** Requests whose error is replaced: `reply` is what the client gets instead. */
export type ReplyExpect = Expect.Fail | Expect.UnknownBind | Expect.UnknownDescribe

/** One request's entry. Reused: read its fields before `shift`, which clears them. */
export interface Expectation {
  /** 0 only for `NONE`, the head of an empty queue. */
  readonly kind: Expect | 0
  readonly statement: Statement | undefined
  readonly serverName: string
  readonly reply: Buffer | undefined
}

class Slot implements Expectation {
  kind: Expect | 0 = 0
  statement: Statement | undefined = undefined
  serverName = ""
  reply: Buffer | undefined = undefined
}

/**
 * The head of an empty queue: a reply that no request of ours expects. Not frozen (a frozen object
 * has another shape, which would make every read of the head polymorphic); `Expectation` is read-only.
 */
const NONE: Expectation = new Slot()

// Small: most clients pipeline little, and an idle client keeps this ring (it doubles as needed).
const INITIAL_SIZE = 4

export class ExpectationQueue {
  private slots: Array<Slot> = Array.from({ length: INITIAL_SIZE }, () => new Slot())
  private first = 0
  private count = 0
  /**
   * Requests ever added to and taken from the queue: a request's sequence number names it
   * (`FirstUseRetry` watches one by its number).
   */
  private pushed = 0
  private shiftedCount = 0

  get size(): number {
    return this.count
  }

  /** Requests taken from the queue so far: the head's sequence number. */
  get shifted(): number {
    return this.shiftedCount
  }

  /** The sequence number the next request pushed will get. */
  get nextSeq(): number {
    return this.pushed
  }

  /** The oldest request still waiting for its reply, or `NONE`. */
  get head(): Expectation {
    return this.count === 0 ? NONE : this.slots[this.first]!
  }

  get headKind(): Expect | 0 {
    return this.count === 0 ? 0 : this.slots[this.first]!.kind
  }

  /** The entry `i` places behind the head (0 = the head); `i` < `size`. */
  at(i: number): Expectation {
    return this.slots[(this.first + i) & (this.slots.length - 1)]!
  }

  push(kind: PlainExpect): void {
    this.next().kind = kind
  }

  pushStatement(kind: StatementExpect, statement: Statement | undefined): void {
    const slot = this.next()
    slot.kind = kind
    slot.statement = statement
  }

  pushHidden(kind: HiddenExpect, serverName: string): void {
    const slot = this.next()
    slot.kind = kind
    slot.serverName = serverName
  }

  pushReply(kind: ReplyExpect, reply: Buffer): void {
    const slot = this.next()
    slot.kind = kind
    slot.reply = reply
  }

  /** The head got its whole reply. */
  shift(): void {
    clear(this.slots[this.first]!)
    this.first = (this.first + 1) & (this.slots.length - 1)
    this.count--
    this.shiftedCount++
  }

  /** Forgets every entry (the server is being released or closed); sequence numbers go on. */
  clear(): void {
    for (let i = 0; i < this.count; i++) clear(this.slots[(this.first + i) & (this.slots.length - 1)]!)
    this.first = 0
    this.count = 0
  }

  /** Index (0 = the head) of the first entry of `kind` at or after `from`, or -1. */
  indexOf(kind: Expect, from: number): number {
    const mask = this.slots.length - 1
    for (let i = from; i < this.count; i++) if (this.slots[(this.first + i) & mask]!.kind === kind) return i
    return -1
  }

  /** Whether every entry is one the pooler answers itself (a made-up ParseComplete or CloseComplete). */
  allSynthetic(): boolean {
    const mask = this.slots.length - 1
    for (let i = 0; i < this.count; i++) {
      const kind = this.slots[(this.first + i) & mask]!.kind
      if (kind !== Expect.SyntheticParse && kind !== Expect.SyntheticClose) return false
    }
    return true
  }

  /** The first Sync's ReadyForQuery becomes the pooler's; returns whether there was one. */
  hideFirstSync(): boolean {
    const i = this.indexOf(Expect.Sync, 0)
    if (i < 0) return false
    this.slots[(this.first + i) & (this.slots.length - 1)]!.kind = Expect.HiddenSync
    return true
  }

  /**
   * Removes the Sync entries behind the head up to the first CopyEnd (all of them without one), the
   * rest keeping their order; returns how many. They were never requests: the server ignored them.
   */
  removeSyncsBeforeCopyEnd(): number {
    if (this.count <= 1) return 0
    const slots = this.slots
    const mask = slots.length - 1
    let ended = false
    let kept = 1
    for (let i = 1; i < this.count; i++) {
      const at = (this.first + i) & mask
      const slot = slots[at]!
      if (!ended && slot.kind === Expect.Sync) continue
      if (slot.kind === Expect.CopyEnd) ended = true
      const to = (this.first + kept) & mask
      // Swapped, not copied: every slot object stays in the ring exactly once.
      slots[at] = slots[to]!
      slots[to] = slot
      kept++
    }
    for (let i = kept; i < this.count; i++) clear(slots[(this.first + i) & mask]!)
    const removed = this.count - kept
    this.count = kept
    this.pushed -= removed
    return removed
  }

  private next(): Slot {
    if (this.count === this.slots.length) this.grow()
    const slot = this.slots[(this.first + this.count) & (this.slots.length - 1)]!
    this.count++
    this.pushed++
    return slot
  }

  private grow(): void {
    const size = this.slots.length
    const slots: Array<Slot> = new Array(size * 2)
    for (let i = 0; i < size; i++) slots[i] = this.slots[(this.first + i) & (size - 1)]!
    for (let i = size; i < size * 2; i++) slots[i] = new Slot()
    this.slots = slots
    this.first = 0
  }
}

const clear = (slot: Slot): void => {
  slot.kind = 0
  slot.statement = undefined
  slot.serverName = ""
  slot.reply = undefined
}
