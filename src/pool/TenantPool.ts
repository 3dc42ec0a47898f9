import { Cause, Effect, Exit, FiberSet, Option, type Scope } from "effect"
import { type TidepoolError, tidepoolError, upstreamError } from "../errors/index.ts"
import { connect, ServerConnection, type UpstreamTarget } from "../upstream/index.ts"
import { Fifo } from "./Fifo.ts"
import { LatencyHistogram } from "./Histogram.ts"
import { ListenHub } from "./ListenHub.ts"
import type { PoolPermits } from "./PermitGate.ts"
import type { PoolSeats } from "./SeatGate.ts"
import { StatementRegistry } from "./StatementRegistry.ts"

export type PoolMode = "transaction" | "session"

export interface PoolSettings {
  readonly key: string
  readonly tenant: string
  readonly user: string
  readonly database: string
  readonly mode: PoolMode
  /** Exact cap on server connections, open or opening. */
  readonly size: number
  readonly maxClients: number
  readonly checkoutTimeoutMs: number
  /** 0 keeps idle servers forever. */
  readonly serverIdleTimeoutMs: number
  /** Servers kept open while idle (warm minimum), never more than `size`. */
  readonly minSize: number
  readonly serverLifetimeMs: number
  /**
   * After a refusal that would repeat (unknown database, wrong password), new connects wait this long
   * and clients get the refusal at once meanwhile. Failures to reach the database back off from
   * `RETRY_FIRST_MS` to `RETRY_MAX_MS` instead (see `TenantPool.onConnectFailed`).
   */
  readonly connectBackoffMs: number
  readonly target: UpstreamTarget
}

/** Called exactly once per checkout: with a server, or with the reason there is none. */
export type CheckoutCallback = (error: TidepoolError | undefined, server: ServerConnection | undefined) => void

/**
 * Running totals for one pool, updated in place on the hot path (plain number fields: no
 * allocation, no Effect). The observability layer reads them to export metrics.
 */
export class PoolCounters {
  checkouts = 0
  /** Checkouts that had to queue, and the total time they waited. */
  checkoutsWaited = 0
  checkoutWaitMs = 0
  checkoutTimeouts = 0
  /** Transactions completed (transaction mode: one per release at a transaction boundary). */
  transactions = 0
  /** Query, Sync and FunctionCall messages clients sent. */
  queries = 0
  clientBytes = 0
  serverBytes = 0
  serverConnects = 0
  serverConnectFailures = 0
  /** Named statements prepared on servers for clients (transaction mode): first time on a server, */
  statementsPrepared = 0
  /** … again on a server that lacked it (the client's statement met another server), */
  statementsReprepared = 0
  /** … and closed to keep a server within the statement cache size. */
  statementsEvicted = 0
  /** Transaction mode: clients pinned to their server now (docs/session-state.md). */
  pinnedClients = 0
  /** Transaction mode: times a server was asked what a client left in its session (one round trip each). */
  sessionProbes = 0
  /** Waits of the checkouts that queued (immediate ones are `checkouts - checkoutsWaited`, all 0 s). */
  readonly checkoutWait = new LatencyHistogram()
  /** Transaction mode: how long each transaction held its server. */
  readonly transactionTime = new LatencyHistogram()
  /** From a client's TCP connect to its first ReadyForQuery (TLS, authentication, attach). */
  readonly clientConnect = new LatencyHistogram()
  /** From a client's TCP connect to its disconnect. */
  readonly clientLifetime = new LatencyHistogram()
}

/** A server as the admin console and metrics see it. */
export interface ServerView {
  readonly server: ServerConnection
  readonly state: "active" | "idle"
}

/** While the database cannot be reached, the first new attempt comes this soon, then twice as late each time… */
const RETRY_FIRST_MS = 50
/** … up to this: how late a pool whose clients wait notices that its database answers again. */
const RETRY_MAX_MS = 1000
/**
 * Worker and cluster mode: a pressed pool closes an idle server once it has gone unused this long.
 * One that was used more recently is in use (its client's next transaction comes straight back
 * for it): closing it made the pool reconnect at once (docs/scale-out.md#server-churn-explained-and-fixed).
 */
const PRESSED_IDLE_MS = 500

export interface Waiter {
  readonly callback: CheckoutCallback
  readonly since: number
  readonly deadline: number
  cancelled: boolean
}

const isWaiting = (waiter: Waiter): boolean => !waiter.cancelled

/**
 * Servers lent while a waiter's callback runs, as (pool, waiter, server) triples: delivered once it
 * returns. A waiter may give its server back inside its callback (a login that only learns the
 * pool's parameters, a relay that ended meanwhile), which lends it to the next waiter, whose callback
 * would run inside the first's: a queue of a thousand such waiters overflowed the stack, and the
 * waiters past that point were never resumed, their server lent out for ever. Delivered in turn from
 * the outermost lend instead, each callback still in the same tick and in the queue's order. A waiter
 * cancelled between its turn and its delivery (its client gone, its fiber interrupted, by an earlier
 * callback) gets nothing: the server goes back to its pool.
 */
const handoffs: Array<TenantPool | Waiter | ServerConnection> = []
let handingOff = false

