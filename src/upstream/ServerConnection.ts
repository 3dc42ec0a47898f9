import { Buffer } from "node:buffer"
import * as net from "node:net"
import { Effect, Exit, Queue, Redacted } from "effect"
import { serialize } from "pg-protocol"
import { type TidepoolError, tidepoolError, upstreamError } from "../errors/index.ts"
import {
  Backend,
  cancelRequest,
  decodeAuthentication,
  decodeBackendKeyData,
  decodeErrorFields,
  decodeParameterStatus,
  MessageScanner,
  md5Password,
  ProtocolError,
  ScramClient,
  type ScramClientCredentials,
  type ScramKeys,
  startupMessage
} from "../protocol/index.ts"
import { ReadBuffer } from "./ReadBuffer.ts"
import { startTls, type UpstreamTlsOptions } from "./startTls.ts"

export type { UpstreamTlsOptions } from "./startTls.ts"

/** Where and as whom a server connection logs in. */
export interface UpstreamTarget {
  readonly host: string
  readonly port: number
  readonly database: string
  readonly user: string
  readonly password: Redacted.Redacted<string> | undefined
  /**
   * SCRAM pass-through (auth_query users): the current ClientKey (and ServerKey) to log in with
   * instead of a password, read at each login so new servers use the latest key. `rejected` hears
   * of a 28P01 answer to it (the password changed upstream).
   */
  readonly scramKeys?: () => PassthroughKeys | undefined
  readonly connectTimeoutMs: number
  /** undefined: plaintext. */
  readonly tls?: UpstreamTlsOptions | undefined
}

/**
 * Sees every message of the client's replies (not the pooler's silent ones) but DataRow — the bulk
 * of most replies, which no observer needs — before the chunk holding it reaches
 * `ServerHandler.onData`. Offsets are relative to that chunk; `start` is -1 for a message that began
 * in an earlier chunk. Bodies of ErrorResponse and CommandComplete are inspected.
 */
export type ServerObserver = (
  type: number,
  length: number,
  body: Buffer | undefined,
  bodyStart: number,
  start: number,
  end: number
) => void

export type PassthroughKeys = Extract<ScramClientCredentials, { readonly clientKey: Buffer }> & {
  readonly rejected?: () => void
}

/** How a connection is used; the pool's servers never keep row bodies. */
export interface ConnectOptions {
  /** Keep DataRow and RowDescription bodies, for `query` (control-plane connections only). */
  readonly rows?: boolean
}

/** What the relay currently serving a client wants to hear from this server. */
export interface ServerHandler {
  /** Called once per chunk, after the chunk has been scanned (status, parameters are up to date). */
  readonly onData: (chunk: Buffer) => void
  readonly onClose: (reason: string) => void
  /**
   * An exception in the pooler's own code while this chunk was handled (the observer's, say): the
   * server is already destroyed; the holder ends what it was doing. Without it, `onClose` follows.
   */
  readonly onFault?: (cause: unknown) => void
}

interface LoginMessage {
  readonly type: number
  readonly body: Buffer
}

const {
  ReadyForQuery: Z,
  ParameterStatus: S,
  ErrorResponse: E,
  BackendKeyData: K,
  Authentication: R,
  DataRow: D,
  RowDescription: T,
  NotificationResponse: A
} = Backend

let nextId = 1
const EMPTY = Buffer.alloc(0)

/**
 * One upstream socket, logged in. It tracks only what a pooler must know to lend it safely: the
 * transaction status of the last ReadyForQuery, how many ReadyForQuery messages are still owed, and
 * the parameters the server reported. Who reads its bytes is decided by `handler` (a relay, the
 * pool's idle watch, or a control-plane query), so one scanner serves every phase.
 */
export class ServerConnection {
  /**
   * Whether a failed `connect` is worth trying again soon: the database could not be reached, or is
   * starting, stopping or out of connections. Anything else (an unknown database, a wrong password, a
   * TLS or authentication mismatch) would fail the same way on every attempt.
   */
  static isTransient(error: TidepoolError): boolean {
    return UNREACHABLE in error || (error.code === "ECHECKOUTFAILED" && TRANSIENT_SQLSTATES.has(error.sqlstate))
  }

