import { Buffer } from "node:buffer"
import type * as net from "node:net"
import { renderErrorResponse, type TidepoolError, tidepoolError } from "../errors/index.ts"
import type { TenantPool } from "../pool/index.ts"
import { Backend, cstringEnd, Frontend, STATEMENT_TARGET, TxStatus } from "../protocol/index.ts"
import { type ServerConnection, type ServerObserver, writeChunk } from "../upstream/index.ts"
import { ClientStatements, type Statement } from "./ClientStatements.ts"
import { Expect, type Expectation, ExpectationQueue } from "./ExpectationQueue.ts"
import { FirstUseRetry, RetryState } from "./FirstUseRetry.ts"
import { ReplyEdits, Withheld } from "./ReplyEdits.ts"
import { ServerStatementCache } from "./ServerStatementCache.ts"
import {
  ABORTED,
  CLOSE_COMPLETE_MESSAGE,
  CLOSE_UNNAMED,
  clientNamedError,
  closeStatement,
  commandTag,
  DESCRIBE_MISSING,
  describeStatement,
  FLUSH_MESSAGE,
  PARSE_COMPLETE_MESSAGE,
  pushRenamed,
  READY_IDLE,
  resultTypeKey,
  SqlTag,
  STALE_PLAN,
  SYNC_MESSAGE
} from "./StatementMessages.ts"

export interface PreparedStatementOptions {
  /** Rename clients' named statements to shared server-side ones (docs/prepared-statements.md); off = pass through. */
  readonly rename: boolean
  /** Statements kept prepared per server; the least recently used is closed beyond. */
  readonly cacheSize: number
  /** Named statements one client may hold (EMAXPREPARED). */
  readonly maxCount: number
  /** Bytes of Parse messages one client may hold (EMAXPREPAREDMEM). */
  readonly maxMemory: number
}

export const defaultPreparedStatementOptions: PreparedStatementOptions = {
  rename: true,
  cacheSize: 200,
  maxCount: 100,
  maxMemory: 1_048_576
}

// Frontend message types.
const {
  Parse: PARSE,
  Bind: BIND,
  Describe: DESCRIBE,
  Execute: EXECUTE,
  Close: CLOSE,
  Sync: SYNC,
  Flush: FLUSH,
  Query: QUERY,
  FunctionCall: FUNCTION_CALL,
  CopyDone: COPY_DONE,
  CopyFail: COPY_FAIL
} = Frontend
const STATEMENT = STATEMENT_TARGET

// Backend message types.
const {
  ParseComplete: PARSE_COMPLETE,
  BindComplete: BIND_COMPLETE,
  CloseComplete: CLOSE_COMPLETE,
  RowDescription: ROW_DESCRIPTION,
  ParameterDescription: PARAMETER_DESCRIPTION,
  NoData: NO_DATA,
  CommandComplete: COMMAND_COMPLETE,
  EmptyQueryResponse: EMPTY_QUERY,
  PortalSuspended: PORTAL_SUSPENDED,
  ErrorResponse: ERROR,
  ReadyForQuery: READY,
  CopyInResponse: COPY_IN
} = Backend

const EMPTY = Buffer.alloc(0)
/** The server-side name of a hidden Parse or Close of the client's unnamed statement (nothing to track). */
const UNNAMED = ""
/** Rewritten client bytes up to this size go to the server copied into one Buffer; larger ones corked. */
const GATHER_MAX = 16 * 1024

const IDLE = TxStatus.Idle
const FAILED = TxStatus.Failed

/**
 * Named prepared statements in transaction mode (docs/prepared-statements.md), for one client. The client's named
 * statements are renamed to server-side names derived from their content (`tp_<sha256>`), so clients
 * preparing the same statement share it on a server; a Bind or Describe landing on a server that
 * lacks the statement is preceded by the stored Parse, whose ParseComplete is swallowed; a Parse the
 * server already has is dropped and its ParseComplete made up in the right place of the reply.
 *
 * This class decides; the state lives in its parts, one job each:
 * - `ClientStatements`: the client's statements by its names, and its unnamed statement;
 * - `ServerStatementCache`: what the held server has prepared (sent Parses included);
 * - `ExpectationQueue`: what each request written to the server expects back, and what becomes of it;
 * - `ReplyEdits`: the drops and insertions applied to a server chunk on its way to the client;
 * - `FirstUseRetry`: the exchange that may run again on a fresh copy of a stale statement;
 * - `StatementMessages`: reading and building the messages.
 *
 * The client→server side rewrites whole messages (the relay only hands over complete ones); the
 * server→client side follows every reply message through the queue, drops what the pooler asked
 * for, and inserts what it made up, forwarding the rest zero-copy.
 *
 * Every Parse the pooler sends is followed by a hidden Describe, so it knows what each copy returns;
 * a client's use of a statement whose result type it has, on a copy not known to return that type, is
 * held for one round trip while a fresh copy is described, and answered as PostgreSQL would answer
 * the client on its own connection (`use`, `resume`; docs/prepared-statements.md, "After DDL").
 *
 * It also watches CommandComplete tags for SQL-level `PREPARE`: such a statement lives only on the
 * server that ran it, so the client is pinned to that server until it deallocates it (`pinned`).
 * `DEALLOCATE ALL` and `DISCARD ALL` clear both the client's statements and what the pooler knows
 * the server holds.
 */
export class PreparedStatements {
  /**
   * How many were made in this process: a relay makes one at its client's first checkout, never for
   * a client that stays idle (test/unit/session/TransactionRelay.test.ts checks it).
   */
  static made = 0