const handOff = (pool: TenantPool, waiter: Waiter, server: ServerConnection): void => {
  handoffs.push(pool, waiter, server)
  if (handingOff) return
  handingOff = true
  let failed = false
  let failure: unknown
  try {
    for (let i = 0; i < handoffs.length; i += 3) {
      const w = handoffs[i + 1] as Waiter
      const lent = handoffs[i + 2] as ServerConnection
      try {
        if (w.cancelled) (handoffs[i] as TenantPool).release(lent)
        else w.callback(undefined, lent)
      } catch (cause) {
        // A callback's bug must not keep the next waiters from their servers: raised once all are delivered.
        if (!failed) {
          failed = true
          failure = cause
        }
      }
    }
  } finally {
    while (handoffs.length > 0) handoffs.pop()
    handingOff = false
  }
  if (failed) throw failure
}

/**
 * The pool of one (tenant, user, mode, database). Checkout and release are plain synchronous
 * callbacks (docs/architecture.md#hot-path-rules): an idle server is lent at once, otherwise the caller joins a FIFO queue with
 * a deadline. Connects run as fibers in the pool's scope, so closing the pool interrupts them.
 */
export class TenantPool {
  private readonly idle: Array<ServerConnection> = []
  private readonly waiters = new Fifo<Waiter>()
  private readonly busy = new Set<ServerConnection>()
  private opening = 0
  /** Servers closed by the pool whose sockets have not closed yet: their backends may still be running. */
  private closing = 0
  /** Why the last connect failed; undefined once one succeeds. The pool is "failing" while set. */
  private lastConnectError: TidepoolError | undefined = undefined
  /** Connects failed in a row, for the back-off. */
  private connectFailures = 0
  /** No new connect before this instant (epoch ms) while failing. */
  private retryAt = 0
  /**
   * When a pool that had reached its database first failed to reach it again (a restart, a
   * failover): for one checkout timeout from then, clients wait for it to come back instead of
   * getting the connect error at once.
   */
  private outageSince: number | undefined = undefined
  private retryTimer: NodeJS.Timeout | undefined = undefined
  private deadlineTimer: NodeJS.Timeout | undefined = undefined
  private closed = false
  /** Bumped by `reconfigure`: servers of an older generation are replaced, never lent again. */
  private generation = 0
  /** Busy servers opened under older settings: closed when released instead of pooled. */
  private readonly stale = new Set<ServerConnection>()
  /** PAUSE: nothing is lent (checkouts queue) until `resume`. */
  private paused = false
  /** RECONNECT: servers created at or before this instant close instead of being lent again. */
  private reconnectBefore = 0
  /** Called once no server is lent out (PAUSE waits for in-flight transactions). */
  private quietListeners: Array<() => void> = []
  /** Clients attached to this pool (session mode: each holds or awaits a server). */
  clients = 0
  /** ParameterStatus of the pool's first server right after login: the pristine session defaults. */
  parameters: ReadonlyMap<string, string> | undefined = undefined
  /** `name=value` settings a server of this pool has accepted, so they need no check at connect. */
  readonly knownSettings = new Set<string>()
  readonly counters = new PoolCounters()
  readonly startedAt = Date.now()
  /** Told when a checkout that queued ends, lent or timed out (tracing: `pool.checkout` spans). */
  onWaitEnded: ((since: number, ended: number, queued: number, error: TidepoolError | undefined) => void) | undefined =
    undefined
  /** Also report every Nth immediate checkout to `onWaitEnded` (a sample, with no wait); 0: none. */
  sampleEvery = 0
  private sinceSample = 0
  /** Server-side statements shared by this pool's clients (transaction mode): which parsed, which went stale. */
  readonly statements = new StatementRegistry()
  /**
   * Worker mode only (docs/scale-out.md#the-permit-model): the host's permit ledger. `total` never
   * exceeds `granted`; undefined in a single process, where `settings.size` alone caps the pool.
   */
  gate: PoolPermits | undefined = undefined
  private granted = 0
  /** The last `want` told to the ledger: it hears again only when this grows or drops to 0. */
  private wantSent = 0
  /** Ledger directives: hold at most `keep` servers; `pressed`: another process waits, keep none unused. */
  private keep = Number.POSITIVE_INFINITY
  private pressed = false
  /** While pressed: closes the next idle server to pass PRESSED_IDLE_MS unused. */
  private pressTimer: NodeJS.Timeout | undefined = undefined
  /**
   * A checkout queued since the last sweep. "Want nothing" is judged over the sweep's interval, not
   * at one instant: a pool whose clients queue now and then has, at most instants, nobody waiting
   * (they are between transactions), and telling the ledger so had it pressed and its servers closed
   * while its clients came straight back for them.
   */
  private queuedSinceSweep = false

  constructor(
    public settings: PoolSettings,
    private readonly runFork: <A, E>(effect: Effect.Effect<A, E>) => void
  ) {}

  /** Counts every backend that may exist, so the cap holds exactly (see `closing`). */
  get total(): number {
    return this.live + this.closing
  }

  /** Servers open or opening that can serve clients. */
  private get live(): number {
    return this.idle.length + this.busy.size + this.opening
  }