  readonly id = nextId++
  readonly parameters = new Map<string, string>()
  /**
   * What this session's settings are, as far as the pooler knows, by lower-cased name: every value the
   * server reported, plus what the pooler applied itself (settings PostgreSQL does not report).
   */
  readonly settings = new Map<string, string>()
  /** Settings in `settings` that the pooler applied and PostgreSQL does not report. */
  readonly unreported = new Set<string>()
  /** Bumped on every ParameterStatus: a relay compares it to learn whether its client changed a setting. */
  parameterChanges = 0
  /**
   * The client settings (as a `settingsKey`) this session was last brought in line with; cleared
   * whenever its settings change. Lets a relay skip comparing settings when they cannot differ.
   */
  syncedTo: string | undefined = undefined
  /** ReadyForQuery messages whose replies belong to the pooler, not the client (see `sendSilently`). */
  private silent = 0
  /** Offset in the current chunk where the client's bytes resume after a silent reply, or -1. */
  private silentEnd = -1
  /** The server refused a silent query: the client's settings could not be restored. */
  private silentError: string | undefined = undefined
  /** CancelRequests sent for this server and not yet answered; the pool holds it back meanwhile. */
  cancelsInFlight = 0
  /** Set by the pool when it held this server back for in-flight cancels. */
  onCancelsDone: (() => void) | undefined = undefined
  backendPid = 0
  backendSecret: Buffer = Buffer.alloc(0)
  /** Transaction status byte of the last ReadyForQuery: I, T or E. */
  txStatus = 0x49
  /** ReadyForQuery messages owed for Query/Sync/FunctionCall messages sent. */
  pending = 0
  /**
   * An extended-protocol batch was sent without its Sync (session mode keeps this; transaction mode
   * tracks it in its relay). Such a server ignores everything until a Sync: it cannot be reset.
   */
  inBatch = false
  /** The backend said FATAL (terminated, shutting down): it is exiting, and is never to be lent again. */
  terminating = false
  /**
   * Set for transaction-mode servers: a FATAL that arrives between transactions (PostgreSQL ending an
   * idle backend) is kept from the relay, even in the chunk that ends the last client's reply — that
   * client's transaction is over, and the FATAL would only tell it that its connection ended.
   */
  withholdBetweenTransactions = false
  /** Offset in the current chunk where withheld bytes start, or -1. */
  private withheldFrom = -1
  /** The rows of the silent `probe` in flight and what to call with them at its ReadyForQuery. */
  private probeRows: Array<Array<string | null>> | undefined = undefined
  private probeDone: ((rows: ReadonlyArray<ReadonlyArray<string | null>>) => void) | undefined = undefined
  /**
   * Called with every NotificationResponse ('A') this server sends, silent phases included (the
   * body is a view, valid during the call). A transaction-mode relay uses it while it moves a
   * client's LISTENs off this server (docs/session-state.md#listen-and-notify).
   */
  onNotification: ((body: Buffer, start: number, length: number, silent: boolean) => void) | undefined = undefined
  /** SQLSTATE and message of the last ErrorResponse seen, for reporting a loss mid-transaction. */
  lastErrorCode: string | undefined = undefined
  lastErrorMessage: string | undefined = undefined
  /**
   * Named statements the pooler prepared on this session (transaction mode), by server-side name, in
   * least-recently-used order, with the pool's statement epoch at which each was prepared.
   */
  readonly statements = new Map<string, number>()
  observer: ServerObserver | undefined = undefined
  /** Where the chunk handed to `onData` starts in the socket's chunk (after a silent reply). */
  private base = 0
  readonly createdAt = Date.now()
  lastUsedAt = Date.now()
  closed = false
  closeReason = ""
  handler: ServerHandler | undefined = undefined
  /** The owning pool's handler for while this server sits idle; made once, reused at every release. */
  idleHandler: ServerHandler | undefined = undefined
  private loginSink: ((m: LoginMessage) => void) | undefined = undefined
  private readonly scanner: MessageScanner
  /** Whether DataRow bodies are read outside probes (`{ rows: true }` connections). */
  private readonly rowsInspected: boolean

