import { mkdirSync } from "node:fs"
import * as path from "node:path"
// The module, not the package index: the index also loads the redis client and the worker and
// cluster modules, about a second of start-up for nothing.
import * as NodeServices from "@effect/platform-node/NodeServices"
import { PgClient, PgMigrator } from "@effect/sql-pg"
import { Context, Data, Effect, Fiber, Layer, type Option, Redacted, Schema, Stream } from "effect"
import { Reactivity } from "effect/reactivity"
import { Migrator, SqlClient } from "effect/sql"
import { formatProblem, problemsFromParseError, Tenant } from "../config/index.ts"
import * as NodeSqlite from "./NodeSqlite.ts"
import type { Vault } from "./Vault.ts"

export class TenantStoreError extends Data.TaggedError("TenantStoreError")<{ readonly message: string }> {}

/** A tenant as stored, with the version every write bumps (caches compare it to skip no-op reloads). */
export interface StoredTenant {
  readonly tenant: Tenant
  readonly version: number
}

/**
 * Where tenants live: the same table and semantics on SQLite (one node) and PostgreSQL (several
 * nodes sharing one store). Passwords are encrypted by the vault before they reach the database.
 */
export interface TenantStoreShape {
  readonly kind: "sqlite" | "postgres"
  readonly list: Effect.Effect<ReadonlyArray<StoredTenant>, TenantStoreError>
  readonly get: (externalId: string) => Effect.Effect<Option.Option<StoredTenant>, TenantStoreError>
  /** Every external_id with its version: what a cache compares to find what changed, cheaply. */
  readonly versions: Effect.Effect<ReadonlyMap<string, number>, TenantStoreError>
  /** Inserts or replaces; `created` tells which. */
  readonly upsert: (tenant: Tenant) => Effect.Effect<{ readonly created: boolean }, TenantStoreError>
  readonly remove: (externalId: string) => Effect.Effect<boolean, TenantStoreError>
  /**
   * external_ids changed by any node (PostgreSQL LISTEN/NOTIFY), so every node's cache follows;
   * empty for SQLite, which one node owns.
   */
  readonly changes: Stream.Stream<string, TenantStoreError>
  /**
   * Sends `payload` on the change channel (PostgreSQL): a listener proves it listens by hearing it,
   * and a tenant's terminate reaches every node with it (Tenants). Payloads with a space are never
   * external_ids.
   */
  readonly signal: (payload: string) => Effect.Effect<void, TenantStoreError>
  /**
   * PostgreSQL only: the store's client, for read-only views of the other tables kept in the store
   * (the cluster ledger's, src/cluster/StoreViews.ts), so they need no connection of their own.
   */
  readonly sql?: SqlClient.SqlClient | undefined
}

export class TenantStore extends Context.Service<TenantStore, TenantStoreShape>()("tidepool/TenantStore") {}

const CHANNEL = "tidepool_tenants"

/**
 * `effect`'s answer if it comes within `ms`, else `onTimeout`'s, at the deadline whatever the
 * driver does: a store that has gone silent can hold a query (or its wait for one of the pool's
 * connections) well past an interruption, so the query runs on in its own fiber, which is then
 * interrupted in the background. For answers an operator waits on (API, console, scrape).
 */
export const withinDeadline = <A, E, B>(
  effect: Effect.Effect<A, E>,
  ms: number,
  onTimeout: () => Effect.Effect<B, E>
): Effect.Effect<A | B, E> =>
  Effect.flatMap(Effect.forkDetach(effect), (fiber) =>
    Fiber.join(fiber).pipe(
      Effect.timeoutOrElse({
        duration: ms,
        orElse: () => Effect.andThen(Effect.forkDetach(Fiber.interrupt(fiber)), onTimeout())
      })
    )
  )

const migrations = Migrator.fromRecord({
  "0001_create_tenants": Effect.flatMap(
    SqlClient.SqlClient,
    (sql) => sql`CREATE TABLE tidepool_tenants (
      external_id TEXT PRIMARY KEY,
      config TEXT NOT NULL,
      version BIGINT NOT NULL,
      updated_at BIGINT NOT NULL
    )`
  )
})

// The table (and its rows) the Effect 3 migrators wrote, so existing stores are not migrated twice.
const migratorOptions = { loader: migrations, table: "tidepool_migrations" }

// SQLite needs no schema dump, so the plain migrator does (it is what SqliteMigrator.run was).
const runSqliteMigrations = Migrator.make({})

