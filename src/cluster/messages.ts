/**
 * The IPC messages between the supervisor and its workers (docs/scale-out.md). Plain JSON over the
 * `child_process` channel; none is sent per message or per transaction.
 */

/**
 * A backend the ledger can cancel should its worker die, or a cluster host should (recorded in the
 * store: src/cluster/StoreRunner.ts `BackendRef`, the same shape).
 */
export interface BackendRef {
  readonly pid: number
  /** The backend's cancel key, hex. */
  readonly secret: string
  readonly host: string
  readonly port: number
  /** Its worker spoke TLS to it (tenant `upstream_ssl`): a plaintext cancel may be refused. */
  readonly tls?: boolean | undefined
  /** The TLS server name sent (SNI) and verified: the tenant's `db_host`. */
  readonly tlsServerName?: string | undefined
  /** The certificate was verified (tenant `upstream_verify: peer`). */
  readonly tlsVerify?: boolean | undefined
}

/** One worker's answer to a gather (docs/scale-out.md#views-of-the-whole-host), or its absence. */
export interface GatheredPart {
  /** The worker's number, from 1 as in logs and the `worker` label. */
  readonly worker: number
  readonly pid: number
  /** undefined: the worker did not answer within the gather's deadline (starting, hung, gone). */
  readonly data: unknown
}

/** A worker as the supervisor sees it (SHOW WORKERS, `tidepool_worker_*` metrics). */
export interface WorkerInfo {
  readonly worker: number
  readonly pid: number | null
  readonly ready: boolean
  readonly startedAt: number
  readonly restarts: number
  readonly hangs: number
  /** Milliseconds since its last heartbeat (null before its first). */
  readonly beatAgeMs: number | null
}

export type ToSupervisor =
  | { readonly t: "ready" }
  | { readonly t: "beat" }
  | { readonly t: "want"; readonly key: string; readonly size: number; readonly n: number }
  | { readonly t: "release"; readonly key: string; readonly n: number }
  | { readonly t: "opened"; readonly key: string; readonly backend: BackendRef }
  | { readonly t: "closed"; readonly key: string; readonly pid: number }
  | { readonly t: "cancel"; readonly processId: number; readonly secret: string }
  | { readonly t: "tenant"; readonly id: string }
  | { readonly t: "terminate"; readonly id: string }
  /** Client seats (global max_clients): `need` logins wait for a seat; 0 asks for spare seats only. */
  | { readonly t: "seat-want"; readonly key: string; readonly limit: number; readonly need: number }
  /** Seats given back; `reclaimed`: the answer to the `seat-reclaim` of `round` (sent even when n is 0). */
  | {
      readonly t: "seat-release"
      readonly key: string
      readonly n: number
      readonly reclaimed: boolean
      readonly round?: number
    }
  /** Asks for every worker's `collected` answer to `what` (a host-wide view). */
  /** `timeoutMs` 0: wait for every worker (or its death), as commands do. */
  | { readonly t: "gather"; readonly id: number; readonly what: string; readonly timeoutMs: number }
  | { readonly t: "collected"; readonly id: number; readonly data: unknown }

export type ToWorker =
  | { readonly t: "grant"; readonly key: string; readonly n: number }
  | { readonly t: "directive"; readonly key: string; readonly keep: number | null; readonly press: boolean }
  | { readonly t: "cancel"; readonly processId: number; readonly secret: string }
  | { readonly t: "tenant"; readonly id: string }
  | { readonly t: "terminate"; readonly id: string }
  /** The answer to a `seat-want`: `n` seats granted (maybe 0); keep about `spare` unused seats. */
  | { readonly t: "seats"; readonly key: string; readonly n: number; readonly spare: number }
  /** Another worker needs a seat and none is free on the host: give back every unused seat (answer `round`). */
  | { readonly t: "seat-reclaim"; readonly key: string; readonly round: number }
  | { readonly t: "collect"; readonly id: number; readonly what: string }
  /** Cluster mode: the host's runner slot changed (a re-registration had to take another). */
  | { readonly t: "slot"; readonly slot: number }
  | {
      readonly t: "gathered"
      readonly id: number
      readonly parts: ReadonlyArray<GatheredPart>
      readonly workers: ReadonlyArray<WorkerInfo>
    }

/** The environment variable that makes `tidepool serve` a worker: its number, from 0. */
export const WORKER_ENV = "TIDEPOOL_WORKER_INDEX"

/** How often a worker beats (ms), set by the supervisor in the worker's environment; unset: no beat. */
export const BEAT_ENV = "TIDEPOOL_WORKER_BEAT_MS"

/** Bits 23–30 of a worker's client process ids: its number plus one (see SessionRegistry). */
export const ownerOf = (processId: number): number => (processId >>> 23) - 1

/**
 * Cluster mode with workers: the host's runner slot, set by the supervisor in each worker's
 * environment at its start (and told by a `slot` message when it changes).
 */
export const SLOT_ENV = "TIDEPOOL_RUNNER_SLOT"

/**
 * Cluster mode with workers (docs/scale-out.md#cancelrequest-across-hosts): a client's process id is
 * the runner slot in bits 20–30 (as for a single-process runner, so any host finds the owner host),
 * the worker's number plus one in bits 14–19, and 14 random bits.
 */
export const CLUSTER_WORKER_SHIFT = 14
export const clusterOwnerOf = (processId: number): number => ((processId >>> CLUSTER_WORKER_SHIFT) & 63) - 1