  get stats() {
    return {
      counters: this.counters,
      idle: this.idle.length,
      busy: this.busy.size,
      opening: this.opening,
      waiting: this.waiters.length,
      clients: this.clients
    }
  }

  /**
   * Admits one more client of this pool, or says which limit refuses it: session mode holds a server
   * per client (`pool_size`), every mode caps clients at `max_clients`. Each admitted client is
   * given back with `leave`. In worker mode the limits hold for the whole host: the seat the client
   * takes was reserved by `reserveSeat` (PoolRegistry.get), which asked the supervisor if need be.
   */
  admit(): TidepoolError | undefined {
    if (this.seats === undefined) {
      if (this.settings.mode === "session" && this.clients >= this.settings.size)
        return tidepoolError("EMAXCONNSESSION", this.settings.size)
      if (this.clients >= this.settings.maxClients) return tidepoolError("EMAXCONN", this.settings.maxClients)
      this.clients++
      return undefined
    }
    // A closed pool refuses at checkout (ESERVERCLOSED), as in a single process.
    if (this.closed || this.reservedSeats > 0) this.reservedSeats = Math.max(0, this.reservedSeats - 1)
    else if (this.clients >= this.seatsHeld) return this.seatRefusal()
    this.clients++
    return undefined
  }

  /** A client admitted by `admit` left. */
  leave(): void {
    this.clients--
    if (this.seats !== undefined) this.returnSpareSeats()
  }

  /**
   * Worker mode: host-wide seats (docs/scale-out.md#max_clients-across-workers). `seatsHeld` counts
   * this worker's clients plus the seats it keeps spare and those reserved for logins on their way.
   */
  seats: PoolSeats | undefined = undefined
  private seatsHeld = 0
  private reservedSeats = 0
  private reservedAt = 0
  private spareSeats = 0
  private seatAsked = false
  private readonly seatWaiters: Array<{ readonly done: (error: TidepoolError | undefined) => void; asked: boolean }> =
    []

  /** The host-wide limit on this pool's clients: session mode holds a server per client. */
  private get seatLimit(): number {
    const { mode, size, maxClients } = this.settings
    return mode === "session" ? Math.min(size, maxClients) : maxClients
  }

  private seatRefusal(): TidepoolError {
    const { mode, size, maxClients } = this.settings
    return mode === "session" && size <= maxClients
      ? tidepoolError("EMAXCONNSESSION", size)
      : tidepoolError("EMAXCONN", maxClients)
  }

  /**
   * Worker mode: holds a host-wide seat for a client about to `admit`. Free when this worker holds a
   * spare seat (the usual case); otherwise one supervisor round trip, which at the limit first takes
   * unused seats back from the other workers; fails with the limit's error when the host is full.
   */
  reserveSeat(): Effect.Effect<void, TidepoolError> {
    return Effect.callback<void, TidepoolError>((resume) => {
      if (this.takeSeat()) {
        resume(Effect.void)
        return
      }
      // Bounded like a checkout: an answer that never comes (a supervisor or store away, a peer
      // that cannot answer) must not hold the login, and its connection, for ever.
      const timer = setTimeout(() => {
        const i = this.seatWaiters.indexOf(waiter)
        if (i < 0) return
        this.seatWaiters.splice(i, 1)
        resume(Effect.fail(this.seatRefusal()))
      }, this.settings.checkoutTimeoutMs)
      const waiter = {
        asked: false,
        done: (error: TidepoolError | undefined) => {
          clearTimeout(timer)
          resume(error === undefined ? Effect.void : Effect.fail(error))
        }
      }
      this.seatWaiters.push(waiter)
      this.askSeats()
      return Effect.sync(() => {
        clearTimeout(timer)
        const i = this.seatWaiters.indexOf(waiter)
        if (i >= 0) this.seatWaiters.splice(i, 1)
      })
    })
  }

  private takeSeat(): boolean {
    if (this.seats === undefined || this.closed) return true
    if (this.clients + this.reservedSeats >= this.seatsHeld) return false
    this.reservedSeats++
    this.reservedAt = Date.now()
    // Running low: ask for more before a login has to wait for them.
    if (!this.seatAsked && this.seatsHeld - this.clients - this.reservedSeats < Math.ceil(this.spareSeats / 2)) {
      this.seatAsked = true
      this.seats.want(this.seatLimit, 0)
    }
    return true
  }

  private askSeats(): void {
    if (this.seatAsked) return
    let need = 0
    for (const w of this.seatWaiters) {
      w.asked = true
      need++
    }
    if (need === 0) return
    this.seatAsked = true
    this.seats!.want(this.seatLimit, need)
  }

  /** The supervisor's answer to a `want`: `n` more seats (maybe none); keep about `spare` unused. */
  seatsGranted(n: number, spare: number): void {
    this.seatsHeld += n
    this.spareSeats = spare
    this.seatAsked = false
    for (let i = 0; i < this.seatWaiters.length; ) {
      const w = this.seatWaiters[i]!
      if (this.takeSeat()) {
        this.seatWaiters.splice(i, 1)
        w.done(undefined)
      } else if (w.asked) {
        // The supervisor took back every unused seat of the host before answering: the host is full.
        this.seatWaiters.splice(i, 1)
        w.done(this.seatRefusal())
      } else i++
    }
    this.askSeats()
    this.returnSpareSeats()
  }

