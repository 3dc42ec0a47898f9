import { randomUUID } from "node:crypto"
import { readFileSync } from "node:fs"
import * as net from "node:net"
import { Effect, Result } from "effect"
import pg from "pg"
import type { PoolPermits, TenantPool } from "../pool/index.ts"
import type { PoolSeats } from "../pool/SeatGate.ts"
import { type CancelTarget, type ServerConnection, sendCancel } from "../upstream/index.ts"
import { type Claim, type Directive, divide } from "./PoolShares.ts"

/**
 * One runner of the store ledger (docs/scale-out.md#several-hosts): this process's line to the
 * permit ledger kept in the PostgreSQL tenant store, shared by every host. Each pool's permits are
 * taken and given back in short transactions serialised per pool by a transaction-scoped advisory
 * lock; the runner's row is a lease it renews; a runner whose lease expired while the store was up
 * and whose store session is gone has its servers' queries cancelled and its permits reclaimed by
 * any other. Nothing here runs per transaction: the store hears of a pool when it opens or closes
 * servers, or when its clients start or stop waiting.
 *
 * Plain callbacks over one dedicated `pg` connection (its session holds the runner's advisory lock
 * and LISTENs), every store job in one queue, so the runner's own transactions never interleave.
 */

/** The advisory-lock namespace (first int4): runner locks are (NS, runner_id), pool locks (NS + 1, hashtext(key)). */
export const NS = 0x74696470
const CHANNEL = "tidepool_permits"
/** Seats (max_clients across hosts): a runner was asked to give back unused seats, or answered. */
const SEAT_CHANNEL = "tidepool_seats"
/** How long a login short of a seat waits for the other runners to give back their unused ones. */
const SEAT_ANSWER_MS = 2_000
/** Process ids in cluster mode: the runner's slot in bits 20–30, 20 random bits below. */
export const SLOT_SHIFT = 20
export const MAX_SLOT = 2 ** (31 - SLOT_SHIFT) - 1
/** How often a pool whose clients wait asks again, should a notification be lost (reconnects). */
const POLL_MS = 1_000

export const slotOf = (processId: number): number => processId >>> SLOT_SHIFT

/**
 * The slot a registration takes: its previous one if free (a runner back from a reclaim keeps the
 * ids its clients hold), else the first free one after `cursor` in cyclic order. The cursor moves
 * with every registration (the runner-id sequence), so a slot freed by a reclaim is taken again
 * only after the other slots have had their turn: a runner cut off from the store past its lease
 * finds its slot still free when it comes back, and its clients' cancels still reach it.
 */
export const pickSlot = (used: ReadonlySet<number>, previous: number, cursor: number, max = MAX_SLOT): number => {
  if (previous > 0 && previous <= max && !used.has(previous)) return previous
  for (let i = 0; i < max; i++) {
    const slot = ((((cursor + i) % max) + max) % max) + 1
    if (!used.has(slot)) return slot
  }
  return 0
}

/**
 * A pool's name in the store: its key's parts (tenant, user, mode, database; NUL-separated in
 * memory, which PostgreSQL text cannot hold) as a JSON array, readable in `tidepool_permits`.
 */
export const storeKey = (key: string): string => JSON.stringify(key.split("\u0000"))
const memoryKey = (stored: string): string | undefined => {
  try {
    const parts: unknown = JSON.parse(stored)
    return Array.isArray(parts) ? parts.join("\u0000") : undefined
  } catch {
    return undefined
  }
}

const SCHEMA = [
  `CREATE TABLE IF NOT EXISTS tidepool_runners (
    runner_id BIGSERIAL PRIMARY KEY,
    slot INT NOT NULL UNIQUE,
    address TEXT NOT NULL,
    token TEXT NOT NULL DEFAULT '',
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    renewed_at TIMESTAMPTZ NOT NULL DEFAULT now()
  )`,
  `CREATE TABLE IF NOT EXISTS tidepool_permits (
    pool_key TEXT NOT NULL,
    runner_id BIGINT NOT NULL REFERENCES tidepool_runners ON DELETE CASCADE,
    held INT NOT NULL,
    want INT NOT NULL,
    want_since BIGINT NOT NULL DEFAULT 0,
    keep INT,
    press BOOLEAN NOT NULL DEFAULT false,
    PRIMARY KEY (pool_key, runner_id)
  )`,
  "CREATE INDEX IF NOT EXISTS tidepool_permits_runner ON tidepool_permits (runner_id)",
  // Stores created before runners had a token. (ALTER TABLE … IF NOT EXISTS would take its table's
  // exclusive lock even when the column is there.)
  `DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('tidepool_runners') AND attname = 'token' AND NOT attisdropped) THEN
      ALTER TABLE tidepool_runners ADD COLUMN token TEXT NOT NULL DEFAULT '';
    END IF;
  END $$`,
  `CREATE TABLE IF NOT EXISTS tidepool_seats (
    pool_key TEXT NOT NULL,
    runner_id BIGINT NOT NULL REFERENCES tidepool_runners ON DELETE CASCADE,
    held INT NOT NULL,
    reclaim BOOLEAN NOT NULL DEFAULT false,
    PRIMARY KEY (pool_key, runner_id)
  )`,
  `CREATE TABLE IF NOT EXISTS tidepool_backends (
    runner_id BIGINT NOT NULL REFERENCES tidepool_runners ON DELETE CASCADE,
    host TEXT NOT NULL,
    port INT NOT NULL,
    pid INT NOT NULL,
    secret TEXT NOT NULL,
    tls BOOLEAN NOT NULL DEFAULT false,
    tls_server_name TEXT,
    tls_verify BOOLEAN NOT NULL DEFAULT false,
    tenant TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (runner_id, host, port, pid)
  )`,
  // Stores created before TLS backends were recorded: their rows (all plaintext) keep the defaults.
  `DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('tidepool_backends') AND attname = 'tenant' AND NOT attisdropped) THEN
      ALTER TABLE tidepool_backends ADD COLUMN IF NOT EXISTS tls BOOLEAN NOT NULL DEFAULT false,
        ADD COLUMN IF NOT EXISTS tls_server_name TEXT,
        ADD COLUMN IF NOT EXISTS tls_verify BOOLEAN NOT NULL DEFAULT false,
        ADD COLUMN IF NOT EXISTS tenant TEXT NOT NULL DEFAULT '';
    END IF;
  END $$`
]

/**
 * Whether the ledger's tables are all there. The DDL runs only if not: even with IF NOT EXISTS,
 * CREATE INDEX locks its table against writes, and at every registration that queued other
 * runners' pool transactions behind it (two runners registering at once after a store restored
 * empty deadlocked on it).
 */
const SCHEMA_PRESENT = `SELECT to_regclass('tidepool_runners') IS NOT NULL AND to_regclass('tidepool_permits') IS NOT NULL
  AND to_regclass('tidepool_backends') IS NOT NULL AND to_regclass('tidepool_seats') IS NOT NULL
  AND to_regclass('tidepool_permits_runner') IS NOT NULL
  AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('tidepool_runners') AND attname = 'token' AND NOT attisdropped)
  AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('tidepool_backends') AND attname = 'tenant' AND NOT attisdropped) AS ok`