  private readonly statements: ClientStatements
  private readonly cache: ServerStatementCache
  private readonly queue = new ExpectationQueue()
  private readonly edits = new ReplyEdits()
  private readonly retryWatch = new FirstUseRetry()
  /** SQL-level PREPAREs minus DEALLOCATEs on the held server. */
  private sqlPrepared = 0
  private server: ServerConnection | undefined = undefined

  /** The server reported an error in an extended-protocol exchange: it skips everything until Sync. */
  private skipping = false
  /** The server is in COPY FROM STDIN and the client has not ended the data yet: it ignores Sync. */
  private copyIn = false
  /** See `takeReopened`. */
  private reopened = false
  /** Bytes of a streamed (not rewritten) client message still to come in later chunks. */
  private streamRemaining = 0

  /**
   * A use held until a fresh copy of its statement is described (see `use`): the sequence number of
   * that hidden Describe, -1 when nothing is held; the client's bytes from the held Bind or Describe
   * on wait in `held`.
   */
  private holdSeq = -1
  private holdStatement: Statement | undefined = undefined
  private holdKind: Expect.Bind | Expect.Describe = Expect.Bind
  private held: Array<Buffer> = []
  /** The held use found the result type changed: it gets `cached plan must not change result type`. */
  private verdict: Statement | undefined = undefined
  /** Statements whose hidden Describe was answered in the chunk being scanned, in order. */
  private readonly describedNow: Array<Statement> = []

  // Pieces of the client chunk being rewritten; `runStart` is where the untouched run began.
  private readonly pieces: Array<Buffer> = []

  constructor(
    private readonly client: net.Socket,
    private readonly pool: TenantPool,
    private readonly options: PreparedStatementOptions,
    /** The client's session settings (kept current by the relay). */
    settings: ReadonlyMap<string, string> = new Map()
  ) {
    this.statements = new ClientStatements(pool.statements, options, settings)
    this.cache = new ServerStatementCache(pool.statements, options.cacheSize)
    PreparedStatements.made++
  }

  /** See ClientStatements.useSettings. */
  useSettings(settings: ReadonlyMap<string, string>): void {
    this.statements.useSettings(settings)
  }

  /** The client ran SQL-level PREPARE: its server must stay with it. */
  get pinned(): boolean {
    return this.sqlPrepared > 0
  }

  attach(server: ServerConnection): void {
    this.server = server
    this.cache.attach(server.statements)
    server.observer = this.onServerMessage
  }

  detach(server: ServerConnection): void {
    server.observer = undefined
    this.server = undefined
    this.cache.detach()
    // Empty at a transaction boundary; anything left belongs to a server being closed.
    this.queue.clear()
    this.skipping = false
    this.copyIn = false
    this.reopened = false
    this.statements.unnamedHere = false
    this.streamRemaining = 0
    this.edits.reset()
    this.retryWatch.cancel()
    this.holdSeq = -1
    this.holdStatement = undefined
    if (this.held.length > 0) this.held = []
    this.verdict = undefined
    while (this.describedNow.length > 0) this.describedNow.pop()
  }

  // ---- client → server ------------------------------------------------------------------------

  /**
   * Writes client bytes to the held server, rewritten as needed. Parse, Bind, Describe and Close
   * arrive whole; other messages may begin or end in another chunk (they stream). Returns
   * `socket.write`'s answer.
   */
  write(server: ServerConnection, data: Buffer): boolean {
    const ok = this.feed(server, data)
    // Made-up replies at the head go out now, unless a reply message is half forwarded.
    if (server.atBoundary && !this.edits.holding) this.settle(-1)
    return ok
  }

  /** `rewrite`, or, while a use is held (see `use`), keeps the bytes to write after it. */
  private feed(server: ServerConnection, data: Buffer): boolean {
    if (this.holdSeq < 0) return this.rewrite(server, data)
    this.held.push(Buffer.from(data))
    return true
  }

