import { randomUUID } from "node:crypto"
import { Context, Deferred, Effect, Layer, Option, Schedule, Semaphore, Stream } from "effect"
import { AppConfig, type Tenant } from "../config/index.ts"
import { TenantRegistry } from "./TenantRegistry.ts"
import { TenantStore, type TenantStoreError, withinDeadline } from "./TenantStore.ts"

/** What changed in the tenant cache; listeners apply it to pools and sessions. */
export type TenantChange =
  | { readonly _tag: "Upserted"; readonly before: Tenant | undefined; readonly after: Tenant }
  | { readonly _tag: "Removed"; readonly before: Tenant }

export type TenantListener = (change: TenantChange) => Effect.Effect<void>

/**
 * How far a tenant's terminate went beyond this process: `store` — every node and worker listening
 * on the PostgreSQL store was notified; `none` — the store is SQLite, there is no other node (a
 * host's other workers hear it from the supervisor); `failed` — the store could not send it.
 */
export type TerminateReach =
  | { readonly _tag: "store" }
  | { readonly _tag: "none" }
  | { readonly _tag: "failed"; readonly message: string }

/**
 * The change channel's terminate message: `terminate <origin> <external_id>`. An external_id has no
 * space, so no node takes it for a tenant to reload; `origin` is the sending process, which has
 * terminated its own clients already.
 */
const TERMINATE = "terminate "
const BROADCAST_TIMEOUT_MS = 2_000

interface Cached {
  readonly tenant: Tenant
  readonly version: number
}

/** Ban fields are set only through PATCH: a PUT or a config-file upsert keeps the stored ones. */
export const keepBan = (next: Tenant, existing: Tenant | undefined): Tenant => {
  const { banned_at: _a, ban_reason: _r, banned_until: _u, ...rest } = next
  if (existing === undefined) return rest
  return {
    ...rest,
    ...(existing.banned_at !== undefined ? { banned_at: existing.banned_at } : {}),
    ...(existing.ban_reason !== undefined ? { ban_reason: existing.ban_reason } : {}),
    ...(existing.banned_until !== undefined ? { banned_until: existing.banned_until } : {})
  }
}

/**
 * The tenant cache in front of the store. Reads (the login path) are synchronous map lookups;
 * every write goes to the store, then reloads that tenant into the cache and tells the listeners
 * (pool drains, client kicks) before returning, so an API answer means the change is in effect on
 * this node. Other nodes sharing a PostgreSQL store learn of it by LISTEN/NOTIFY, and a periodic
 * full reload (TIDEPOOL_TENANT_REFRESH_MS) catches anything a dropped listener connection missed.
 */