export interface RunnerOptions {
  readonly url: string
  readonly leaseMs: number
  /** host:port other runners forward this runner's CancelRequests to. */
  readonly address: string
  /** Bounds each cancel sent for a reclaimed runner's backend, and each store query. */
  readonly timeoutMs: number
  readonly log: (level: "debug" | "info" | "warning", message: string) => void
  /** Told the runner's slot at every registration (a re-registration may have to take another). */
  readonly onSlot?: (slot: number) => void
  /**
   * `GLOBAL_UPSTREAM_CA_PATH`: verifies a reclaimed TLS backend whose tenant has no `upstream_tls_ca`
   * of its own, as this host's own server connections would be verified.
   */
  readonly upstreamCaPath?: string
}

/** A backend as a reclaimer needs it: where it is, its cancel key, and how its owner reached it. */
export interface BackendRef {
  readonly host: string
  readonly port: number
  readonly pid: number
  /** The backend's cancel key, hex. */
  readonly secret: string
  /** Its owner spoke TLS to it (tenant `upstream_ssl`); absent: plaintext. */
  readonly tls?: boolean | undefined
  /** The TLS server name its owner sent (SNI) and verified: the tenant's `db_host`. */
  readonly tlsServerName?: string | undefined
  /** Its owner verified the certificate (tenant `upstream_verify: peer`). */
  readonly tlsVerify?: boolean | undefined
}

/**
 * What holds a pool's permits on this runner: a TenantPool (one process per host), or the
 * supervisor's host ledger for one pool key (several workers per host, src/cluster/HostPermits.ts).
 */
export interface PermitHolder {
  readonly settings: { readonly key: string; readonly size: number }
  readonly isClosed: boolean
  grant(n: number): void
  direct(keep: number, press: boolean): void
}

/** A holder's line to the runner; a backend undefined is not recorded (one its worker could not report). */
export interface LinePermits {
  readonly want: (size: number, n: number) => void
  readonly release: (n: number) => void
  readonly opened: (backend: BackendRef | undefined) => void
  readonly closed: (backend: BackendRef | undefined) => void
}

/**
 * A server's cancel key as the store records it, with how it was reached: a TLS upstream (or a proxy
 * in front of it) may refuse a plaintext cancel, so a reclaimer cancels over TLS as its owner would.
 */
export const backendRef = (server: ServerConnection): BackendRef => ({
  host: server.target.host,
  port: server.target.port,
  pid: server.backendPid,
  secret: server.backendSecret.toString("hex"),
  ...(server.target.tls === undefined
    ? {}
    : { tls: true, tlsServerName: server.target.host, tlsVerify: server.target.tls.verify })
})

interface PoolLine {
  /** The newest pool of this key; an older one closing still returns its permits under the key. */
  pool: PermitHolder | undefined
  size: number
  /** Permits this runner's pools hold (granted and not released). */
  held: number
  /** More permits wanted now (the pool's last `want`, less what was granted since). */
  want: number
  /** Released permits the store does not know of yet. */
  release: number
  /** The directive last given to the pool. */
  directive: Directive
  /** When its last transaction ran (monotonic ms): the once-a-second re-ask skips a pool just settled. */
  settledAt: number
}

/** `tenant`: the pool key's tenant, whose record in the store gives a reclaimer its `upstream_tls_ca`. */
type BackendOp = { readonly add: boolean; readonly ref: BackendRef; readonly tenant: string }

/** A backend's row as `flushBackends` writes it (json_to_recordset's names). */
const backendRow = ({ ref, tenant }: BackendOp) => ({
  host: ref.host,
  port: ref.port,
  pid: ref.pid,
  secret: ref.secret,
  tls: ref.tls === true,
  tls_server_name: ref.tls === true ? (ref.tlsServerName ?? ref.host) : null,
  tls_verify: ref.tls === true && ref.tlsVerify === true,
  tenant
})

/** What holds a pool's client seats on this runner: a TenantPool, or a host's supervisor (HostSeats). */
export interface SeatHolder {
  readonly settings: { readonly key: string }
  readonly isClosed: boolean
  seatsGranted(n: number, spare: number): void
  /** Gives back every unused seat, through `release(n, true)` (even 0), now or later. */
  reclaimSeats(): void
}

/** A pool's client seats on this runner (max_clients across hosts, docs/scale-out.md#max_clients-across-hosts). */
interface SeatLine {
  pool: SeatHolder | undefined
  /** Seats this runner holds: its clients, those reserved for logins on their way, its spare block. */
  held: number
  limit: number
  /** The pool's open request: logins short of a seat (0: a spare block is welcome); undefined: none. */
  need: number | undefined
  /** Since when (monotonic ms) the request waits for other runners to give back unused seats; 0: it does not. */
  askedAt: number
  /** Other runners asked this one for its unused seats: the pool's answer is to be written. */
  answered: boolean
  /** The pool was asked for its unused seats and has not answered yet. */
  reclaiming: boolean
}

const LIFTED: Directive = { keep: null, press: false }

/** A recorded backend as its owner reported it. */
const recordedRef = (b: RecordedBackend): BackendRef => ({
  host: b.host,
  port: b.port,
  pid: b.pid,
  secret: b.secret,
  ...(b.tls ? { tls: true, tlsServerName: b.tls_server_name ?? b.host, tlsVerify: b.tls_verify } : {})
})

/** A row of `tidepool_backends`, as a reclaimer reads it. */
interface RecordedBackend {
  readonly host: string
  readonly port: number
  readonly pid: number
  readonly secret: string
  readonly tls: boolean
  readonly tls_server_name: string | null
  readonly tls_verify: boolean
  readonly tenant: string
}

/** Sends a CancelRequest and resolves once the server has taken it (closed), or after `timeoutMs`. */
export const sendCancelRequest = (
  host: string,
  port: number,
  pid: number,
  secret: Buffer,
  timeoutMs: number
): Promise<void> =>
  new Promise((resolve) => {
    const packet = Buffer.alloc(12 + secret.length)
    packet.writeInt32BE(packet.length, 0)
    packet.writeInt32BE(80877102, 4)
    packet.writeInt32BE(pid, 8)
    secret.copy(packet, 12)
    const socket = net.connect({ host, port })
    const timer = setTimeout(() => socket.destroy(), timeoutMs)
    socket.on("error", () => undefined)
    socket.on("close", () => {
      clearTimeout(timer)
      resolve()
    })
    socket.on("connect", () => socket.end(packet))
  })

/** Where and how to send a backend's CancelRequest: the way its owner reached it (TLS, server name, verification). */
export const cancelTargetOf = (b: BackendRef, ca: string | undefined, timeoutMs: number): CancelTarget => ({
  host: b.host,
  port: b.port,
  connectTimeoutMs: timeoutMs,
  ...(b.tls === true ? { tls: { verify: b.tlsVerify === true, ca }, serverName: b.tlsServerName ?? b.host } : {})
})