  private rewrite(server: ServerConnection, data: Buffer): boolean {
    const rename = this.options.rename
    const pieces = this.pieces
    const queue = this.queue
    const watch = this.retryWatch
    let runStart = 0
    let end = data.length
    let pos = Math.min(this.streamRemaining, end)
    this.streamRemaining -= pos
    // Bytes of an exchange that may have to run again (see `watchFirstUse`): [keepFrom, keepTo).
    let keepFrom = watch.state === RetryState.Watch ? 0 : -1
    let keepTo = end
    if (watch.state === RetryState.Ready && pos > 0) watch.keep(data.subarray(0, pos)) // the rest of its Sync
    while (pos < end) {
      const type = data[pos]!
      const next = pos + 1 + data.readInt32BE(pos + 1)
      if (next > end) this.streamRemaining = next - end
      if (watch.state === RetryState.Ready) {
        // The client went on past that exchange: running it again would reorder its requests.
        watch.cancel()
        keepFrom = -1
      }
      switch (type) {
        case QUERY:
        case FUNCTION_CALL:
          // A simple Query uses, and so destroys, the unnamed statement (here and for the client).
          if (type === QUERY && rename) this.statements.forgetUnnamed()
          queue.push(Expect.Query)
          if (watch.state === RetryState.Watch) watch.cancel()
          keepFrom = -1
          break
        case SYNC:
          // PostgreSQL ignores Sync while it receives COPY data: no ReadyForQuery will answer it.
          if (this.copyIn) server.pending--
          else queue.push(Expect.Sync)
          if (watch.state === RetryState.Watch) {
            watch.state = RetryState.Ready
            keepTo = next
          }
          break
        case COPY_DONE:
        case COPY_FAIL:
          this.copyIn = false
          queue.push(Expect.CopyEnd)
          break
        case EXECUTE:
          queue.push(Expect.Execute)
          break
        case PARSE: {
          const nameEnd = cstringEnd(data, pos + 5, next)
          if (!rename || nameEnd <= pos + 5) {
            if (rename && nameEnd === pos + 5) this.statements.keepUnnamed(data, pos, next)
            queue.pushStatement(Expect.Parse, undefined)
            break
          }
          if (pos > runStart) pieces.push(data.subarray(runStart, pos))
          this.parse(data, pos, nameEnd, next)
          runStart = next
          break
        }
        case BIND: {
          const portalEnd = cstringEnd(data, pos + 5, next)
          const nameEnd = portalEnd < 0 ? -1 : cstringEnd(data, portalEnd + 1, next)
          if (!rename || nameEnd <= portalEnd + 1) {
            if (rename && nameEnd === portalEnd + 1 && !this.statements.unnamedHere) {
              if (pos > runStart) pieces.push(data.subarray(runStart, pos))
              this.restoreUnnamed()
              runStart = pos
            }
            queue.pushStatement(Expect.Bind, undefined)
            break
          }
          if (pos > runStart) pieces.push(data.subarray(runStart, pos))
          if (this.use(server, data, pos, portalEnd + 1, nameEnd, next, Expect.Bind)) {
            end = this.holdFrom(data, pos)
            keepFrom = -1
            runStart = end
            continue
          }
          if (watch.state === RetryState.Watch && keepFrom < 0) keepFrom = pos
          runStart = next
          break
        }
        case DESCRIBE:
        case CLOSE: {
          const nameEnd = cstringEnd(data, pos + 6, next)
          if (!rename || data[pos + 5] !== STATEMENT || nameEnd <= pos + 6) {
            if (rename && data[pos + 5] === STATEMENT && nameEnd === pos + 6) {
              if (type === CLOSE) {
                this.statements.forgetUnnamed()
              } else if (!this.statements.unnamedHere) {
                if (pos > runStart) pieces.push(data.subarray(runStart, pos))
                this.restoreUnnamed()
                runStart = pos
              }
            }
            if (type === DESCRIBE) queue.pushStatement(Expect.Describe, undefined)
            else queue.push(Expect.Close)
            break
          }
          if (pos > runStart) pieces.push(data.subarray(runStart, pos))
          if (type === DESCRIBE) {
            if (this.use(server, data, pos, pos + 6, nameEnd, next, Expect.Describe)) {
              end = this.holdFrom(data, pos)
              keepFrom = -1
              runStart = end
              continue
            }
            if (watch.state === RetryState.Watch && keepFrom < 0) keepFrom = pos
          } else {
            this.close(data.toString("utf8", pos + 6, nameEnd), data.subarray(pos, next))
          }
          runStart = next
          break
        }
        // Flush, CopyData and anything else expect no reply of their own.
      }
      pos = next
    }
    if (keepFrom >= 0 && watch.state !== RetryState.None) watch.keep(data.subarray(keepFrom, keepTo))
    let ok: boolean
    if (runStart === 0 && pieces.length === 0) {
      ok = server.write(data)
    } else if (pieces.length === 0 && runStart >= end) {
      ok = true // every message was answered by the pooler (a Parse the server already has)
    } else {
      if (end > runStart) pieces.push(runStart === 0 ? data : data.subarray(runStart, end))
      let total = 0
      for (let i = 0; i < pieces.length; i++) total += pieces[i]!.length
      if (total <= GATHER_MAX) {
        // One write of one Buffer: a corked socket's writes are each a buffered request (an object,
        // then a writev through the stream machinery), which costs more than copying a few messages.
        ok = server.write(pieces.length === 1 ? pieces[0]! : Buffer.concat(pieces, total))
      } else {
        const socket = server.socket
        socket.cork()
        ok = true
        for (let i = 0; i < pieces.length; i++) ok = socket.write(pieces[i]!)
        socket.uncork()
      }
      while (pieces.length > 0) pieces.pop()
    }
    return ok
  }

  /**
   * A Bind or Describe of the unnamed statement on a server where it is not the client's (see
   * `ClientStatements.keepUnnamed`): the client's unnamed Parse goes first, or a Close of the
   * unnamed statement when the client has none.
   */
  private restoreUnnamed(): void {
    const parse = this.statements.unnamedParse()
    if (parse !== undefined) {
      this.pieces.push(parse)
      this.queue.pushHidden(Expect.HiddenParse, UNNAMED)
    } else {
      this.pieces.push(CLOSE_UNNAMED)
      this.queue.pushHidden(Expect.HiddenClose, UNNAMED)
    }
    this.statements.unnamedHere = true
  }

  private parse(data: Buffer, pos: number, nameEnd: number, next: number): void {
    const name = data.toString("utf8", pos + 5, nameEnd)
    const refusal = this.statements.refusal(name, next - pos)
    if (refusal !== undefined) {
      this.fail(refusal)
      return
    }
    const statement = this.statements.register(name, data, pos, nameEnd, next)
    if (this.cache.useCurrent(statement.serverName)) {
      this.queue.pushStatement(Expect.SyntheticParse, statement)
    } else {
      this.prepareOn(statement, false)
    }
  }