const storeError = (what: string) => (cause: unknown) =>
  new TenantStoreError({
    message: `tenant store: ${what} failed: ${cause instanceof Error ? cause.message : String(cause)}`
  })

// What the database holds: the tenant as the API spells it, each user's `db_password` replaced by
// `db_password_enc` (vault ciphertext bound to tenant and user), and a JIT JWT key by
// `jit_jwt_secret_enc`.
const encodeTenant = Schema.encodeEffect(Tenant)
const decodeTenant = Schema.decodeUnknownEffect(Tenant)

const passwordContext = (externalId: string, dbUser: string) => `${externalId}/${dbUser}`
const jitKeyContext = (externalId: string) => `${externalId}#jit_jwt_secret`

export const serializeTenant = (tenant: Tenant, vault: Vault): Effect.Effect<string, TenantStoreError> =>
  Effect.gen(function* () {
    const encoded = yield* encodeTenant(tenant).pipe(Effect.mapError(storeError("encoding a tenant")))
    const users = []
    for (const [i, user] of encoded.users.entries()) {
      const { db_password: _, ...rest } = user
      const sealed = vault.encrypt(tenant.users[i]!.db_password, passwordContext(tenant.external_id, user.db_user))
      if (typeof sealed !== "string") return yield* new TenantStoreError({ message: sealed.message })
      users.push({ ...rest, db_password_enc: sealed })
    }
    const { jit_jwt_secret: _, ...fields } = encoded
    let jitKey: Record<string, string> = {}
    if (tenant.jit_jwt_secret !== undefined) {
      const sealed = vault.encrypt(tenant.jit_jwt_secret, jitKeyContext(tenant.external_id))
      if (typeof sealed !== "string") return yield* new TenantStoreError({ message: sealed.message })
      jitKey = { jit_jwt_secret_enc: sealed }
    }
    return JSON.stringify({ ...fields, ...jitKey, users })
  })

export const deserializeTenant = (text: string, vault: Vault): Effect.Effect<Tenant, TenantStoreError> =>
  Effect.gen(function* () {
    const { jit_jwt_secret_enc, ...raw } = JSON.parse(text) as Record<string, unknown> & {
      users: Array<Record<string, unknown>>
    }
    if (jit_jwt_secret_enc !== undefined) {
      const plain = vault.decrypt(String(jit_jwt_secret_enc), jitKeyContext(String(raw.external_id)))
      if (!Redacted.isRedacted(plain)) return yield* new TenantStoreError({ message: plain.message })
      raw.jit_jwt_secret = Redacted.value(plain)
    }
    const users = []
    for (const { db_password_enc, ...user } of raw.users) {
      const plain = vault.decrypt(
        String(db_password_enc),
        passwordContext(String(raw.external_id), String(user.db_user))
      )
      if (!Redacted.isRedacted(plain)) return yield* new TenantStoreError({ message: plain.message })
      users.push({ ...user, db_password: Redacted.value(plain) })
    }
    return yield* decodeTenant({ ...raw, users }).pipe(
      // Problems are rendered by the config loader's formatter, which never prints a secret.
      Effect.mapError(
        (e) =>
          new TenantStoreError({
            message: `tenant store: stored tenant ${String(raw.external_id)} no longer validates: ${problemsFromParseError(e, raw).map(formatProblem).join("; ")}`
          })
      )
    )
  })

interface Row {
  readonly config: string
  readonly version: number | string
}

