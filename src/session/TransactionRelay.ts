import { Buffer } from "node:buffer"
import type * as net from "node:net"
import { performance } from "node:perf_hooks"
import { type TidepoolError, tidepoolError } from "../errors/index.ts"
import type { CheckoutCallback, ListenSubscriber, TenantPool } from "../pool/index.ts"
import {
  ClientMessage,
  classifyClientMessage,
  Frontend,
  MessageScanner,
  type ProtocolError,
  readyForQuery
} from "../protocol/index.ts"
import type { ReadBuffer, ServerConnection, ServerHandler } from "../upstream/index.ts"
import {
  defaultPreparedStatementOptions,
  type PreparedStatementOptions,
  PreparedStatements
} from "./PreparedStatements.ts"
import { LISTENS, PROBE, sessionEffects, UNPIN, unlistenTargets } from "./SessionEffects.ts"
import { customSettingNames, type ProbeResult, probeResult, sessionProbe } from "./SessionProbe.ts"
import type { RelayEnd } from "./SessionRelay.ts"
import {
  adoptSettings,
  STATEMENT_TIMEOUT,
  type StartSettings,
  settingsChange,
  settingsKey,
  TRACKED_PARAMETERS
} from "./settings.ts"

const { Producer, Sync, Terminate, Opens } = ClientMessage
const { Parse: PARSE, Bind: BIND, Query: QUERY, FunctionCall: FUNCTION_CALL } = Frontend

/** Notifications one client may have waiting for its transaction to end, and unread bytes in its socket. */
const MAX_WAITING_NOTIFICATIONS = 100_000
const MAX_UNREAD_BYTES = 16 * 1024 * 1024

/** SQL longer than this is not read for session effects: it counts as `PROBE` (one round trip at its boundary). */
const READ_SQL_MAX = 65_536

/** Held messages up to this size are gathered whole; larger ones only as far as needed (`largeHeld`). */
const HOLD_WHOLE = 65_536
/** The most of a large Bind's head (its portal and statement names) gathered before it streams. */
const HEAD_MAX = 65_536
// Verdicts of `largeHeld`.
const WAIT = 0
const STREAM = 1

const ignore = (_chunk: Buffer): void => {}

/** The answer to a bare Sync when no server is held; never mutated, so one instance serves every client. */
const READY_IDLE = readyForQuery("I")

/**
 * Transaction-mode data plane (docs/architecture.md#transaction-relay, docs/operations.md#transaction-mode-port-6543): a server is borrowed from the pool
 * when the client sends something and given back at the first transaction boundary. Plain callbacks,
 * no Effect, no Promise, no per-message allocation: client chunks are framed only to count the
 * ReadyForQuery messages they will produce and to spot Terminate, then forwarded untouched (a
 * plaintext client's chunk is first copied out of the shared read buffer, once per read; server
 * chunks are forwarded as views of their connection's read buffer, see `ReadBuffer`).
 *
 * ## When a server goes back to the pool (the release rule)
 *
 * A held server is released as soon as all of these hold:
 *
 * 1. `server.pending === 0` — every ReadyForQuery owed for a Query, Sync or FunctionCall we forwarded
 *    has arrived;
 * 2. `server.txStatus === 'I'` — the last of them says no transaction is open ('T'/'E' keep it);
 * 3. `!open` — no extended-protocol request is waiting for its Sync. `open` becomes true on any
 *    message that starts or continues an extended-protocol exchange (Parse, Bind, Describe, Execute,
 *    Close, and any type we do not know) and false on Query, Sync or FunctionCall, which conclude
 *    one. A `Parse/Bind/Execute/Flush` batch has pending 0 but the server is mid-request (and after
 *    an error it discards everything until Sync), so pending alone is not enough. Flush (H) and the
 *    COPY sub-protocol messages (CopyData, CopyDone, CopyFail) leave `open` unchanged: Flush only
 *    asks for output already owed, and COPY messages either belong to a COPY started by a counted
 *    Query/Execute (whose ReadyForQuery comes after CopyDone/CopyFail) or are ignored by the server
 *    outside COPY. So `Q "COPY … FROM STDIN"`, CopyData…, CopyDone releases at its ReadyForQuery;
 * 4. `!partial` — the bytes forwarded end on a message boundary (no half-sent message);
 * 5. no probe of the client's session state is in flight and nothing pins the client to its server
 *    (see "Session state" below).
 *
 * This is checked after each server chunk has been handed to the client socket (so the final bytes
 * are already queued for the client when the server moves on), after each client chunk (a trailing
 * Flush or CopyData can be the last thing needed), and right after a checkout. Because a client
 * chunk is counted before it is written, a query the client pipelined behind the final
 * ReadyForQuery keeps the server held.
 *
 * ## Ending
 *
 * The relay ends exactly once (`onEnd`) and leaves no listener behind. Whatever ends it, a held server
 * is released if the rule above holds, otherwise closed: discarded (socket destroyed) when the client
 * vanished, broke the protocol or the server died; closed politely (pending bytes flushed, then
 * Terminate) when the client sent Terminate, so that what it sent before Terminate still runs, as it
 * would on a direct connection. The client's Terminate itself never reaches a pooled server: it is
 * recognised from its type byte, even when the rest of it is still to arrive.
 *
 * ## Named prepared statements
 *
 * Parse, Bind, Describe and Close reach a server only once the relay has what it may rewrite of
 * them (the scanner holds back an incomplete one; `gather` collects it whole up to 64 kB, a larger
 * Bind only up to its names; everything else streams), so `PreparedStatements` can rewrite them at
 * the moment it knows which server they go to; it follows the server's replies to drop and make up
 * the ones its rewriting changed. A client with no server whose chunk only prepares statements the
 * pool knows is answered without one (`answerAlone`). A client that ran SQL-level PREPARE is pinned
 * to its server until it deallocates (`statements.pinned`).
 *
 * ## Session state (docs/architecture.md#session-state-in-transaction-mode)
 *
 * Query and Parse texts are read by `sessionEffects`; when one may have left session state, the
 * server is not released at the next boundary but asked (`probe`) what the session holds: its
 * settings become the client's (re-applied wherever it goes next, reset for the next client of this
 * server), state that cannot move pins the client (`pinReason`), and its LISTENs move to the pool's
 * ListenHub. Client bytes wait in `queue` while the pooler's questions are out.
 */