  /** Another worker's login needs a seat and the host has none free: every unused seat goes back. */
  reclaimSeats(): void {
    const unused = Math.max(0, this.seatsHeld - this.clients - this.reservedSeats)
    this.seatsHeld -= unused
    this.seats?.release(unused, true)
  }

  private returnSpareSeats(): void {
    const unused = this.seatsHeld - this.clients - this.reservedSeats
    // Hysteresis: a client leaving and the next arriving do not each cost a message.
    const keep = this.closed ? 0 : this.spareSeats
    if (unused > 2 * keep || (this.closed && unused > 0)) {
      this.seatsHeld -= unused - keep
      this.seats!.release(unused - keep, false)
    }
  }

  /**
   * The pool closed: logins waiting for a seat go on to find it closed (and ask the pool that serves
   * the key now, PoolRegistry.get); unused seats go back, those reserved for logins on their way
   * too (no login joins a closed pool, and a closed pool is no longer swept for stale reservations).
   */
  private closeSeats(): void {
    for (const w of this.seatWaiters.splice(0)) w.done(undefined)
    this.reservedSeats = 0
    this.returnSpareSeats()
  }

  /** A reservation whose login never called `admit` (its fiber interrupted in between) is dropped. */
  private expireSeats(now: number): void {
    if (this.seats === undefined || this.reservedSeats === 0 || now - this.reservedAt < 1000) return
    this.reservedSeats = 0
    this.returnSpareSeats()
  }

  /** How long the oldest waiting checkout has waited, in ms (0 when nobody waits). */
  longestWaitMs(now: number = Date.now()): number {
    const w = this.waiters.find(isWaiting)
    return w === undefined ? 0 : now - w.since
  }

  /**
   * Live reconfiguration (a tenant changed): new settings apply to every later checkout. Idle
   * servers close now; servers lent out finish their transaction (or session) and close on release;
   * connects in flight under the old settings close when they land. Waiters keep their place.
   */
  reconfigure(settings: PoolSettings): void {
    if (this.closed) return
    this.settings = settings
    this.generation++
    // New settings (another host, a fixed password) deserve a connect now, not after the old back-off.
    this.forgetFailures()
    this.parameters = undefined
    this.knownSettings.clear()
    for (const server of this.busy) this.stale.add(server)
    this.hub?.retarget()
    for (const server of this.idle.splice(0)) {
      server.handler = undefined
      this.closeCounted(server, "tenant reconfigured", false)
    }
    this.afterShrink()
  }

  /** Every open server and whether a client holds it (admin views; not for the hot path). */
  servers(): Array<ServerView> {
    const out: Array<ServerView> = []
    for (const server of this.busy) out.push({ server, state: "active" })
    for (const server of this.idle) out.push({ server, state: "idle" })
    return out
  }

  /** When the longest-waiting checkout started (epoch ms), if any is queued. */
  get oldestWaitSince(): number | undefined {
    return this.waiters.find(isWaiting)?.since
  }

  get isPaused(): boolean {
    return this.paused
  }

  /** PAUSE: new checkouts queue (their deadline still runs) until `resume`; lent servers finish their work. */
  pause(): void {
    this.paused = true
  }

  /** Calls `listener` once no server is lent out: at once if none is. Returns a function that forgets it. */
  whenQuiet(listener: () => void): () => void {
    if (this.busy.size === 0) {
      listener()
      return () => {}
    }
    this.quietListeners.push(listener)
    return () => {
      const i = this.quietListeners.indexOf(listener)
      if (i >= 0) this.quietListeners.splice(i, 1)
    }
  }

  resume(): void {
    if (!this.paused) return
    this.paused = false
    for (;;) {
      if (this.waiters.length === 0) break
      const server = this.takeIdle()
      if (server === undefined) break
      const waiter = this.nextWaiter()
      if (waiter === undefined) {
        this.busy.delete(server)
        this.watchIdle(server)
        this.idle.push(server)
        break
      }
      // takeIdle marked it busy; lend counts the checkout.
      this.lend(server, waiter)
    }
    this.grow()
  }

  /** RECONNECT: every server open now is closed instead of lent again (idle ones at once). */
  reconnect(): void {
    this.reconnectBefore = Date.now()
    this.maintain(this.reconnectBefore)
  }

  /** Lends a server: synchronously when one is idle, else when one frees up, opens, or the wait times out. */
  checkout(callback: CheckoutCallback): Waiter | undefined {
    if (this.closed) {
      callback(tidepoolError("ESERVERCLOSED", "pool is shutting down"), undefined)
      return undefined
    }
    const server = this.paused ? undefined : this.takeIdle()
    if (server !== undefined) {
      this.counters.checkouts++
      if (this.sampleEvery > 0 && ++this.sinceSample >= this.sampleEvery) {
        this.sinceSample = 0
        const now = Date.now()
        this.onWaitEnded?.(now, now, this.waiters.length, undefined)
      }
      callback(undefined, server)
      return undefined
    }
    const now = Date.now()
    // The database just refused, or cannot be reached and this is no passing outage of a pool that
    // had reached it, and nothing is alive or on its way: say so now rather than at the deadline.
    if (
      this.lastConnectError !== undefined &&
      now < this.retryAt &&
      !this.ridingOut(now) &&
      this.busy.size + this.idle.length + this.opening === 0
    ) {
      callback(this.lastConnectError, undefined)
      return undefined
    }
    const waiter: Waiter = { callback, since: now, deadline: now + this.settings.checkoutTimeoutMs, cancelled: false }
    this.waiters.push(waiter)
    this.queuedSinceSweep = true
    this.armDeadline()
    if (!this.paused) this.grow(now)
    return waiter
  }