export class Tenants extends Context.Service<Tenants>()("tidepool/Tenants", {
  make: Effect.gen(function* () {
    const store = yield* TenantStore
    const config = yield* AppConfig
    const byId = new Map<string, Cached>()
    const bySni = new Map<string, Tenant>()
    const listeners: Array<TenantListener> = []
    const terminateListeners: Array<(externalId: string) => Effect.Effect<void>> = []
    const origin = randomUUID()
    // Reloads and writes one at a time, so listeners see changes in order and diffs are exact.
    const lock = yield* Semaphore.make(1)

    const index = () => {
      bySni.clear()
      for (const { tenant } of byId.values()) {
        if (tenant.sni_hostname !== undefined) bySni.set(tenant.sni_hostname.toLowerCase(), tenant)
      }
    }

    const publish = (change: TenantChange) => Effect.forEach(listeners, (l) => l(change), { discard: true })

    /** Brings one tenant of the cache in line with the store. */
    const reloadUnlocked = (externalId: string): Effect.Effect<void, TenantStoreError> =>
      Effect.gen(function* () {
        const stored = yield* store.get(externalId)
        const before = byId.get(externalId)
        if (Option.isNone(stored)) {
          if (before === undefined) return
          byId.delete(externalId)
          index()
          yield* publish({ _tag: "Removed", before: before.tenant })
          return
        }
        if (before !== undefined && before.version === stored.value.version) return
        byId.set(externalId, stored.value)
        index()
        yield* publish({ _tag: "Upserted", before: before?.tenant, after: stored.value.tenant })
      })

    /** The initial load: one query. */
    const loadAllUnlocked = Effect.gen(function* () {
      for (const stored of yield* store.list) {
        byId.set(stored.tenant.external_id, stored)
      }
      index()
    })

    /** The periodic refresh: versions first, then only the tenants that changed. */
    const refreshUnlocked = Effect.gen(function* () {
      const versions = yield* store.versions
      for (const id of [...byId.keys(), ...versions.keys()]) {
        if (byId.get(id)?.version !== versions.get(id)) yield* reloadUnlocked(id)
      }
    })

    const reload = (externalId: string) => lock.withPermits(1)(reloadUnlocked(externalId))

    const registry: TenantRegistry["Service"] = {
      get: (id) => byId.get(id)?.tenant,
      bySni: (host) => bySni.get(host.toLowerCase()),
      all: () => [...byId.values()].map((c) => c.tenant)
    }

    /** Another process's terminate (`terminate <origin> <id>`): this one ends the tenant's clients too. */
    const terminated = (payload: string): Effect.Effect<void> => {
      const rest = payload.slice(TERMINATE.length)
      const space = rest.indexOf(" ")
      if (space < 0 || rest.slice(0, space) === origin) return Effect.void
      const id = rest.slice(space + 1)
      return Effect.forEach(terminateListeners, (l) => l(id), { discard: true })
    }

    if (store.kind === "postgres") {
      // LISTEN is issued asynchronously: until this node hears its own ping, a change made elsewhere
      // could slip between the initial load and the listener. Pings carry a space, which no
      // external_id has.
      const ping = `ping ${randomUUID()}`
      const listening = yield* Deferred.make<void>()
      yield* store.changes.pipe(
        Stream.runForEach((id) =>
          id.startsWith(TERMINATE)
            ? terminated(id)
            : id.includes(" ")
              ? Deferred.succeed(listening, undefined)
              : reload(id)
        ),
        Effect.tapError((e) => Effect.logWarning(`${e.message}; retrying`)),
        Effect.retry(Schedule.spaced("1 second")),
        Effect.forkScoped
      )
      yield* store.signal(ping).pipe(
        Effect.andThen(
          Deferred.await(listening).pipe(
            Effect.timeoutOrElse({ duration: "250 millis", orElse: () => Effect.fail("not yet" as const) })
          )
        ),
        Effect.retry(Schedule.recurs(40)),
        Effect.catch(() => Effect.logWarning("not listening for tenant changes yet; relying on the periodic refresh"))
      )
    }

    yield* lock.withPermits(1)(loadAllUnlocked)

    if (store.kind === "postgres") {
      if (config.tenantRefreshMs > 0) {
        yield* lock
          .withPermits(1)(refreshUnlocked)
          .pipe(
            Effect.catch((e) => Effect.logWarning(e.message)),
            Effect.delay(config.tenantRefreshMs),
            Effect.forever,
            Effect.forkScoped
          )
      }
    }

    return {
      registry,
      /** Runs `listener` for every later change, before the write that caused it returns. */
      onChange: (listener: TenantListener) => Effect.sync(() => void listeners.push(listener)),
      /** Runs `listener` with the external_id of every terminate another process sends (below). */
      onTerminate: (listener: (externalId: string) => Effect.Effect<void>) =>
        Effect.sync(() => void terminateListeners.push(listener)),
      /**
       * Tells every other process sharing the PostgreSQL store (other hosts, and this host's other
       * workers: each listens itself) to terminate the tenant as this one just did. Sent on the
       * change channel like every tenant write, so it needs nothing but the store; a process whose
       * listening connection is down at that moment misses it (there is nothing to reload later).
       */
      broadcastTerminate: (externalId: string): Effect.Effect<TerminateReach> =>
        store.kind !== "postgres"
          ? Effect.succeed({ _tag: "none" } as const)
          : withinDeadline(
              store.signal(`${TERMINATE}${origin} ${externalId}`).pipe(
                Effect.as<TerminateReach>({ _tag: "store" }),
                Effect.catch((e) => Effect.succeed<TerminateReach>({ _tag: "failed", message: e.message }))
              ),
              // A store that has gone silent must not hold the API's answer: the caller can retry.
              BROADCAST_TIMEOUT_MS,
              () =>
                Effect.succeed<TerminateReach>({
                  _tag: "failed",
                  message: `tenant store: NOTIFY did not complete within ${BROADCAST_TIMEOUT_MS / 1000} s`
                })
            ).pipe(Effect.withSpan("tenants.broadcast_terminate", { attributes: { "tidepool.tenant": externalId } })),
      get: (id: string) => byId.get(id)?.tenant,
      /** Writes the tenant (keeping its ban state) and applies the change on this node. */
      put: (tenant: Tenant) =>
        lock
          .withPermits(1)(
            Effect.gen(function* () {
              const existing = yield* store.get(tenant.external_id)
              const { created } = yield* store.upsert(
                keepBan(tenant, Option.getOrUndefined(Option.map(existing, (s) => s.tenant)))
              )
              yield* reloadUnlocked(tenant.external_id)
              return { created }
            })
          )
          .pipe(Effect.withSpan("tenants.put", { attributes: { "tidepool.tenant": tenant.external_id } })),
      /** Writes the tenant as given, ban fields included (PATCH). */
      replace: (tenant: Tenant) =>
        lock
          .withPermits(1)(Effect.andThen(store.upsert(tenant), reloadUnlocked(tenant.external_id)))
          .pipe(Effect.withSpan("tenants.replace", { attributes: { "tidepool.tenant": tenant.external_id } })),
      remove: (id: string) =>
        lock
          .withPermits(1)(
            Effect.gen(function* () {
              const removed = yield* store.remove(id)
              yield* reloadUnlocked(id)
              return removed
            })
          )
          .pipe(Effect.withSpan("tenants.remove", { attributes: { "tidepool.tenant": id } })),
      reload
    } as const
  })
}) {
  static readonly layer = Layer.effect(this, this.make)

  /** The synchronous read side, for the login path. */
  static readonly registry = Layer.effect(
    TenantRegistry,
    Effect.map(Tenants, (t) => t.registry)
  )
}