export class TransactionRelay implements ServerHandler {
  // Built on first use: a client that stays idle keeps none of them (docs/login-path.md, "Idle
  // clients"). Callbacks handed to sockets, the pool and the hub are made when first handed over, and
  // the server calls the relay itself (`onData`, `onClose`, `onFault`): no closure per client up front.
  private scanner: MessageScanner | undefined = undefined
  private statements: PreparedStatements | undefined = undefined
  private readonly statementOptions: PreparedStatementOptions
  private onCheckout: CheckoutCallback | undefined = undefined
  private onServerDrain: (() => void) | undefined = undefined
  private onClientDrain: (() => void) | undefined = undefined
  private onProbed: ((rows: ReadonlyArray<ReadonlyArray<string | null>>) => void) | undefined = undefined
  private onMovedNotification: ServerConnection["onNotification"] = undefined
  /** An incomplete message held back by the scanner, gathered until whole (`carryNeed`: 0 = header incomplete). */
  private readonly carry: Array<Buffer> = []
  private carryHave = 0
  private carryNeed = 0

  /** Why a held message cannot be accepted (see `largeHeld`); the relay ends with it. */
  private refusal: TidepoolError | undefined = undefined
  /** Largest named Parse held whole: the client's prepared-statement memory. */
  private readonly maxHeldParse: number
  /** Whether named statements are renamed (so a named Parse must be held whole). */
  private readonly renames: boolean

  private reads: ReadBuffer | undefined = undefined
  /** The server lent to this client, if any. */
  private held: ServerConnection | undefined = undefined
  /** A checkout is in flight (`waiter` is set when it did not complete synchronously). */
  private waiting = false
  private waiter: ReturnType<TenantPool["checkout"]> = undefined
  /** Client chunks (or a prefix of one) read while no server was held, kept by reference. */
  private readonly queue: Array<Buffer> = []
  /** ReadyForQuery producers in `queue`, added to the server's `pending` when it arrives. */
  private queuedProducers = 0

  // State of what the (held or awaited) server received from this client; see the release rule.
  private open = false
  private partial = false

  // Per-chunk scan results, written by `onClientMessage` during `scanner.feed`.
  private chunkProducers = 0
  private chunkSyncs = 0
  private chunkMessages = 0
  private chunkOpen = false
  /** Offset of the Terminate's type byte in the current chunk, or -1. */
  private terminateAt = -1

  // Flow control. The client is paused when it sends more while a checkout waits (`backlog`; not
  // at the first chunk: a client that waits for its answer is never paused and resumed), while the
  // server's socket is full (`serverBlocked`), and while the client's socket is full with no server
  // held (bare Sync answers); the held server is paused while the client's socket is full.
  private backlog = false
  private serverBlocked = false
  private clientBlocked = false
  private clientPaused = false
  private serverPaused = false

  /** An exception of ours ended the relay (`fault`): its server is never reused. */
  private faulted = false
  /** Client sent Terminate; we are only waiting for a server to run what it sent before it. */
  private terminating = false
  private draining = false
  private ended = false
  /** The held server's `parameterChanges` when it was lent: a difference means the client SET something. */
  private changesAtAttach = 0
  /** When the held server was lent (performance.now()), for the transaction duration histogram. */
  private attachedAt = 0

  /**
   * @param settings the client's session settings (lower-cased names); re-applied silently whenever
   *   a transaction lands on a server whose values differ, and updated from what the client SETs.
   */
  constructor(
    private readonly client: net.Socket,
    private readonly pool: TenantPool,
    maxMessageSize: number,
    settings: StartSettings,
    private readonly onEnd: (end: RelayEnd) => void,
    statements: PreparedStatementOptions = defaultPreparedStatementOptions
  ) {
    this.statementOptions = statements
    this.maxHeldParse = Math.max(statements.maxMemory, HOLD_WHOLE)
    this.renames = statements.rename
    this.maxMessageSize = maxMessageSize
    // Both shared: the clients of a pool nearly always have the same settings (settings.ts).
    this.settingsKey = settings.key
    this.settings = settings.map
  }

  /**
   * The client's session settings (lower-cased names); re-applied silently whenever a transaction
   * lands on a server whose values differ, and updated from what the client SETs. Shared with the
   * clients that logged in with the same ones, never changed, until the client's first change
   * (`ownSettings`) gives it a copy of its own.
   */
  private settings: Map<string, string>

  /**
   * The client's settings as it logged in: what `RESET` returns a setting to. Set when `settings`
   * becomes the client's own (the shared map it had, which never changes); until then `settings`.
   */
  private startupSettings: ReadonlyMap<string, string> | undefined = undefined

  /** Before the first change to `settings`: the client's own copy, and everyone who reads it told. */
  private ownSettings(): Map<string, string> {
    if (this.startupSettings === undefined) {
      this.startupSettings = this.settings
      this.settings = new Map(this.settings)
      this.statements?.useSettings(this.settings)
    }
    return this.settings
  }

