import { createHash } from "node:crypto"
import type * as net from "node:net"
import { renderErrorResponse, tidepoolError } from "../errors/index.ts"
import type { TenantPool } from "../pool/index.ts"
import { Backend, errorResponse, Frontend, readyForQuery, STATEMENT_TARGET, TxStatus } from "../protocol/index.ts"
import { type ServerConnection, type ServerObserver, writeChunk } from "../upstream/index.ts"

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

/**
 * Settings that change what a statement means when it is parsed (how literals are read, which tables
 * a name means): part of its identity, so clients with different values never share a statement.
 */
const PARSE_SETTINGS = [
  "search_path",
  "datestyle",
  "intervalstyle",
  "timezone",
  "standard_conforming_strings",
  "client_encoding"
] as const

/**
 * What each request sent to the server expects back, in order. Kept as a ring of small integers so
 * tracking a request costs no allocation.
 */
enum Expect {
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
  /** A Sync whose ReadyForQuery belongs to the pooler (an exchange it runs again, see `retry`). */
  HiddenSync = 16
}

interface Statement {
  /** The client's name. */
  readonly name: string
  readonly serverName: string
  /** `serverName` and its NUL, as Bind and Describe carry it. */
  readonly serverNameZ: Buffer
  /** The client's Parse, renamed: what a server lacking the statement is sent. */
  readonly parse: Buffer
  readonly bytes: number
  /** The pool's statement clock (`StatementRegistry`) when the client parsed it. */
  readonly parsedAt: number
  /**
   * The clock when a Bind or Describe of it by this client last succeeded, -1 before the first: the
   * client has seen the statement's result type as of then.
   */
  usedAt: number
}

const PARSE_COMPLETE_MESSAGE = Buffer.from([PARSE_COMPLETE, 0, 0, 0, 4])
const READY_IDLE = readyForQuery("I")
const SYNC_MESSAGE = Buffer.from([SYNC, 0, 0, 0, 4])
const EMPTY = Buffer.alloc(0)
/** The ref of a hidden Parse or Close of the client's unnamed statement (no server-side name to track). */
const UNNAMED = ""
/** In the edit list: where a held ParameterDescription is kept from, or written to (see `params`). */
const PARAMS_MARK = Buffer.alloc(0)
const CLOSE_COMPLETE_MESSAGE = Buffer.from([CLOSE_COMPLETE, 0, 0, 0, 4])

/**
 * A request that always fails without side effects: Describe of a statement no one can have
 * prepared (longer than SQL identifiers may be, and clients' protocol-level names are renamed).
 */
const DESCRIBE_MISSING = (() => {
  const name = Buffer.from("tidepool.missing.statement.that.no.session.can.have.prepared.ever\0")
  const m = Buffer.alloc(6 + name.length)
  m[0] = DESCRIBE
  m.writeInt32BE(5 + name.length, 1)
  m[5] = STATEMENT
  name.copy(m, 6)
  return m
})()

const closeStatement = (serverName: string): Buffer => {
  const len = Buffer.byteLength(serverName)
  const m = Buffer.alloc(7 + len)
  m[0] = CLOSE
  m.writeInt32BE(6 + len, 1)
  m[5] = STATEMENT
  m.write(serverName, 6)
  return m
}

/** Close of the unnamed statement (see `restoreUnnamed`). */
const CLOSE_UNNAMED = closeStatement("")

const TAG_PREPARE = Buffer.from("PREPARE\0")
const TAG_DEALLOCATE = Buffer.from("DEALLOCATE\0")
const TAG_DEALLOCATE_ALL = Buffer.from("DEALLOCATE ALL\0")
const TAG_DISCARD_ALL = Buffer.from("DISCARD ALL\0")

const isTag = (body: Buffer, start: number, length: number, tag: Buffer) =>
  length === tag.length && body.compare(tag, 0, tag.length, start, start + length) === 0

/** End of the NUL-terminated string starting at `at` (the NUL's offset), or -1. */
const cstringEnd = (data: Buffer, at: number, end: number): number => {
  const nul = data.indexOf(0, at)
  return nul < 0 || nul >= end ? -1 : nul
}

const IDLE = TxStatus.Idle
const FAILED = TxStatus.Failed
/** PostgreSQL's answer to a request in a failed transaction. */
const ABORTED = errorResponse({
  severity: "ERROR",
  code: "25P02",
  message: "current transaction is aborted, commands ignored until end of transaction block"
})

// States of an exchange that may run again (`watchFirstUse`).
const RETRY_NONE = 0
/** Its first Bind or Describe was written; its bytes are kept until its Sync. */
const RETRY_WATCH = 1
/** Its Sync was written and nothing after it: it can run again. */
const RETRY_READY = 2
/** Beyond this, an exchange is not kept for running again. */
const RETRY_MAX_BYTES = 65_536

/** What PostgreSQL says when a statement's result type changed since it was prepared (postgres.js re-prepares on its routine). */
const STALE_PLAN = errorResponse({
  severity: "ERROR",
  code: "0A000",
  message: "cached plan must not change result type",
  routine: "RevalidateCachedQuery"
})