  /**
   * @param reads the socket's own `ReadBuffer` when it was opened with one (plaintext): the chunks
   *   handed to `onData` are then views of it (see `writeChunk`). Otherwise 'data' events.
   */
  constructor(
    readonly socket: net.Socket,
    readonly target: UpstreamTarget,
    options: ConnectOptions = {},
    readonly reads?: ReadBuffer
  ) {
    this.rowsInspected = options.rows === true
    this.scanner = new MessageScanner(this.onMessage, {
      maxMessageSize: 0,
      inspect: options.rows === true ? "ZSEKRCDTA" : "ZSEKRCA"
    })
    if (reads !== undefined) reads.sink = this.onSocketData
    else socket.on("data", this.onSocketData)
    socket.on("close", this.onSocketClose)
    socket.on("error", this.onSocketError)
  }

  private readonly onMessage = (type: number, length: number, body: Buffer | undefined, start: number): void => {
    const silent = this.silent > 0
    if (type === Z) {
      this.txStatus = body![start]!
      if (this.pending > 0) this.pending--
      if (this.silent > 0 && --this.silent === 0) {
        this.silentEnd = this.scanner.messageEnd
        this.base = this.silentEnd
        const done = this.probeDone
        if (done !== undefined) {
          const rows = this.probeRows!
          this.probeDone = undefined
          this.probeRows = undefined
          this.scanner.setInspected(D, this.rowsInspected)
          if (this.silentError === undefined) done(rows)
        }
      }
    } else if (type === D) {
      if (this.probeRows !== undefined && silent)
        this.probeRows.push(decodeDataRow(body!.subarray(start, start + length)))
    } else if (type === A) {
      this.onNotification?.(body!, start, length, silent)
    } else if (type === S) {
      const [name, value] = decodeParameterStatus(body!, start, start + length)
      this.parameters.set(name, value)
      this.settings.set(name.toLowerCase(), value)
      this.parameterChanges++
      this.syncedTo = undefined
    } else if (type === E) {
      const fields = decodeErrorFields(body!, start, start + length)
      this.lastErrorCode = fields.C
      this.lastErrorMessage = fields.M
      if (this.silent > 0) this.silentError ??= fields.M ?? "error"
      const severity = fields.V ?? fields.S
      if (severity === "FATAL" || severity === "PANIC") {
        this.terminating = true
        if (
          this.withholdBetweenTransactions &&
          !silent &&
          this.loginSink === undefined &&
          this.pending === 0 &&
          this.txStatus === 0x49 &&
          this.scanner.messageStart >= 0
        ) {
          this.withheldFrom = this.scanner.messageStart
          return
        }
      }
    }
    const observer = this.observer
    if (observer !== undefined && !silent && type !== D) {
      const scanner = this.scanner
      const base = this.base
      observer(
        type,
        length,
        body,
        start,
        scanner.messageStart < 0 ? -1 : scanner.messageStart - base,
        scanner.messageEnd - base
      )
    }
    if (this.loginSink !== undefined) {
      this.loginSink({
        type,
        body: Buffer.from(body === undefined ? Buffer.alloc(0) : body.subarray(start, start + length))
      })
    }
  }

  // Guarded: an exception of ours (in the observer, say) destroys this server and tells its holder,
  // never the process (docs/operations.md, containment).
  private readonly onSocketData = (chunk: Buffer): void => {
    try {
      this.socketData(chunk)
    } catch (cause) {
      const handler = this.handler
      this.destroy("internal error in the pooler while reading from the server")
      handler?.onFault?.(cause)
    }
  }