  /** The client's first bytes: its scanner. */
  private makeScanner(): MessageScanner {
    // Parse, Bind, Describe and Close may be rewritten, so they are held back (see `gather`).
    // Query and Parse texts are read for session effects (SessionEffects.ts); Bind for its statement.
    this.scanner = new MessageScanner(
      (type, length, body, start) => {
        this.onClientMessage(type, length, body, start)
      },
      { maxMessageSize: this.maxMessageSize, inspect: "QPB", inspectMax: READ_SQL_MAX, hold: "PBDC" }
    )
    return this.scanner
  }

  /** The prepared-statement state, made at the first checkout (or a Parse answered without a server). */
  private prepared(): PreparedStatements {
    if (this.statements === undefined)
      this.statements = new PreparedStatements(this.client, this.pool, this.statementOptions, this.settings)
    return this.statements
  }

  // ---- session state (docs/session-state.md) -----------------------------------------------------

  /** SessionEffects flags of what the client sent since the last probe of its server. */
  private effects = 0
  /** Flags of the client's prepared statements that have any, by client-side name (a Bind runs them). */
  private statementEffects: Map<string, number> | undefined = undefined
  /** Custom (dotted) settings the client has named: the probe asks for them, since pg_settings does not list them. */
  private customSettings: Set<string> | undefined = undefined
  /** Texts of flagged prepared statements, for the channels their UNLISTEN and the custom settings they name. */
  private statementTexts: Map<string, string> | undefined = undefined
  /** Channels the client's UNLISTENs named since the last probe ("*" for all). */
  private unlistens: Array<string> | undefined = undefined
  /** The server is being asked what the client left on it; client bytes wait meanwhile. */
  private probing = false
  /** Why the client keeps its server across transactions (state that cannot move), if it does. */
  private pinReason: string | undefined = undefined
  /** This client as a LISTEN subscriber of its pool's hub (made on its first LISTEN). */
  private subscriber: ListenSubscriber | undefined = undefined
  /** Notifications for the client that wait for its server's transaction to end. */
  private notifications: Array<Buffer> | undefined = undefined
  /** NotificationResponses the held server sent while its LISTENs moved to the hub, and whether each was withheld. */
  private moved: Array<{ readonly body: Buffer; readonly withheld: boolean }> | undefined = undefined

  /** What pins the client to its server, if anything (admin console, metric). */
  get pinnedBy(): string | undefined {
    return this.pinReason ?? (this.statements?.pinned === true ? "SQL-level prepared statement" : undefined)
  }

  /** `settings` as a `settingsKey`, kept current with it. */
  private settingsKey: string

  private readonly maxMessageSize: number

  /** The server held right now, for CancelRequest routing. */
  get server(): ServerConnection | undefined {
    // While the pooler asks the server about the session, no client query runs there to cancel.
    return this.probing ? undefined : this.held
  }

  /** Waiting for the pool to lend a server (admin console's client state). */
  get isWaiting(): boolean {
    return this.waiting
  }

  /**
   * Takes over the client socket; `readAhead` holds bytes the handshake read past its end, `reads`
   * is the socket's ReadBuffer when it reads into one (shared: every chunk is copied on arrival,
   * since the relay keeps or writes all of it), else 'data' events.
   */
  start(readAhead: Buffer, reads?: ReadBuffer): void {
    if (this.ended) return
    this.reads = reads
    if (reads !== undefined) reads.sink = this.onClientView
    else {
      this.onClientData = (input) => {
        this.guardedClientData(input)
      }
      this.client.on("data", this.onClientData)
    }
    this.client.on("close", this.onClientClose)
    if (readAhead.length > 0) this.guardedClientData(readAhead)
    if (!this.ended && this.client.destroyed) this.onClientClose()
  }

  /** Shutdown: ends now if no server is held, otherwise at the next release point (after releasing). */
  drain(): void {
    if (this.ended) return
    this.draining = true
    const server = this.held
    if (server === undefined) this.end({ _tag: "Drained" })
    else this.settle(server) // at a boundary: released, or (pinned) the relay ends and its server is closed
  }

  /**
   * Ends now, whatever the state (for the session's interruption finalizer: a client that does not
   * read may never let its socket close). A held server is released only if the release rule holds,
   * otherwise discarded; a waiting checkout is cancelled. Ends with `Drained`.
   */
  abort(): void {
    this.end({ _tag: "Drained" })
  }

  // ---- client → server ------------------------------------------------------------------------

  private onClientMessage(type: number, length: number, body: Buffer | undefined, start: number): void {
    if (this.terminateAt >= 0) return // nothing after Terminate counts
    if (type === QUERY || type === PARSE || type === BIND) this.readEffects(type, length, body, start)
    else if (type === FUNCTION_CALL) this.effects |= PROBE // by OID: set_config or a lock may be what it calls
    const kind = classifyClientMessage(type)
    if (kind === Producer) {
      this.chunkProducers++
      this.chunkOpen = false
    } else if (kind === Sync) {
      this.chunkProducers++
      this.chunkSyncs++
      this.chunkOpen = false
    } else if (kind === Terminate) {
      this.terminateAt = this.scanner!.messageStart
      return
    } else if (kind === Opens) {
      this.chunkOpen = true
    }
    this.chunkMessages++
  }