const formatBytes = (n: number): string =>
  n % 1_048_576 === 0 ? `${n / 1_048_576}MB` : n % 1024 === 0 ? `${n / 1024}kB` : `${n} bytes`

/**
 * Named prepared statements in transaction mode (docs/prepared-statements.md), for one client. The client's named
 * statements are renamed to server-side names derived from their content (`tp_<sha256>`), so clients
 * preparing the same statement share it on a server; a Bind or Describe landing on a server that
 * lacks the statement is preceded by the stored Parse, whose ParseComplete is swallowed; a Parse the
 * server already has is dropped and its ParseComplete made up in the right place of the reply.
 *
 * The client→server side rewrites whole messages (the relay only hands over complete ones); the
 * server→client side follows every reply message through `expect` (a ring of request kinds), drops
 * what the pooler asked for, and inserts what it made up, forwarding the rest zero-copy.
 *
 * It also watches CommandComplete tags for SQL-level `PREPARE`: such a statement lives only on the
 * server that ran it, so the client is pinned to that server until it deallocates it (`pinned`).
 * `DEALLOCATE ALL` and `DISCARD ALL` clear both the client's statements and what the pooler knows
 * the server holds.
 */
export class PreparedStatements {
  private readonly statements = new Map<string, Statement>()
  private memory = 0
  /** SQL-level PREPAREs minus DEALLOCATEs on the held server. */
  private sqlPrepared = 0
  private server: ServerConnection | undefined = undefined

  // The expectation ring.
  private kinds = new Uint8Array(64)
  private refs: Array<unknown> = new Array(64)
  private head = 0
  private count = 0
  /** The server reported an error in an extended-protocol exchange: it skips everything until Sync. */
  private skipping = false
  /** The server is in COPY FROM STDIN and the client has not ended the data yet: it ignores Sync. */
  private copyIn = false
  /** See `takeReopened`. */
  private reopened = false
  /** The chunk holding the client's unnamed statement's Parse at [unnamedAt, unnamedEnd), if it has one (`keepUnnamed`). */
  private unnamedChunk: Buffer | undefined = undefined
  private unnamedAt = 0
  private unnamedEnd = 0
  /** The held server's unnamed statement is the client's (or both have none) since it was lent. */
  private unnamedHere = false
  /** Bytes of a streamed (not rewritten) client message still to come in later chunks. */
  private streamRemaining = 0

  // Edits of the server chunk being scanned: drops [at, end) and inserts (end = -1) in offset order.
  private readonly opAt: Array<number> = []
  private readonly opEnd: Array<number> = []
  private readonly opBuf: Array<Buffer | undefined> = []
  /** Bytes of a reply message that may have to be dropped, held back until it is complete. */
  private readonly withheld: Array<Buffer> = []

  // Pieces of the client chunk being rewritten; `runStart` is where the untouched run began.
  private readonly pieces: Array<Buffer> = []

  /** Requests ever added to and taken from the ring: a request's sequence number names it. */
  private pushed = 0
  private shifted = 0
  // An exchange that may run again (see `watchFirstUse`): its state, the sequence number of its
  // first request (the Bind or Describe), and a copy of its client bytes.
  private retryState = RETRY_NONE
  private retrySeq = -1
  private readonly retryKept: Array<Buffer> = []
  private retryBytes = 0
  /** The exchange is being written again: it is not watched a second time. */
  private retrying = false
  /** A watched Describe's ParameterDescription, held until the Describe succeeds (dropped if it runs again). */
  private params: Buffer | undefined = undefined
  private paramsWanted = false

  constructor(
    private readonly client: net.Socket,
    private readonly pool: TenantPool,
    private readonly options: PreparedStatementOptions,
    /** The client's session settings (kept current by the relay). */
    private readonly settings: ReadonlyMap<string, string> = new Map()
  ) {}

  /** The client ran SQL-level PREPARE: its server must stay with it. */
  get pinned(): boolean {
    return this.sqlPrepared > 0
  }

  attach(server: ServerConnection): void {
    this.server = server
    server.observer = this.onServerMessage
  }

  detach(server: ServerConnection): void {
    server.observer = undefined
    this.server = undefined
    // Empty at a transaction boundary; anything left belongs to a server being closed.
    if (this.count > 0) this.refs.fill(undefined)
    this.head = 0
    this.count = 0
    this.skipping = false
    this.copyIn = false
    this.reopened = false
    this.unnamedHere = false
    this.streamRemaining = 0
    this.opAt.length = 0
    this.opEnd.length = 0
    this.opBuf.length = 0
    this.withheld.length = 0
    this.cancelRetry()
    this.params = undefined
    this.paramsWanted = false
  }

  // ---- client → server ------------------------------------------------------------------------

  /**
   * Writes client bytes to the held server, rewritten as needed. Parse, Bind, Describe and Close
   * arrive whole; other messages may begin or end in another chunk (they stream). Returns
   * `socket.write`'s answer.
   */
  write(server: ServerConnection, data: Buffer): boolean {
    const ok = this.rewrite(server, data)
    // Made-up replies at the head go out now, unless a reply message is half forwarded.
    if (server.atBoundary && this.withheld.length === 0) this.settle(-1)
    return ok
  }