  private socketData(chunk: Buffer): void {
    const silentBefore = this.silent
    this.silentEnd = -1
    this.withheldFrom = -1
    this.base = 0
    const err = this.scanner.feed(chunk)
    if (err !== undefined) {
      this.destroy(`invalid data from server: ${err.message}`)
      return
    }
    if (this.silentError !== undefined) {
      // Running the client's transaction with another client's settings is never an option.
      this.destroy(`could not restore the client's settings: ${this.silentError}`)
      return
    }
    if (silentBefore === 0) {
      const cut = this.withheldFrom
      // An empty chunk still tells the holder something arrived (the pool's idle watch closes the server).
      this.handler?.onData(cut < 0 ? chunk : cut > 0 ? chunk.subarray(0, cut) : EMPTY)
    } else if (this.silentEnd >= 0) {
      // Even when the silent reply ends the chunk, the relay hears of it: it may be releasable now.
      this.handler?.onData(this.silentEnd < chunk.length ? chunk.subarray(this.silentEnd) : EMPTY)
    }
  }

  /**
   * Sends a simple query whose whole reply (rows, notices, ParameterStatus, ReadyForQuery) is kept
   * from the relay's handler; the relay's next bytes follow it in order. Used to re-apply a client's
   * settings before its transaction. Settings the query changes are tracked as usual.
   */
  sendSilently(sql: string): void {
    this.pending++
    this.silent++
    this.socket.write(serialize.query(sql))
  }

  /**
   * A silent query whose rows the pooler reads: `done` gets them when its ReadyForQuery arrives
   * (not if it failed: a failed silent query closes the server, as for `sendSilently`). Only one at
   * a time, and only when no other silent reply is owed, so the rows are this query's.
   */
  probe(sql: string, done: (rows: ReadonlyArray<ReadonlyArray<string | null>>) => void): void {
    if (this.silent > 0 || this.probeDone !== undefined) throw new Error("probe while a silent reply is owed")
    this.probeRows = []
    this.probeDone = done
    this.scanner.setInspected(D, true)
    this.sendSilently(sql)
  }

  private readonly onSocketError = (err: Error): void => {
    this.closeReason ||= err.message
  }

  private readonly onSocketClose = (): void => {
    if (!this.closed) {
      this.closed = true
      this.closeReason ||= "server closed the connection"
    }
    this.loginSink?.({ type: -1, body: Buffer.alloc(0) })
    this.handler?.onClose(this.closeReason)
  }

  /**
   * Cancels whatever this server is running, on a separate connection as the protocol requires.
   * Counted while in flight, so the pool does not lend the server to another client before
   * PostgreSQL has taken the cancel (which would otherwise hit that client's query).
   */
  readonly cancel: Effect.Effect<void> = Effect.suspend(() => {
    this.cancelsInFlight++
    return sendCancel(this.target, this.backendPid, this.backendSecret).pipe(
      Effect.ignore,
      Effect.ensuring(
        Effect.sync(() => {
          if (--this.cancelsInFlight > 0) return
          const done = this.onCancelsDone
          this.onCancelsDone = undefined
          done?.()
        })
      )
    )
  })

  /** When the current chunk ended inside a message: its type (0 at a message boundary). */
  get incompleteType(): number {
    return this.scanner.atBoundary ? 0 : this.scanner.incompleteType
  }

  /** Where that message starts in the chunk handed to `onData`, or -1 if it began in an earlier chunk. */
  get incompleteStart(): number {
    const start = this.scanner.incompleteStart
    return start < 0 ? -1 : start - this.base
  }

  get atBoundary(): boolean {
    return this.scanner.atBoundary
  }

  /** After DISCARD ALL: only what the server reports is known; settings the pooler applied are gone. */
  resetSettings(): void {
    this.syncedTo = undefined
    this.statements.clear()
    this.settings.clear()
    this.unreported.clear()
    for (const [name, value] of this.parameters) this.settings.set(name.toLowerCase(), value)
  }