  /** Notes what a Query, a Parse or a Bind may leave on the server (see SessionEffects.ts). */
  private readEffects(type: number, length: number, body: Buffer | undefined, start: number): void {
    if (type === BIND) {
      const known = this.statementEffects
      if (known === undefined) return
      if (body === undefined) {
        this.effects |= PROBE
        return
      }
      const portalEnd = body.indexOf(0, start)
      const name = body.toString("utf8", portalEnd + 1, body.indexOf(0, portalEnd + 1))
      const flags = known.get(name)
      if (flags !== undefined) this.ran(flags, this.statementTexts?.get(name))
      return
    }
    if (body === undefined || length > READ_SQL_MAX) {
      // Too large to read: assume the worst, once, at its boundary.
      this.effects |= PROBE
      return
    }
    const end = start + length
    if (type === QUERY) {
      const flags = sessionEffects(body, start, end)
      if (flags !== 0) this.ran(flags, body.toString("utf8", start, end - 1))
      return
    }
    // Parse: flags are kept for the statement and count when a Bind runs it.
    const nameEnd = body.indexOf(0, start)
    const flags = sessionEffects(body, nameEnd + 1, end)
    if (flags === 0 && this.statementEffects === undefined) return
    const name = body.toString("utf8", start, nameEnd)
    if (flags === 0) {
      const known = this.statementEffects!
      known.delete(name)
      this.statementTexts?.delete(name)
      // Empty again: later Parses and Binds decode no names.
      if (known.size === 0) {
        this.statementEffects = undefined
        this.statementTexts = undefined
      }
      return
    }
    this.statementEffects ??= new Map()
    this.statementEffects.set(name, flags)
    this.statementTexts ??= new Map()
    this.statementTexts.set(name, body.toString("utf8", nameEnd + 1, body.indexOf(0, nameEnd + 1)))
  }

  private ran(flags: number, sql: string | undefined): void {
    this.effects |= flags
    if (sql === undefined) return
    if ((flags & LISTENS) !== 0) {
      const targets = unlistenTargets(sql)
      if (targets.length > 0) {
        this.unlistens ??= []
        this.unlistens.push(...targets)
      }
    }
    if ((flags & PROBE) !== 0 && sql.includes(".")) {
      const names = customSettingNames(sql)
      if (names.length > 0) {
        this.customSettings ??= new Set()
        for (const name of names) this.customSettings.add(name)
      }
    }
  }

  // Only one of these two is handed to the socket: a plaintext client reads into the shared buffer.
  private readonly onClientView = (view: Buffer): void => {
    this.guardedClientData(Buffer.from(view))
  }

  /** 'data' events of a client read without a ReadBuffer (TLS), made when one starts. */
  private onClientData: ((input: Buffer) => void) | undefined = undefined

  // Every callback a socket or the pool calls is guarded: an exception of ours ends this session
  // alone (see `fault`), never the process with every other client in it.
  private guardedClientData(input: Buffer): void {
    try {
      this.clientData(input)
    } catch (cause) {
      this.fault(cause)
    }
  }

  private clientData(input: Buffer): void {
    if (this.ended || this.terminating) return
    this.pool.counters.clientBytes += input.length
    const chunk = this.carryHave === 0 ? input : this.gather(input)
    if (chunk === undefined) {
      if (this.refusal !== undefined) this.end({ _tag: "ClientError", error: this.refusal })
      return
    }
    const scanner = this.scanner ?? this.makeScanner()
    this.chunkProducers = 0
    this.chunkSyncs = 0
    this.chunkMessages = 0
    this.chunkOpen = this.open
    this.terminateAt = -1
    const error = scanner.feed(chunk)
    if (this.terminateAt < 0 && error !== undefined) {
      this.end({ _tag: "ClientError", error: protocolFailure(error) })
      return
    }
    let data = chunk
    if (this.terminateAt >= 0) {
      this.terminating = true
      data = this.terminateAt === chunk.length ? chunk : chunk.subarray(0, this.terminateAt)
      this.partial = false
    } else if (scanner.held >= 0) {
      const tail = chunk.subarray(scanner.held)
      this.carry.push(tail)
      this.carryHave = tail.length
      this.carryNeed = scanner.heldLength
      // A message that could never be accepted is refused now, not after the client sent all of it.
      if (this.carryNeed > HOLD_WHOLE && tail.length >= 6 && this.largeHeld(tail) === WAIT && this.refusal) {
        this.end({ _tag: "ClientError", error: this.refusal })
        return
      }
      data = chunk.subarray(0, scanner.held)
      this.partial = false
    } else {
      this.partial = !scanner.atBoundary
    }
    this.open = this.chunkOpen
    this.pool.counters.queries += this.chunkProducers
    if (data.length === 0 && !this.terminating) return

    const server = this.held
    if (server !== undefined) {
      if (this.probing) {
        // The server is answering the pooler's own questions: the client's bytes follow them.
        this.queuedProducers += this.chunkProducers
        if (data.length > 0) this.queue.push(data)
        this.backlog = true
        this.flow()
        return
      }
      server.pending += this.chunkProducers
      if (data.length > 0 && !this.statements!.write(server, data)) this.blockOnServer(server)
      if (this.terminating) this.end({ _tag: "ClientTerminated" })
      else this.settle(server)
      return
    }

    this.queuedProducers += this.chunkProducers
    if (this.waiting) {
      if (data.length > 0) this.queue.push(data)
      this.backlog = true
      this.flow()
      return
    }
    if (this.terminating) {
      // Run what came before Terminate only if it can have an effect: a Query, a FunctionCall, or
      // extended-protocol work concluded by a Sync (without Sync it would be rolled back anyway).
      if (this.chunkProducers === 0 || this.chunkMessages === this.chunkSyncs) {
        this.end({ _tag: "ClientTerminated" })
        return
      }
    } else if (this.chunkMessages > 0 && this.chunkMessages === this.chunkSyncs) {
      this.answerSyncs(this.chunkSyncs)
      return
    } else if (!this.partial && this.queue.length === 0) {
      // Parse, Close, Flush and Sync alone may not need a server (see PreparedStatements.answerAlone).
      const answered = this.prepared().answerAlone(data)
      if (answered >= 0) {
        this.queuedProducers -= this.chunkSyncs
        if (answered === 0) this.blockOnClient()
        return
      }
    }
    if (data.length > 0) this.queue.push(data)
    this.checkout()
  }

