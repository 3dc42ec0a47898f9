import { Buffer } from "node:buffer"
import { Cause, Effect, Exit, Option } from "effect"
import { serialize } from "pg-protocol"
import { TidepoolError, tidepoolError } from "../errors/index.ts"
import { quoteIdentifier } from "../protocol/index.ts"
import { connect, type ServerConnection, type ServerHandler, type UpstreamTarget } from "../upstream/index.ts"

/**
 * LISTEN/NOTIFY for transaction-mode clients (docs/session-state.md#listen-and-notify). A client's
 * server changes with every transaction, so no pooled server can listen for it: each pool with
 * listeners keeps one more connection of its own that LISTENs on the union of its subscribers'
 * channels and hands every NotificationResponse to the channel's subscribers.
 *
 * Data plane: everything here is a synchronous callback; only the connect runs as an Effect (on
 * the pool's runtime, so closing the pool interrupts it).
 */
export interface ListenSubscriber {
  /** A whole NotificationResponse message ('A', as PostgreSQL sends it), ready to write to the client. */
  readonly onNotification: (message: Buffer) => void
  /** The listening connection was lost (notifications may have been missed): the subscriber is dropped. */
  readonly onLost: (error: TidepoolError) => void
}

/** Called once a LISTEN is in effect on the hub's connection, or with why it could not be. */
export type ListenDone = (error: TidepoolError | undefined) => void

/** How long the connection stays open once nobody listens, so a client that re-LISTENs finds it. */
export const LISTEN_LINGER_MS = 5_000

/**
 * The connection only reads, so a network path that died without a reset would go unnoticed (and
 * notifications silently missed) for the system's keepalive time, two hours by default on Linux.
 */
const KEEPALIVE_MS = 30_000

/** PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes, and notifications carry the truncated name. */
const MAX_IDENTIFIER_BYTES = 63

const A = 0x41 // NotificationResponse
const E = 0x45 // ErrorResponse
const Z = 0x5a // ReadyForQuery

interface Waiter {
  readonly subscriber: ListenSubscriber
  readonly done: ListenDone
}

/** One LISTEN or UNLISTEN, in the order sent; PostgreSQL answers them in that order. */
interface Command {
  readonly channel: Channel
  readonly listen: boolean
  /** Subscribers waiting for this LISTEN to take effect. */
  readonly waiters: Array<Waiter>
  error: TidepoolError | undefined
}

interface Channel {
  readonly name: string
  /** Replaced, never mutated, so a fan-out in progress keeps iterating the list it started with. */
  subscribers: ReadonlyArray<ListenSubscriber>
  /** Whether the last command queued for this channel was a LISTEN. */
  listening: boolean
  /** That LISTEN, until PostgreSQL has answered it. */
  pending: Command | undefined
}

type State = "idle" | "connecting" | "open" | "closed"

/**
 * The listening connection of one pool (tenant, database, user, mode). Opened on the first
 * subscription, closed `lingerMs` after the last subscriber left; it is not one of the pool's
 * `pool_size` servers (docs/session-state.md#listen-and-notify says why).
 */
export class ListenHub {
  private state: State = "idle"
  private server: ServerConnection | undefined = undefined
  private readonly channelsByName = new Map<string, Channel>()
  private readonly channelsBySubscriber = new Map<ListenSubscriber, Set<Channel>>()
  /** Queued while connecting; written when the connection is up. */
  private outbox: Array<Command> = []
  /** Written, awaiting their ReadyForQuery, oldest first. */
  private readonly inflight: Array<Command> = []
  /** Bytes of a message split across reads (copied: a server's chunk may be a view of a reused buffer). */
  private rest: Buffer | undefined = undefined
  private lingerTimer: NodeJS.Timeout | undefined = undefined
  /** Where the current connection (open or opening) goes. */
  private connectedTo: UpstreamTarget | undefined = undefined
  /** Bumped whenever a connection is given up, so a connect that lands late is closed. */
  private generation = 0
  /** NotificationResponses received, and delivered to subscribers (one per subscriber). */
  notificationsReceived = 0
  notificationsDelivered = 0
  /** Times a live listening connection was lost. */
  connectionsLost = 0