const splitAddress = (address: string): { host: string; port: number } => {
  const at = address.lastIndexOf(":")
  return { host: address.slice(0, at).replace(/^\[|\]$/g, ""), port: Number(address.slice(at + 1)) }
}

export class StoreRunner {
  private client: pg.Client | undefined
  /** When the current store session began (monotonic ms): reclaiming needs a lease's worth of it. */
  private connectedAt = 0
  private runnerId: number | undefined
  /**
   * This registration's own mark on its row. A store restored empty restarts the runner_id
   * sequence, so a runner id alone may name another runner's new row: every write checks the token.
   */
  private token = ""
  private slotNumber = 0
  private readonly lines = new Map<string, PoolLine>()
  private readonly dirty = new Set<string>()
  private readonly seatLines = new Map<string, SeatLine>()
  private readonly dirtySeats = new Set<string>()
  private backendOps: Array<BackendOp> = []
  /** Open servers' backends by host/port/pid, re-recorded after a re-registration. */
  private readonly backends = new Map<string, BackendOp>()
  private addresses = new Map<number, string>()
  private queue: Promise<void> = Promise.resolve()
  private pumping = false
  private lastRenewal = 0
  private timer: NodeJS.Timeout | undefined
  private stopping = false
  private reconnecting = false
  /** Pool transactions since the last renewal (logged at debug with it: the ledger's store traffic). */
  private settles = 0
  private onHeldChange: (() => void) | undefined

  private constructor(private readonly options: RunnerOptions) {}

  /** Connects, creates the ledger's tables if needed and registers; fails if the store cannot be reached. */
  static async start(options: RunnerOptions): Promise<StoreRunner> {
    const runner = new StoreRunner(options)
    await runner.connect()
    await runner.register()
    await runner.refreshAddresses()
    const tick = Math.min(POLL_MS, Math.max(100, Math.floor(options.leaseMs / 3)))
    runner.timer = setInterval(() => runner.tick(), tick)
    runner.timer.unref()
    return runner
  }

  /** This runner's number in BackendKeyData (1–2047). */
  get slot(): number {
    return this.slotNumber
  }

  /** The high bits of this runner's client process ids. */
  readonly prefix = (): number => this.slotNumber << SLOT_SHIFT

  attach(pool: TenantPool): PoolPermits {
    const line = this.attachHolder(pool)
    return {
      want: line.want,
      release: line.release,
      opened: (server) => line.opened(backendRef(server)),
      closed: (server) => line.closed(backendRef(server))
    }
  }

  attachHolder(pool: PermitHolder): LinePermits {
    const key = pool.settings.key
    const line = this.line(key)
    line.pool = pool
    // A record made from a late report knows no size (0): the line keeps the one it has.
    if (pool.settings.size > 0) line.size = pool.settings.size
    if (line.directive.keep !== null || line.directive.press)
      pool.direct(line.directive.keep ?? Number.POSITIVE_INFINITY, line.directive.press)
    return {
      want: (size, n) => {
        line.size = size
        line.want = Math.max(0, n)
        this.touch(key)
      },
      release: (n) => {
        line.held -= n
        line.release += n
        this.touch(key)
        this.onHeldChange?.()
      },
      opened: (backend) => this.backendOp(true, backend, key),
      closed: (backend) => this.backendOp(false, backend, key)
    }
  }

  /**
   * max_clients across hosts: the pool's seats are counted in the store, taken in blocks (so a login
   * costs a store transaction only when its runner's block is used up), and a login is refused only
   * after every other runner holding seats has been asked for its unused ones.
   */
  attachSeats(pool: SeatHolder): PoolSeats {
    const key = pool.settings.key
    let line = this.seatLines.get(key)
    if (line === undefined) {
      line = { pool, held: 0, limit: 0, need: undefined, askedAt: 0, answered: false, reclaiming: false }
      this.seatLines.set(key, line)
    }
    line.pool = pool
    const seats = line
    return {
      want: (limit, need) => {
        seats.limit = limit
        seats.need = Math.max(seats.need ?? 0, need)
        if (this.client === undefined) {
          setImmediate(() => this.answerLocally(key, seats))
          return
        }
        this.touchSeats(key)
      },
      release: (n, reclaimed) => {
        seats.held -= n
        if (reclaimed) {
          seats.answered = true
          seats.reclaiming = false
        }
        this.touchSeats(key)
      }
    }
  }

  private touchSeats(key: string): void {
    this.dirtySeats.add(key)
    this.pump()
  }

  /**
   * Fail static for seats: while the store is away, logins are admitted up to the pool's limit on
   * this host alone (as without cluster mode); once the store is back the seats held are written,
   * and while the pool's rows add up to more than its limit nobody is granted a new one.
   */
  private answerLocally(key: string, line: SeatLine): void {
    if (line.need === undefined) return
    this.answerSeats(key, line, Math.min(line.need, Math.max(0, line.limit - line.held)), 0)
  }

  /** The answer to a pool's request: `n` seats more (maybe 0); keep about `spare` unused. */
  private answerSeats(key: string, line: SeatLine, n: number, spare: number): void {
    if (line.need === undefined) return
    line.need = undefined
    line.askedAt = 0
    line.held += n
    const pool = line.pool
    if (pool === undefined || pool.isClosed) {
      line.held -= n
      if (n > 0) this.touchSeats(key)
      return
    }
    pool.seatsGranted(n, spare)
  }