  /**
   * Adds `input` to a held-back incomplete message; returns the bytes to scan once enough of it is
   * here (an oversized or malformed header is handed over at once, for the scanner to refuse). Small
   * messages are gathered whole. A large one is gathered only as far as the relay needs it, so what
   * one client makes Tidepool hold stays bounded (about `maxPreparedMemory`, see `largeHeld`).
   */
  private gather(input: Buffer): Buffer | undefined {
    const carry = this.carry
    carry.push(input)
    this.carryHave += input.length
    if (this.carryNeed === 0 && this.carryHave >= 5) {
      const head = this.flatCarry()
      const length = head.readInt32BE(1)
      this.carryNeed = length < 4 || length > this.maxMessageSize ? this.carryHave : length + 1
    }
    if (this.carryNeed === 0) return undefined
    if (this.carryHave < this.carryNeed) {
      if (this.carryNeed <= HOLD_WHOLE) return undefined
      const head = this.flatCarry()
      const verdict = this.largeHeld(head)
      if (verdict !== STREAM) return undefined
      // Enough of its head is here: the rest streams (the scanner lets this one through).
      this.scanner!.streamFirst = true
      this.clearCarry()
      return head
    }
    const whole = this.flatCarry()
    this.clearCarry()
    return whole
  }

  /**
   * A held message larger than HOLD_WHOLE, with `head` gathered so far: STREAM once its head is here
   * (a Bind's portal and statement names: only they are rewritten; an unnamed Parse, or any Parse
   * when statements are not renamed: nothing is); WAIT for more; or sets `refusal`: a named Parse is
   * kept whole for as long as the statement lives, so beyond the client's statement memory it could
   * never be kept; Describe and Close carry only a name; a Bind whose names run past HEAD_MAX is no
   * Bind a driver sends.
   */
  private largeHeld(head: Buffer): number {
    const type = head[0]
    const have = head.length
    if (type === PARSE) {
      if (have < 6) return WAIT
      if (head[5] === 0 || !this.renames) return STREAM
      if (this.carryNeed > this.maxHeldParse) {
        this.refusal = tidepoolError("EMESSAGETOOLARGE", this.carryNeed - 1, this.maxHeldParse)
      }
      return WAIT
    }
    if (type === BIND) {
      const portalEnd = head.indexOf(0, 5)
      if (portalEnd >= 0 && head.indexOf(0, portalEnd + 1) >= 0) return STREAM
      if (have > HEAD_MAX) this.refusal = tidepoolError("EPROTOCOL", "Bind with names longer than 64 kB")
      return WAIT
    }
    this.refusal = tidepoolError("EPROTOCOL", `message of type "${String.fromCharCode(type!)}" larger than 64 kB`)
    return WAIT
  }

  private flatCarry(): Buffer {
    const carry = this.carry
    if (carry.length > 1) {
      const flat = Buffer.concat(carry, this.carryHave)
      while (carry.length > 0) carry.pop()
      carry.push(flat)
    }
    return carry[0]!
  }

  private clearCarry(): void {
    while (this.carry.length > 0) this.carry.pop()
    this.carryHave = 0
    this.carryNeed = 0
  }

  /** Bare Syncs with no server held: each gets ReadyForQuery 'I' from us. */
  private answerSyncs(count: number): void {
    this.queuedProducers -= count
    let ok = true
    for (let i = 0; i < count; i++) ok = this.client.write(READY_IDLE)
    if (!ok) this.blockOnClient()
  }

  private checkout(): void {
    this.waiting = true
    this.onCheckout ??= (error, server) => {
      try {
        this.checkedOut(error, server)
      } catch (cause) {
        this.fault(cause)
      }
    }
    const waiter = this.pool.checkout(this.onCheckout)
    if (this.waiting) this.waiter = waiter
  }

  private checkedOut(error: Parameters<CheckoutCallback>[0], server: ServerConnection | undefined): void {
    this.waiting = false
    this.backlog = false
    this.waiter = undefined
    if (this.ended) {
      // Not expected (the waiter is cancelled when the relay ends), but never strand a server.
      if (server !== undefined) this.pool.release(server)
      return
    }
    if (server === undefined) {
      this.end({
        _tag: "ClientError",
        error: error ?? tidepoolError("ESERVERCLOSED", "no server available")
      })
      return
    }
    this.attach(server)
  }

  /** Takes a freshly lent server: owes it the queued producers, writes the queued bytes. */
  private attach(server: ServerConnection): void {
    this.held = server
    server.handler = this
    this.prepared().attach(server)
    // Another client may have left different settings on this server: restore ours first.
    if (server.syncedTo !== this.settingsKey) {
      const change = settingsChange(server, this.settings)
      if (change.sql !== "") {
        server.sendSilently(change.sql)
        // A silent query that fails closes the server, so the new settings can be recorded now.
        change.commit()
      }
      server.syncedTo = this.settingsKey
    }
    this.changesAtAttach = server.parameterChanges
    this.attachedAt = performance.now()
    this.writeQueue(server)
    if (this.terminating) this.end({ _tag: "ClientTerminated" })
    else this.settle(server)
    this.flow()
  }

  /** Writes the client bytes queued while no server could take them. */
  private writeQueue(server: ServerConnection): void {
    server.pending += this.queuedProducers
    this.queuedProducers = 0
    const queue = this.queue
    let ok = true
    if (queue.length === 1) {
      ok = this.statements!.write(server, queue[0]!)
    } else if (queue.length > 1) {
      server.socket.cork()
      for (let i = 0; i < queue.length; i++) ok = this.statements!.write(server, queue[i]!)
      server.socket.uncork()
    }
    while (queue.length > 0) queue.pop()
    if (!ok) this.blockOnServer(server)
  }