/** The store over any Effect SQL client: only portable SQL (SQLite ≥ 3.35 and PostgreSQL). */
const makeSqlStore = (kind: "sqlite" | "postgres", vault: Vault, changes: Stream.Stream<string, TenantStoreError>) =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    // pg_notify rather than PgClient.notify, whose `NOTIFY channel, $1` PostgreSQL rejects.
    const signal = (payload: string) =>
      kind === "postgres"
        ? sql`SELECT pg_notify(${CHANNEL}, ${payload})`.pipe(Effect.asVoid, Effect.mapError(storeError("NOTIFY")))
        : Effect.void
    const notify = (externalId: string) =>
      signal(externalId).pipe(
        Effect.catch((e) => Effect.logWarning(`${e.message}; other nodes see the change at their next refresh`))
      )
    const toStored = (row: Row) =>
      Effect.map(deserializeTenant(row.config, vault), (tenant) => ({ tenant, version: Number(row.version) }))
    const store: TenantStoreShape = {
      kind,
      list: sql<Row>`SELECT config, version FROM tidepool_tenants ORDER BY external_id`.pipe(
        Effect.mapError(storeError("listing tenants")),
        Effect.flatMap(Effect.forEach(toStored))
      ),
      versions: sql<{
        external_id: string
        version: number | string
      }>`SELECT external_id, version FROM tidepool_tenants`.pipe(
        Effect.mapError(storeError("listing tenant versions")),
        Effect.map((rows) => new Map(rows.map((r) => [r.external_id, Number(r.version)])))
      ),
      get: (externalId) =>
        sql<Row>`SELECT config, version FROM tidepool_tenants WHERE external_id = ${externalId}`.pipe(
          Effect.mapError(storeError("reading a tenant")),
          Effect.flatMap((rows) => (rows[0] === undefined ? Effect.succeedNone : Effect.asSome(toStored(rows[0]))))
        ),
      upsert: (tenant) =>
        Effect.gen(function* () {
          const config = yield* serializeTenant(tenant, vault)
          const now = Date.now()
          const rows = yield* sql<{ version: number | string }>`
            INSERT INTO tidepool_tenants (external_id, config, version, updated_at)
            VALUES (${tenant.external_id}, ${config}, 1, ${now})
            ON CONFLICT (external_id) DO UPDATE
              SET config = excluded.config, version = tidepool_tenants.version + 1, updated_at = excluded.updated_at
            RETURNING version`.pipe(Effect.mapError(storeError("writing a tenant")))
          yield* notify(tenant.external_id)
          return { created: Number(rows[0]?.version) === 1 }
        }),
      remove: (externalId) =>
        Effect.gen(function* () {
          const rows =
            yield* sql`DELETE FROM tidepool_tenants WHERE external_id = ${externalId} RETURNING external_id`.pipe(
              Effect.mapError(storeError("deleting a tenant"))
            )
          if (rows.length > 0) yield* notify(externalId)
          return rows.length > 0
        }),
      changes,
      signal,
      ...(kind === "postgres" ? { sql } : {})
    }
    return store
  })

/** SQLite in `<dataDir>/tidepool.db` (or `:memory:`), migrated at start. */
export const sqliteStore = (filename: string, vault: Vault): Layer.Layer<TenantStore, TenantStoreError> =>
  Layer.effect(
    TenantStore,
    Effect.gen(function* () {
      yield* runSqliteMigrations(migratorOptions).pipe(Effect.mapError(storeError("migrating the SQLite store")))
      return yield* makeSqlStore("sqlite", vault, Stream.empty)
    })
  ).pipe(
    Layer.provide(
      Layer.unwrap(
        Effect.try({
          try: () => {
            if (filename !== ":memory:") mkdirSync(path.dirname(filename), { recursive: true })
            return Layer.effect(
              SqlClient.SqlClient,
              NodeSqlite.make({ filename }).pipe(Effect.mapError(storeError(`opening ${filename}`)))
            ).pipe(Layer.provide(Reactivity.layer))
          },
          catch: storeError(`opening ${filename}`)
        })
      )
    )
  )

/** PostgreSQL at DATABASE_URL, migrated at start; writes NOTIFY every node's cache. */
export const postgresStore = (
  url: Redacted.Redacted<string>,
  vault: Vault
): Layer.Layer<TenantStore, TenantStoreError> =>
  Layer.effect(
    TenantStore,
    Effect.gen(function* () {
      const pg = yield* PgClient.PgClient
      yield* PgMigrator.run(migratorOptions).pipe(Effect.mapError(storeError("migrating the PostgreSQL store")))
      return yield* makeSqlStore(
        "postgres",
        vault,
        Stream.unwrap(Effect.map(pg.listen(CHANNEL), Stream.fromQueue)).pipe(
          Stream.map((notification) => notification.payload),
          Stream.mapError(storeError("listening for tenant changes"))
        )
      )
    })
  ).pipe(
    Layer.provide(
      PgClient.layerFrom(
        PgClient.make({ url, applicationName: "tidepool", maxConnections: 4 }).pipe(
          Effect.mapError(storeError("connecting to DATABASE_URL"))
        )
      )
    ),
    // PgMigrator can dump the schema with pg_dump; it needs the platform services for that.
    Layer.provide(NodeServices.layer)
  )