  /**
   * The pooler set `name` (lower-cased) on this server, or learnt that a client did. `followed`: a
   * relay learns of its changes from ParameterStatus, so it needs no RESET for the next client;
   * by default, whether PostgreSQL reports it.
   */
  applied(name: string, value: string, followed?: boolean): void {
    this.syncedTo = undefined
    this.settings.set(name, value)
    let reported = followed
    if (reported === undefined) {
      reported = false
      for (const key of this.parameters.keys()) if (key.toLowerCase() === name) reported = true
    }
    if (reported) this.unreported.delete(name)
    else this.unreported.add(name)
  }

  /** The pooler RESET `name`, which PostgreSQL does not report: its value is the default again. */
  unapplied(name: string): void {
    this.syncedTo = undefined
    this.settings.delete(name)
    this.unreported.delete(name)
  }

  /** Idle and in a known state: safe to lend to another client. */
  get isIdle(): boolean {
    return !this.closed && this.pending === 0 && this.txStatus === 0x49
  }

  write(data: Buffer): boolean {
    return this.socket.write(data)
  }

  /** Polite close: Terminate, then end. */
  close(reason: string): void {
    if (this.closed) return
    this.closed = true
    this.closeReason = reason
    if (this.socket.writable) this.socket.end(serialize.end())
    else this.socket.destroy()
  }

  destroy(reason: string): void {
    this.closed = true
    this.closeReason ||= reason
    this.socket.destroy()
  }

  /**
   * Runs `sql` as a simple query from the control plane (reset, SET) and waits for its ReadyForQuery.
   * Fails with the server's error; the connection is then still usable if it reports idle.
   */
  readonly simpleQuery = (sql: string): Effect.Effect<void, TidepoolError> =>
    Effect.gen({ self: this }, function* () {
      const messages = yield* Queue.unbounded<LoginMessage>()
      this.loginSink = (m) => Queue.offerUnsafe(messages, m)
      this.pending++
      this.socket.write(serialize.query(sql))
      let error: TidepoolError | undefined
      for (;;) {
        const m = yield* Queue.take(messages)
        if (m.type === -1) return yield* tidepoolError("ESERVERCLOSED", this.closeReason)
        if (m.type === E && error === undefined) error = upstreamError(fieldsOf(m.body))
        if (m.type === Z) break
      }
      if (error !== undefined) return yield* error
    }).pipe(
      Effect.ensuring(
        Effect.sync(() => {
          this.loginSink = undefined
        })
      )
    )

  /**
   * Runs `sql` with text parameters over the extended protocol (values travel apart from the SQL, so
   * nothing needs quoting) and returns every row as text, with the column count of the result.
   * Only on connections made with `{ rows: true }`.
   */
  readonly query = (
    sql: string,
    params: ReadonlyArray<string>
  ): Effect.Effect<
    { readonly columns: number; readonly rows: ReadonlyArray<ReadonlyArray<string | null>> },
    TidepoolError
  > =>
    Effect.gen({ self: this }, function* () {
      const messages = yield* Queue.unbounded<LoginMessage>()
      this.loginSink = (m) => Queue.offerUnsafe(messages, m)
      this.pending++
      this.socket.write(
        Buffer.concat([
          serialize.parse({ text: sql }),
          serialize.bind({ values: [...params] }),
          serialize.describe({ type: "P" }),
          serialize.execute(),
          serialize.sync()
        ])
      )
      let error: TidepoolError | undefined
      let columns = 0
      const rows: Array<Array<string | null>> = []
      for (;;) {
        const m = yield* Queue.take(messages)
        if (m.type === -1) return yield* tidepoolError("ESERVERCLOSED", this.closeReason)
        if (m.type === E && error === undefined) error = upstreamError(fieldsOf(m.body))
        else if (m.type === T && m.body.length >= 2) columns = m.body.readInt16BE(0)
        else if (m.type === D) rows.push(decodeDataRow(m.body))
        else if (m.type === Z) break
      }
      if (error !== undefined) return yield* error
      return { columns, rows }
    }).pipe(
      Effect.ensuring(
        Effect.sync(() => {
          this.loginSink = undefined
        })
      )
    )