  // ---- server → client ------------------------------------------------------------------------

  /** ServerHandler: a chunk from the held server. */
  onData(chunk: Buffer): void {
    try {
      this.serverData(chunk)
    } catch (cause) {
      this.fault(cause)
    }
  }

  private serverData(chunk: Buffer): void {
    const server = this.held
    if (server === undefined || this.ended) return
    const statements = this.statements!
    if (chunk.length > 0) {
      this.pool.counters.serverBytes += chunk.length
      if (!statements.forward(server, chunk)) this.blockOnClient()
    }
    statements.settleAfter(server)
    if (statements.takeReopened()) this.open = true
    // A Terminate that arrived while the pooler asked the server about its session ends the relay now.
    if (this.terminating && !this.probing) this.end({ _tag: "ClientTerminated" })
    else this.settle(server)
  }

  /** ServerHandler: the held server closed. */
  onClose(reason: string): void {
    if (this.held === undefined || this.ended) return
    this.end({ _tag: "ServerClosed", reason })
  }

  /** ServerHandler: an exception of ours while the held server's chunk was handled. */
  onFault(cause: unknown): void {
    this.fault(cause)
  }

  // ---- release --------------------------------------------------------------------------------

  /** The release rule (see the class comment). */
  private releasable(server: ServerConnection): boolean {
    return (
      server.isIdle &&
      !this.open &&
      !this.partial &&
      server.atBoundary &&
      !this.probing &&
      this.pinReason === undefined &&
      this.statements?.pinned !== true
    )
  }

  /**
   * At a transaction boundary: asks the server what the client left on it when its SQL may have
   * changed session state (`probe`), then hands on notifications that waited, and releases the
   * server — or keeps it, when something pins the client to it.
   */
  private settle(server: ServerConnection): void {
    if (this.probing || !this.atBoundary(server)) return
    if (this.needsProbe()) {
      // A cancel still on its way would hit the probe (and a failed probe closes the server).
      if (server.cancelsInFlight > 0) {
        server.onCancelsDone = this.onCancelsDone
        return
      }
      this.probe(server)
      return
    }
    this.effects = 0
    if (this.notifications !== undefined && this.notifications.length > 0) this.deliverNotifications()
    if (this.releasable(server)) this.releaseAtBoundary(server)
    else if (this.draining) this.end({ _tag: "Drained" }) // pinned: its server is closed
  }

  private readonly onCancelsDone = (): void => {
    try {
      const server = this.held
      if (server !== undefined && !this.ended) this.settle(server)
    } catch (cause) {
      this.fault(cause)
    }
  }

  private needsProbe(): boolean {
    return (this.effects & PROBE) !== 0 || ((this.effects & UNPIN) !== 0 && this.pinnedBy !== undefined)
  }

  // ---- session state: probe, settings, pins, LISTEN (docs/session-state.md) ---------------------

  private probe(server: ServerConnection): void {
    this.probing = true
    if ((this.effects & LISTENS) !== 0 && this.moved === undefined) {
      // A notification for a channel the client just started listening on may come inside the
      // probe's (withheld) reply, before the hub listens: keep it (see `moveListens`).
      this.moved = []
      server.onNotification = this.movedNotifications()
    }
    this.effects = 0
    this.pool.counters.sessionProbes++
    this.onProbed ??= (rows) => {
      try {
        this.probed(probeResult(rows))
      } catch (cause) {
        this.fault(cause)
      }
    }
    server.probe(sessionProbe(this.customSettings, server.target.user), this.onProbed)
  }

  /**
   * Runs inside the server's read callback: whatever it writes to the server is queued behind the
   * probe's reply, and the relay settles when the server's handler hears of that reply.
   */
  private probed(result: ProbeResult): void {
    const server = this.held
    if (server === undefined || this.ended) return
    this.pin(result.pin)
    this.adoptProbedSettings(server, result.settings)
    const unlistens = this.unlistens
    this.unlistens = undefined
    const subscriber = this.subscriber
    if (unlistens !== undefined && subscriber !== undefined) {
      const hub = this.pool.listenHub
      for (const target of unlistens) {
        if (target === "*") hub.unlistenAll(subscriber)
        else hub.unlisten(target, subscriber)
      }
    }
    if (result.channels.length > 0) this.moveListens(server, result.channels)
    else this.resync(server, "")
  }

  /** Records what pins the client (undefined: nothing), keeping the pool's count of pinned clients. */
  private pin(reason: string | undefined): void {
    if ((reason === undefined) !== (this.pinReason === undefined)) {
      this.pool.counters.pinnedClients += reason === undefined ? -1 : 1
    }
    this.pinReason = reason
  }

