import { Context } from "effect"
import type { TenantPool } from "./TenantPool.ts"

/**
 * One pool's line to the host's client seats (worker mode, docs/scale-out.md#max_clients-across-workers):
 * `max_clients` (and, in session mode, `pool_size`) counted over every worker of the host.
 */
export interface PoolSeats {
  /** `need` logins wait for a seat (0: a few spare seats are welcome, nobody waits). */
  readonly want: (limit: number, need: number) => void
  /** Gives `n` seats back; `reclaimed` answers the supervisor's reclaim (sent even for 0). */
  readonly release: (n: number, reclaimed: boolean) => void
}

/**
 * Present only in worker mode: PoolRegistry attaches each new pool. The supervisor answers through
 * `TenantPool.seatsGranted` and `TenantPool.reclaimSeats`.
 */
export class SeatGate extends Context.Service<SeatGate, { readonly attach: (pool: TenantPool) => PoolSeats }>()(
  "tidepool/SeatGate"
) {}