  constructor(
    /** Read at each connect, so a reconfigured pool's next connection uses the new target. */
    private readonly target: () => UpstreamTarget,
    private readonly runFork: <A, E>(effect: Effect.Effect<A, E>) => void,
    private readonly lingerMs: number = LISTEN_LINGER_MS
  ) {}

  /** The listening connection, while open (admin views). */
  get connection(): ServerConnection | undefined {
    return this.state === "open" ? this.server : undefined
  }

  /** Channels with at least one subscriber. */
  get channelCount(): number {
    return this.channelsByName.size
  }

  get subscriberCount(): number {
    return this.channelsBySubscriber.size
  }

  /**
   * Subscribes `subscriber` to `channel` (the exact name: already case-folded or unquoted). `done`
   * is called once the channel is LISTENed on the hub's connection — synchronously when it already
   * is — or with an error (the subscriber is then not subscribed to it). It is not called if the
   * subscriber unlistens the channel before that.
   */
  listen(channel: string, subscriber: ListenSubscriber, done: ListenDone): void {
    if (this.state === "closed") {
      done(tidepoolError("ESERVERCLOSED", "pool is shutting down"))
      return
    }
    const name = clipIdentifier(channel)
    let entry = this.channelsByName.get(name)
    if (entry === undefined) {
      entry = { name, subscribers: [], listening: false, pending: undefined }
      this.channelsByName.set(name, entry)
    }
    let mine = this.channelsBySubscriber.get(subscriber)
    if (mine?.has(entry) === true) {
      // Already subscribed: PostgreSQL's LISTEN of a channel already listened is a no-op too.
      if (entry.pending !== undefined) entry.pending.waiters.push({ subscriber, done })
      else done(undefined)
      return
    }
    if (mine === undefined) {
      mine = new Set()
      this.channelsBySubscriber.set(subscriber, mine)
    }
    mine.add(entry)
    entry.subscribers = [...entry.subscribers, subscriber]
    this.stopLinger()
    if (!entry.listening) {
      entry.listening = true
      entry.pending = this.send(entry, true)
    }
    if (entry.pending !== undefined) entry.pending.waiters.push({ subscriber, done })
    else done(undefined)
  }

  unlisten(channel: string, subscriber: ListenSubscriber): void {
    const entry = this.channelsByName.get(clipIdentifier(channel))
    if (entry === undefined) return
    const mine = this.channelsBySubscriber.get(subscriber)
    if (mine === undefined || !mine.delete(entry)) return
    if (mine.size === 0) this.channelsBySubscriber.delete(subscriber)
    this.leave(entry, subscriber)
    this.lingerIfUnused()
  }

  /** UNLISTEN * and client disconnects. */
  unlistenAll(subscriber: ListenSubscriber): void {
    const mine = this.channelsBySubscriber.get(subscriber)
    if (mine === undefined) return
    this.channelsBySubscriber.delete(subscriber)
    for (const entry of mine) this.leave(entry, subscriber)
    this.lingerIfUnused()
  }

  channels(subscriber: ListenSubscriber): ReadonlyArray<string> {
    const mine = this.channelsBySubscriber.get(subscriber)
    if (mine === undefined) return []
    const out: Array<string> = []
    for (const entry of mine) out.push(entry.name)
    return out
  }

