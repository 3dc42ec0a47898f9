import { Context, Effect, Layer, Option, Redacted, Schema } from "effect"
import { AuthQuery } from "../auth/index.ts"
import { type Tenant, Tenant as TenantSchema, userMaxClients, userPoolSize } from "../config/index.ts"
import { tidepoolError } from "../errors/index.ts"
import { PoolRegistry, type PoolSettings } from "../pool/index.ts"
import { banOf, type TenantChange, Tenants } from "../tenants/index.ts"
import { UpstreamTls } from "../tls/index.ts"
import type { UpstreamTlsOptions } from "../upstream/index.ts"
import { PeerWorkers, SessionRegistry } from "./SessionRegistry.ts"

/**
 * The username part of a pool key (`tenant\0alias\0mode\0database`, see ClientSession; a JIT
 * pool's alias part is `alias\0jit\0<token digest>`).
 */
const aliasOf = (settings: PoolSettings): string => settings.key.split("\u0000")[1] ?? settings.user

const sameSecret = (a: Redacted.Redacted<string> | undefined, b: Redacted.Redacted<string> | undefined) =>
  a === b || (a !== undefined && b !== undefined && Redacted.value(a) === Redacted.value(b))

/**
 * A pool's settings under the tenant's new configuration; the same object when nothing that matters
 * to the pool changed (it is then left alone), undefined when its user is gone. auth_query tenants
 * (`require_user: false`) keep the credentials the pool logs in with: they come from the client's
 * login, not from `users[]`, whose single manager user only sets the limits.
 */
export const retarget = (
  settings: PoolSettings,
  tenant: Tenant,
  tls?: UpstreamTlsOptions | undefined
): PoolSettings | undefined => {
  const user = tenant.require_user
    ? tenant.users.find((u) => u.db_user_alias === aliasOf(settings))
    : tenant.users.find((u) => u.is_manager)
  if (user === undefined) return undefined
  // JIT pools log in with their client's token, and encrypt when their client did (ClientAuth).
  const jit = settings.key.includes("\u0000jit\u0000")
  const credentials = tenant.require_user && !jit ? { user: user.db_user, password: user.db_password } : {}
  const next: PoolSettings = {
    ...settings,
    size: userPoolSize(tenant, user),
    maxClients: userMaxClients(tenant, user),
    checkoutTimeoutMs: user.pool_checkout_timeout,
    target: {
      ...settings.target,
      host: tenant.db_host,
      port: tenant.db_port,
      ...credentials,
      tls: jit ? (tls ?? settings.target.tls) : tls
    }
  }
  const unchanged =
    next.size === settings.size &&
    next.maxClients === settings.maxClients &&
    next.checkoutTimeoutMs === settings.checkoutTimeoutMs &&
    next.target.host === settings.target.host &&
    next.target.port === settings.target.port &&
    next.target.user === settings.target.user &&
    sameSecret(next.target.password, settings.target.password) &&
    JSON.stringify(next.target.tls ?? null) === JSON.stringify(settings.target.tls ?? null)
  return unchanged ? settings : next
}

const withoutBan = ({ banned_at: _a, ban_reason: _r, banned_until: _u, ...rest }: Tenant) => rest
const encode = Schema.encodeSync(TenantSchema)
const configurationChanged = (before: Tenant, after: Tenant) =>
  JSON.stringify(encode(withoutBan(before) as Tenant)) !== JSON.stringify(encode(withoutBan(after) as Tenant))

/**
 * Applies tenant changes to this node's pools and clients, as soon as the cache sees them (API write
 * here, NOTIFY from another node): a ban ends every client of the tenant with EBANNED (mid-transaction
 * included); a new configuration drains the tenant's pools onto the new settings; a deleted tenant's
 * pools stop and its clients get ENOTFOUND.
 */
export class TenantChanges extends Context.Service<TenantChanges>()("tidepool/TenantChanges", {
  make: Effect.gen(function* () {
    const tenants = yield* Tenants
    const pools = yield* PoolRegistry
    const sessions = yield* SessionRegistry
    const authQuery = yield* AuthQuery
    const upstreamTls = yield* UpstreamTls

    const apply = (change: TenantChange) =>
      Effect.gen(function* () {
        if (change._tag === "Removed") {
          const id = change.before.external_id
          yield* authQuery.invalidate(id, true)
          const n = yield* sessions.kickTenant(id, (s) => tidepoolError("ENOTFOUND", s.user, id))
          yield* pools.stopTenant(id)
          yield* Effect.logInfo(`tenant deleted: its pools stopped, ${n} client(s) disconnected`).pipe(
            Effect.annotateLogs({ tenant: id })
          )
          return
        }
        const { before, after } = change
        const id = after.external_id
        const ban = banOf(after)
        if (ban !== undefined) {
          const n = yield* sessions.kickTenant(id, () => ban)
          if (n > 0) {
            yield* Effect.logInfo(`tenant banned: ${n} client(s) disconnected`).pipe(
              Effect.annotateLogs({ tenant: id })
            )
          }
        }
        if (before === undefined || !configurationChanged(before, after)) return
        yield* authQuery.invalidate(id, false)
        if (after.require_user) {
          const aliases = new Set(after.users.map((u) => u.db_user_alias))
          yield* sessions.kickTenant(id, (s) =>
            aliases.has(s.user) ? undefined : tidepoolError("ENOTFOUND", s.user, id)
          )
        }
        const tls = upstreamTls.optionsFor(after)
        yield* pools.reconfigure(id, (settings) => retarget(settings, after, tls))
        yield* Effect.logInfo("tenant reconfigured: its pools drain onto the new settings").pipe(
          Effect.annotateLogs({ tenant: id })
        )
      })

    yield* tenants.onChange(apply)

    const peers = yield* Effect.serviceOption(PeerWorkers)
    const terminateHere = (id: string) =>
      Effect.gen(function* () {
        const n = yield* sessions.kickTenant(id, () => tidepoolError("EADMINSHUTDOWN"))
        yield* pools.stopTenant(id)
        return n
      })

    // A terminate sent by another process sharing the PostgreSQL store (another host, or another
    // worker of this one).
    yield* tenants.onTerminate((id) =>
      Effect.gen(function* () {
        const n = yield* terminateHere(id)
        yield* Effect.logInfo(`tenant terminated by another node: ${n} client(s) disconnected`).pipe(
          Effect.annotateLogs({ tenant: id })
        )
      })
    )

    return {
      /**
       * GET …/terminate: stops every pool of the tenant and ends its clients (57P01), here and on
       * every node sharing the store (docs/api.md). `disconnected` counts this process's clients only.
       */
      terminate: (id: string) =>
        Effect.gen(function* () {
          const disconnected = yield* terminateHere(id)
          // With a PostgreSQL store every worker of every host hears the store's notification, this
          // host's other workers included; the supervisor carries it only where the store cannot
          // (SQLite, or the notification failed), so no worker runs it twice.
          const reach = yield* tenants.broadcastTerminate(id)
          if (reach._tag !== "store" && Option.isSome(peers)) peers.value.terminated(id)
          if (reach._tag === "failed") {
            yield* Effect.logWarning(`tenant terminated on this node only: ${reach.message}`).pipe(
              Effect.annotateLogs({ tenant: id })
            )
          }
          return { disconnected, reach }
        }).pipe(Effect.withSpan("tenants.terminate", { attributes: { "tidepool.tenant": id } })),
      /** A terminate another worker of this host ran (worker mode, through the supervisor). */
      terminateHere
    } as const
  })
}) {
  static readonly layer = Layer.effect(this, this.make)
}