  /** The client went away while waiting. */
  cancel(waiter: Waiter): void {
    waiter.cancelled = true
    this.waiters.remove(waiter)
  }

  /** Returns a server that is idle and in a known state. Anything else must go through `discard`. */
  release(server: ServerConnection): void {
    if (server.cancelsInFlight > 0 && !server.closed) {
      // A cancel meant for the last client's query must not reach the next client's: lend the
      // server again only once PostgreSQL has taken every cancel sent for it.
      server.onCancelsDone = () => this.release(server)
      return
    }
    // A PAUSE waiting for quiet hears of a release that leaves no other server lent before the pool
    // decides where this one goes: its fiber runs at once and may RESUME or RECONNECT, which the
    // decision below then follows. Meanwhile the server still counts (a RESUME opens no server past
    // the pool's size for the waiters it finds).
    if (this.quietListeners.length > 0) this.notifyQuiet(server)
    const stale = this.stale.size > 0 && this.stale.delete(server)
    const now = Date.now()
    if (this.closed || stale || !server.isIdle || server.terminating || this.expired(server, now)) {
      this.unlend(server)
      this.closeCounted(server, stale ? "tenant reconfigured" : "released", false)
      this.afterShrink()
      return
    }
    // Worker and cluster mode: above its share. (Pressed, a server coming back is not closed: it was
    // just used; idle ones go once unused for PRESSED_IDLE_MS, `closeUnused`.)
    // `live` still counts this server (it leaves `busy` only below): above its share means more than `keep`.
    if (this.gate !== undefined && this.live > this.keep) {
      this.unlend(server)
      this.closeCounted(server, "permit returned to another worker", false)
      this.afterShrink()
      return
    }
    server.lastUsedAt = now
    const waiter = this.paused ? undefined : this.nextWaiter()
    if (waiter !== undefined) {
      // Straight to the next client: it stays in `busy` (a Set's delete and add cost more than the
      // rest of a release).
      this.lend(server, waiter, now)
      return
    }
    this.unlend(server)
    this.watchIdle(server)
    this.idle.push(server)
    // Pressed: it closes if it goes unused (at most one timer per PRESSED_IDLE_MS, not one per release).
    if (this.pressed && this.pressTimer === undefined) this.pressTimer = setTimeout(this.onPressTimer, PRESSED_IDLE_MS)
  }

  /** Closes `server` and keeps counting it against the cap until its socket has really closed. */
  private closeCounted(server: ServerConnection, reason: string, destroy: boolean): void {
    if (!server.socket.destroyed) {
      this.closing++
      server.socket.once("close", () => {
        this.closing--
        this.afterShrink()
      })
    }
    if (destroy) server.destroy(reason)
    else server.close(reason)
  }

  /**
   * Closes a server whose state is unknown (client vanished mid-statement or mid-transaction,
   * protocol error). Nothing more may be written to it (the client may have left half a message), so
   * its socket is destroyed; and since a backend notices a closed socket only when it next reads, a
   * statement it is running (`pg_sleep`, a lock wait, a long query) would keep its transaction and
   * locks until it ends: it is cancelled too, as a client would, on a connection of its own. The
   * server counts against the cap until that cancel has been delivered.
   */
  discard(server: ServerConnection, reason: string): void {
    this.busy.delete(server)
    this.stale.delete(server)
    if (this.quietListeners.length > 0) this.notifyQuiet()
    const backendAlive = !server.closed
    this.closeCounted(server, reason, true)
    if (backendAlive) {
      this.closing++
      this.runFork(
        Effect.ensuring(
          server.cancel,
          Effect.sync(() => {
            this.closing--
            this.afterShrink()
          })
        )
      )
    }
    this.afterShrink()
  }

  /** Closes a server politely: bytes already written reach it first (it runs them, then reads Terminate). */
  retire(server: ServerConnection, reason: string): void {
    this.busy.delete(server)
    this.stale.delete(server)
    if (this.quietListeners.length > 0) this.notifyQuiet()
    this.closeCounted(server, reason, false)
    this.afterShrink()
  }