  /**
   * Answers, with no server, a client chunk made only of Parse messages of statements this pool has
   * already seen parse, Close of statements, Flush and Sync: the relay calls it when the client holds
   * no server and has nothing queued, so no transaction is open. The statements are prepared on a
   * server at their first Bind or Describe. Without this, a client that prepares synchronously on
   * one connection while it holds servers on others (pgbench `-M prepared` runs several clients per
   * thread) waits for a server that only it can give back. The price: a Parse that would now fail
   * (the table it names was dropped since it last parsed) fails at its first Bind or Describe.
   *
   * Returns -1 when the chunk needs a server (nothing was done), else 1, or 0 when the client's
   * socket is full.
   */
  answerAlone(data: Buffer): number {
    if (!this.options.rename) return -1
    const end = data.length
    // Types first: the common first chunk of a transaction (a Query, a Bind…) leaves here unhashed.
    for (let at = 0; at < end; at = at + 1 + data.readInt32BE(at + 1)) {
      const type = data[at]
      if (type !== PARSE && type !== CLOSE && type !== SYNC && type !== FLUSH) return -1
      if (end - at < 5) return -1
    }
    const statements = this.statements
    const names = this.aloneNames
    while (names.length > 0) names.pop()
    let count = 0
    let memory = 0
    let size = 0
    let pos = 0
    while (pos < end) {
      const type = data[pos]!
      const next = pos + 1 + data.readInt32BE(pos + 1)
      if (next > end) return -1
      if (type === PARSE) {
        const nameEnd = cstringEnd(data, pos + 5, next)
        if (nameEnd <= pos + 5) return -1
        const name = data.toString("utf8", pos + 5, nameEnd)
        if (statements.has(name) || names.includes(name)) return -1
        const serverName = statements.serverNameOf(data, nameEnd, next)
        if (!this.pool.statements.isParsed(serverName)) return -1
        count++
        memory += next - pos
        if (!statements.wouldFit(count, memory)) return -1
        names.push(name, serverName)
        size += PARSE_COMPLETE_MESSAGE.length
      } else if (type === CLOSE) {
        const nameEnd = cstringEnd(data, pos + 6, next)
        if (data[pos + 5] !== STATEMENT || nameEnd <= pos + 6) return -1
        size += CLOSE_COMPLETE_MESSAGE.length
      } else if (type === SYNC) {
        size += READY_IDLE.length
      } else if (type !== FLUSH) {
        return -1
      }
      pos = next
    }
    const reply = Buffer.allocUnsafe(size)
    let at = 0
    let parsed = 0
    pos = 0
    while (pos < end) {
      const type = data[pos]!
      const next = pos + 1 + data.readInt32BE(pos + 1)
      if (type === PARSE) {
        const nameEnd = cstringEnd(data, pos + 5, next)
        statements.register(names[parsed]!, data, pos, nameEnd, next, names[parsed + 1]!)
        parsed += 2
        at += PARSE_COMPLETE_MESSAGE.copy(reply, at)
      } else if (type === CLOSE) {
        const statement = statements.get(data.toString("utf8", pos + 6, cstringEnd(data, pos + 6, next)))
        if (statement !== undefined) statements.forget(statement)
        at += CLOSE_COMPLETE_MESSAGE.copy(reply, at)
      } else if (type === SYNC) {
        at += READY_IDLE.copy(reply, at)
      }
      pos = next
    }
    while (names.length > 0) names.pop()
    return this.client.write(reply) ? 1 : 0
  }

  /** Scratch for `answerAlone`: client name, server-side name, per Parse. */
  private readonly aloneNames: Array<string> = []

  /**
   * Bind or Describe of a client statement: make sure the server has it, then use its server-side
   * name. Returns true when the request must wait (see below): nothing of it was written, and the
   * caller keeps it and what follows for `resume`.
   */
  private use(
    server: ServerConnection,
    data: Buffer,
    pos: number,
    nameStart: number,
    nameEnd: number,
    next: number,
    kind: Expect.Bind | Expect.Describe
  ): boolean {
    const name = data.toString("utf8", nameStart, nameEnd)
    const statement = this.statements.get(name)
    if (statement === undefined) {
      // Passed as is: it may be a SQL-level PREPAREd statement of this (pinned) client; if not, the
      // server's "does not exist" comes back as ours.
      this.pieces.push(data.subarray(pos, next))
      this.queue.pushReply(
        kind === Expect.Bind ? Expect.UnknownBind : Expect.UnknownDescribe,
        renderErrorResponse(tidepoolError("EPREPAREDNOTFOUND", name))
      )
      return false
    }
    const resultType = statement.resultType
    if (this.verdict === statement) {
      // Its result type changed since PostgreSQL fixed it for this client: on its own connection
      // PostgreSQL would refuse it too. Once: from now on the client gets the statement as it is now.
      this.verdict = undefined
      this.stale(statement, kind)
      return false
    }
    const serverName = statement.serverName
    const stamp = this.cache.stampOf(serverName)
    const current = stamp !== undefined && this.cache.useCurrent(serverName)
    if (
      resultType !== undefined &&
      (!current || (stamp !== statement.checkedStamp && this.cache.describedOf(serverName)?.resultType !== resultType))
    ) {
      // The client has its statement's result type, and this server has no copy known to return it.
      // A fresh copy returns the type as it is now, which is PostgreSQL's answer only if it is the
      // client's: described first, the request waits for the answer (`resume`). Rare: a statement
      // prepared again for a client that used it before (another server, evicted, stale, DDL).
      if (!this.skippedNow()) {
        if (current) this.cache.unsure(serverName)
        this.prepareOn(statement, true)
        this.pieces.push(FLUSH_MESSAGE)
        this.holdSeq = this.queue.nextSeq - 1
        this.holdStatement = statement
        this.holdKind = kind
        return true
      }
      // An earlier request failed: the server skips this one, as PostgreSQL would.
    } else if (resultType !== undefined) {
      // Stamps are the pool's clock: this copy, wherever it is, need not be looked up again.
      statement.checkedStamp = stamp!
    } else if (!current) {
      this.prepareOn(statement, true)
    } else if (statement.usedAt < 0 && stamp < statement.parsedAt && this.retryWatch.state === RetryState.None) {
      this.watchFirstUse(server)
    }
    pushRenamed(this.pieces, data, pos, nameStart, nameEnd, next, statement.serverNameZ)
    const watch = this.retryWatch
    if (watch.state === RetryState.Watch && watch.seq < 0) watch.seq = this.queue.nextSeq
    this.queue.pushStatement(kind, statement)
    return false
  }