  /** Logs in after the socket connected: startup, authentication, parameters, key data, ReadyForQuery. */
  readonly login = (): Effect.Effect<void, TidepoolError> =>
    Effect.gen({ self: this }, function* () {
      const messages = yield* Queue.unbounded<LoginMessage>()
      this.loginSink = (m) => Queue.offerUnsafe(messages, m)
      const next = Effect.flatMap(Queue.take(messages), (m) =>
        m.type === -1 ? Effect.fail(connectFailed(this.closeReason, true)) : Effect.succeed(m)
      )
      const { user, database, password } = this.target
      this.socket.write(startupMessage({ user, database, client_encoding: "UTF8" }))
      let scram: ScramClient | undefined
      let passthrough: PassthroughKeys | undefined
      let known: ScramKeys | undefined
      /** The server proved it knows the password (SASLFinal's signature checked). */
      let proven = false
      for (;;) {
        const m = yield* next
        if (m.type === E) {
          const fields = fieldsOf(m.body)
          if (fields.code === "28P01") passthrough?.rejected?.()
          return yield* upstreamError(fields)
        }
        if (m.type === K) {
          const key = decodeBackendKeyData(m.body, 0, m.body.length)
          if (key instanceof ProtocolError) return yield* connectFailed(key.message)
          this.backendPid = key.processId
          this.backendSecret = key.secretKey
          continue
        }
        if (m.type === Z) return
        if (m.type !== R) continue
        const auth = decodeAuthentication(m.body, 0, m.body.length)
        if (auth instanceof ProtocolError) return yield* connectFailed(auth.message)
        const method = LOGIN_METHODS[auth._tag]
        if (method !== undefined) yield* Effect.annotateCurrentSpan("tidepool.login_method", method)
        switch (auth._tag) {
          case "AuthenticationOk":
            // PostgreSQL sends SASLFinal before AuthenticationOk: without it, whoever answers never
            // proved it knows the password (libpq refuses this too).
            if (scram !== undefined && !proven) {
              return yield* connectFailed("the server ended the SCRAM exchange without proving it knows the password")
            }
            break
          case "AuthenticationCleartextPassword":
            this.socket.write(serialize.password(yield* requirePassword(password, user)))
            break
          case "AuthenticationMD5Password":
            this.socket.write(serialize.password(md5Password(user, yield* requirePassword(password, user), auth.salt)))
            break
          case "AuthenticationSASL": {
            if (!auth.mechanisms.includes("SCRAM-SHA-256")) {
              return yield* connectFailed(`server offers no supported SASL mechanism (${auth.mechanisms.join(", ")})`)
            }
            passthrough = this.target.scramKeys?.()
            known = password === undefined ? undefined : upstreamScramKeys.get(password)
            scram = new ScramClient(passthrough ?? { password: yield* requirePassword(password, user), known })
            this.socket.write(serialize.sendSASLInitialResponseMessage("SCRAM-SHA-256", scram.clientFirst()))
            break
          }
          case "AuthenticationSASLContinue": {
            const final = scram?.handleServerFirst(auth.data.toString("utf8"))
            if (typeof final !== "string") return yield* connectFailed("invalid SCRAM server-first message")
            this.socket.write(serialize.sendSCRAMClientFinalMessage(final))
            break
          }
          case "AuthenticationSASLFinal": {
            const ok = scram?.verifyServerFinal(auth.data.toString("utf8"))
            if (ok !== true) return yield* connectFailed("server signature mismatch in SCRAM exchange")
            proven = true
            // Kept once the server has proved the keys right: a host that cannot prove it evicts nothing.
            const keys = scram?.keys
            if (passthrough === undefined && password !== undefined && keys !== undefined && keys !== known) {
              upstreamScramKeys.set(password, keys)
            }
            break
          }
          case "AuthenticationUnsupported":
            return yield* connectFailed(`unsupported authentication request ${auth.code}`)
        }
      }
    }).pipe(
      Effect.ensuring(
        Effect.sync(() => {
          this.loginSink = undefined
        })
      )
    )
}