  /**
   * Closes idle servers past their lifetime, and those idle longer than the idle timeout while more
   * than the warm minimum are open; then opens servers up to the warm minimum. Called by the
   * registry's coarse timer.
   */
  maintain(now: number): void {
    this.expireSeats(now)
    const { serverIdleTimeoutMs, minSize, size } = this.settings
    // Oldest first: the idle list is used LIFO, so its head has waited longest.
    for (let i = 0; i < this.idle.length; ) {
      const server = this.idle[i]!
      const idleTooLong = serverIdleTimeoutMs > 0 && now - server.lastUsedAt >= serverIdleTimeoutMs
      // Pressed (several processes): another one waits, so an idle server its clients left unused
      // for PRESSED_IDLE_MS goes.
      const unwanted = this.pressed && now - server.lastUsedAt >= PRESSED_IDLE_MS
      const expired = this.expired(server, now)
      if (expired || unwanted || (idleTooLong && this.live > minSize)) {
        this.idle.splice(i, 1)
        server.handler = undefined
        this.closeCounted(
          server,
          expired ? "lifetime reached" : unwanted ? "permit returned to another worker" : "idle timeout",
          false
        )
      } else {
        i++
      }
    }
    // Warm servers only while the database answers: a failing pool dials again only for a waiting
    // client, so a pool nobody uses (its clients gone, its database missing) stops dialling.
    if (this.lastConnectError === undefined) {
      while (
        !this.closed &&
        this.live < Math.min(minSize, size) &&
        this.total < size &&
        (this.gate === undefined || (this.total < this.granted && !this.pressed))
      )
        this.open()
    }
    if (this.waiters.length > 0) this.grow(now)
    if (this.gate !== undefined) {
      this.growServers(now)
      this.settlePermits(true)
      this.queuedSinceSweep = this.waiters.length > 0
    }
  }

  private hub: ListenHub | undefined = undefined

  /**
   * LISTEN/NOTIFY for this pool's clients: one more connection, opened on the first LISTEN and not
   * counted in `size` (docs/session-state.md#listen-and-notify).
   */
  get listenHub(): ListenHub {
    if (this.hub === undefined) {
      this.hub = new ListenHub(() => this.settings.target, this.runFork)
      if (this.closed) this.hub.close()
    }
    return this.hub
  }

  /** Stops lending, fails waiters, closes idle servers; busy ones close when released. */
  close(): void {
    if (this.closed) return
    this.closed = true
    this.hub?.close()
    if (this.deadlineTimer !== undefined) clearTimeout(this.deadlineTimer)
    if (this.retryTimer !== undefined) clearTimeout(this.retryTimer)
    if (this.pressTimer !== undefined) clearTimeout(this.pressTimer)
    for (const w of this.waiters.drain()) w.callback(tidepoolError("ESERVERCLOSED", "pool is shutting down"), undefined)
    for (const listener of this.quietListeners.splice(0)) listener()
    for (const s of this.idle.splice(0)) {
      s.handler = undefined
      // Worker mode: the permit goes back only once the socket has closed.
      if (this.gate !== undefined) this.closeCounted(s, "pool closed", false)
      else s.close("pool closed")
    }
    if (this.gate !== undefined) this.settlePermits()
    if (this.seats !== undefined) this.closeSeats()
  }

  get isClosed(): boolean {
    return this.closed
  }

  private expired(server: ServerConnection, now: number): boolean {
    return (
      server.createdAt <= this.reconnectBefore ||
      (this.settings.serverLifetimeMs > 0 && now - server.createdAt >= this.settings.serverLifetimeMs)
    )
  }

  /** A server leaves `busy` (back to idle, or closing). */
  private unlend(server: ServerConnection): void {
    this.busy.delete(server)
    if (this.quietListeners.length > 0) this.notifyQuiet()
  }

  /** Quiet: no server lent, or only `releasing` (being released now). */
  private notifyQuiet(releasing?: ServerConnection): void {
    const busy = this.busy
    if (busy.size > 1 || (busy.size === 1 && (releasing === undefined || !busy.has(releasing)))) return
    for (const listener of this.quietListeners.splice(0)) listener()
  }

  private takeIdle(): ServerConnection | undefined {
    // LIFO: the most recently used server has warm caches, and cold ones age out by the idle timeout.
    for (;;) {
      const server = this.idle.pop()
      if (server === undefined) return undefined
      if (server.closed || server.terminating) continue
      server.handler = undefined
      this.busy.add(server)
      return server
    }
  }

  /** Hands `server`, already in `busy`, to `waiter`. */
  private lend(server: ServerConnection, waiter: Waiter, now: number = Date.now()): void {
    server.handler = undefined
    const counters = this.counters
    counters.checkouts++
    counters.checkoutsWaited++
    const waited = now - waiter.since
    counters.checkoutWaitMs += waited
    counters.checkoutWait.observe(waited)
    if (this.onWaitEnded !== undefined) this.onWaitEnded(waiter.since, now, this.waiters.length, undefined)
    handOff(this, waiter, server)
  }

  private nextWaiter(): Waiter | undefined {
    for (;;) {
      const w = this.waiters.shift()
      if (w === undefined || !w.cancelled) return w
    }
  }

  /** Whether clients wait for the database to come back rather than get the connect error at once. */
  private ridingOut(now: number): boolean {
    return this.outageSince !== undefined && now - this.outageSince < this.settings.checkoutTimeoutMs
  }

  private forgetFailures(): void {
    this.lastConnectError = undefined
    this.connectFailures = 0
    this.retryAt = 0
    this.outageSince = undefined
  }

  /**
   * Opens servers for waiters, up to the exact cap. While connects fail, one attempt at a time and
   * not before the back-off ends (a timer brings the next one); the first success opens the rest.
   */
  private grow(now: number = Date.now()): void {
    this.growServers(now)
    if (this.gate !== undefined) this.settlePermits()
  }

