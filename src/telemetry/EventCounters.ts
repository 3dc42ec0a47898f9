import { Context, Effect, Layer } from "effect"
import { TenantRegistry } from "../tenants/index.ts"

/** A counter per distinct label tuple; the key joins the label values with NUL. */
export type LabelledCounts = Map<string, number>

const bump = (counts: LabelledCounts, key: string) => {
  counts.set(key, (counts.get(key) ?? 0) + 1)
}

/** The listener's limits (docs/configuration.md, "Limits that protect the node"), for the metrics. */
export interface Admission {
  /** Client connections open on both ports, logged in or not. */
  open: number
  /** Of those, accepted and not yet authenticated. */
  handshaking: number
  /** Connections refused at accept by TIDEPOOL_MAX_CLIENT_CONNECTIONS. */
  refusedClients: number
  /** Connections refused at accept by TIDEPOOL_MAX_HANDSHAKES. */
  refusedHandshakes: number
}

/**
 * Counts of control-plane events (client-visible errors, logins) for the metrics exporter. Updated
 * once per event off the hot path. A tenant label names only a tenant this node serves: a client
 * asking for tenants that do not exist must not grow the label set (an unknown tenant counts as "").
 */
export class EventCounters extends Context.Service<EventCounters>()("tidepool/EventCounters", {
  make: Effect.gen(function* () {
    const tenants = yield* TenantRegistry
    const known = (tenant: string | undefined) =>
      tenant !== undefined && tenants.get(tenant) !== undefined ? tenant : ""
    /** tenant, code */
    const errors: LabelledCounts = new Map()
    /** tenant, user, method */
    const joinsOk: LabelledCounts = new Map()
    /** tenant, method, reason (the error code) */
    const joinsFail: LabelledCounts = new Map()
    const admission: Admission = { open: 0, handshaking: 0, refusedClients: 0, refusedHandshakes: 0 }
    return {
      errors,
      joinsOk,
      joinsFail,
      admission,
      /** A client-visible error (or a log-only one such as ECLIENTSOCKETCLOSED), by code. */
      error: (tenant: string | undefined, code: string): void => bump(errors, `${known(tenant)}\u0000${code}`),
      loginSucceeded: (tenant: string, user: string, method: string): void => {
        bump(joinsOk, `${known(tenant)}\u0000${user}\u0000${method}`)
      },
      loginFailed: (tenant: string | undefined, method: string, code: string): void =>
        bump(joinsFail, `${known(tenant)}\u0000${method}\u0000${code}`),
      /** Drops the series of tenants this node no longer serves (a deleted tenant's series disappear). */
      prune: (): void => {
        for (const counts of [errors, joinsOk, joinsFail]) {
          for (const key of counts.keys()) {
            const tenant = key.slice(0, key.indexOf("\u0000"))
            if (tenant !== "" && tenants.get(tenant) === undefined) counts.delete(key)
          }
        }
      }
    } as const
  })
}) {
  static readonly layer = Layer.effect(this, this.make)
}