  /**
   * Answers the client's Bind or Describe of `statement` with `cached plan must not change result
   * type` (a Describe with its ParameterDescription first, as PostgreSQL describes the parameters
   * before it re-plans), making the server fail in its place.
   */
  private stale(statement: Statement, kind: Expect.Bind | Expect.Describe): void {
    statement.usedAt = this.pool.statements.now
    statement.resultType = undefined
    statement.checkedStamp = -1
    const params = kind === Expect.Describe ? statement.params : undefined
    this.pieces.push(DESCRIBE_MISSING)
    this.queue.pushReply(Expect.Fail, params === undefined ? STALE_PLAN : Buffer.concat([params, STALE_PLAN]))
  }

  /** Whether the server is skipping what is written now: an earlier request failed and its Sync is still to come. */
  private skippedNow(): boolean {
    const queue = this.queue
    return (
      this.skipping &&
      queue.indexOf(Expect.Sync, 0) < 0 &&
      queue.indexOf(Expect.Query, 0) < 0 &&
      queue.indexOf(Expect.HiddenSync, 0) < 0
    )
  }

  /** The client's bytes from the request at `pos` on wait for a hidden Describe; returns `pos`. */
  private holdFrom(data: Buffer, pos: number): number {
    this.streamRemaining = 0
    this.retryWatch.cancel()
    this.held.push(Buffer.from(data.subarray(pos)))
    return pos
  }

  /**
   * The hidden Describe of a held use was answered (or skipped: its Parse failed, and the server
   * skips the held request too). Decides the held request's fate and writes what was held.
   */
  private resume(server: ServerConnection): void {
    const statement = this.holdStatement!
    this.holdSeq = -1
    this.holdStatement = undefined
    const fresh = this.cache.describedOf(statement.serverName)
    const resultType = statement.resultType
    if (fresh !== undefined && resultType !== undefined && fresh.resultType !== resultType) {
      this.verdict = statement
      // Copies prepared before the change, on any server, are stale: prepared afresh before their next
      // use (a client that has no result type for the statement takes the type as it is now). This
      // fresh copy is not.
      this.pool.statements.markStale(statement.serverName)
      this.cache.renew(statement.serverName)
    }
    const held = this.held
    this.held = []
    for (let i = 0; i < held.length; i++) this.feed(server, held[i]!)
    this.verdict = undefined
    if (server.atBoundary && !this.edits.holding) this.settle(-1)
  }

  /**
   * The first use of a statement by this client lands on a copy prepared before the client's Parse
   * (see `FirstUseRetry`). When this Bind or Describe opens its exchange with no transaction open,
   * and nothing but replies the pooler makes up is ahead of it, the exchange can be run again on a
   * fresh copy: `write` keeps its bytes until its Sync (see `retry`).
   */
  private watchFirstUse(server: ServerConnection): void {
    if (server.txStatus !== IDLE || this.retryWatch.running) return
    if (!this.queue.allSynthetic()) return
    this.retryWatch.watch()
  }

  private close(name: string, message: Buffer): void {
    const statement = this.statements.get(name)
    if (statement === undefined && this.sqlPrepared > 0) {
      // Perhaps a SQL-level PREPAREd statement of this pinned client: the server must close it.
      this.pieces.push(message)
      this.queue.push(Expect.Close)
      return
    }
    if (statement !== undefined) this.statements.forget(statement)
    // The server keeps it for other clients (and the cache evicts it in time); a Close of an unknown
    // name is no error in PostgreSQL either. Undone if the server skips it (an earlier error).
    this.queue.pushStatement(Expect.SyntheticClose, statement)
  }

  /**
   * Sends the statement's Parse to a server lacking it (closing a stale copy and evicting as needed),
   * and a Describe behind it: its answer is the copy's description (`recordDescriptions`).
   */
  private prepareOn(statement: Statement, hidden: boolean): void {
    const cache = this.cache
    const serverName = statement.serverName
    const counters = this.pool.counters
    if (cache.replace(serverName)) this.hiddenClose(serverName)
    for (let oldest = cache.evict(); oldest !== undefined; oldest = cache.evict()) {
      this.hiddenClose(oldest)
      counters.statementsEvicted++
    }
    this.pieces.push(statement.parse)
    if (hidden) this.queue.pushHidden(Expect.HiddenParse, serverName)
    else this.queue.pushStatement(Expect.Parse, statement)
    this.pieces.push(describeStatement(statement.serverNameZ))
    this.queue.pushStatement(Expect.HiddenDescribe, statement)
    cache.sent(serverName)
    if (hidden) counters.statementsReprepared++
    else counters.statementsPrepared++
  }