  /**
   * The pool's tenant changed. If its database is elsewhere now (host, port, database, user, or TLS
   * turned on or off), the connection is given up: a connect in flight starts again at the new
   * place, and an open one counts as lost — notifications sent to the new place until now were
   * missed (a failover), so its subscribers get ELISTENLOST. Other changes (a new password, pool
   * sizes) keep it.
   */
  retarget(): void {
    const old = this.connectedTo
    if (old === undefined || samePlace(old, this.target())) return
    if (this.state === "connecting") {
      this.generation++
      this.open()
    } else if (this.state === "open") {
      this.connectionsLost++
      this.failAll(tidepoolError("ELISTENLOST", "the tenant's database settings changed"), true)
    }
  }

  /**
   * The pool is closing (shutdown, tenant deleted): its clients are being ended for that reason, so
   * subscribers are dropped without `onLost`; LISTENs still in flight fail with ESERVERCLOSED.
   */
  close(): void {
    if (this.state === "closed") return
    const waiters = this.takeWaiters()
    this.state = "closed"
    this.dropConnection("pool closed")
    this.channelsByName.clear()
    this.channelsBySubscriber.clear()
    const error = tidepoolError("ESERVERCLOSED", "pool is shutting down")
    for (const w of waiters) w.done(error)
  }

  private leave(entry: Channel, subscriber: ListenSubscriber): void {
    entry.subscribers = entry.subscribers.filter((s) => s !== subscriber)
    const pending = entry.pending
    if (pending !== undefined) {
      for (let i = pending.waiters.length - 1; i >= 0; i--)
        if (pending.waiters[i]!.subscriber === subscriber) pending.waiters.splice(i, 1)
    }
    if (entry.subscribers.length > 0) return
    this.channelsByName.delete(entry.name)
    if (entry.listening) {
      entry.listening = false
      entry.pending = undefined
      this.send(entry, false)
    }
  }

  /** Queues LISTEN or UNLISTEN, connecting first if need be. */
  private send(channel: Channel, listen: boolean): Command {
    const command: Command = { channel, listen, waiters: [], error: undefined }
    if (this.state === "open") this.write([command])
    else {
      this.outbox.push(command)
      if (this.state === "idle") this.open()
    }
    return command
  }

  private write(commands: ReadonlyArray<Command>): void {
    const server = this.server!
    const buffers: Array<Buffer> = []
    for (const command of commands) {
      this.inflight.push(command)
      buffers.push(
        serialize.query(`${command.listen ? "LISTEN" : "UNLISTEN"} ${quoteIdentifier(command.channel.name)}`)
      )
    }
    server.write(buffers.length === 1 ? buffers[0]! : Buffer.concat(buffers))
  }

  private open(): void {
    this.state = "connecting"
    const generation = this.generation
    const target = this.target()
    this.connectedTo = target
    this.runFork(
      connect(target).pipe(
        Effect.exit,
        Effect.tap((exit) =>
          Effect.sync(() => {
            if (generation !== this.generation || this.state !== "connecting") {
              if (Exit.isSuccess(exit)) exit.value.close("listening connection no longer needed")
              return
            }
            if (Exit.isSuccess(exit)) this.onOpened(exit.value)
            else this.onConnectFailed(exit.cause)
          })
        )
      )
    )
  }

  private onOpened(server: ServerConnection): void {
    this.state = "open"
    this.server = server
    this.rest = undefined
    server.handler = this.handler
    server.socket.setKeepAlive(true, KEEPALIVE_MS)
    const queued = this.outbox
    this.outbox = []
    if (queued.length > 0) this.write(queued)
    this.lingerIfUnused()
  }

  private onConnectFailed(cause: Cause.Cause<TidepoolError>): void {
    if (Cause.hasInterruptsOnly(cause)) return // the pool is closing
    const reason = Option.match(Cause.findErrorOption(cause), {
      onNone: () => String(Cause.squash(cause)),
      onSome: (e) => e.message
    })
    this.failAll(tidepoolError("ELISTENFAILED", `could not open the listening connection: ${reason}`), false)
  }

  private readonly handler: ServerHandler = {
    onData: (chunk) => this.onData(chunk),
    onClose: (reason) => this.lost(reason),
    onFault: () => this.lost("internal error in the pooler while reading from the server")
  }