  /**
   * What the client's session on this server now holds becomes the client's own settings, and the
   * server's record of them: settings it RESET go back to its startup values (as PostgreSQL's RESET
   * does), settings it SET follow it to its next server, and the next client of this server gets
   * them reset (`settingsChange`). Reported settings are followed from ParameterStatus instead.
   */
  private adoptProbedSettings(server: ServerConnection, probed: ReadonlyMap<string, string>): void {
    const settings = this.ownSettings()
    let changed = false
    if (server.parameterChanges !== this.changesAtAttach) {
      // Reported settings the client changed are its own now (as at detach), or resync would undo them.
      adoptSettings(settings, server)
      this.changesAtAttach = server.parameterChanges
      changed = true
    }
    // Reported settings a relay follows (settings.ts); a reported one it does not follow
    // (session_authorization, default_transaction_read_only) is treated like any other.
    const reported = new Set<string>()
    for (const name of server.parameters.keys()) {
      const lower = name.toLowerCase()
      if (TRACKED_PARAMETERS.includes(lower)) reported.add(lower)
    }
    for (const [name, value] of probed) {
      if (reported.has(name)) continue
      if (server.settings.get(name) !== value || !server.unreported.has(name)) server.applied(name, value, false)
      if (settings.get(name) !== value) {
        settings.set(name, value)
        changed = true
      }
    }
    for (const name of [...server.unreported]) if (!probed.has(name)) server.unapplied(name)
    // The probe RESET statement_timeout on the server; `resync` restores the client's own value.
    server.unapplied(STATEMENT_TIMEOUT)
    for (const [name, value] of [...settings]) {
      if (reported.has(name) || probed.has(name)) continue
      const initial = this.startupSettings!.get(name)
      if (initial === undefined) settings.delete(name)
      else if (initial !== value) settings.set(name, initial)
      else continue
      changed = true
    }
    if (changed) this.settingsKey = settingsKey(settings)
  }

  /**
   * Brings the server in line with the client's settings (a RESET to a startup value) and runs
   * `extra`; the probe ends when that reply is in.
   */
  private resync(server: ServerConnection, extra: string): void {
    const change = settingsChange(server, this.settings)
    const sql = change.sql === "" ? extra : extra === "" ? change.sql : `${change.sql}; ${extra}`
    if (sql === "") {
      server.syncedTo = this.settingsKey
      this.endProbe(server)
      return
    }
    server.probe(sql, () => {
      try {
        change.commit()
        server.syncedTo = this.settingsKey
        this.endProbe(server)
      } catch (cause) {
        this.fault(cause)
      }
    })
  }

  /**
   * The client LISTENed: its channels move to the pool's listening connection (ListenHub) and the
   * server stops listening. Until the server has, a notification may reach the client both ways
   * (or, during the pooler's own queries, only as the server's withheld copy): `moved` records the
   * server's copies so that `endProbe` delivers each notification once.
   */
  private moveListens(server: ServerConnection, channels: ReadonlyArray<string>): void {
    const hub = this.pool.listenHub
    this.subscriber ??= {
      onNotification: (message) => this.onHubNotification(message),
      onLost: (error) => this.onListenLost(error)
    }
    const subscriber = this.subscriber
    this.moved ??= []
    server.onNotification = this.movedNotifications()
    let left = channels.length
    let failure: TidepoolError | undefined
    for (const channel of channels) {
      hub.listen(channel, subscriber, (error) => {
        failure ??= error
        if (--left > 0) return
        try {
          if (this.ended || this.held !== server) return
          if (failure !== undefined) this.end({ _tag: "ClientError", error: failure })
          else this.resync(server, "UNLISTEN *")
        } catch (cause) {
          this.fault(cause)
        }
      })
    }
  }

  private movedNotifications(): NonNullable<ServerConnection["onNotification"]> {
    this.onMovedNotification ??= (body, start, length, withheld) => {
      this.moved?.push({ body: Buffer.from(body.subarray(start, start + length)), withheld })
    }
    return this.onMovedNotification
  }

  /** The probe is over: notifications are reconciled and the client's waiting bytes go to the server. */
  private endProbe(server: ServerConnection): void {
    this.probing = false
    const moved = this.moved
    if (moved !== undefined) {
      this.moved = undefined
      server.onNotification = undefined
      if (this.notifications === undefined) this.notifications = []
      const waiting = this.notifications
      for (const { body, withheld } of moved) {
        const copy = waiting.findIndex(
          (message) => message.length === body.length + 5 && message.subarray(5).equals(body)
        )
        if (!withheld) {
          // The client has it from the server already.
          if (copy >= 0) waiting.splice(copy, 1)
        } else if (copy < 0) {
          const message = Buffer.allocUnsafe(body.length + 5)
          message[0] = 0x41
          message.writeInt32BE(body.length + 4, 1)
          body.copy(message, 5)
          waiting.push(message)
        }
      }
    }
    this.backlog = false
    this.writeQueue(server)
    this.flow()
  }

  private onHubNotification(message: Buffer): void {
    try {
      if (this.ended) return
      if (this.notifications === undefined) this.notifications = []
      const waiting = this.notifications
      if (waiting.length >= MAX_WAITING_NOTIFICATIONS || this.client.writableLength > MAX_UNREAD_BYTES) {
        // A listener that does not read (or a transaction that never ends) must not grow the process.
        this.end({
          _tag: "ClientError",
          error: tidepoolError("ELISTENLOST", "the client did not read its notifications")
        })
        return
      }
      // PostgreSQL delivers notifications between transactions: while a transaction runs, they wait.
      const held = this.held
      if (held !== undefined && (this.probing || !this.atBoundary(held))) waiting.push(message)
      else if (!this.client.write(message)) this.blockOnClient()
    } catch (cause) {
      this.fault(cause)
    }
  }

  private onListenLost(error: TidepoolError): void {
    try {
      this.subscriber = undefined
      this.end({ _tag: "ClientError", error })
    } catch (cause) {
      this.fault(cause)
    }
  }

  private deliverNotifications(): void {
    const waiting = this.notifications!
    let ok = true
    for (let i = 0; i < waiting.length; i++) ok = this.client.write(waiting[i]!)
    while (waiting.length > 0) waiting.pop()
    if (!ok) this.blockOnClient()
  }

  /**
   * Between transactions, whether or not the client is pinned to its server. The server's bytes
   * must end on a message boundary too: an asynchronous message (a notification) cut in two after
   * the last ReadyForQuery must reach the client whole before anything else happens.
   */
  private atBoundary(server: ServerConnection): boolean {
    return server.isIdle && !this.open && !this.partial && server.atBoundary
  }