/** DataRow columns as text (NULL as null); a truncated row yields what could be read. */
const decodeDataRow = (body: Buffer): Array<string | null> => {
  const out: Array<string | null> = []
  if (body.length < 2) return out
  const count = body.readInt16BE(0)
  let pos = 2
  for (let i = 0; i < count && pos + 4 <= body.length; i++) {
    const length = body.readInt32BE(pos)
    pos += 4
    if (length < 0) out.push(null)
    else {
      out.push(body.toString("utf8", pos, Math.min(pos + length, body.length)))
      pos += length
    }
  }
  return out
}

const fieldsOf = (body: Buffer) => {
  const f = decodeErrorFields(body, 0, body.length)
  return { code: f.C, message: f.M, detail: f.D, hint: f.H }
}

/**
 * Marks a failure to reach the database at all (see `ServerConnection.isTransient`). A property of
 * the error itself, not a set of instances, so the mark travels with the error however it is passed
 * on. Not enumerable, so no log or client ever sees it.
 */
const UNREACHABLE = Symbol("tidepool/unreachable")

/**
 * What PostgreSQL answers a login with while it starts up, shuts down or recovers (57P0x), or when it
 * lacks the resources for one more connection (class 53, e.g. 53300 too many connections).
 */
const TRANSIENT_SQLSTATES = new Set(["57P01", "57P02", "57P03", "53000", "53100", "53200", "53300", "53400"])

const connectFailed = (reason: string, transient = false): TidepoolError => {
  const error = upstreamError({ code: "08006", message: `Failed to connect to database: ${reason}` })
  if (transient) Object.defineProperty(error, UNREACHABLE, { value: true })
  return error
}

/**
 * The SCRAM keys last derived from each configured upstream password, found by its `Redacted`
 * object (one per tenant user, replaced when the tenant changes, so entries go with it): a pool
 * opening servers derives them once, not with PBKDF2 per server (1–4 ms of the event loop each, for
 * every client of the process, when a pool fills). A salt that changed (the role's password was
 * changed upstream) derives them anew. Exported for the tests.
 */
export const upstreamScramKeys = new WeakMap<Redacted.Redacted<string>, ScramKeys>()

const requirePassword = (password: Redacted.Redacted<string> | undefined, user: string) =>
  password === undefined
    ? Effect.fail(connectFailed(`the server asked for a password for user "${user}" and none is configured`))
    : Effect.succeed(Redacted.value(password))

/** docs/architecture.md#telemetry: the `upstream.connect` span's login method, by what the server asked for. */
const LOGIN_METHODS: Partial<Record<string, string>> = {
  AuthenticationCleartextPassword: "password",
  AuthenticationMD5Password: "md5",
  AuthenticationSASL: "scram-sha-256"
}

/** docs/architecture.md#telemetry: the `upstream.connect` span says how the attempt ended, and a failure's code. */
const annotateOutcome = <A, R>(self: Effect.Effect<A, TidepoolError, R>) =>
  self.pipe(
    Effect.tap(() => Effect.annotateCurrentSpan("tidepool.outcome", "ok")),
    Effect.tapError((error) => Effect.annotateCurrentSpan({ "tidepool.outcome": "fail", "error.code": error.code }))
  )

/**
 * A connected socket to the target, TLS-upgraded when the target asks for it, within the connect
 * timeout. On failure nothing is left open.
 */
