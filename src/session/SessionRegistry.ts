import { randomInt } from "node:crypto"
import { Context, Effect, Layer, Option } from "effect"
import { type TidepoolError, tidepoolError } from "../errors/index.ts"
import type { TenantPool } from "../pool/index.ts"
import type { ServerConnection } from "../upstream/index.ts"

/** What the admin console shows of a logged-in client; built once per session. */
export interface SessionInfo {
  readonly pool: TenantPool
  /** The user name the client logged in with, without the tenant part. */
  readonly user: string
  readonly address: string
  readonly port: number
  readonly localAddress: string
  readonly localPort: number
  /** Epoch ms. */
  readonly connectedAt: number
  readonly applicationName: string
  readonly tls: boolean
  /** `active`: holds a server; `waiting`: waits for one; `idle`: neither (transaction mode, between transactions). */
  readonly state: () => "active" | "waiting" | "idle"
  readonly server: () => ServerConnection | undefined
  /** Transaction mode: what pins the client to its server, if anything (docs/session-state.md). */
  readonly pinnedBy: () => string | undefined
}

/** What the registry needs from a live client session. */
export interface SessionHandle {
  /** Cancels the query running on the client's server, if any. */
  readonly cancel: () => Effect.Effect<void>
  /** Shutdown: end the session now if it is between transactions, else at the next boundary. */
  readonly drain: () => void
  readonly tenant: string
  /** The username the client logged in with. */
  readonly user: string
  /** Control plane (ban, delete, terminate): end the session now with `error`, even mid-transaction. */
  readonly kick: (error: TidepoolError) => void
  /** Admin KILL: ends the session now (57P01). */
  readonly kill?: () => Effect.Effect<void>
  /** Absent for admin console sessions, which are not pooled clients. */
  readonly info?: SessionInfo
  /** What `client_idle_timeout` watches; absent for admin console sessions. */
  readonly idle?: IdleProbe
}

/** How the idle sweep sees a client without a hook on the relay's hot path. */
export interface IdleProbe {
  /** Bytes the client has sent so far (the socket's own counter). */
  readonly bytesRead: () => number
  /** Outside any transaction with nothing in flight: the state in which a silent client is idle. */
  readonly quiet: () => boolean
}

interface Entry {
  readonly secretKey: number
  readonly handle: SessionHandle
  /** `bytesRead` at the last sweep, and since when (epoch ms) the client has been quiet and silent. */
  seenBytes: number
  idleSince: number
}

export interface RegisteredSession extends SessionKey {
  readonly handle: SessionHandle
}

export interface SessionKey {
  readonly processId: number
  readonly secretKey: number
}

/** Bits 23–30 of a worker's process ids carry its number plus one; the low 23 bits are random. */
const OWNER_SHIFT = 23

/**
 * Worker mode only (docs/scale-out.md): this worker's number, the way to the worker that issued a
 * process id this one did not (CancelRequest routing), and to every other worker.
 */
export class PeerWorkers extends Context.Service<
  PeerWorkers,
  {
    readonly self: number
    /**
     * Cluster mode (docs/scale-out.md#several-hosts): process ids are `prefix()` (the runner's number
     * in the bits from `shift` up) plus `shift` random bits; absent: the worker layout above.
     */
    readonly ids?: { readonly shift: number; readonly prefix: () => number }
    readonly forwardCancel: (processId: number, secretKey: Buffer) => void
    /** `…/terminate` ran here: the other workers do the same. */
    readonly terminated: (tenant: string) => void
  }
>()("tidepool/PeerWorkers") {}

/**
 * Live client sessions by the pooler-issued BackendKeyData. Clients never see a real backend's key:
 * their CancelRequest is matched here and re-sent to whichever server they hold, so one client can
 * never cancel another's query by guessing.
 */
