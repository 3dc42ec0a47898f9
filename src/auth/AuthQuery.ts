import { createHash } from "node:crypto"
import { Clock, Context, Deferred, Duration, Effect, Exit, Layer, Option, Random, Redacted, Semaphore } from "effect"
import { AppConfig, type Tenant, type User } from "../config/index.ts"
import { type TidepoolError, tidepoolError } from "../errors/index.ts"
import { parseScramSecret, type ScramSecret } from "../protocol/index.ts"
import { TenantRegistry } from "../tenants/index.ts"
import { UpstreamTls } from "../tls/index.ts"
import { connect, type PassthroughKeys, type ServerConnection } from "../upstream/index.ts"
import { CircuitBreaker } from "./CircuitBreaker.ts"

/** docs/errors.md: the message of a tenant blocked by the auth_query breaker. */
export const AUTH_QUERY_BLOCKED =
  "failed to retrieve database credentials after multiple attempts, new connections are temporarily blocked"

/** docs/errors.md: the EAUTHQUERY reason for a role the database does not know. */
export const USER_NOT_FOUND = "user not found in the database"

const MD5_SECRET = "MD5 secrets are not supported for auth_query, use require_user instead"
const INVALID_SECRET = "unsupported or invalid secret format"

/** docs/authentication.md: re-fetches after a wrong password, per (tenant, user) and minute. */
export const REFETCHES_PER_MINUTE = 3

/** The ClientKey and ServerKey a verified login recovered, for its pools' upstream logins. */
export interface UpstreamKeys {
  readonly clientKey: Buffer
  readonly serverKey: Buffer
}

interface Entry {
  readonly tenant: string
  readonly user: string
  /** What the secret was fetched from; a tenant whose upstream or query changed misses the cache. */
  readonly source: string
  secret: ScramSecret
  /** Last login that used it; entries unused for the cache TTL are dropped. */
  usedAt: number
}

/** The dedicated upstream connection of one tenant, as its manager user. */
interface Link {
  conn: ServerConnection | undefined
  /** Host, port, database, manager user and password the connection was made with. */
  made: string
  readonly lock: Semaphore.Semaphore
}

const key = (tenant: string, user: string) => `${tenant}\u0000${user}`

const sourceOf = (tenant: Tenant) =>
  `${tenant.db_host}\u0000${tenant.db_port}\u0000${tenant.db_database}\u0000${tenant.auth_query}`

const managerOf = (tenant: Tenant): User | undefined => tenant.users.find((u) => u.is_manager) ?? tenant.users[0]

const sameSecret = (a: ScramSecret, b: ScramSecret) =>
  a.iterations === b.iterations &&
  a.salt.equals(b.salt) &&
  a.storedKey.equals(b.storedKey) &&
  a.serverKey.equals(b.serverKey)

const authQueryError = (reason: string) => tidepoolError("EAUTHQUERY", reason)

/** A fetch's outcome: the secret, or no such role. Everything else is an EAUTHQUERY error. */
type Fetched = ScramSecret | "not found"

/**
 * Secrets of `require_user: false` tenants (docs/authentication.md). The tenant's `auth_query` runs with the
 * client's username as `$1` on one dedicated upstream connection per tenant, logged in as the manager
 * user as the tenant registry has it at that moment (a rotated manager password reconnects it, and no
 * client notices). Only SCRAM verifiers are accepted; Tidepool never sees a plaintext password.
 *
 * Secrets are cached and re-checked in the background, so logins do not query the upstream and an
 * unauthenticated client cannot make Tidepool query it at will: a wrong password re-fetches at most
 * three times per user and minute, which is how a rotated password is noticed before the next
 * re-check. A role dropped or re-passworded upstream stops matching within one re-check interval.
 *
 * The ClientKeys recovered from logins are kept here too (memory only): the pools of auth_query users
 * log in upstream with them (SCRAM pass-through). They are stored per (tenant, username) only after
 * the client's proof matched that username's own verifier, so a key never serves another user.
 */