const openSocket = (target: CancelTarget, reads?: ReadBuffer): Effect.Effect<net.Socket, TidepoolError> =>
  Effect.callback<net.Socket, TidepoolError>((resume) => {
    const s = net.connect({
      host: target.host,
      port: target.port,
      noDelay: true,
      keepAlive: true,
      ...(reads !== undefined ? { onread: reads.onread } : {})
    })
    const onError = (err: NodeJS.ErrnoException) => {
      s.destroy()
      resume(Effect.fail(connectFailed(err.code === "ECONNREFUSED" ? "connection refused" : err.message, true)))
    }
    s.once("error", onError)
    s.once("connect", () => {
      s.off("error", onError)
      resume(Effect.succeed(s))
    })
    return Effect.sync(() => s.destroy())
  }).pipe(
    Effect.flatMap(
      (s): Effect.Effect<net.Socket, TidepoolError> =>
        target.tls === undefined
          ? Effect.succeed(s)
          : startTls(s, target.serverName ?? target.host, target.tls, connectFailed)
    ),
    Effect.timeoutOrElse({
      duration: target.connectTimeoutMs,
      orElse: () => Effect.fail(connectFailed(`connection timed out after ${target.connectTimeoutMs}ms`, true))
    })
  )

/**
 * Opens and logs in a server connection. The caller owns the result and must `close` it; on failure
 * the socket is already destroyed.
 */
export const connect = Effect.fn("upstream.connect")(function* (target: UpstreamTarget, options?: ConnectOptions) {
  yield* Effect.annotateCurrentSpan({
    "db.host": target.host,
    "db.port": target.port,
    "db.user": target.user,
    tls: target.tls !== undefined
  })
  yield* Effect.annotateCurrentSpan("tidepool.login_method", "trust") // until the server asks for a password
  // TLS reads go through the TLS socket's stream, so only plaintext servers read into a ReadBuffer.
  const reads = target.tls === undefined ? ReadBuffer.own() : undefined
  const socket = yield* openSocket(target, reads)
  const conn = new ServerConnection(socket, target, options, reads)
  yield* conn.login().pipe(
    Effect.timeoutOrElse({
      duration: target.connectTimeoutMs,
      orElse: () => Effect.fail(connectFailed(`login timed out after ${target.connectTimeoutMs}ms`, true))
    }),
    // Failure, defect or interruption (pool closing mid-login): the socket must not outlive the attempt.
    Effect.onExit((exit) => (Exit.isSuccess(exit) ? Effect.void : Effect.sync(() => conn.destroy("login failed"))))
  )
  return conn
}, annotateOutcome)

/**
 * Where a CancelRequest for a server goes, and how to reach it the way its connection did: an
 * `UpstreamTarget` is one; so is what the cluster's store records of another host's backend
 * (src/cluster/StoreRunner.ts), whose owner may be gone.
 */
export interface CancelTarget {
  readonly host: string
  readonly port: number
  /** undefined: plaintext. */
  readonly tls?: UpstreamTlsOptions | undefined
  /** The TLS server name (SNI, and the name verified); `host` when absent, as for a server connection. */
  readonly serverName?: string | undefined
  /** Bounds the whole cancel: connect, TLS, and PostgreSQL taking it. */
  readonly connectTimeoutMs: number
}

/**
 * Sends a CancelRequest for `pid` on a fresh connection to the server's address — over TLS when the
 * server connection used it (SSLRequest first, same verification), since such a server, or a proxy
 * in front of it, may refuse plaintext. Succeeds when the server closes that connection, i.e. has
 * taken the cancel; fails with the reason (refused, TLS, timed out) otherwise.
 */
export const sendCancel = (target: CancelTarget, pid: number, secret: Buffer): Effect.Effect<void, TidepoolError> =>
  openSocket(target).pipe(
    Effect.flatMap((s) =>
      Effect.callback<void>((resume) => {
        s.on("error", () => undefined)
        s.once("close", () => resume(Effect.void))
        s.end(cancelRequest(pid, secret))
        return Effect.sync(() => s.destroy())
      })
    ),
    Effect.timeoutOrElse({
      duration: target.connectTimeoutMs,
      orElse: () => Effect.fail(connectFailed(`the cancel was not taken within ${target.connectTimeoutMs}ms`, true))
    })
  )