  private hiddenClose(serverName: string): void {
    this.pieces.push(closeStatement(serverName))
    this.queue.pushHidden(Expect.HiddenClose, serverName)
  }

  /** Answers the current request with `error`, making the server fail in its place so its state matches. */
  private fail(error: TidepoolError): void {
    this.pieces.push(DESCRIBE_MISSING)
    this.queue.pushReply(Expect.Fail, renderErrorResponse(error))
  }

  // ---- server → client ------------------------------------------------------------------------

  private readonly onServerMessage: ServerObserver = (type, length, body, bodyStart, start, end) => {
    const queue = this.queue
    const head = queue.head
    const kind = head.kind
    let drop = false
    /** The dropped message is kept (`params`) to be written later. */
    let capture = false
    /** The kept ParameterDescription goes out before this message. */
    let prefix = false
    /** The dropped message answers the pooler's own Describe (kept as the copy's description). */
    let described = false
    /** Goes to the client before this message. */
    let before: Buffer | undefined
    let replacement: Buffer | undefined
    switch (type) {
      case PARSE_COMPLETE:
        if (kind === Expect.HiddenParse) {
          drop = true
          if (head.serverName !== UNNAMED) this.pool.statements.markParsed(head.serverName)
        } else if (kind === Expect.Parse && head.statement !== undefined) {
          this.pool.statements.markParsed(head.statement.serverName)
        }
        if (kind === Expect.HiddenParse || kind === Expect.Parse) queue.shift()
        break
      case CLOSE_COMPLETE:
        if (kind === Expect.HiddenClose) drop = true
        if (kind === Expect.HiddenClose || kind === Expect.Close) queue.shift()
        break
      case BIND_COMPLETE:
        if (kind === Expect.Bind) this.used()
        else if (kind === Expect.UnknownBind) queue.shift()
        break
      case PARAMETER_DESCRIPTION:
        if (kind === Expect.HiddenDescribe) {
          drop = true
          described = true
        } else if (kind === Expect.Describe && this.retryWatch.isHead(queue.shifted)) {
          // A Describe that may run again answers twice if it fails after this: held until it succeeds.
          drop = true
          capture = true
          this.edits.paramsWanted = true
        }
        break
      case ROW_DESCRIPTION:
      case NO_DATA:
        if (kind === Expect.HiddenDescribe) {
          drop = true
          described = true
          this.describedNow.push(head.statement!)
          queue.shift()
        } else if (kind === Expect.Describe) {
          prefix = this.edits.paramsWanted
          this.used()
        } else if (kind === Expect.UnknownDescribe) {
          queue.shift()
        }
        break
      case COMMAND_COMPLETE:
        this.onTag(body!, bodyStart, length)
        if (kind === Expect.Execute) queue.shift()
        break
      case EMPTY_QUERY:
      case PORTAL_SUSPENDED:
        if (kind === Expect.Execute) queue.shift()
        break
      case COPY_IN:
        this.enterCopyIn()
        break
      case ERROR: {
        // Read before `onError` may shift the head (which clears its fields).
        const statement = head.statement
        before = this.paramsBeforeError(head)
        replacement = this.onError(head) ?? this.clientNamed(kind, statement, body!, bodyStart, length)
        drop = replacement !== undefined
        break
      }
      case READY:
        while (queue.size > 0) {
          const k = queue.headKind
          queue.shift()
          if (k === Expect.Sync || k === Expect.Query) break
          if (k === Expect.HiddenSync) {
            drop = true
            break
          }
        }
        this.skipping = false
        break
      // Everything else (rows, notices, notifications, ParameterStatus, COPY) passes through.
    }
    // Edits in offset order: the held-back start of this message, then its drop and replacement.
    const edits = this.edits
    if (prefix) edits.insertParams(Math.max(start, 0))
    if (before !== undefined) edits.insert(Math.max(start, 0), before)
    if (start < 0) {
      edits.releaseWithheld(
        described ? Withheld.Capture : capture ? Withheld.Params : drop ? Withheld.Drop : Withheld.Forward
      )
    }
    if (drop) {
      if (described) edits.dropIntoCapture(Math.max(start, 0), end)
      else if (capture) edits.dropIntoParams(Math.max(start, 0), end)
      else edits.drop(Math.max(start, 0), end)
    }
    if (replacement !== undefined) edits.insert(end, replacement)
    this.settle(end)
  }

  /**
   * The answer to a Describe the pooler sent is the description of the copy it just prepared: kept
   * for the clients that will use that copy, and, for this client's statement, PostgreSQL's
   * description of it when nothing fixed one before (the copy was prepared for its Parse, or for its
   * first use, or after it was told the type changed).
   */
  private recordDescriptions(): void {
    const bytes = this.edits.takeCaptured()
    const statements = this.describedNow
    let params: Buffer | undefined
    let n = 0
    for (let pos = 0; pos + 5 <= bytes.length; ) {
      const next = pos + 1 + bytes.readInt32BE(pos + 1)
      if (bytes[pos] === PARAMETER_DESCRIPTION) {
        params = bytes.subarray(pos, next)
      } else if (n < statements.length) {
        const statement = statements[n++]!
        const resultType = resultTypeKey(bytes, pos, next)
        const copyParams = params ?? EMPTY
        this.cache.described(statement.serverName, resultType, copyParams)
        statement.resultType ??= resultType
        if (params !== undefined) statement.params ??= params
        params = undefined
      }
      pos = next
    }
    while (statements.length > 0) statements.pop()
  }