export class AuthQuery extends Context.Service<AuthQuery>()("tidepool/AuthQuery", {
  make: Effect.gen(function* () {
    const config = yield* AppConfig
    const registry = yield* TenantRegistry
    const breaker = yield* CircuitBreaker
    const upstreamTls = yield* UpstreamTls
    const entries = new Map<string, Entry>()
    const keys = new Map<string, PassthroughKeys>()
    const links = new Map<string, Link>()
    const inflight = new Map<string, Deferred.Deferred<Fetched, TidepoolError>>()
    const refetches = new Map<string, Array<number>>()
    const serviceScope = yield* Effect.scope

    const dropLink = (tenant: string) => {
      const link = links.get(tenant)
      links.delete(tenant)
      link?.conn?.close("auth_query connection no longer needed")
    }
    yield* Effect.addFinalizer(() =>
      Effect.sync(() => {
        for (const tenant of [...links.keys()]) dropLink(tenant)
      })
    )

    /** The tenant's connection, (re)made when missing, broken, or made with other credentials. */
    const linkOf = (tenant: Tenant, link: Link) =>
      Effect.gen(function* () {
        const manager = managerOf(tenant)
        if (manager === undefined) return yield* authQueryError("no manager user configured for this tenant")
        // A digest, so the connection notices new credentials without keeping another plaintext copy.
        const made = createHash("sha256")
          .update(`${tenant.db_host}\u0000${tenant.db_port}\u0000${tenant.db_database}\u0000${manager.db_user}\u0000`)
          .update(JSON.stringify(upstreamTls.optionsFor(tenant) ?? null))
          .update(Redacted.value(manager.db_password))
          .digest("base64")
        if (link.conn !== undefined && !link.conn.closed && link.made === made && link.conn.isIdle) return link.conn
        link.conn?.close("auth_query connection replaced")
        link.conn = undefined
        const conn = yield* connect(
          {
            host: tenant.db_host,
            port: tenant.db_port,
            database: tenant.db_database,
            user: manager.db_user,
            password: manager.db_password,
            connectTimeoutMs: config.upstreamConnectTimeoutMs,
            tls: upstreamTls.optionsFor(tenant)
          },
          { rows: true }
        ).pipe(Effect.mapError((e) => authQueryError(`auth_query connection failed: ${e.message}`)))
        link.conn = conn
        link.made = made
        return conn
      })

    /** Runs the auth_query for `user`; breaker-counted, one query at a time per tenant. */
    const fetch = (tenant: Tenant, user: string): Effect.Effect<Fetched, TidepoolError> =>
      Effect.gen(function* () {
        const sql = tenant.auth_query
        if (sql === undefined) return yield* authQueryError("no auth_query configured for this tenant")
        let link = links.get(tenant.external_id)
        if (link === undefined) {
          // Made without yielding: two first fetches of a tenant must not both open a connection.
          link = { conn: undefined, made: "", lock: Semaphore.makeUnsafe(1) }
          links.set(tenant.external_id, link)
        }
        const current = link
        const result = yield* current.lock.withPermits(1)(
          Effect.gen(function* () {
            const conn = yield* linkOf(tenant, current)
            return yield* conn.query(sql, [user]).pipe(
              Effect.timeoutOrElse({
                duration: config.upstreamConnectTimeoutMs,
                orElse: () => Effect.fail(tidepoolError("ESERVERCLOSED", "no answer in time"))
              }),
              // A connection left mid-query (timeout, interruption) is of no further use.
              Effect.onExit((exit) =>
                Exit.isSuccess(exit) || conn.isIdle ? Effect.void : Effect.sync(() => conn.destroy("auth_query failed"))
              ),
              Effect.mapError((e) => authQueryError(`authentication query failed: ${e.message}`))
            )
          })
        )
        if (result.rows.length === 0) return undefined
        const row = result.rows[0]!
        // Supavisor's contract: one row (user, secret), and the row is the user asked for.
        if (result.rows.length > 1 || result.columns !== 2 || row.length !== 2 || row[0] !== user) {
          return yield* authQueryError("authentication query returned wrong format")
        }
        return row[1] ?? ""
      }).pipe(
        Effect.tap(() => breaker.authQuerySucceeded(tenant.external_id)),
        Effect.tapError(() => breaker.authQueryFailed(tenant.external_id)),
        Effect.flatMap((found): Effect.Effect<Fetched, TidepoolError> => {
          if (found === undefined) return Effect.succeed("not found")
          if (found.startsWith("md5")) {
            return Effect.fail(authQueryError(MD5_SECRET))
          }
          const secret = parseScramSecret(found)
          return secret === undefined ? Effect.fail(authQueryError(INVALID_SECRET)) : Effect.succeed(secret)
        }),
        Effect.withSpan("auth.query", { attributes: { "tidepool.tenant": tenant.external_id, "db.user": user } })
      )

    /**
     * One fetch per (tenant, user) at a time: a login storm of one user queries once. The fetch runs
     * in the service's scope, so a client that gives up (timeout, disconnect) leaves it to finish for
     * the others instead of cutting the connection mid-query.
     */
    const fetchShared = (tenant: Tenant, user: string): Effect.Effect<Fetched, TidepoolError> =>
      Effect.suspend(() => {
        const k = key(tenant.external_id, user)
        const running = inflight.get(k)
        if (running !== undefined) return Deferred.await(running)
        const started = Deferred.makeUnsafe<Fetched, TidepoolError>()
        inflight.set(k, started)
        return fetch(tenant, user).pipe(
          Effect.exit,
          Effect.flatMap((exit) => {
            inflight.delete(k)
            return Deferred.done(started, exit)
          }),
          // Shutdown interrupts it: waiters must hear of that too, not wait forever.
          Effect.onInterrupt(() =>
            Effect.andThen(
              Effect.sync(() => inflight.delete(k)),
              Deferred.interrupt(started)
            )
          ),
          Effect.forkIn(serviceScope),
          Effect.andThen(Deferred.await(started))
        )
      })

    /**
     * A role whose secret became unusable (now MD5, or none) must not keep logging in with the old
     * verifier; an upstream that cannot be asked right now is another matter (that is what the
     * cache is for).
     */
    const forgetUnusable = (tenant: Tenant, user: string, error: TidepoolError) =>
      Effect.sync(() => {
        if (error.code === "EAUTHQUERY" && (error.message === MD5_SECRET || error.message === INVALID_SECRET)) {
          entries.delete(key(tenant.external_id, user))
          keys.delete(key(tenant.external_id, user))
        }
      })

    /** Records a fetch in the cache; a role that no longer exists takes its key with it. */
    const store = (tenant: Tenant, user: string, fetched: Fetched, now: number) => {
      const k = key(tenant.external_id, user)
      if (fetched === "not found") {
        entries.delete(k)
        keys.delete(k)
        return
      }
      const entry = entries.get(k)
      if (entry !== undefined && entry.source === sourceOf(tenant)) entry.secret = fetched
      else entries.set(k, { tenant: tenant.external_id, user, source: sourceOf(tenant), secret: fetched, usedAt: now })
    }

    const blocked = (tenant: string) =>
      Effect.flatMap(breaker.isAuthQueryBlocked(tenant), (isBlocked) =>
        isBlocked ? Effect.fail(tidepoolError("ECIRCUITBREAKER", AUTH_QUERY_BLOCKED)) : Effect.void
      )

    /** Re-checks every cached secret (when `refresh`); drops the unused, and tenants gone or changed. */
    const recheck = (refresh: boolean) =>
      Effect.gen(function* () {
        const now = yield* Clock.currentTimeMillis
        const live = new Set<string>()
        const due: Array<[Tenant, Entry]> = []
        for (const [k, entry] of entries) {
          const tenant = registry.get(entry.tenant)
          if (tenant === undefined || tenant.require_user || sourceOf(tenant) !== entry.source) {
            entries.delete(k)
            keys.delete(k)
          } else if (now - entry.usedAt > config.authQueryCacheTtlMs) {
            entries.delete(k)
          } else {
            live.add(entry.tenant)
            due.push([tenant, entry])
          }
        }
        for (const tenant of [...links.keys()]) if (!live.has(tenant)) dropLink(tenant)
        for (const [k, times] of refetches) if (times.every((t) => t <= now - 60_000)) refetches.delete(k)
        if (!refresh) return
        yield* Effect.forEach(
          due,
          ([tenant, entry]) =>
            Effect.when(
              fetchShared(tenant, entry.user).pipe(
                Effect.tap((fetched) => Effect.sync(() => store(tenant, entry.user, fetched, now))),
                Effect.catch((error) =>
                  Effect.andThen(
                    forgetUnusable(tenant, entry.user, error),
                    Effect.logWarning(`auth_query re-check failed: ${error.message}`).pipe(
                      Effect.annotateLogs({ tenant: tenant.external_id, user: entry.user, code: error.code })
                    )
                  )
                )
              ),
              Effect.map(breaker.isAuthQueryBlocked(tenant.external_id), (b) => !b)
            ),
          { concurrency: 8, discard: true }
        )
      })

    // Jitter spreads the re-checks of many nodes over time instead of querying in lockstep. Without
    // re-checks, the same loop still drops unused entries and idle connections once a minute.
    const interval = config.authQueryRecheckIntervalMs > 0 ? config.authQueryRecheckIntervalMs : 60_000
    const pause = Effect.flatMap(Random.nextIntBetween(interval / 2, (interval * 3) / 2), (ms) =>
      Effect.sleep(Duration.millis(ms))
    )
    const pass = recheck(config.authQueryRecheckIntervalMs > 0)
    yield* Effect.forkScoped(Effect.forever(Effect.andThen(pause, pass)).pipe(Effect.interruptible))

    return {
      /**
       * The verifier of `user`: cached, else fetched now. `fresh` says it was fetched for this login
       * (a wrong password then needs no re-fetch).
       */
      secret: (tenant: Tenant, user: string) =>
        Effect.gen(function* () {
          const now = yield* Clock.currentTimeMillis
          const entry = entries.get(key(tenant.external_id, user))
          if (entry !== undefined && entry.source === sourceOf(tenant)) {
            entry.usedAt = now
            return { secret: entry.secret, fresh: false }
          }
          yield* blocked(tenant.external_id)
          const fetched = yield* fetchShared(tenant, user)
          store(tenant, user, fetched, now)
          if (fetched === "not found") return yield* authQueryError(USER_NOT_FOUND)
          return { secret: fetched, fresh: true }
        }),

      /**
       * After a wrong password: fetches the secret again (rate-limited) and says whether it changed,
       * i.e. the cache was stale rather than the password wrong.
       */
      refetch: (tenant: Tenant, user: string, tried: ScramSecret) =>
        Effect.gen(function* () {
          const now = yield* Clock.currentTimeMillis
          const k = key(tenant.external_id, user)
          const recent = (refetches.get(k) ?? []).filter((t) => t > now - 60_000)
          if (recent.length >= REFETCHES_PER_MINUTE || (yield* breaker.isAuthQueryBlocked(tenant.external_id))) {
            refetches.set(k, recent)
            return false
          }
          recent.push(now)
          refetches.set(k, recent)
          const fetched = yield* fetchShared(tenant, user).pipe(
            Effect.tapError((error) => forgetUnusable(tenant, user, error)),
            Effect.option
          )
          if (Option.isNone(fetched)) return false
          store(tenant, user, fetched.value, now)
          return fetched.value !== "not found" && !sameSecret(fetched.value, tried)
        }),

      /**
       * Keeps the keys a verified login recovered, for the user's pools to log in upstream. When the
       * upstream refuses them (28P01: the password changed), the cached verifier is stale too:
       * it is dropped, so the next login fetches the current one instead of failing against it.
       */
      remember: (tenant: string, user: string, upstream: UpstreamKeys) =>
        Effect.sync(() => {
          const k = key(tenant, user)
          keys.set(k, { ...upstream, rejected: () => entries.delete(k) })
        }),

      /** The latest verified keys of `user`; read at every upstream login of its pools. */
      keysOf: (tenant: string, user: string): PassthroughKeys | undefined => keys.get(key(tenant, user)),

      /**
       * Forgets a tenant's cached secrets and its auth_query connection (the tenant changed), and with
       * `removed` also the keys its pools log in with. A changed tenant keeps the keys: its pools'
       * next servers still need them, and a client's next login refreshes them.
       */
      invalidate: (tenant: string, removed: boolean) =>
        Effect.sync(() => {
          for (const [k, entry] of entries) if (entry.tenant === tenant) entries.delete(k)
          if (removed) for (const k of [...keys.keys()]) if (k.startsWith(key(tenant, ""))) keys.delete(k)
          dropLink(tenant)
        }),

      /** Runs one re-check pass now (the background loop does this every interval). */
      recheck: recheck(true)
    } as const
  })
}) {
  static readonly layer = Layer.effect(this, this.make)
}