export class SessionRegistry extends Context.Service<SessionRegistry>()("tidepool/SessionRegistry", {
  make: Effect.gen(function* () {
    const sessions = new Map<number, Entry>()
    const router = Option.getOrUndefined(yield* Effect.serviceOption(PeerWorkers))
    const owner = router === undefined ? 0 : (router.self + 1) << OWNER_SHIFT
    const shift = router?.ids?.shift ?? OWNER_SHIFT
    const prefix = router?.ids?.prefix ?? (() => owner)
    return {
      register: (handle: SessionHandle): SessionKey => {
        let processId: number
        do processId = router === undefined ? randomInt(1, 2 ** 31 - 1) : prefix() | randomInt(0, 2 ** shift)
        while (sessions.has(processId))
        const secretKey = randomInt(-(2 ** 31), 2 ** 31 - 1)
        sessions.set(processId, { secretKey, handle, seenBytes: handle.idle?.bytesRead() ?? 0, idleSince: Date.now() })
        return { processId, secretKey }
      },
      unregister: (key: SessionKey): void => {
        sessions.delete(key.processId)
      },
      cancel: (processId: number, secretKey: Buffer): Effect.Effect<boolean> =>
        Effect.suspend(() => {
          if (router !== undefined && processId >>> shift !== prefix() >>> shift) {
            router.forwardCancel(processId, secretKey)
            return Effect.succeed(true)
          }
          const entry = sessions.get(processId)
          if (entry === undefined || secretKey.length !== 4 || secretKey.readInt32BE(0) !== entry.secretKey) {
            return Effect.succeed(false)
          }
          return Effect.as(entry.handle.cancel(), true)
        }),
      /**
       * Ends the sessions of `tenant` for which `errorFor` gives an error, and cancels the queries
       * they were running upstream (the closed server's backend would otherwise run its query to
       * the end: PostgreSQL notices a vanished client only when it next writes). Returns how many.
       */
      kickTenant: (
        tenant: string,
        errorFor: (session: SessionHandle) => TidepoolError | undefined
      ): Effect.Effect<number> =>
        Effect.suspend(() => {
          const cancels: Array<Effect.Effect<void>> = []
          for (const { handle } of [...sessions.values()]) {
            if (handle.tenant !== tenant) continue
            const error = errorFor(handle)
            if (error === undefined) continue
            // Taken before the kick, which lets go of the server.
            cancels.push(handle.cancel())
            handle.kick(error)
          }
          return Effect.as(
            Effect.forEach(cancels, (c) => c, { concurrency: 16, discard: true }),
            cancels.length
          )
        }),
      /** Sessions of `tenant` right now. */
      countOf: (tenant: string): number => {
        let n = 0
        for (const { handle } of sessions.values()) if (handle.tenant === tenant) n++
        return n
      },
      /**
       * One pass of the idle sweep: a client is idle from the first sweep that finds it quiet with
       * no new bytes, so time spent in a transaction or running a query never counts, and a client
       * that sent anything starts again. Ends with ECLIENTIDLETIMEOUT those idle for their tenant's
       * timeout (`timeoutOf`: ms, 0 = never); returns how many.
       */
      sweepIdle: (now: number, timeoutOf: (tenant: string) => number): number => {
        let ended = 0
        for (const entry of sessions.values()) {
          const { handle } = entry
          if (handle.idle === undefined) continue
          const bytes = handle.idle.bytesRead()
          if (bytes !== entry.seenBytes || !handle.idle.quiet()) {
            entry.seenBytes = bytes
            entry.idleSince = now
            continue
          }
          const timeout = timeoutOf(handle.tenant)
          if (timeout > 0 && now - entry.idleSince >= timeout) {
            handle.kick(tidepoolError("ECLIENTIDLETIMEOUT", timeout))
            ended++
          }
        }
        return ended
      },
      drainAll: (): void => {
        for (const { handle } of sessions.values()) handle.drain()
      },
      /** Every live session, for the admin console and metrics (allocates: not for the hot path). */
      all: (): Array<RegisteredSession> =>
        Array.from(sessions, ([processId, { secretKey, handle }]) => ({ processId, secretKey, handle }))
    } as const
  })
}) {
  static readonly layer = Layer.effect(this, this.make)
}