  private growServers(now: number): void {
    while (
      !this.closed &&
      !this.paused &&
      this.waiters.length > this.opening &&
      this.total < this.settings.size &&
      (this.gate === undefined || (this.total < this.granted && this.live < this.keep))
    ) {
      if (this.lastConnectError !== undefined) {
        if (this.opening > 0) return
        if (now < this.retryAt) {
          this.armRetry(now)
          return
        }
      }
      this.open()
    }
  }

  private armRetry(now: number): void {
    if (this.retryTimer !== undefined || this.closed) return
    this.retryTimer = setTimeout(this.onRetry, Math.max(0, this.retryAt - now))
  }

  private readonly onRetry = (): void => {
    this.retryTimer = undefined
    this.grow()
  }

  private open(): void {
    this.opening++
    const generation = this.generation
    this.runFork(
      connect(this.settings.target).pipe(
        Effect.exit,
        Effect.tap((exit) =>
          Effect.sync(() => {
            this.opening--
            if (Exit.isSuccess(exit) && generation !== this.generation) {
              this.closeCounted(exit.value, "tenant reconfigured", false)
              this.afterShrink()
            } else if (Exit.isSuccess(exit)) this.onOpened(exit.value)
            else this.onConnectFailed(exit)
          })
        )
      )
    )
  }

  private onOpened(server: ServerConnection): void {
    const recovered = this.lastConnectError !== undefined
    this.forgetFailures()
    this.counters.serverConnects++
    this.parameters ??= new Map(server.parameters)
    server.withholdBetweenTransactions = this.settings.mode === "transaction"
    const gate = this.gate
    if (gate !== undefined) {
      gate.opened(server)
      server.socket.once("close", () => gate.closed(server))
    }
    if (this.closed) {
      server.close("pool closed")
      return
    }
    // Worker and cluster mode: a server opened for a permit serves a waiting client before a
    // directive can take it back (one that came while it connected). Without this, a pool smaller
    // than the number of busy workers handed its permit round, each new server closed unused.
    const first = gate !== undefined && !this.paused ? this.nextWaiter() : undefined
    if (first !== undefined) {
      server.lastUsedAt = Date.now()
      this.busy.add(server)
      this.lend(server, first)
    } else {
      this.busy.add(server)
      this.release(server)
    }
    // Connects went one at a time while failing: the clients still waiting need the rest now.
    if (recovered) this.grow()
  }

  private onConnectFailed(exit: Exit.Exit<ServerConnection, TidepoolError>): void {
    if (Exit.isSuccess(exit)) return
    if (Cause.hasInterruptsOnly(exit.cause)) return // the pool is closing
    // A defect (a bug, or bytes no PostgreSQL would send) is a failed connect like any other.
    const failure = Option.getOrElse(Cause.findErrorOption(exit.cause), () =>
      upstreamError({ code: "08006", message: `Failed to connect to database: ${Cause.squash(exit.cause)}` })
    )
    this.counters.serverConnectFailures++
    const now = Date.now()
    const transient = ServerConnection.isTransient(failure)
    if (!transient) this.outageSince = undefined
    else if (this.lastConnectError === undefined && this.counters.serverConnects > 0) this.outageSince ??= now
    this.lastConnectError = failure
    this.connectFailures++
    this.retryAt =
      now +
      (transient
        ? Math.min(RETRY_MAX_MS, RETRY_FIRST_MS * 2 ** Math.min(this.connectFailures - 1, 20))
        : this.settings.connectBackoffMs)
    const alive = this.busy.size + this.idle.length > 0
    if (transient && (alive || this.ridingOut(now))) {
      // A server may be released, or the database come back: waiters keep their place (and their
      // deadline) while the pool tries again.
      if (this.waiters.length > 0) this.armRetry(now)
      return
    }
    // Nobody can be served soon if no server is alive: tell every waiter now instead of at their deadline.
    if (!alive) {
      for (const w of this.waiters.drain()) if (!w.cancelled) w.callback(failure, undefined)
    } else {
      const w = this.nextWaiter()
      w?.callback(failure, undefined)
    }
  }

  private afterShrink(): void {
    if (this.waiters.length > 0 || this.gate !== undefined) this.grow()
  }

  /**
   * Worker mode: asks the ledger for the permits waiting clients need beyond those held, and gives
   * back those no server and no waiting client needs (a closed server's, once its socket closed).
   */
  private settlePermits(fromSweep = false): void {
    const gate = this.gate!
    const size = this.settings.size
    const need =
      this.closed || this.paused ? 0 : Math.max(0, Math.min(this.waiters.length - this.opening, size - this.total))
    // Permits neither backing a server nor about to (within the share the ledger set) go back. A
    // pool whose clients queued since the last sweep keeps those within its share for the next
    // checkout that queues: judged at one instant (a grant landing between two transactions), the
    // busy process handed a permit back and asked for it again, several times in a row.
    const within = Math.max(0, this.keep - this.live)
    const kept =
      this.queuedSinceSweep && !this.pressed && !this.closed && !this.paused ? within : Math.min(need, within)
    const spare = Math.max(0, this.granted - this.total - kept)
    const want = need - (this.granted - this.total)
    if (want > this.wantSent) {
      this.wantSent = want
      gate.want(size, want)
    } else if (want <= 0 && this.wantSent > 0 && (spare > 0 || fromSweep) && !this.queuedSinceSweep) {
      // "Want nothing" goes with permits given back, or at a sweep, and only once no checkout has
      // queued for a whole sweep interval (`queuedSinceSweep`): a pool whose clients wait now and
      // then would otherwise tell the ledger at every transaction, or at every other sweep.
      this.wantSent = 0
      gate.want(size, 0)
    }
    if (spare > 0) {
      this.granted -= spare
      gate.release(spare)
    }
  }

