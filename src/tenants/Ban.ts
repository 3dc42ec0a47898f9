import { DateTime } from "effect"
import type { Tenant } from "../config/index.ts"
import { type TidepoolError, tidepoolError } from "../errors/index.ts"
import type { TenantRegistry } from "./TenantRegistry.ts"

/** Whether the tenant is banned right now: banned, and `banned_until` absent or still ahead. */
export const isBanned = (tenant: Tenant, now: number = Date.now()): boolean =>
  tenant.banned_at !== undefined &&
  (tenant.banned_until === undefined || DateTime.toEpochMillis(tenant.banned_until) > now)

/** The error a client of a banned tenant gets, or undefined when the tenant is not banned. */
export const banOf = (tenant: Tenant): TidepoolError | undefined =>
  isBanned(tenant) ? tidepoolError("EBANNED", tenant.ban_reason ?? "no reason given") : undefined

/**
 * Re-checked once a session is registered (and so reachable by bans and deletes): a ban or delete
 * applied while the client was between its login and its registration would otherwise miss it.
 */
export const revokedSince = (
  registry: TenantRegistry["Service"],
  externalId: string,
  user: string
): TidepoolError | undefined => {
  const current = registry.get(externalId)
  return current === undefined ? tidepoolError("ENOTFOUND", user, externalId) : banOf(current)
}