  /**
   * One pool's seat transaction, under the pool's seat lock: write what this runner holds (the
   * truth: its pools' count), answer a reclaim asked of it, and serve its pool's request — from the
   * seats free, or, short of them, first asking every other runner holding seats to give back its
   * unused ones and waiting (up to SEAT_ANSWER_MS, a runner that cannot answer being dead or cut
   * off) until each has answered.
   */
  private async settleSeats(key: string): Promise<void> {
    const line = this.seatLines.get(key)
    if (line === undefined || this.runnerId === undefined) return
    const me = this.runnerId
    const sk = storeKey(key)
    const need = line.need
    const answered = line.answered
    const now = performance.now()
    const result = await this.transaction(async (c) => {
      await c.query("SELECT pg_advisory_xact_lock($1, hashtext($2))", [NS + 2, sk])
      await this.ours(c)
      const rows = (
        await c.query("SELECT runner_id, held, reclaim FROM tidepool_seats WHERE pool_key = $1", [sk])
      ).rows.map((r) => ({ id: Number(r.runner_id), held: Number(r.held), reclaim: Boolean(r.reclaim) }))
      const own = rows.find((r) => r.id === me)
      const others = rows.filter((r) => r.id !== me)
      const askedOfUs = own?.reclaim === true && !answered
      let held = line.held
      let notify = answered
      let wait = false
      let grant = 0
      let spare = 0
      if (need !== undefined) {
        const runners = Number((await c.query("SELECT count(*) AS n FROM tidepool_runners")).rows[0].n)
        spare = Math.floor(line.limit / (4 * Math.max(1, runners)))
        const free = line.limit - held - others.reduce((sum, r) => sum + r.held, 0)
        if (need > 0 && free < need) {
          const unasked = others.filter((r) => r.held > 0 && !r.reclaim)
          if (line.askedAt === 0 && unasked.length > 0) {
            for (const r of unasked)
              await c.query("UPDATE tidepool_seats SET reclaim = true WHERE pool_key = $1 AND runner_id = $2", [
                sk,
                r.id
              ])
            notify = true
            wait = true
          } else if (others.some((r) => r.reclaim) && (line.askedAt === 0 || now - line.askedAt < SEAT_ANSWER_MS)) {
            wait = true
          }
        }
        if (!wait) {
          grant = Math.max(0, Math.min(free, need + spare))
          held += grant
        }
      }
      const reclaim = own?.reclaim === true && !answered
      if (held <= 0 && !reclaim) {
        if (own !== undefined)
          await c.query("DELETE FROM tidepool_seats WHERE pool_key = $1 AND runner_id = $2", [sk, me])
      } else if (own === undefined || own.held !== held || own.reclaim !== reclaim) {
        await c.query(
          `INSERT INTO tidepool_seats (pool_key, runner_id, held, reclaim) VALUES ($1, $2, $3, $4)
           ON CONFLICT (pool_key, runner_id) DO UPDATE SET held = $3, reclaim = $4`,
          [sk, me, Math.max(0, held), reclaim]
        )
      }
      if (notify) await c.query("SELECT pg_notify($1, $2)", [SEAT_CHANNEL, sk])
      return { wait, grant, spare, askedOfUs }
    })
    if (answered) line.answered = false
    if (need !== undefined) {
      if (result.wait) {
        if (line.askedAt === 0) line.askedAt = now
      } else this.answerSeats(key, line, result.grant, result.spare)
    }
    if (result.askedOfUs && !line.reclaiming) {
      line.reclaiming = true
      const pool = line.pool
      // The pool answers through `release(n, true)`, even with 0.
      if (pool !== undefined && !pool.isClosed) pool.reclaimSeats()
      else {
        line.reclaiming = false
        line.answered = true
        this.touchSeats(key)
      }
    }
  }

  /** A CancelRequest for another runner's client: sent on to that runner's address, as an ordinary one. */
  forwardCancel(processId: number, secret: Buffer): void {
    const slot = slotOf(processId)
    const send = (address: string | undefined) => {
      if (address === undefined || address === this.options.address) return
      const { host, port } = splitAddress(address)
      this.options.log("debug", `CancelRequest for runner ${slot} forwarded to ${address}`)
      void sendCancelRequest(host, port, processId, secret, this.options.timeoutMs)
    }
    const known = this.addresses.get(slot)
    if (known !== undefined) send(known)
    else void this.enqueue(() => this.refreshAddresses()).then(() => send(this.addresses.get(slot)))
  }

  /**
   * Shutdown, after the pools have closed: waits (up to `timeoutMs`) until every permit's server has
   * closed and the store knows, then deletes this runner's row so its permits are free at once. A
   * permit still held at the deadline stays with the row, for the lease to reclaim after cancels.
   */
  async stop(timeoutMs: number): Promise<void> {
    clearInterval(this.timer)
    const deadline = Date.now() + timeoutMs
    while (this.heldTotal() > 0 && Date.now() < deadline) {
      await new Promise<void>((resolve) => {
        this.onHeldChange = resolve
        setTimeout(resolve, deadline - Date.now()).unref()
      })
    }
    this.onHeldChange = undefined
    this.stopping = true
    await this.enqueue(async () => {
      if (this.client === undefined || this.runnerId === undefined || this.heldTotal() > 0) return
      await this.transaction(async (c) => {
        const keys = await c.query("SELECT pool_key FROM tidepool_permits WHERE runner_id = $1", [this.runnerId])
        await c.query("DELETE FROM tidepool_runners WHERE runner_id = $1 AND token = $2", [this.runnerId, this.token])
        for (const row of keys.rows) await c.query("SELECT pg_notify($1, $2)", [CHANNEL, row.pool_key])
      })
      this.options.log("info", `permit ledger: runner ${this.runnerId} left the store; its permits are free`)
    })
    const client = this.client
    this.client = undefined
    await client?.end().catch(() => undefined)
  }

  /**
   * Gives the pool its directive at once. A server still connecting for a grant is not lost to it:
   * the pool lends a server it opened for a permit to a waiting client before a directive can take
   * it back (TenantPool.onOpened), so a pool smaller than the number of busy runners still serves
   * someone at each hand-over. (A hold-back here, until the granted server had logged in, did the
   * same job less well: a grant netted against a release opened no server, and the directive then
   * waited for the 1 s fallback — an idle runner's first query took 2 s instead of 0.3 s,
   * `npm run bench:fairness -- --parts uneven`.)
   */
  private apply(line: PoolLine): void {
    const d = line.directive
    const pool = line.pool
    if (pool !== undefined && !pool.isClosed) pool.direct(d.keep ?? Number.POSITIVE_INFINITY, d.press)
  }

  private heldTotal(): number {
    let n = 0
    for (const line of this.lines.values()) n += line.held
    return n
  }

  private line(key: string): PoolLine {
    let line = this.lines.get(key)
    if (line === undefined) {
      line = {
        pool: undefined,
        size: 0,
        held: 0,
        want: 0,
        release: 0,
        directive: LIFTED,
        settledAt: 0
      }
      this.lines.set(key, line)
    }
    return line
  }

  private touch(key: string): void {
    this.dirty.add(key)
    this.pump()
  }

  private backendOp(add: boolean, ref: BackendRef | undefined, key: string): void {
    if (ref === undefined) return
    const id = `${ref.host}:${ref.port}:${ref.pid}`
    const op: BackendOp = { add, ref, tenant: key.split("\u0000")[0] ?? "" }
    if (add) this.backends.set(id, op)
    else {
      // Workers report over separate channels: a new backend that reuses a closed one's pid may be
      // reported before the old one's close, which must then not remove the new one.
      if (this.backends.get(id)?.ref.secret !== ref.secret) return
      this.backends.delete(id)
    }
    this.backendOps.push(op)
    this.pump()
  }

  /** Runs store jobs one at a time; a job that fails (the store is away) leaves its work for later. */
  private enqueue<A>(job: () => Promise<A>): Promise<A | undefined> {
    const run = this.queue.then(job).catch((e: unknown) => {
      this.failed(e)
      return undefined
    })
    this.queue = run.then(() => undefined)
    return run
  }