  /** Releases the held server at a transaction boundary; ends the relay there when draining. */
  private releaseAtBoundary(server: ServerConnection): void {
    this.pool.counters.transactions++
    this.pool.counters.transactionTime.observe(performance.now() - this.attachedAt)
    this.detach(server)
    this.pool.release(server)
    if (this.draining) this.end({ _tag: "Drained" })
    else this.flow()
  }

  /** Stops listening to `server` and leaves its socket flowing, so the pool (or the next client) can read it. */
  private detach(server: ServerConnection): void {
    if (server.parameterChanges !== this.changesAtAttach) {
      adoptSettings(this.ownSettings(), server)
      this.settingsKey = settingsKey(this.settings)
    }
    this.statements?.detach(server)
    this.held = undefined
    server.handler = undefined
    if (this.serverBlocked) {
      this.serverBlocked = false
      server.socket.off("drain", this.onServerDrain!)
    }
    if (this.serverPaused) {
      this.serverPaused = false
      server.socket.resume()
    }
  }

  // ---- flow control ---------------------------------------------------------------------------

  private blockOnServer(server: ServerConnection): void {
    if (this.serverBlocked) return
    this.serverBlocked = true
    this.onServerDrain ??= () => {
      this.serverBlocked = false
      this.guardedFlow()
    }
    server.socket.once("drain", this.onServerDrain)
    this.flow()
  }

  private blockOnClient(): void {
    if (this.clientBlocked) return
    this.clientBlocked = true
    this.onClientDrain ??= () => {
      this.clientBlocked = false
      this.guardedFlow()
    }
    this.client.once("drain", this.onClientDrain)
    this.flow()
  }

  private guardedFlow(): void {
    try {
      this.flow()
    } catch (cause) {
      this.fault(cause)
    }
  }

  /** Pauses or resumes each side to match the current state; calls only on change. */
  private flow(): void {
    if (this.ended) return
    const server = this.held
    const pauseClient = this.backlog || this.serverBlocked || (this.clientBlocked && server === undefined)
    if (pauseClient !== this.clientPaused) {
      this.clientPaused = pauseClient
      if (pauseClient) this.client.pause()
      else this.client.resume()
    }
    if (server !== undefined && this.clientBlocked !== this.serverPaused) {
      this.serverPaused = this.clientBlocked
      if (this.clientBlocked) server.socket.pause()
      else server.socket.resume()
    }
  }

  // ---- ending ---------------------------------------------------------------------------------

  private readonly onClientClose = (): void => {
    // After Terminate the client may close at once; what it sent before still runs (see attach).
    if (this.terminating) return
    this.end({ _tag: "ClientClosed" })
  }

  /**
   * An exception in our own code: the session ends with EINTERNAL (the session logs the cause) and its
   * server, in a state nobody can vouch for, is discarded.
   */
  private fault(cause: unknown): void {
    if (this.ended) return
    this.faulted = true
    this.end({ _tag: "Fault", cause })
  }

  private end(end: RelayEnd): void {
    if (this.ended) return
    this.ended = true
    const client = this.client
    if (this.reads !== undefined) this.reads.sink = ignore
    if (this.onClientData !== undefined) client.off("data", this.onClientData)
    client.off("close", this.onClientClose)
    if (this.onClientDrain !== undefined) client.off("drain", this.onClientDrain)
    if (this.waiter !== undefined) {
      this.pool.cancel(this.waiter)
      this.waiter = undefined
    }
    this.waiting = false
    this.backlog = false
    while (this.queue.length > 0) this.queue.pop()
    while (this.carry.length > 0) this.carry.pop()
    this.notifications = undefined
    if (this.pinReason !== undefined) this.pool.counters.pinnedClients-- // its server goes with it (giveBack)
    const subscriber = this.subscriber
    if (subscriber !== undefined) {
      this.subscriber = undefined
      this.pool.listenHub.unlistenAll(subscriber)
    }
    const server = this.held
    if (server !== undefined && this.moved !== undefined) {
      this.moved = undefined
      server.onNotification = undefined
    }
    if (server !== undefined) this.giveBack(server, end)
    this.onEnd(end)
  }

  /** Puts the held server back when the release rule holds; closes it otherwise, never reusing it. */
  private giveBack(server: ServerConnection, end: RelayEnd): void {
    const clean = !this.faulted && this.releasable(server) && !this.needsProbe()
    const pinned = !clean && !this.faulted && this.atBoundary(server) && !this.probing
    const pin = this.pinnedBy ?? "session state not yet read"
    this.detach(server)
    if (clean) {
      this.pool.release(server)
    } else if (pinned) {
      // What pins the client (or what it may have left) belongs to it alone: the server goes with it.
      this.pool.retire(server, `client left with a ${pin}`)
    } else if (end._tag === "ClientTerminated" && !server.closed) {
      // Polite close: bytes already written (what preceded Terminate) reach the server before its
      // own Terminate, so they run as on a direct connection.
      this.pool.retire(server, "client terminated mid-transaction")
    } else {
      this.pool.discard(server, discardReason(end))
    }
  }
}

const protocolFailure = (error: ProtocolError) =>
  error.reason === "MessageTooLarge"
    ? tidepoolError("EMESSAGETOOLARGE", error.size ?? 0, error.max ?? 0)
    : tidepoolError("EPROTOCOL", error.message)

const discardReason = (end: RelayEnd): string => {
  switch (end._tag) {
    case "ClientClosed":
      return "client disconnected mid-transaction"
    case "ClientError":
      return `client error (${end.error.code}) mid-transaction`
    case "ServerClosed":
      return end.reason
    case "Fault":
      return "internal error in the relay"
    default:
      return "relay ended mid-transaction"
  }
}
