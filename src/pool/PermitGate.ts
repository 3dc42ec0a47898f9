import { Context } from "effect"
import type { ServerConnection } from "../upstream/index.ts"
import type { TenantPool } from "./TenantPool.ts"

/**
 * One pool's line to the host's permit ledger (worker mode, docs/scale-out.md#the-permit-model). A
 * permit is the right to one server open, opening or closing; messages go only when servers open or
 * close, never per checkout.
 */
export interface PoolPermits {
  /** The pool needs `n` more permits now than it holds (0: none any more). */
  readonly want: (size: number, n: number) => void
  /** Gives `n` permits back. */
  readonly release: (n: number) => void
  /** A server logged in: the ledger keeps its cancel key, to cancel its query should this process die. */
  readonly opened: (server: ServerConnection) => void
  readonly closed: (server: ServerConnection) => void
}

/**
 * Present only in worker mode: PoolRegistry attaches each new pool to the ledger. The ledger answers
 * through `TenantPool.grant` and `TenantPool.direct`.
 */
export class PermitGate extends Context.Service<PermitGate, { readonly attach: (pool: TenantPool) => PoolPermits }>()(
  "tidepool/PermitGate"
) {}