  private pump(): void {
    if (this.pumping || this.client === undefined || this.runnerId === undefined) return
    this.pumping = true
    // One pass over what is dirty now, then the queue's other jobs: under a stream of changes (a
    // busy pool's wants, its peers' NOTIFYs) the renewal and the reclaim must still get their turn,
    // or a live runner's lease would run out behind its own pool traffic.
    void this.enqueue(async () => {
      try {
        if (this.backendOps.length > 0) await this.flushBackends()
        // A pool whose transaction fails stays dirty: an error that leaves the session alive (a
        // statement or lock timeout, a deadlock) must not leave its want or seat request unasked.
        for (const key of [...this.dirty]) {
          if (this.client === undefined || this.runnerId === undefined) break
          this.dirty.delete(key)
          await this.settle(key).catch((e: unknown) => {
            this.dirty.add(key)
            throw e
          })
        }
        for (const key of [...this.dirtySeats]) {
          if (this.client === undefined || this.runnerId === undefined) break
          this.dirtySeats.delete(key)
          await this.settleSeats(key).catch((e: unknown) => {
            this.dirtySeats.add(key)
            throw e
          })
        }
      } finally {
        this.pumping = false
      }
      if (this.dirty.size > 0 || this.dirtySeats.size > 0 || this.backendOps.length > 0) this.pump()
    })
  }

  private failed(e: unknown): void {
    const message = e instanceof Error ? e.message : String(e)
    const code = (e as { code?: string }).code
    if (code === "23503" || code === "42P01") {
      // A foreign key to our runner row failed: the row is gone, reclaimed by another runner; or
      // the ledger's tables are gone (a store restored or replaced): register again either way.
      void this.enqueue(() => this.reclaimed())
      return
    }
    if (this.client === undefined) return
    this.options.log("warning", `permit ledger: store query failed: ${message}`)
    // The session is fine after an error PostgreSQL reported (the work is retried at the next tick),
    // except for those that end it (shutdown, connection exceptions).
    const state = e instanceof pg.DatabaseError ? (e.code ?? "") : ""
    // Not registered (a registration that failed): only a reconnect registers again.
    if (state === "" || state.startsWith("57P") || state.startsWith("08") || this.runnerId === undefined) this.lost()
  }

  /** The store session ended: fail static (keep what is held) until the tick reconnects. */
  private lost(): void {
    const client = this.client
    if (client === undefined) return
    this.client = undefined
    this.options.log(
      "warning",
      "permit ledger: lost the tenant store; serving with the permits held (no new ones) until it is back"
    )
    // Logins waiting for a seat are not kept waiting for the store.
    for (const [key, seats] of this.seatLines)
      if (seats.need !== undefined) setImmediate(() => this.answerLocally(key, seats))
    client.end().catch(() => undefined)
  }

  private async connect(): Promise<void> {
    const client = new pg.Client({
      connectionString: this.options.url,
      application_name: "tidepool runner",
      keepAlive: true,
      connectionTimeoutMillis: this.options.timeoutMs,
      query_timeout: Math.max(this.options.timeoutMs, 2_000)
    })
    client.on("error", () => {
      if (this.client === client) this.lost()
    })
    client.on("end", () => {
      if (this.client === client) this.lost()
    })
    client.on("notification", (n) => {
      const key = n.payload === undefined ? undefined : memoryKey(n.payload)
      if (key === undefined) return
      if (n.channel === SEAT_CHANNEL) {
        if (this.seatLines.has(key)) this.touchSeats(key)
      } else if (this.lines.has(key)) this.touch(key)
    })
    await client.connect()
    try {
      // A host that vanishes (power, network) never closes its store session: PostgreSQL notices
      // only by TCP keepalive, by default after two hours, and until then its lock keeps its permits
      // from being reclaimed. Probes at a third of the lease bound that to about 4/3 of a lease.
      const probe = Math.max(1, Math.ceil(this.options.leaseMs / 3000))
      await client.query(
        `SET tcp_keepalives_idle = ${probe}; SET tcp_keepalives_interval = ${probe}; SET tcp_keepalives_count = 3`
      )
      await client.query(`LISTEN ${CHANNEL}; LISTEN ${SEAT_CHANNEL}`)
    } catch (e) {
      await client.end().catch(() => undefined)
      throw e
    }
    this.client = client
    this.connectedAt = performance.now()
  }

  private async transaction<A>(body: (c: pg.Client) => Promise<A>): Promise<A> {
    const c = this.client
    if (c === undefined) throw new Error("not connected to the tenant store")
    await c.query("BEGIN")
    try {
      const result = await body(c)
      await c.query("COMMIT")
      return result
    } catch (e) {
      await c.query("ROLLBACK").catch(() => undefined)
      throw e
    }
  }

  /** Takes a runner row (a free slot, this one's previous if it can) and its session lock. */
  private async register(): Promise<void> {
    const previous = this.slotNumber
    // The tables too: a store that came back empty (restored, replaced) gets them again.
    await this.transaction(async (c) => {
      await c.query("SELECT pg_advisory_xact_lock($1, -1)", [NS])
      if ((await c.query(SCHEMA_PRESENT)).rows[0].ok) return
      for (const ddl of SCHEMA) await c.query(ddl)
    })
    const token = randomUUID()
    const row = await this.transaction(async (c) => {
      await c.query("SELECT pg_advisory_xact_lock($1, 0)", [NS])
      const used = new Set((await c.query("SELECT slot FROM tidepool_runners")).rows.map((r) => Number(r.slot)))
      const cursor = await c.query(
        "SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence('tidepool_runners', 'runner_id')::regclass), 0) AS n"
      )
      const slot = pickSlot(used, previous, Number(cursor.rows[0].n))
      if (slot === 0) throw new Error(`permit ledger: all ${MAX_SLOT} runner slots are taken`)
      const inserted = await c.query(
        "INSERT INTO tidepool_runners (slot, address, token) VALUES ($1, $2, $3) RETURNING runner_id",
        [slot, this.options.address, token]
      )
      let id = Number(inserted.rows[0].runner_id)
      // The row's lock, taken without waiting: after a store restored empty, the sequence starts
      // again, and a live runner that has not noticed yet still holds the lock of the id we got
      // (waiting for it hung this registration, and the whole queue behind it). Skip such ids.
      // (A session lock taken here outlives the transaction, as it must.)
      for (let tries = 0; ; tries++) {
        const locked = await c.query("SELECT pg_try_advisory_lock($1, $2::int) AS ok", [NS, id])
        if (locked.rows[0].ok) break
        if (tries === 100) throw new Error("permit ledger: no free runner lock")
        const next = await c.query(
          "UPDATE tidepool_runners SET runner_id = nextval(pg_get_serial_sequence('tidepool_runners', 'runner_id')) WHERE runner_id = $1 RETURNING runner_id",
          [id]
        )
        id = Number(next.rows[0].runner_id)
      }
      // Registering again after a reclaim: what the pools still hold is declared in the same
      // transaction, under each pool's lock, so no other runner is granted it in between.
      const holding = [...this.lines]
        .filter(([, line]) => line.held > 0)
        .map(([key, line]) => [storeKey(key), line.held] as const)
        .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
      for (const [sk, held] of holding) {
        // Never wait for a pool's lock while holding the registration lock: a pool whose lock is
        // busy is declared by this runner's next transaction on it instead.
        const locked = await c.query("SELECT pg_try_advisory_xact_lock($1, hashtext($2)) AS ok", [NS + 1, sk])
        if (!locked.rows[0].ok) continue
        await c.query(
          "INSERT INTO tidepool_permits (pool_key, runner_id, held, want, want_since) VALUES ($1, $2, $3, 0, 0)",
          [sk, id, held]
        )
        await c.query("SELECT pg_notify($1, $2)", [CHANNEL, sk])
      }
      return { id, slot }
    })
    this.runnerId = row.id
    this.token = token
    this.slotNumber = row.slot
    this.options.onSlot?.(row.slot)
    this.lastRenewal = performance.now()
    if (previous > 0 && previous !== row.slot)
      this.options.log(
        "warning",
        `permit ledger: runner slot ${previous} was taken meanwhile; now slot ${row.slot} (CancelRequests of this host's clients from before name slot ${previous} and cancel nothing)`
      )
    this.options.log("info", `permit ledger: runner ${row.id} registered as slot ${row.slot} (${this.options.address})`)
  }