  /**
   * A hidden Parse or Describe ahead of the client's Describe of the same statement failed (its table
   * was dropped, say): PostgreSQL, which has the statement, would send its ParameterDescription
   * before the error. Not in a failed transaction, where PostgreSQL refuses to describe a statement
   * that returns rows before it describes anything.
   */
  private paramsBeforeError(head: Expectation): Buffer | undefined {
    const kind = head.kind
    if (kind !== Expect.HiddenParse && kind !== Expect.HiddenDescribe) return undefined
    if (this.server?.lastErrorCode === "25P02") return undefined
    const serverName = kind === Expect.HiddenParse ? head.serverName : head.statement!.serverName
    const queue = this.queue
    let client: Expectation | undefined
    for (let i = 1; i < queue.size; i++) {
      const entry = queue.at(i)
      if (entry.kind !== Expect.HiddenDescribe) {
        client = entry
        break
      }
    }
    let statement: Statement | undefined
    if (client !== undefined) {
      if (client.kind === Expect.Describe) statement = client.statement
    } else if (this.holdSeq >= 0 && this.holdKind === Expect.Describe) {
      statement = this.holdStatement
    }
    return statement !== undefined && statement.serverName === serverName ? statement.params : undefined
  }

  /** The client's Bind or Describe at the head succeeded: it has seen the statement's result type. */
  private used(): void {
    const statement = this.queue.head.statement
    if (statement !== undefined) {
      statement.usedAt = this.pool.statements.now
      if (statement.resultType === undefined) {
        const copy = this.cache.describedOf(statement.serverName)
        if (copy !== undefined) {
          statement.resultType = copy.resultType
          if (copy.params.length > 0) statement.params ??= copy.params
        }
      }
    }
    if (this.retryWatch.seq === this.queue.shifted) this.retryWatch.cancel()
    this.queue.shift()
  }

  /** An error about a renamed statement names it as the client does (see `clientNamedError`). */
  private clientNamed(
    kind: Expect | 0,
    statement: Statement | undefined,
    body: Buffer,
    start: number,
    length: number
  ): Buffer | undefined {
    if ((kind !== Expect.Bind && kind !== Expect.Describe && kind !== Expect.Parse) || statement === undefined) {
      return undefined
    }
    return clientNamedError(statement.serverName, statement.name, body, start, length)
  }

  /**
   * An ErrorResponse: returns the pooler's own error to send in its place, if any. `head` is read
   * before anything shifts it: its fields are cleared when it leaves the queue.
   */
  private onError(head: Expectation): Buffer | undefined {
    // A COPY that fails ends its data: the client's later Syncs count again.
    this.copyIn = false
    const kind = head.kind
    if (kind === 0 || kind === Expect.Query || kind === Expect.Sync) return undefined
    const server = this.server!
    const queue = this.queue
    const watch = this.retryWatch
    const code = server.lastErrorCode
    let replacement: Buffer | undefined
    if (kind === Expect.Fail) replacement = head.reply
    else if ((kind === Expect.UnknownBind || kind === Expect.UnknownDescribe) && code === "26000") {
      replacement = head.reply
    } else if ((kind === Expect.Bind || kind === Expect.Describe) && head.statement !== undefined) {
      const statement = head.statement
      const serverName = statement.serverName
      if (code === "0A000") {
        // `cached plan must not change result type` (matched by SQLSTATE: the text may be translated):
        // stale everywhere in the pool, so every server re-prepares it before its next use.
        if (this.cache.holdsCurrent(serverName)) this.pool.statements.markStale(serverName)
        if (watch.isHead(queue.shifted) && this.streamRemaining === 0) {
          this.retry(server, statement)
          return EMPTY
        }
        // The client sees the error: from now on it takes the statement's result type as it is.
        statement.usedAt = this.pool.statements.now
        statement.resultType = undefined
        statement.checkedStamp = -1
      } else if (code === "26000") {
        // The server lost it behind the pooler's back (SQL DEALLOCATE, DISCARD in a function), or
        // never had it: a hidden Parse earlier in the pipeline met an aborted transaction. Prepared
        // again at the next use. PostgreSQL looks a statement up before it checks for an aborted
        // transaction; this client has the statement, so on its own connection it would get 25P02.
        this.cache.lost(serverName)
        if (server.txStatus === FAILED) replacement = ABORTED
      }
    } else if ((kind === Expect.Parse || kind === Expect.HiddenParse) && code === "42P05") {
      // The server has it though the pooler thought not: closed and prepared again at the next use.
      const serverName = kind === Expect.Parse ? head.statement?.serverName : head.serverName
      if (serverName !== undefined && serverName !== UNNAMED) {
        this.undo(head)
        queue.shift()
        this.cache.unsure(serverName)
        this.skipping = true
        return undefined
      }
    }
    // The watched request failed otherwise: nothing to run again.
    if (watch.seq === queue.shifted) watch.cancel()
    if (kind === Expect.Parse && head.statement !== undefined) {
      this.pool.statements.forgetParsed(head.statement.serverName)
    } else if (kind === Expect.HiddenParse && head.serverName !== UNNAMED) {
      this.pool.statements.forgetParsed(head.serverName)
    }
    this.undo(head)
    queue.shift()
    this.skipping = true
    return replacement
  }