  private rewrite(server: ServerConnection, data: Buffer): boolean {
    const rename = this.options.rename
    const pieces = this.pieces
    let runStart = 0
    const end = data.length
    let pos = Math.min(this.streamRemaining, end)
    this.streamRemaining -= pos
    // Bytes of an exchange that may have to run again (see `watchFirstUse`): [keepFrom, keepTo).
    let keepFrom = this.retryState === RETRY_WATCH ? 0 : -1
    let keepTo = end
    if (this.retryState === RETRY_READY && pos > 0) this.keep(data.subarray(0, pos)) // the rest of its Sync
    while (pos < end) {
      const type = data[pos]!
      const next = pos + 1 + data.readInt32BE(pos + 1)
      if (next > end) this.streamRemaining = next - end
      if (this.retryState === RETRY_READY) {
        // The client went on past that exchange: running it again would reorder its requests.
        this.cancelRetry()
        keepFrom = -1
      }
      switch (type) {
        case QUERY:
        case FUNCTION_CALL:
          // A simple Query uses, and so destroys, the unnamed statement (here and for the client).
          if (type === QUERY && rename) this.forgetUnnamed()
          this.expect(Expect.Query, undefined)
          if (this.retryState === RETRY_WATCH) this.cancelRetry()
          keepFrom = -1
          break
        case SYNC:
          // PostgreSQL ignores Sync while it receives COPY data: no ReadyForQuery will answer it.
          if (this.copyIn) server.pending--
          else this.expect(Expect.Sync, undefined)
          if (this.retryState === RETRY_WATCH) {
            this.retryState = RETRY_READY
            keepTo = next
          }
          break
        case COPY_DONE:
        case COPY_FAIL:
          this.copyIn = false
          this.expect(Expect.CopyEnd, undefined)
          break
        case EXECUTE:
          this.expect(Expect.Execute, undefined)
          break
        case PARSE: {
          const nameEnd = cstringEnd(data, pos + 5, next)
          if (!rename || nameEnd <= pos + 5) {
            if (rename && nameEnd === pos + 5) this.keepUnnamed(data, pos, next)
            this.expect(Expect.Parse, undefined)
            break
          }
          if (pos > runStart) pieces.push(data.subarray(runStart, pos))
          this.parse(server, data, pos, nameEnd, next)
          runStart = next
          break
        }
        case BIND: {
          const portalEnd = cstringEnd(data, pos + 5, next)
          const nameEnd = portalEnd < 0 ? -1 : cstringEnd(data, portalEnd + 1, next)
          if (!rename || nameEnd <= portalEnd + 1) {
            if (rename && nameEnd === portalEnd + 1 && !this.unnamedHere) {
              if (pos > runStart) pieces.push(data.subarray(runStart, pos))
              this.restoreUnnamed()
              runStart = pos
            }
            this.expect(Expect.Bind, undefined)
            break
          }
          if (pos > runStart) pieces.push(data.subarray(runStart, pos))
          this.use(server, data, pos, portalEnd + 1, nameEnd, next, Expect.Bind)
          if (this.retryState === RETRY_WATCH && keepFrom < 0) keepFrom = pos
          runStart = next
          break
        }
        case DESCRIBE:
        case CLOSE: {
          const nameEnd = cstringEnd(data, pos + 6, next)
          if (!rename || data[pos + 5] !== STATEMENT || nameEnd <= pos + 6) {
            if (rename && data[pos + 5] === STATEMENT && nameEnd === pos + 6) {
              if (type === CLOSE) {
                this.forgetUnnamed()
              } else if (!this.unnamedHere) {
                if (pos > runStart) pieces.push(data.subarray(runStart, pos))
                this.restoreUnnamed()
                runStart = pos
              }
            }
            this.expect(type === DESCRIBE ? Expect.Describe : Expect.Close, undefined)
            break
          }
          if (pos > runStart) pieces.push(data.subarray(runStart, pos))
          if (type === DESCRIBE) {
            this.use(server, data, pos, pos + 6, nameEnd, next, Expect.Describe)
            if (this.retryState === RETRY_WATCH && keepFrom < 0) keepFrom = pos
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
    if (keepFrom >= 0 && this.retryState !== RETRY_NONE) this.keep(data.subarray(keepFrom, keepTo))
    let ok: boolean
    if (runStart === 0 && pieces.length === 0) {
      ok = server.write(data)
    } else if (pieces.length === 0 && runStart >= end) {
      ok = true // every message was answered by the pooler (a Parse the server already has)
    } else {
      if (end > runStart) pieces.push(runStart === 0 ? data : data.subarray(runStart, end))
      const socket = server.socket
      socket.cork()
      ok = true
      for (let i = 0; i < pieces.length; i++) ok = socket.write(pieces[i]!)
      socket.uncork()
      pieces.length = 0
    }
    return ok
  }

  /**
   * The client's unnamed statement lives on whichever server ran its Parse, and dies with a simple
   * Query, a Close of it or the next unnamed Parse. A Bind or Describe of it in a later transaction
   * may land on another server, which holds another client's unnamed statement or none: the
   * client's Parse is sent there first (its ParseComplete swallowed), or, when the client has none,
   * a Close of the unnamed statement, so the server fails as PostgreSQL would for this client.
   * The Parse is kept by reference (the relay owns its chunks), copied only out of a large chunk.
   */
  private keepUnnamed(data: Buffer, pos: number, next: number): void {
    this.unnamedHere = true
    if (next > data.length) {
      this.unnamedChunk = undefined // streamed: too large to keep (docs/prepared-statements.md, limits)
    } else if (data.length > 4096) {
      this.unnamedChunk = Buffer.from(data.subarray(pos, next))
      this.unnamedAt = 0
      this.unnamedEnd = next - pos
    } else {
      this.unnamedChunk = data
      this.unnamedAt = pos
      this.unnamedEnd = next
    }
  }

  private forgetUnnamed(): void {
    this.unnamedChunk = undefined
    this.unnamedHere = true
  }

  private restoreUnnamed(): void {
    const chunk = this.unnamedChunk
    if (chunk !== undefined) {
      this.pieces.push(chunk.subarray(this.unnamedAt, this.unnamedEnd))
      this.expect(Expect.HiddenParse, UNNAMED)
    } else {
      this.pieces.push(CLOSE_UNNAMED)
      this.expect(Expect.HiddenClose, UNNAMED)
    }
    this.unnamedHere = true
  }

  /** Keeps a copy of client bytes of an exchange that may run again; gives up beyond `RETRY_MAX_BYTES`. */
  private keep(bytes: Buffer): void {
    this.retryBytes += bytes.length
    if (this.retryBytes > RETRY_MAX_BYTES) this.cancelRetry()
    else this.retryKept.push(Buffer.from(bytes))
  }

  private cancelRetry(): void {
    this.retryState = RETRY_NONE
    this.retrySeq = -1
    this.retryKept.length = 0
    this.retryBytes = 0
  }

  private parse(server: ServerConnection, data: Buffer, pos: number, nameEnd: number, next: number): void {
    const name = data.toString("utf8", pos + 5, nameEnd)
    const refusal = this.refusal(name, next - pos)
    if (refusal !== undefined) {
      this.fail(refusal)
      return
    }
    const statement = this.register(name, data, pos, nameEnd, next)
    if (this.isCurrentOn(server, statement.serverName)) {
      this.expect(Expect.SyntheticParse, statement)
    } else {
      this.prepareOn(server, statement, false)
    }
  }

  /** Why a Parse of `name` (`bytes` long) is refused, if it is. */
  private refusal(name: string, bytes: number) {
    return this.statements.has(name)
      ? tidepoolError("EPREPAREDDUP", name)
      : this.statements.size >= this.options.maxCount
        ? tidepoolError("EMAXPREPARED", this.options.maxCount)
        : this.memory + bytes > this.options.maxMemory
          ? tidepoolError("EMAXPREPAREDMEM", formatBytes(this.options.maxMemory))
          : undefined
  }

  /** The server-side name of the Parse at `nameEnd` (the end of its client-side name). */
  private serverNameOf(data: Buffer, nameEnd: number, next: number): string {
    // Query text, parameter types, and the settings that decide how the text is read: its identity.
    const hash = createHash("sha256").update(data.subarray(nameEnd + 1, next))
    for (const setting of PARSE_SETTINGS) hash.update(`\0${setting}=${this.settings.get(setting) ?? ""}`)
    return `tp_${hash.digest("hex").slice(0, 40)}`
  }

  /** Records the client's statement from its Parse message at [`pos`, `next`). */
  private register(
    name: string,
    data: Buffer,
    pos: number,
    nameEnd: number,
    next: number,
    serverName?: string
  ): Statement {
    const bytes = next - pos
    const server = serverName ?? this.serverNameOf(data, nameEnd, next)
    const serverNameBytes = Buffer.byteLength(server)
    const parse = Buffer.allocUnsafe(next - nameEnd + 5 + serverNameBytes)
    parse[0] = PARSE
    parse.writeInt32BE(parse.length - 1, 1)
    parse.write(server, 5)
    data.copy(parse, 5 + serverNameBytes, nameEnd, next)
    const statement: Statement = {
      name,
      serverName: server,
      serverNameZ: Buffer.from(`${server}\0`),
      parse,
      bytes,
      parsedAt: this.pool.statements.tick(),
      usedAt: -1
    }
    this.statements.set(name, statement)
    this.memory += bytes
    return statement
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
    const names = this.aloneNames
    names.length = 0
    let count = this.statements.size
    let memory = this.memory
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
        if (this.statements.has(name) || names.includes(name)) return -1
        const serverName = this.serverNameOf(data, nameEnd, next)
        if (!this.pool.statements.isParsed(serverName)) return -1
        count++
        memory += next - pos
        if (count > this.options.maxCount || memory > this.options.maxMemory) return -1
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
        this.register(names[parsed]!, data, pos, nameEnd, next, names[parsed + 1]!)
        parsed += 2
        at += PARSE_COMPLETE_MESSAGE.copy(reply, at)
      } else if (type === CLOSE) {
        const statement = this.statements.get(data.toString("utf8", pos + 6, cstringEnd(data, pos + 6, next)))
        if (statement !== undefined) this.forget(statement)
        at += CLOSE_COMPLETE_MESSAGE.copy(reply, at)
      } else if (type === SYNC) {
        at += READY_IDLE.copy(reply, at)
      }
      pos = next
    }
    names.length = 0
    return this.client.write(reply) ? 1 : 0
  }

  /** Scratch for `answerAlone`: client name, server-side name, per Parse. */
  private readonly aloneNames: Array<string> = []

  /** Bind or Describe of a client statement: make sure the server has it, then use its server-side name. */
  private use(
    server: ServerConnection,
    data: Buffer,
    pos: number,
    nameStart: number,
    nameEnd: number,
    next: number,
    kind: Expect.Bind | Expect.Describe
  ): void {
    const name = data.toString("utf8", nameStart, nameEnd)
    const statement = this.statements.get(name)
    if (statement === undefined) {
      // Passed as is: it may be a SQL-level PREPAREd statement of this (pinned) client; if not, the
      // server's "does not exist" comes back as ours.
      this.pieces.push(data.subarray(pos, next))
      this.expect(
        kind === Expect.Bind ? Expect.UnknownBind : Expect.UnknownDescribe,
        renderErrorResponse(tidepoolError("EPREPAREDNOTFOUND", name))
      )
      return
    }
    const registry = this.pool.statements
    if (statement.usedAt >= 0 && registry.staleSince(statement.serverName, statement.usedAt)) {
      // Its result type changed after this client last used it: on its own connection PostgreSQL
      // would refuse it too. Once: from now on the client gets the statement as it is now.
      statement.usedAt = registry.now
      this.pieces.push(DESCRIBE_MISSING)
      this.expect(Expect.Fail, STALE_PLAN)
      return
    }
    const stamp = server.statements.get(statement.serverName)
    if (stamp === undefined || !this.isCurrentOn(server, statement.serverName)) {
      this.prepareOn(server, statement, true)
    } else if (statement.usedAt < 0 && stamp < statement.parsedAt && this.retryState === RETRY_NONE) {
      this.watchFirstUse(server)
    }
    // The message with the server-side name: a new header, then slices (parameters are not copied).
    const header = Buffer.allocUnsafe(5)
    header[0] = data[pos]!
    header.writeInt32BE(next - pos - 1 - (nameEnd + 1 - nameStart) + statement.serverNameZ.length, 1)
    const pieces = this.pieces
    pieces.push(header)
    if (nameStart > pos + 5) pieces.push(data.subarray(pos + 5, nameStart))
    pieces.push(statement.serverNameZ)
    if (next > nameEnd + 1) pieces.push(data.subarray(nameEnd + 1, next))
    if (this.retryState === RETRY_WATCH && this.retrySeq < 0) this.retrySeq = this.pushed
    this.expect(kind, statement)
  }

  /**
   * The first use of a statement by this client lands on a copy prepared before the client's Parse:
   * if the objects it names changed in between, the server reports `cached plan must not change
   * result type`, which PostgreSQL would not have said to this client (its Parse came after the
   * change). When this Bind or Describe opens its exchange with no transaction open, the exchange
   * can be run again on a fresh copy: `write` keeps its bytes until its Sync (see `retry`).
   */
  private watchFirstUse(server: ServerConnection): void {
    if (server.txStatus !== IDLE || this.retrying) return
    for (let i = 0; i < this.count; i++) {
      const kind = this.kinds[(this.head + i) & (this.kinds.length - 1)]!
      if (kind !== Expect.SyntheticParse && kind !== Expect.SyntheticClose) return
    }
    this.retryState = RETRY_WATCH
    this.retrySeq = -1
  }

  private close(name: string, message: Buffer): void {
    const statement = this.statements.get(name)
    if (statement === undefined && this.sqlPrepared > 0) {
      // Perhaps a SQL-level PREPAREd statement of this pinned client: the server must close it.
      this.pieces.push(message)
      this.expect(Expect.Close, undefined)
      return
    }
    if (statement !== undefined) this.forget(statement)
    // The server keeps it for other clients (and the cache evicts it in time); a Close of an unknown
    // name is no error in PostgreSQL either. Undone if the server skips it (an earlier error).
    this.expect(Expect.SyntheticClose, statement)
  }

  /** Whether `server` holds the statement, prepared since its plan last went stale; touches the LRU. */
  private isCurrentOn(server: ServerConnection, serverName: string): boolean {
    const stamp = server.statements.get(serverName)
    if (stamp === undefined || !this.pool.statements.isCurrent(serverName, stamp)) return false
    server.statements.delete(serverName)
    server.statements.set(serverName, stamp)
    return true
  }

  /** Sends the statement's Parse to a server lacking it (closing a stale copy and evicting as needed). */
  private prepareOn(server: ServerConnection, statement: Statement, hidden: boolean): void {
    const cache = server.statements
    const serverName = statement.serverName
    const counters = this.pool.counters
    if (cache.delete(serverName)) this.hiddenClose(serverName)
    while (cache.size >= this.options.cacheSize) {
      const oldest = cache.keys().next().value as string
      cache.delete(oldest)
      this.hiddenClose(oldest)
      counters.statementsEvicted++
    }
    this.pieces.push(statement.parse)
    this.expect(hidden ? Expect.HiddenParse : Expect.Parse, hidden ? serverName : statement)
    cache.set(serverName, this.pool.statements.tick())
    if (hidden) counters.statementsReprepared++
    else counters.statementsPrepared++
  }

  private hiddenClose(serverName: string): void {
    this.pieces.push(closeStatement(serverName))
    this.expect(Expect.HiddenClose, serverName)
  }

  /** Answers the current request with `error`, making the server fail in its place so its state matches. */
  private fail(error: ReturnType<typeof tidepoolError>): void {
    this.pieces.push(DESCRIBE_MISSING)
    this.expect(Expect.Fail, renderErrorResponse(error))
  }

  private forget(statement: Statement): void {
    if (this.statements.get(statement.name) !== statement) return
    this.statements.delete(statement.name)
    this.memory -= statement.bytes
  }

  private expect(kind: Expect, ref: unknown): void {
    if (this.count === this.kinds.length) this.grow()
    const i = (this.head + this.count) & (this.kinds.length - 1)
    this.kinds[i] = kind
    this.refs[i] = ref
    this.count++
    this.pushed++
  }

  private grow(): void {
    const size = this.kinds.length
    const kinds = new Uint8Array(size * 2)
    const refs: Array<unknown> = new Array(size * 2)
    for (let i = 0; i < size; i++) {
      kinds[i] = this.kinds[(this.head + i) & (size - 1)]!
      refs[i] = this.refs[(this.head + i) & (size - 1)]
    }
    this.kinds = kinds
    this.refs = refs
    this.head = 0
  }

  private get headKind(): number {
    return this.count === 0 ? 0 : this.kinds[this.head]!
  }

  private get headRef(): unknown {
    return this.refs[this.head]
  }

  private shift(): void {
    this.refs[this.head] = undefined
    this.head = (this.head + 1) & (this.kinds.length - 1)
    this.count--
    this.shifted++
  }

  // ---- server → client ------------------------------------------------------------------------

  private readonly onServerMessage: ServerObserver = (type, length, body, bodyStart, start, end) => {
    const kind = this.headKind
    let drop = false
    /** The dropped message is kept (`params`) to be written later. */
    let capture = false
    /** The kept ParameterDescription goes out before this message. */
    let prefix = false
    let replacement: Buffer | undefined
    switch (type) {
      case PARSE_COMPLETE:
        if (kind === Expect.HiddenParse) {
          drop = true
          if (this.headRef !== UNNAMED) this.pool.statements.markParsed(this.headRef as string)
        } else if (kind === Expect.Parse && this.headRef !== undefined) {
          this.pool.statements.markParsed((this.headRef as Statement).serverName)
        }
        if (kind === Expect.HiddenParse || kind === Expect.Parse) this.shift()
        break
      case CLOSE_COMPLETE:
        if (kind === Expect.HiddenClose) drop = true
        if (kind === Expect.HiddenClose || kind === Expect.Close) this.shift()
        break
      case BIND_COMPLETE:
        if (kind === Expect.Bind) this.used()
        else if (kind === Expect.UnknownBind) this.shift()
        break
      case PARAMETER_DESCRIPTION:
        // A Describe that may run again answers twice if it fails after this: held until it succeeds.
        if (kind === Expect.Describe && this.retrySeq === this.shifted && this.retryState !== RETRY_NONE) {
          drop = true
          capture = true
          this.paramsWanted = true
        }
        break
      case ROW_DESCRIPTION:
      case NO_DATA:
        if (kind === Expect.Describe) {
          prefix = this.paramsWanted
          this.used()
        } else if (kind === Expect.UnknownDescribe) {
          this.shift()
        }
        break
      case COMMAND_COMPLETE:
        this.onTag(body!, bodyStart, length)
        if (kind === Expect.Execute) this.shift()
        break
      case EMPTY_QUERY:
      case PORTAL_SUSPENDED:
        if (kind === Expect.Execute) this.shift()
        break
      case COPY_IN:
        this.enterCopyIn()
        break
      case ERROR: {
        const ref = this.headRef
        replacement = this.onError(kind) ?? this.clientNamed(kind, ref, body!, bodyStart, length)
        drop = replacement !== undefined
        break
      }
      case READY:
        while (this.count > 0) {
          const k = this.headKind
          this.shift()
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
    if (prefix) this.insert(Math.max(start, 0), PARAMS_MARK)
    const withheld = this.withheld
    if (start < 0 && withheld.length > 0) {
      if (capture) this.params = Buffer.concat(withheld)
      else if (!drop) for (let i = 0; i < withheld.length; i++) this.insert(0, withheld[i]!)
      withheld.length = 0
    }
    if (drop) {
      this.opAt.push(Math.max(start, 0))
      this.opEnd.push(end)
      this.opBuf.push(capture ? PARAMS_MARK : undefined)
    }
    if (replacement !== undefined) this.insert(end, replacement)
    this.settle(end)
  }

  /** The client's Bind or Describe at the head succeeded: it has seen the statement's result type. */
  private used(): void {
    const statement = this.headRef as Statement | undefined
    if (statement !== undefined) statement.usedAt = this.pool.statements.now
    if (this.retrySeq === this.shifted) this.cancelRetry()
    this.shift()
  }

  /**
   * An error about a renamed statement names it as the client does (`bind message supplies 0
   * parameters, but prepared statement "q" requires 1`): the pooler's `tp_…` names stay internal.
   */
  private clientNamed(kind: number, ref: unknown, body: Buffer, start: number, length: number): Buffer | undefined {
    if ((kind !== Expect.Bind && kind !== Expect.Describe && kind !== Expect.Parse) || ref === undefined) {
      return undefined
    }
    const statement = ref as Statement
    const text = body.toString("utf8", start, start + length)
    if (!text.includes(statement.serverName)) return undefined
    const fields = Buffer.from(text.replaceAll(statement.serverName, statement.name), "utf8")
    const message = Buffer.allocUnsafe(5 + fields.length)
    message[0] = ERROR
    message.writeInt32BE(4 + fields.length, 1)
    fields.copy(message, 5)
    return message
  }

  /** An ErrorResponse: returns the pooler's own error to send in its place, if any. */
  private onError(kind: number): Buffer | undefined {
    // A COPY that fails ends its data: the client's later Syncs count again.
    this.copyIn = false
    if (kind === 0 || kind === Expect.Query || kind === Expect.Sync) return undefined
    const server = this.server!
    const ref = this.headRef
    const code = server.lastErrorCode
    let replacement: Buffer | undefined
    if (kind === Expect.Fail) replacement = ref as Buffer
    else if ((kind === Expect.UnknownBind || kind === Expect.UnknownDescribe) && code === "26000") {
      replacement = ref as Buffer
    } else if ((kind === Expect.Bind || kind === Expect.Describe) && ref !== undefined) {
      const statement = ref as Statement
      const serverName = statement.serverName
      if (code === "0A000") {
        // `cached plan must not change result type` (matched by SQLSTATE: the text may be translated):
        // stale everywhere in the pool, so every server re-prepares it before its next use.
        const stamp = server.statements.get(serverName)
        if (stamp !== undefined && this.pool.statements.isCurrent(serverName, stamp)) {
          this.pool.statements.markStale(serverName)
        }
        if (this.retrySeq === this.shifted && this.retryState !== RETRY_NONE && this.streamRemaining === 0) {
          this.retry(server, statement)
          return EMPTY
        }
        // The client sees the error: it has seen the statement's new result type by now.
        statement.usedAt = this.pool.statements.now
      } else if (code === "26000") {
        // The server lost it behind the pooler's back (SQL DEALLOCATE, DISCARD in a function), or
        // never had it: a hidden Parse earlier in the pipeline met an aborted transaction. Prepared
        // again at the next use. PostgreSQL looks a statement up before it checks for an aborted
        // transaction; this client has the statement, so on its own connection it would get 25P02.
        server.statements.delete(serverName)
        if (server.txStatus === FAILED) replacement = ABORTED
      }
    } else if ((kind === Expect.Parse || kind === Expect.HiddenParse) && code === "42P05") {
      // The server has it though the pooler thought not: closed and prepared again at the next use.
      const serverName = kind === Expect.Parse ? (ref as Statement | undefined)?.serverName : (ref as string)
      if (serverName !== undefined && serverName !== UNNAMED) {
        this.undo(kind, ref)
        this.shift()
        server.statements.set(serverName, -1)
        this.skipping = true
        return undefined
      }
    }
    // The watched request failed otherwise: nothing to run again.
    if (this.retrySeq === this.shifted) this.cancelRetry()
    if (kind === Expect.Parse && ref !== undefined) this.pool.statements.forgetParsed((ref as Statement).serverName)
    else if (kind === Expect.HiddenParse && ref !== UNNAMED) this.pool.statements.forgetParsed(ref as string)
    this.undo(kind, ref)
    this.shift()
    this.skipping = true
    return replacement
  }

  /**
   * Runs the watched exchange (see `watchFirstUse`) again on a fresh copy of its statement, in place
   * of the error its first request got: the server skips the rest of the exchange up to a Sync whose
   * ReadyForQuery is the pooler's (the client's own Sync, or one of ours when the client has not sent
   * it yet), then the statement is prepared again and the client's bytes are written once more.
   */
  private retry(server: ServerConnection, statement: Statement): void {
    const kept = this.retryKept.splice(0)
    this.params = undefined
    this.paramsWanted = false
    const ready = this.retryState === RETRY_READY
    this.cancelRetry()
    this.shift()
    this.skipping = true
    if (ready) {
      const mask = this.kinds.length - 1
      for (let i = 0; i < this.count; i++) {
        const at = (this.head + i) & mask
        if (this.kinds[at] === Expect.Sync) {
          this.kinds[at] = Expect.HiddenSync
          break
        }
      }
    } else {
      this.expect(Expect.HiddenSync, undefined)
    }
    // Closed and prepared again before the Bind or Describe that is written again below.
    server.statements.set(statement.serverName, -1)
    server.pending++
    if (!ready) server.write(SYNC_MESSAGE)
    this.retrying = true
    for (const bytes of kept) this.rewrite(server, bytes)
    this.retrying = false
    this.pool.counters.statementsReprepared++
  }

  /** A request the server did not carry out (it failed, or was skipped after an error). */
  private undo(kind: number, ref: unknown): void {
    const cache = this.server!.statements
    switch (kind) {
      case Expect.Parse:
        if (ref !== undefined) {
          const statement = ref as Statement
          // A stale copy may still be there (its Close may have been skipped too): closed before reuse.
          if (cache.has(statement.serverName)) cache.set(statement.serverName, -1)
          this.forget(statement)
        }
        break
      case Expect.SyntheticParse:
        this.forget(ref as Statement)
        break
      case Expect.HiddenParse:
        if (cache.has(ref as string)) cache.set(ref as string, -1)
        break
      case Expect.HiddenClose:
        // The server may still hold it: closed again before any new Parse of that name.
        if (ref !== UNNAMED) cache.set(ref as string, -1)
        break
      case Expect.SyntheticClose: {
        // The Close did not happen: the statement is the client's again, unless the name was reused.
        const statement = ref as Statement | undefined
        if (statement !== undefined && !this.statements.has(statement.name)) {
          this.statements.set(statement.name, statement)
          this.memory += statement.bytes
        }
        break
      }
    }
  }

  /**
   * CopyInResponse: until the client ends the data (CopyDone/CopyFail) PostgreSQL ignores Sync, so
   * Syncs already sent in that stretch expect no ReadyForQuery, and neither will the ones to come.
   */
  private enterCopyIn(): void {
    const server = this.server!
    const size = this.kinds.length
    let ended = false
    let kept = 1
    let dropped = 0
    let concluded = false
    // Keep the head (the COPY's Execute or Query); drop Syncs up to the first CopyEnd.
    for (let i = 1; i < this.count; i++) {
      const at = (this.head + i) & (size - 1)
      const kind = this.kinds[at]!
      if (!ended && kind === Expect.Sync) {
        server.pending--
        dropped++
        continue
      }
      if (kind === Expect.CopyEnd) ended = true
      else if (ended && (kind === Expect.Sync || kind === Expect.Query)) concluded = true
      const to = (this.head + kept) & (size - 1)
      this.kinds[to] = kind
      this.refs[to] = this.refs[at]
      kept++
    }
    for (let i = kept; i < this.count; i++) this.refs[(this.head + i) & (size - 1)] = undefined
    this.count = kept
    this.pushed -= dropped
    this.copyIn = !ended
    if (dropped > 0) {
      this.cancelRetry()
      // The Sync that seemed to end the exchange did not: until one the client sends after its
      // CopyDone, the server is mid-exchange and must stay with this client.
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
    while (this.count > 0) {
      const kind = this.headKind
      if (this.skipping) {
        if (kind === Expect.Sync || kind === Expect.Query || kind === Expect.HiddenSync) return
        this.undo(kind, this.headRef)
      } else if (kind === Expect.SyntheticParse || kind === Expect.SyntheticClose) {
        const message = kind === Expect.SyntheticParse ? PARSE_COMPLETE_MESSAGE : CLOSE_COMPLETE_MESSAGE
        if (at < 0) this.client.write(message)
        else this.insert(at, message)
      } else if (kind !== Expect.CopyEnd) {
        return
      }
      this.shift()
    }
  }

  /**
   * After a server chunk: made-up replies that reached the head while a reply was half received (a
   * silent settings reply, say) go out now, so a client waiting after Flush is not left waiting.
   */
  settleAfter(server: ServerConnection): void {
    if (this.count > 0 && server.atBoundary && this.withheld.length === 0) this.settle(-1)
  }

  private insert(at: number, message: Buffer): void {
    this.opAt.push(at)
    this.opEnd.push(-1)
    this.opBuf.push(message)
  }

  private onTag(body: Buffer, start: number, length: number): void {
    const first = body[start]
    if (first === 0x50) {
      if (isTag(body, start, length, TAG_PREPARE)) this.sqlPrepared++
    } else if (first === 0x44) {
      if (isTag(body, start, length, TAG_DEALLOCATE)) {
        if (this.sqlPrepared > 0) this.sqlPrepared--
      } else if (isTag(body, start, length, TAG_DEALLOCATE_ALL) || isTag(body, start, length, TAG_DISCARD_ALL)) {
        this.sqlPrepared = 0
        this.statements.clear()
        this.memory = 0
        this.server!.statements.clear()
      }
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
    const server = this.server!
    const client = this.client
    let limit = chunk.length
    const incomplete = server.incompleteType
    if (
      incomplete === PARSE_COMPLETE ||
      incomplete === CLOSE_COMPLETE ||
      incomplete === ERROR ||
      ((this.retryState !== RETRY_NONE || this.paramsWanted) &&
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
      if (buf === PARAMS_MARK) {
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
    opAt.length = 0
    opEnd.length = 0
    opBuf.length = 0
    return ok
  }
}