  private tick(): void {
    if (this.stopping) return
    if (this.client === undefined) {
      if (!this.reconnecting) {
        this.reconnecting = true
        void this.enqueue(() => this.reconnect()).finally(() => {
          this.reconnecting = false
        })
      }
      return
    }
    const now = performance.now()
    // Pools whose clients wait ask again (a lost notification); releases the store missed are retried.
    for (const [key, line] of this.lines)
      if ((line.want > 0 || line.release > 0) && now - line.settledAt >= POLL_MS) this.dirty.add(key)
    // A request waiting for other runners' answers looks again (its deadline, a lost notification).
    for (const [key, seats] of this.seatLines) if (seats.askedAt > 0 || seats.answered) this.dirtySeats.add(key)
    this.pump()
    // Lines of closed pools go once nothing of them is left (checked again in the queue).
    let unused = false
    for (const [key, line] of this.lines) if (this.unusedLine(key, line)) unused = true
    for (const [key, line] of this.seatLines) if (this.unusedSeats(key, line)) unused = true
    if (unused) void this.enqueue(async () => this.forgetUnused())
    if (now - this.lastRenewal >= this.options.leaseMs / 3) {
      this.lastRenewal = now
      void this.enqueue(() => this.renew())
    }
  }

  private async reconnect(): Promise<void> {
    if (this.client !== undefined || this.stopping) return
    await this.connect()
    const c = this.client!
    if (this.runnerId === undefined) {
      // Lost the store while registering again: finish that first.
      await this.register()
      for (const op of this.backends.values()) this.backendOps.push(op)
      for (const key of this.lines.keys()) this.dirty.add(key)
      this.pump()
      return
    }
    // A reclaimer may hold our lock for a moment: then our row is about to go; the renewal tells.
    const locked = await c.query("SELECT pg_try_advisory_lock($1, $2::int) AS ok", [NS, this.runnerId])
    if (!locked.rows[0].ok) {
      this.lost()
      return
    }
    this.options.log("info", "permit ledger: the tenant store is back")
    await this.renew()
    if (this.client !== undefined) {
      for (const [key, line] of this.lines) if (line.want > 0 || line.release > 0 || line.held > 0) this.dirty.add(key)
      for (const key of this.seatLines.keys()) this.dirtySeats.add(key)
      this.pump()
    }
  }

  private async renew(): Promise<void> {
    const c = this.client
    if (c === undefined || this.runnerId === undefined) return
    const renewed = await c.query(
      "UPDATE tidepool_runners SET renewed_at = now() WHERE runner_id = $1 AND token = $2",
      [this.runnerId, this.token]
    )
    if (renewed.rowCount === 0) {
      await this.reclaimed()
      return
    }
    if (this.settles > 0)
      this.options.log("debug", `permit ledger: ${this.settles} pool transaction(s) since the last renewal`)
    this.settles = 0
    await this.refreshAddresses()
    if (performance.now() - this.connectedAt >= this.options.leaseMs) await this.reclaimExpired()
  }

  private async refreshAddresses(): Promise<void> {
    const c = this.client
    if (c === undefined) return
    const rows = (await c.query("SELECT slot, address FROM tidepool_runners")).rows
    this.addresses = new Map(rows.map((r) => [Number(r.slot), String(r.address)]))
  }

  /**
   * Our row was reclaimed while we were cut off, and others may have been given our permits. We
   * register again and write what our pools really hold: while the pool is above its size nobody
   * is granted anything, and every holder above its share (ours included) closes servers — idle ones
   * at once, busy ones at their next release — until the pool is within its size again.
   */
  private async reclaimed(): Promise<void> {
    if (this.client === undefined || this.runnerId === undefined) return
    const exists = await this.client
      .query("SELECT 1 FROM tidepool_runners WHERE runner_id = $1 AND token = $2", [this.runnerId, this.token])
      .catch((e: { code?: string }) => (e.code === "42P01" ? { rows: [] } : Promise.reject(e)))
    if (exists.rows.length > 0) return
    this.options.log(
      "warning",
      `permit ledger: runner ${this.runnerId}'s lease was reclaimed while it was away from the store; registering again with what its pools hold`
    )
    await this.client.query("SELECT pg_advisory_unlock_all()")
    this.runnerId = undefined
    this.backendOps = []
    for (const [key, line] of this.lines) {
      line.release = 0
      this.dirty.add(key)
    }
    // Our seat rows went with the runner row: the next transaction of each writes what we hold.
    for (const key of this.seatLines.keys()) this.dirtySeats.add(key)
    await this.register()
    for (const op of this.backends.values()) this.backendOps.push(op)
    this.pump()
  }

  /**
   * Other runners whose lease ran out while we (and so the store) were up for a lease's length, and
   * whose store session is gone (their advisory lock is free): cancel their recorded backends'
   * queries, then delete their rows, which frees their permits, and tell their pools.
   */
  private async reclaimExpired(): Promise<void> {
    const c = this.client!
    const expired = await c.query(
      "SELECT runner_id, slot, address FROM tidepool_runners WHERE runner_id <> $1 AND renewed_at < now() - make_interval(secs => $2::float8 / 1000)",
      [this.runnerId, this.options.leaseMs]
    )
    for (const row of expired.rows) {
      const id = Number(row.runner_id)
      const free = await c.query("SELECT pg_try_advisory_lock($1, $2::int) AS ok", [NS, id])
      if (!free.rows[0].ok) {
        this.options.log("debug", `permit ledger: runner ${id}'s lease expired but its store session is still open`)
        continue
      }
      try {
        const backends = (
          await c.query(
            "SELECT host, port, pid, secret, tls, tls_server_name, tls_verify, tenant FROM tidepool_backends WHERE runner_id = $1",
            [id]
          )
        ).rows as Array<RecordedBackend>
        const cas = new Map<string, Promise<string | undefined>>()
        const cancelled = await Promise.all(
          backends.map(async (b) => {
            let ca: Promise<string | undefined> | undefined
            if (b.tls && b.tls_verify) {
              ca = cas.get(b.tenant)
              if (ca === undefined) {
                ca = this.caOf(c, b.tenant)
                cas.set(b.tenant, ca)
              }
            }
            return this.cancelAsReached(`runner ${id}'s`, recordedRef(b), await ca)
          })
        )
        const failed = cancelled.filter((ok) => !ok).length
        const permits = await this.transaction(async (tx) => {
          const keys = await tx.query("SELECT pool_key, held FROM tidepool_permits WHERE runner_id = $1", [id])
          await tx.query("DELETE FROM tidepool_runners WHERE runner_id = $1", [id])
          for (const k of keys.rows) await tx.query("SELECT pg_notify($1, $2)", [CHANNEL, k.pool_key])
          return keys.rows.reduce((s, k) => s + Number(k.held), 0)
        })
        this.options.log(
          "info",
          `permit ledger: reclaimed runner ${id} (slot ${row.slot}, ${row.address}): lease expired and its store session gone; ${backends.length - failed} backend(s) cancelled${failed > 0 ? ` (${failed} cancel(s) failed)` : ""}, ${permits} permit(s) freed`
        )
      } finally {
        await c.query("SELECT pg_advisory_unlock($1, $2::int)", [NS, id])
      }
    }
  }