  /**
   * Runs the watched exchange (see `FirstUseRetry`) again on a fresh copy of its statement, in place
   * of the error its first request got: the server skips the rest of the exchange up to a Sync whose
   * ReadyForQuery is the pooler's (the client's own Sync, or one of ours when the client has not sent
   * it yet), then the statement is prepared again and the client's bytes are written once more.
   */
  private retry(server: ServerConnection, statement: Statement): void {
    const watch = this.retryWatch
    const ready = watch.state === RetryState.Ready
    const kept = watch.take()
    this.edits.discardParams()
    this.queue.shift()
    this.skipping = true
    if (ready) this.queue.hideFirstSync()
    else this.queue.push(Expect.HiddenSync)
    // Closed and prepared again before the Bind or Describe that is written again below.
    this.cache.unsure(statement.serverName)
    server.pending++
    if (!ready) server.write(SYNC_MESSAGE)
    watch.running = true
    for (const bytes of kept) this.rewrite(server, bytes)
    watch.running = false
    this.pool.counters.statementsReprepared++
  }

  /** A request the server did not carry out (it failed, or was skipped after an error). */
  private undo(entry: Expectation): void {
    const cache = this.cache
    switch (entry.kind) {
      case Expect.Parse:
        if (entry.statement !== undefined) {
          // A stale copy may still be there (its Close may have been skipped too): closed before reuse.
          cache.failed(entry.statement.serverName)
          this.statements.forget(entry.statement)
        }
        break
      case Expect.SyntheticParse:
        if (entry.statement !== undefined) this.statements.forget(entry.statement)
        break
      case Expect.HiddenParse:
        cache.failed(entry.serverName)
        break
      case Expect.HiddenClose:
        // The server may still hold it: closed again before any new Parse of that name.
        if (entry.serverName !== UNNAMED) cache.unsure(entry.serverName)
        break
      case Expect.SyntheticClose:
        // The Close did not happen: the statement is the client's again, unless the name was reused.
        if (entry.statement !== undefined) this.statements.restore(entry.statement)
        break
    }
  }

  /**
   * CopyInResponse: until the client ends the data (CopyDone/CopyFail) PostgreSQL ignores Sync, so
   * Syncs already sent in that stretch expect no ReadyForQuery, and neither will the ones to come.
   */
  private enterCopyIn(): void {
    const server = this.server!
    const queue = this.queue
    // The head is the COPY's Execute or Query; its Syncs up to the client's CopyEnd were never requests.
    const dropped = queue.removeSyncsBeforeCopyEnd()
    server.pending -= dropped
    const copyEnd = queue.indexOf(Expect.CopyEnd, 1)
    this.copyIn = copyEnd < 0
    if (dropped > 0) {
      this.retryWatch.cancel()
      // The Sync that seemed to end the exchange did not: until one the client sends after its
      // CopyDone, the server is mid-exchange and must stay with this client.
      const concluded =
        copyEnd >= 0 && (queue.indexOf(Expect.Sync, copyEnd) >= 0 || queue.indexOf(Expect.Query, copyEnd) >= 0)
      if (!concluded) this.reopened = true
    }
  }

  /** Whether an extended-protocol exchange the relay thought concluded turned out open (see `enterCopyIn`); reading clears it. */
  takeReopened(): boolean {
    const reopened = this.reopened
    this.reopened = false
    return reopened
  }

  /** Emits made-up replies that reached the head and drops requests the server skips; `at` = -1: now. */
  private settle(at: number): void {
    const queue = this.queue
    while (queue.size > 0) {
      const head = queue.head
      const kind = head.kind
      if (this.skipping) {
        if (kind === Expect.Sync || kind === Expect.Query || kind === Expect.HiddenSync) return
        this.undo(head)
      } else if (kind === Expect.SyntheticParse || kind === Expect.SyntheticClose) {
        const message = kind === Expect.SyntheticParse ? PARSE_COMPLETE_MESSAGE : CLOSE_COMPLETE_MESSAGE
        if (at < 0) this.client.write(message)
        else this.edits.insert(at, message)
      } else if (kind !== Expect.CopyEnd) {
        return
      }
      queue.shift()
    }
  }

  /**
   * After a server chunk: made-up replies that reached the head while a reply was half received (a
   * silent settings reply, say) go out now, so a client waiting after Flush is not left waiting.
   */
  settleAfter(server: ServerConnection): void {
    if (this.holdSeq >= 0 && this.queue.shifted > this.holdSeq) this.resume(server)
    if (this.queue.size > 0 && server.atBoundary && !this.edits.holding) this.settle(-1)
  }

  private onTag(body: Buffer, start: number, length: number): void {
    switch (commandTag(body, start, length)) {
      case SqlTag.Prepare:
        this.sqlPrepared++
        break
      case SqlTag.Deallocate:
        if (this.sqlPrepared > 0) this.sqlPrepared--
        break
      case SqlTag.DeallocateAll:
        this.sqlPrepared = 0
        this.statements.clear()
        this.cache.clear()
        break
    }
  }

  /**
   * Forwards a server chunk to the client with this chunk's edits applied. A reply message that may
   * have to be dropped and is still incomplete is held back until the rest arrives.
   */
  forward(server: ServerConnection, chunk: Buffer): boolean {
    // The chunk may be a view of the server's read buffer (see ReadBuffer).
    return writeChunk(this.client, chunk, server.reads, this.send)
  }

  /** Writes a server chunk (the held server's) to the client with this chunk's edits applied. */
  private readonly send = (chunk: Buffer): boolean => {
    const ok = this.edits.apply(
      this.client,
      this.server!,
      chunk,
      this.retryWatch.state !== RetryState.None || this.queue.headKind === Expect.HiddenDescribe
    )
    if (this.describedNow.length > 0 && this.edits.hasCaptured) this.recordDescriptions()
    return ok
  }
}