  private onData(chunk: Buffer): void {
    let buf = chunk
    if (this.rest !== undefined) {
      buf = Buffer.concat([this.rest, chunk])
      this.rest = undefined
    }
    let pos = 0
    while (buf.length - pos >= 5) {
      const length = buf.readInt32BE(pos + 1)
      if (length < 4) {
        this.server?.destroy("invalid data from server")
        return
      }
      const end = pos + 1 + length
      if (end > buf.length) break
      const type = buf[pos]!
      if (type === A) this.onNotification(buf, pos, end)
      else if (type === E) this.onError(buf, pos + 5, end)
      else if (type === Z) this.onReady()
      if (this.state !== "open") return // a subscriber's callback closed the hub, or the connection went
      pos = end
    }
    if (pos < buf.length) this.rest = Buffer.from(buf.subarray(pos))
  }

  private onNotification(buf: Buffer, start: number, end: number): void {
    this.notificationsReceived++
    // Body: sender pid (4 bytes), channel, payload, each NUL-terminated.
    const nameStart = start + 9
    const nameEnd = buf.indexOf(0, nameStart)
    if (nameEnd < 0 || nameEnd >= end) return
    const entry = this.channelsByName.get(buf.toString("utf8", nameStart, nameEnd))
    if (entry === undefined) return
    const subscribers = entry.subscribers
    if (subscribers.length === 0) return
    // One copy shared by every subscriber: the chunk may be a view of a reused read buffer, and a
    // client socket that cannot take it now keeps a reference.
    const message = Buffer.allocUnsafe(end - start)
    buf.copy(message, 0, start, end)
    for (const subscriber of subscribers) {
      this.notificationsDelivered++
      subscriber.onNotification(message)
    }
  }

  private onError(buf: Buffer, start: number, end: number): void {
    const head = this.inflight[0]
    if (head === undefined || head.error !== undefined) return
    const fields = errorFields(buf, start, end)
    const severity = fields.V ?? fields.S
    if (severity === "FATAL" || severity === "PANIC") return // the close that follows reports it
    // PostgreSQL's own refusal (a standby's 25006, say), as it would have told the client.
    head.error = listenRefused(fields.C, fields.M ?? "LISTEN failed")
  }

  private onReady(): void {
    const command = this.inflight.shift()
    if (command === undefined) return // the login's own ReadyForQuery
    const channel = command.channel
    if (channel.pending === command) channel.pending = undefined
    if (!command.listen) return
    const error = command.error
    if (error !== undefined) {
      if (channel.pending === undefined && channel.listening) {
        // PostgreSQL is not listening on it: its next subscriber must LISTEN again.
        channel.listening = false
      }
      for (const w of command.waiters) {
        const mine = this.channelsBySubscriber.get(w.subscriber)
        if (mine?.delete(channel) === true) {
          if (mine.size === 0) this.channelsBySubscriber.delete(w.subscriber)
          channel.subscribers = channel.subscribers.filter((s) => s !== w.subscriber)
        }
      }
      if (channel.subscribers.length === 0 && this.channelsByName.get(channel.name) === channel)
        this.channelsByName.delete(channel.name)
    }
    for (const w of command.waiters) w.done(error)
    if (error !== undefined) this.lingerIfUnused()
  }

  /** The connection ended: every subscriber is told and dropped; the next `listen` connects again. */
  private lost(reason: string): void {
    if (this.state !== "open") return
    this.connectionsLost++
    // PostgreSQL's FATAL (`terminating connection due to administrator command`) says more than the close.
    const server = this.server
    const why = server?.terminating === true && server.lastErrorMessage !== undefined ? server.lastErrorMessage : reason
    this.failAll(tidepoolError("ELISTENLOST", why), true)
  }