  /**
   * Cancels a dead worker's backend of pool `key` (a host's supervisor, before the worker's permits
   * go back) as a reclaimer would: over TLS with its tenant's CA when the worker used TLS. Resolves
   * false, after a warning, if the cancel failed.
   */
  async cancelBackend(backend: BackendRef, key: string, owner: string): Promise<boolean> {
    let ca: string | undefined
    if (backend.tls === true && backend.tlsVerify === true) {
      const tenant = key.split("\u0000")[0] ?? ""
      // On the queue: the store connection may be inside one of the runner's transactions.
      ca = await this.enqueue(() => this.tenantCa(this.client, tenant))
      ca ??= this.globalCa()
    }
    return this.cancelAsReached(owner, backend, ca)
  }

  /**
   * Cancels a backend the way its owner reached it: over TLS, with the server name and verification
   * it used, when it used TLS. A cancel that fails is logged and the caller goes on freeing the
   * permit: the lease (or the worker's exit) has already bounded the wait, and a permit held back
   * for ever would be worse.
   */
  private async cancelAsReached(owner: string, b: BackendRef, ca: string | undefined): Promise<boolean> {
    const target = cancelTargetOf(b, ca, this.options.timeoutMs)
    const result = await Effect.runPromise(Effect.result(sendCancel(target, b.pid, Buffer.from(b.secret, "hex"))))
    if (Result.isSuccess(result)) return true
    this.options.log(
      "warning",
      `permit ledger: the CancelRequest for ${owner} backend ${b.pid} at ${b.host}:${b.port}${b.tls === true ? ` (TLS, server name ${target.serverName})` : ""} failed (${result.failure.message}); its permit is freed anyway`
    )
    return false
  }

  /**
   * The CA that verifies a TLS backend of `tenant`: the tenant's own `upstream_tls_ca`, from its
   * record in the store (the one every host's pools read), else this host's GLOBAL_UPSTREAM_CA_PATH.
   */
  private async caOf(c: pg.Client, tenant: string): Promise<string | undefined> {
    return (await this.tenantCa(c, tenant)) ?? this.globalCa()
  }

  private async tenantCa(c: pg.Client | undefined, tenant: string): Promise<string | undefined> {
    if (c === undefined) return undefined
    return c
      .query("SELECT config::jsonb ->> 'upstream_tls_ca' AS ca FROM tidepool_tenants WHERE external_id = $1", [tenant])
      .then(
        (r) => (r.rows[0]?.ca ?? undefined) as string | undefined,
        // Never holds the reclaim back (a failed cancel does not either): the host's CA, if any, is tried.
        (e: { code?: string; message?: string }) => {
          if (e.code !== "42P01")
            this.options.log(
              "warning",
              `permit ledger: tenant ${tenant}'s CA could not be read (${e.message}); trying GLOBAL_UPSTREAM_CA_PATH`
            )
          return undefined
        }
      )
  }

  private globalCa(): string | undefined {
    const files = this.options.upstreamCaPath ?? ""
    if (files === "") return undefined
    try {
      return files
        .split(",")
        .map((file) => readFileSync(file, "utf8"))
        .join("\n")
    } catch (e) {
      this.options.log(
        "warning",
        `permit ledger: cannot read GLOBAL_UPSTREAM_CA_PATH: ${e instanceof Error ? e.message : e}`
      )
      return undefined
    }
  }

  /**
   * Our row is still ours (its token, see `token`), and stays so until the transaction ends; if not
   * (reclaimed, or the store restored empty and the id reused), the error makes the runner register
   * again (`failed`) instead of writing into another runner's rows.
   */
  private async ours(c: pg.Client): Promise<void> {
    const row = await c.query("SELECT 1 FROM tidepool_runners WHERE runner_id = $1 AND token = $2 FOR KEY SHARE", [
      this.runnerId,
      this.token
    ])
    if (row.rows.length === 0)
      throw Object.assign(new Error("permit ledger: this runner's row is gone"), { code: "23503" })
  }

  /** Writes the backends opened and closed since the last flush, in order. */
  private async flushBackends(): Promise<void> {
    const ops = this.backendOps
    this.backendOps = []
    const c = this.client!
    try {
      await this.ours(c)
      for (let i = 0; i < ops.length; ) {
        const add = ops[i]!.add
        let j = i
        while (j < ops.length && ops[j]!.add === add) j++
        // One row per backend: an upsert that names a row twice fails as a whole ("cannot affect
        // row a second time"), and a re-registration queues every open backend again on top of
        // reports still waiting, so the batch would fail for ever. The last report of each wins.
        // (Deletes name the secret too, and a duplicate delete is harmless.)
        const rows = new Map<string, ReturnType<typeof backendRow>>()
        for (const [k, op] of ops.slice(i, j).entries()) {
          const row = backendRow(op)
          rows.set(add ? `${row.host}:${row.port}:${row.pid}` : String(k), row)
        }
        const refs = JSON.stringify([...rows.values()])
        await c.query(
          add
            ? `INSERT INTO tidepool_backends (runner_id, host, port, pid, secret, tls, tls_server_name, tls_verify, tenant)
               SELECT $1, x.host, x.port, x.pid, x.secret, x.tls, x.tls_server_name, x.tls_verify, x.tenant
               FROM json_to_recordset($2) AS x(host text, port int, pid int, secret text, tls boolean, tls_server_name text, tls_verify boolean, tenant text)
               ON CONFLICT (runner_id, host, port, pid) DO UPDATE SET secret = EXCLUDED.secret, tls = EXCLUDED.tls,
                 tls_server_name = EXCLUDED.tls_server_name, tls_verify = EXCLUDED.tls_verify, tenant = EXCLUDED.tenant`
            : `DELETE FROM tidepool_backends b USING json_to_recordset($2) AS x(host text, port int, pid int, secret text)
               WHERE b.runner_id = $1 AND b.host = x.host AND b.port = x.port AND b.pid = x.pid AND b.secret = x.secret`,
          [this.runnerId, refs]
        )
        i = j
      }
    } catch (e) {
      this.backendOps = [...ops, ...this.backendOps]
      throw e
    }
  }