  /** The ledger granted `n` permits. */
  grant(n: number): void {
    this.granted += n
    this.wantSent = Math.max(0, this.wantSent - n)
    this.grow()
  }

  /**
   * The ledger's directive (docs/scale-out.md#the-permit-model): idle servers beyond `keep` close
   * now; pressed, so do those unused for PRESSED_IDLE_MS, and the others as they pass it.
   */
  direct(keep: number, pressed: boolean): void {
    this.keep = keep
    this.pressed = pressed
    while (this.idle.length > 0 && this.live > keep) {
      const server = this.idle.shift()!
      server.handler = undefined
      this.closeCounted(server, "permit returned to another worker", false)
    }
    this.closeUnused()
    this.grow()
  }

  /**
   * Pressed: closes the idle servers unused for PRESSED_IDLE_MS (another process waits and this one
   * has not needed them), and arms a timer for the next one to get there. A pool whose clients use
   * every server it holds keeps them: its share is what it holds (water-filling), and what another
   * process waits for is taken from pools that have servers to spare.
   */
  private closeUnused(): void {
    if (this.pressTimer !== undefined) {
      clearTimeout(this.pressTimer)
      this.pressTimer = undefined
    }
    if (!this.pressed || this.closed) return
    const now = Date.now()
    let next = Number.POSITIVE_INFINITY
    for (let i = 0; i < this.idle.length; ) {
      const server = this.idle[i]!
      const unusedFor = now - server.lastUsedAt
      if (unusedFor >= PRESSED_IDLE_MS) {
        this.idle.splice(i, 1)
        server.handler = undefined
        this.closeCounted(server, "permit returned to another worker", false)
      } else {
        next = Math.min(next, PRESSED_IDLE_MS - unusedFor)
        i++
      }
    }
    if (next !== Number.POSITIVE_INFINITY) this.pressTimer = setTimeout(this.onPressTimer, next)
  }

  private readonly onPressTimer = (): void => {
    this.pressTimer = undefined
    this.closeUnused()
    this.afterShrink()
  }

  /** Permits held (worker mode), for tests and views. */
  get permits(): number {
    return this.granted
  }

  private armDeadline(): void {
    if (this.deadlineTimer !== undefined) return
    const head = this.waiters.find(isWaiting)
    if (head === undefined) return
    this.deadlineTimer = setTimeout(this.onDeadline, Math.max(0, head.deadline - Date.now()))
  }

  private readonly onDeadline = (): void => {
    this.deadlineTimer = undefined
    const now = Date.now()
    const mode = this.settings.mode === "session" ? "Session" : "Transaction"
    while (this.waiters.length > 0 && this.waiters.peek()!.deadline <= now) {
      const w = this.waiters.shift()!
      if (w.cancelled) continue
      this.counters.checkoutTimeouts++
      // Waiting out an outage that outlasted the wait: why there was no server says more than a timeout.
      const error =
        this.lastConnectError !== undefined && this.busy.size + this.idle.length === 0
          ? this.lastConnectError
          : tidepoolError("ECHECKOUTTIMEOUT", this.settings.checkoutTimeoutMs, mode)
      if (this.onWaitEnded !== undefined) this.onWaitEnded(w.since, now, this.waiters.length, error)
      w.callback(error, undefined)
    }
    this.armDeadline()
  }

  /** While idle, a server speaks only if it is dying (admin shutdown, pg_terminate_backend). */
  private watchIdle(server: ServerConnection): void {
    // Made once per server, not per release: this runs at every transaction boundary.
    server.idleHandler ??= {
      onData: () => {
        this.removeIdle(server)
        this.closeCounted(server, "unexpected message while idle", true)
        this.afterShrink()
      },
      onClose: () => {
        this.removeIdle(server)
        this.afterShrink()
      }
    }
    server.handler = server.idleHandler
  }

  private removeIdle(server: ServerConnection): void {
    const i = this.idle.indexOf(server)
    if (i >= 0) this.idle.splice(i, 1)
  }
}

/** Builds a pool whose connect fibers live in the current scope. */
export const makeTenantPool = (settings: PoolSettings): Effect.Effect<TenantPool, never, Scope.Scope> =>
  Effect.gen(function* () {
    const run = yield* FiberSet.makeRuntime<never, unknown, unknown>()
    const pool = new TenantPool(settings, (effect) => {
      run(effect as Effect.Effect<unknown, unknown, never>)
    })
    yield* Effect.addFinalizer(() => Effect.sync(() => pool.close()))
    return pool
  })