  /**
   * Forgets the connection and every subscription, then tells each subscriber: `done` for each
   * LISTEN still in flight, and `onLost` (when `lost`) once if it had a channel in effect. Callbacks
   * come last, so a subscriber that listens again from them starts afresh.
   */
  private failAll(error: TidepoolError, lost: boolean): void {
    const waiters = this.takeWaiters()
    const listening: Array<ListenSubscriber> = []
    for (const [subscriber, channels] of this.channelsBySubscriber) {
      // A channel with a LISTEN in flight has only that LISTEN's waiters (a new LISTEN is sent only
      // when a channel has no subscriber left), so any other channel was in effect.
      for (const channel of channels) {
        if (channel.pending === undefined) {
          listening.push(subscriber)
          break
        }
      }
    }
    this.dropConnection(error.message)
    this.channelsByName.clear()
    this.channelsBySubscriber.clear()
    for (const w of waiters) w.done(error)
    if (lost) for (const subscriber of listening) subscriber.onLost(error)
  }

  /** Every `done` still owed (the commands are about to be forgotten). */
  private takeWaiters(): Array<Waiter> {
    const out: Array<Waiter> = []
    for (const command of [...this.inflight, ...this.outbox]) {
      out.push(...command.waiters)
      command.waiters.length = 0
    }
    return out
  }

  private dropConnection(reason: string): void {
    this.generation++
    this.stopLinger()
    const server = this.server
    this.server = undefined
    this.connectedTo = undefined
    this.rest = undefined
    this.inflight.length = 0
    this.outbox = []
    if (this.state !== "closed") this.state = "idle"
    if (server !== undefined) {
      server.handler = undefined
      server.close(reason)
    }
  }

  private lingerIfUnused(): void {
    if (this.state !== "open" || this.channelsBySubscriber.size > 0 || this.lingerTimer !== undefined) return
    this.lingerTimer = setTimeout(this.onLingerEnd, this.lingerMs)
    this.lingerTimer.unref()
  }

  private stopLinger(): void {
    if (this.lingerTimer === undefined) return
    clearTimeout(this.lingerTimer)
    this.lingerTimer = undefined
  }

  private readonly onLingerEnd = (): void => {
    this.lingerTimer = undefined
    if (this.state === "open" && this.channelsBySubscriber.size === 0) this.dropConnection("no listeners left")
  }
}

const samePlace = (a: UpstreamTarget, b: UpstreamTarget): boolean =>
  a.host === b.host &&
  a.port === b.port &&
  a.database === b.database &&
  a.user === b.user &&
  (a.tls === undefined) === (b.tls === undefined)

/** `"name"`, with embedded quotes doubled: any channel name, exactly, whatever its case. */

/** The name PostgreSQL will use: at most 63 bytes, cut on a UTF-8 character boundary. */
export const clipIdentifier = (name: string): string => {
  if (name.length <= MAX_IDENTIFIER_BYTES / 3 || Buffer.byteLength(name) <= MAX_IDENTIFIER_BYTES) return name
  const bytes = Buffer.from(name)
  let end = MAX_IDENTIFIER_BYTES
  while (end > 0 && (bytes[end]! & 0xc0) === 0x80) end--
  return bytes.toString("utf8", 0, end)
}

const errorFields = (buf: Buffer, start: number, end: number): Record<string, string> => {
  const out: Record<string, string> = {}
  let pos = start
  while (pos < end && buf[pos] !== 0) {
    const key = String.fromCharCode(buf[pos]!)
    const valueEnd = buf.indexOf(0, pos + 1)
    if (valueEnd < 0 || valueEnd >= end) break
    out[key] = buf.toString("utf8", pos + 1, valueEnd)
    pos = valueEnd + 1
  }
  return out
}

const listenRefused = (sqlstate: string | undefined, message: string): TidepoolError => {
  const error = tidepoolError("ELISTENFAILED", message)
  return sqlstate === undefined
    ? error
    : new TidepoolError({ code: error.code, sqlstate, severity: error.severity, message: error.message })
}