  /**
   * One pool's transaction: under the pool's advisory lock, record what this runner holds and
   * wants, take the free permits its fair share allows, and write every runner's directive; a
   * NOTIFY tells the others when there is something for them (a grant to take, a new directive).
   */
  private async settle(key: string): Promise<void> {
    const line = this.lines.get(key)
    if (line === undefined || this.runnerId === undefined) return
    line.settledAt = performance.now()
    this.settles++
    const me = this.runnerId
    const sk = storeKey(key)
    const release = line.release
    const want = line.want
    // What the pools hold now is the truth (the row says that plus releases not yet written, or
    // nothing at all after a reclaim).
    const holding = line.held
    const result = await this.transaction(async (c) => {
      await c.query("SELECT pg_advisory_xact_lock($1, hashtext($2))", [NS + 1, sk])
      await this.ours(c)
      const rows = (
        await c.query(
          "SELECT runner_id, held, want, want_since, keep, press FROM tidepool_permits WHERE pool_key = $1 ORDER BY runner_id",
          [sk]
        )
      ).rows.map((r) => ({
        id: Number(r.runner_id),
        held: Number(r.held),
        want: Number(r.want),
        since: Number(r.want_since),
        keep: r.keep === null ? null : Number(r.keep),
        press: Boolean(r.press)
      }))
      // Orders waits across hosts; clock skew between hosts only reorders who waited longest.
      const now = Date.now()
      let own = rows.find((r) => r.id === me)
      const before = own === undefined ? undefined : { ...own }
      if (own === undefined) {
        own = { id: me, held: 0, want: 0, since: 0, keep: null, press: false }
        rows.push(own)
      }
      own.held = holding
      // A runner that gives back its last permit while it still wants goes to the back of the queue:
      // a pool smaller than the number of busy runners rotates instead of returning to the same one.
      // (Not for any release: in a larger pool that moved the rounding's extra permit from runner to
      // runner at every hand-over, each time a server closed and another opened.)
      own.since = want > 0 ? (own.want > 0 && !(release > 0 && holding === 0) ? own.since : now) : 0
      own.want = want
      const claims: Array<Claim> = rows.map((r) => ({ held: r.held, want: r.want, since: r.since, keep: r.keep }))
      const division = divide(line.size, claims)
      const i = rows.indexOf(own)
      const granted = division.grants[i]!
      own.held += granted
      own.want -= granted
      if (own.want === 0) own.since = 0
      let notify = false
      for (const [k, r] of rows.entries()) {
        const d = division.directives[k]!
        if (r === own) continue
        if (division.grants[k]! > 0) notify = true
        if (r.keep !== d.keep || r.press !== d.press) {
          notify = true
          await c.query("UPDATE tidepool_permits SET keep = $3, press = $4 WHERE pool_key = $1 AND runner_id = $2", [
            sk,
            r.id,
            d.keep,
            d.press
          ])
        }
      }
      const mine = division.directives[i]!
      if (own.held === 0 && own.want === 0) {
        if (before !== undefined) {
          await c.query("DELETE FROM tidepool_permits WHERE pool_key = $1 AND runner_id = $2", [sk, me])
          notify ||= before.held > 0
        }
      } else if (
        before === undefined ||
        before.held !== own.held ||
        before.want !== own.want ||
        before.keep !== mine.keep ||
        before.press !== mine.press
      ) {
        await c.query(
          `INSERT INTO tidepool_permits (pool_key, runner_id, held, want, want_since, keep, press) VALUES ($1, $2, $3, $4, $5, $6, $7)
           ON CONFLICT (pool_key, runner_id) DO UPDATE SET held = $3, want = $4, want_since = $5, keep = $6, press = $7`,
          [sk, me, own.held, own.want, own.since, mine.keep, mine.press]
        )
        // Permits given back are free for whoever waits.
        notify ||= release > 0 && rows.some((r) => r !== own && r.want > 0)
      }
      if (notify) await c.query("SELECT pg_notify($1, $2)", [CHANNEL, sk])
      return { granted, directive: mine }
    })
    line.release -= release
    line.want = Math.max(0, line.want - result.granted)
    const pool = line.pool
    if (result.granted > 0) {
      line.held += result.granted
      if (pool === undefined || pool.isClosed) {
        // Its pool closed meanwhile: the permits go straight back.
        line.held -= result.granted
        line.release += result.granted
        this.dirty.add(key)
      } else pool.grant(result.granted)
    }
    const d = result.directive
    if (result.granted > 0 || release > 0 || d.keep !== line.directive.keep || d.press !== line.directive.press)
      this.options.log(
        "debug",
        `permit ledger: pool ${sk}: released ${release}, granted ${result.granted}, holds ${line.held}, wants ${line.want}, keep ${d.keep ?? "any"}${d.press ? ", pressed" : ""}`
      )
    if (d.keep !== line.directive.keep || d.press !== line.directive.press) {
      line.directive = d
      this.apply(line)
    }
  }

  /**
   * Lines whose holder closed (a pool swept, a host's record of a key no worker uses any more) with
   * nothing left: no permit held, wanted or to give back, no seat held, asked for or owed an
   * answer, and no transaction pending. The store has no row of theirs then (a pool transaction
   * deletes the row that would hold 0 and want 0; a seat transaction the row of 0 seats), so they
   * go without one. Run as a store job: no pool transaction is under way meanwhile, so none can
   * grant to a line it finds gone. A holder of the key attaching later gets a new line.
   */
  private forgetUnused(): void {
    let lines = 0
    for (const [key, line] of this.lines)
      if (this.unusedLine(key, line)) {
        this.lines.delete(key)
        lines++
      }
    let seats = 0
    for (const [key, line] of this.seatLines)
      if (this.unusedSeats(key, line)) {
        this.seatLines.delete(key)
        seats++
      }
    if (lines + seats > 0)
      this.options.log(
        "debug",
        `permit ledger: lines of unused pools removed (${lines} permit, ${seats} seat); ${this.lines.size} permit and ${this.seatLines.size} seat line(s) left`
      )
  }

  private unusedLine(key: string, line: PoolLine): boolean {
    return (
      (line.pool === undefined || line.pool.isClosed) &&
      line.held === 0 &&
      line.want === 0 &&
      line.release === 0 &&
      !this.dirty.has(key)
    )
  }

  private unusedSeats(key: string, line: SeatLine): boolean {
    return (
      (line.pool === undefined || line.pool.isClosed) &&
      line.held <= 0 &&
      line.need === undefined &&
      line.askedAt === 0 &&
      !line.answered &&
      !line.reclaiming &&
      !this.dirtySeats.has(key)
    )
  }
}
