/**
 * The IPC messages between the supervisor and its workers (docs/scale-out.md). Plain JSON over the
 * `child_process` channel; none is sent per message or per transaction.
 */

/** A backend the ledger can cancel should its worker die (plaintext upstreams only). */
export interface BackendRef {
  readonly pid: number
  /** The backend's cancel key, hex. */
  readonly secret: string
  readonly host: string
  readonly port: number
}

export type ToSupervisor =
  | { readonly t: "ready" }
  | { readonly t: "want"; readonly key: string; readonly size: number; readonly n: number }
  | { readonly t: "release"; readonly key: string; readonly n: number }
  | { readonly t: "opened"; readonly key: string; readonly backend: BackendRef }
  | { readonly t: "closed"; readonly key: string; readonly pid: number }
  | { readonly t: "cancel"; readonly processId: number; readonly secret: string }
  | { readonly t: "tenant"; readonly id: string }
  | { readonly t: "terminate"; readonly id: string }

export type ToWorker =
  | { readonly t: "grant"; readonly key: string; readonly n: number }
  | { readonly t: "directive"; readonly key: string; readonly keep: number | null; readonly press: boolean }
  | { readonly t: "cancel"; readonly processId: number; readonly secret: string }
  | { readonly t: "tenant"; readonly id: string }
  | { readonly t: "terminate"; readonly id: string }

/** The environment variable that makes `tidepool serve` a worker: its number, from 0. */
export const WORKER_ENV = "TIDEPOOL_WORKER_INDEX"

/** Bits 23–30 of a worker's client process ids: its number plus one (see SessionRegistry). */
export const ownerOf = (processId: number): number => (processId >>> 23) - 1
