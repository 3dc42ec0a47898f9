import { X509Certificate } from "node:crypto"
import { PgClient } from "@effect/sql-pg"
import { Effect, Redacted, Result, Schema } from "effect"
import { SqlClient } from "effect/sql"
import {
  formatProblem,
  problemsFromParseError,
  strictParseOptions,
  Tenant,
  type TenantIssue,
  tenantIssues
} from "../config/index.ts"
import { decryptCloak } from "../tenants/index.ts"
import { ImportError, type ImportPlan, type Unmapped } from "./ImportPlan.ts"

export interface SupavisorOptions {
  /** Supavisor's DATABASE_URL; its `ecto://` scheme is read as `postgresql://`. */
  readonly databaseUrl: string
  /** The schema Supavisor's migrations create its tables in. */
  readonly schema?: string | undefined
  /** Supavisor's VAULT_ENC_KEY, parsed: its users' passwords are encrypted with it. */
  readonly vaultKey: Buffer
}

type Row = Readonly<Record<string, unknown>>

/** Tenant columns whose value Tidepool takes as it is (the field names are the same). */
const sameTenantFields = [
  "external_id",
  "db_host",
  "db_port",
  "db_database",
  "ip_version",
  "upstream_ssl",
  "upstream_verify",
  "enforce_ssl",
  "require_user",
  "auth_query",
  "default_pool_size",
  "sni_hostname",
  "default_max_clients",
  "client_idle_timeout",
  "client_heartbeat_interval",
  "allow_list",
  "availability_zone",
  "feature_flags",
  "use_jit",
  "jit_api_url",
  "ban_reason"
] as const

/** Columns that are Supavisor's bookkeeping, not configuration: nothing to carry over. */
const bookkeeping = new Set(["id", "inserted_at", "updated_at", "tenant_external_id"])

const convertedTenantFields = new Set([
  "default_parameter_status",
  "upstream_tls_ca",
  "banned_at",
  "banned_until",
  "default_pool_strategy"
])

const sameUserFields = [
  "db_user",
  "db_user_alias",
  "pool_size",
  "mode_type",
  "is_manager",
  "pool_checkout_timeout",
  "max_clients"
] as const

const convertedUserFields = new Set(["db_pass_encrypted"])

/** `to_jsonb` writes bytea as `\x` followed by hex. */
const bytesOf = (value: unknown): Buffer | undefined =>
  typeof value === "string" && value.startsWith("\\x") ? Buffer.from(value.slice(2), "hex") : undefined

/**
 * Supavisor stores `upstream_tls_ca` as the certificate's DER bytes (its API converts the PEM it
 * is given); Tidepool keeps PEM.
 */
const pemOf = (value: unknown): string | undefined => {
  const bytes = bytesOf(value)
  if (bytes === undefined) return undefined
  const text = bytes.toString("latin1")
  if (text.startsWith("-----BEGIN")) return text
  try {
    return new X509Certificate(bytes).toString()
  } catch {
    return undefined
  }
}

/** Ecto's `utc_datetime` is a `timestamp` without zone holding UTC; to_jsonb omits the zone. */
const utcOf = (value: unknown): string | undefined =>
  typeof value === "string" ? (/[zZ]|[+-]\d\d:?\d\d$/.test(value) ? value : `${value}Z`) : undefined

const unknownColumn = (where: string, column: string): Unmapped => ({
  source: where,
  field: column,
  reason: "a column this importer does not know (a newer Supavisor?): not imported; set its equivalent by hand"
})

interface UserRow {
  readonly row: Row
  readonly password: Redacted.Redacted<string>
}

/** The users of one tenant: one per login name, as Tidepool serves both ports with one user. */
const mapUsers = (externalId: string, users: ReadonlyArray<UserRow>, unmapped: Array<Unmapped>) => {
  const byAlias = new Map<string, UserRow>()
  // Transaction mode first: it is what most applications use, so it wins a name held twice.
  const ordered = [...users].sort(
    (a, b) => Number(a.row.mode_type !== "transaction") - Number(b.row.mode_type !== "transaction")
  )
  for (const user of ordered) {
    const alias = String(user.row.db_user_alias ?? user.row.db_user)
    const kept = byAlias.get(alias)
    if (kept === undefined) {
      byAlias.set(alias, user)
      continue
    }
    unmapped.push({
      source: `tenant ${externalId}`,
      field: `user ${alias} (${String(user.row.mode_type)} mode)`,
      reason: `one user per login name (Supavisor answers a name held twice with EMULTIPLEUSERS); the ${String(kept.row.mode_type)}-mode entry (db_user ${String(kept.row.db_user)}, pool_size ${String(kept.row.pool_size)}) was imported, this one (db_user ${String(user.row.db_user)}, pool_size ${String(user.row.pool_size)}) was not`
    })
  }
  return [...byAlias.values()].map(({ row, password }) => {
    const user: Record<string, unknown> = {}
    for (const field of sameUserFields) if (row[field] !== null && row[field] !== undefined) user[field] = row[field]
    user.db_password = Redacted.value(password)
    for (const [column, value] of Object.entries(row)) {
      const known = bookkeeping.has(column) || convertedUserFields.has(column) || column in user
      if (!known && value !== null && !(sameUserFields as ReadonlyArray<string>).includes(column)) {
        unmapped.push(unknownColumn(`tenant ${externalId} user ${String(row.db_user_alias)}`, column))
      }
    }
    return user
  })
}

/** One Supavisor tenant row as a Tidepool tenant document (before validation). */
const mapTenant = (row: Row, users: ReadonlyArray<UserRow>, unmapped: Array<Unmapped>): Record<string, unknown> => {
  const externalId = String(row.external_id)
  const where = `tenant ${externalId}`
  const tenant: Record<string, unknown> = {}
  for (const field of sameTenantFields) if (row[field] !== null && row[field] !== undefined) tenant[field] = row[field]
  const status = row.default_parameter_status
  if (status !== null && typeof status === "object" && Object.keys(status).length > 0) {
    tenant.default_parameter_status = Object.fromEntries(Object.entries(status).map(([k, v]) => [k, String(v)]))
  }
  if (row.upstream_tls_ca !== null && row.upstream_tls_ca !== undefined) {
    const pem = pemOf(row.upstream_tls_ca)
    if (pem !== undefined) tenant.upstream_tls_ca = pem
    else
      unmapped.push({
        source: where,
        field: "upstream_tls_ca",
        reason: "not a DER or PEM certificate; set upstream_tls_ca (PEM) by hand, or use GLOBAL_UPSTREAM_CA_PATH"
      })
  }
  for (const field of ["banned_at", "banned_until"] as const) {
    const at = utcOf(row[field])
    if (at !== undefined) tenant[field] = at
  }
  if (row.default_pool_strategy !== null && row.default_pool_strategy !== undefined) {
    if (row.default_pool_strategy !== "fifo") {
      unmapped.push({
        source: where,
        field: "default_pool_strategy",
        reason: `${String(row.default_pool_strategy)}: Supavisor no longer reads this column; Tidepool always lends the most recently used idle server (LIFO) and has no setting for it`
      })
    }
  }
  const flags = row.feature_flags
  if (flags !== null && typeof flags === "object" && !Array.isArray(flags)) {
    const kept: Record<string, unknown> = {}
    for (const [name, value] of Object.entries(flags)) {
      if (["boolean", "number", "string"].includes(typeof value)) kept[name] = value
      else
        unmapped.push({
          source: where,
          field: `feature_flags.${name}`,
          reason: "Tidepool's flags are booleans, numbers or strings; set an equivalent by hand if it matters"
        })
    }
    tenant.feature_flags = kept
  }
  for (const [column, value] of Object.entries(row)) {
    const known =
      bookkeeping.has(column) ||
      convertedTenantFields.has(column) ||
      (sameTenantFields as ReadonlyArray<string>).includes(column)
    if (!known && value !== null) unmapped.push(unknownColumn(where, column))
  }
  tenant.users = mapUsers(externalId, users, unmapped)
  return tenant
}

/** Validates a mapped tenant as the API would create it; its problems are reported, never its secrets. */
const validate = (doc: Record<string, unknown>, unmapped: Array<Unmapped>): Tenant | undefined => {
  const where = `tenant ${String(doc.external_id)}`
  const issues: ReadonlyArray<TenantIssue> = tenantIssues(doc)
  const decoded = Schema.decodeUnknownResult(Tenant, strictParseOptions)(doc)
  const problems = [
    ...issues.map((i) => `${i.path.join(".")}: ${i.message}`),
    ...(Result.isFailure(decoded) ? problemsFromParseError(decoded.failure, doc).map(formatProblem) : [])
  ]
  if (problems.length === 0 && Result.isSuccess(decoded)) return decoded.success
  unmapped.push({
    source: where,
    field: "(whole tenant)",
    reason: `not imported, Tidepool refuses it: ${[...new Set(problems)].join("; ")}`
  })
  return undefined
}

/** Every Supavisor tenant and user, read and mapped; passwords decrypted with Supavisor's key. */
const readPlan = (schema: string, key: Buffer) =>
  Effect.gen(function* () {
    const sql = yield* SqlClient.SqlClient
    const fail = (what: string) => (cause: unknown) =>
      new ImportError({ message: `reading Supavisor's ${what} failed: ${messageOf(cause)}` })
    const tables = yield* sql<{ table_name: string }>`SELECT table_name FROM information_schema.tables
      WHERE table_schema = ${schema} AND table_name IN ('tenants', 'users', 'cluster_tenants')`.pipe(
      Effect.mapError(fail("schema"))
    )
    const has = new Set(tables.map((t) => t.table_name))
    if (!has.has("tenants") || !has.has("users")) {
      return yield* new ImportError({
        message: `no Supavisor tables in schema ${schema} (tenants and users): is this Supavisor's DATABASE_URL, and its schema (--schema)?`
      })
    }
    const tenantRows = yield* sql<{ row: Row }>`SELECT to_jsonb(t) AS row FROM ${sql(schema)}.tenants t
      ORDER BY t.external_id`.pipe(Effect.mapError(fail("tenants")))
    const userRows = yield* sql<{ row: Row }>`SELECT to_jsonb(u) AS row FROM ${sql(schema)}.users u
      ORDER BY u.tenant_external_id, u.db_user_alias, u.mode_type`.pipe(Effect.mapError(fail("users")))
    const clusterRows = !has.has("cluster_tenants")
      ? []
      : yield* sql<{ row: Row }>`SELECT to_jsonb(c) AS row FROM ${sql(schema)}.cluster_tenants c
            ORDER BY c.cluster_alias, c.tenant_external_id`.pipe(Effect.mapError(fail("clusters")))

    const usersOf = new Map<string, Array<UserRow>>()
    for (const { row } of userRows) {
      const owner = String(row.tenant_external_id)
      const bytes = bytesOf(row.db_pass_encrypted)
      const password = bytes === undefined ? undefined : decryptCloak(key, bytes)
      if (password === undefined || !Redacted.isRedacted(password)) {
        return yield* new ImportError({
          message: `cannot decrypt the password of user ${String(row.db_user_alias)} of tenant ${owner}: ${password?.message ?? "no db_pass_encrypted"}. Set VAULT_ENC_KEY (or SUPAVISOR_VAULT_ENC_KEY) to Supavisor's VAULT_ENC_KEY`
        })
      }
      usersOf.set(owner, [...(usersOf.get(owner) ?? []), { row, password }])
    }

    const unmapped: Array<Unmapped> = []
    const tenants: Array<Tenant> = []
    for (const { row } of tenantRows) {
      const tenant = validate(mapTenant(row, usersOf.get(String(row.external_id)) ?? [], unmapped), unmapped)
      if (tenant !== undefined) tenants.push(tenant)
    }
    for (const { row } of clusterRows) {
      unmapped.push({
        source: `cluster ${String(row.cluster_alias)}`,
        field: `${String(row.type)} tenant ${String(row.tenant_external_id)}`,
        reason:
          "Tidepool has no clusters (read/write groups of tenants behind one name): clients connect to each tenant by its own external_id"
      })
    }
    const plan: ImportPlan = { source: "supavisor", tenants, unmapped }
    return plan
  })

const messageOf = (cause: unknown): string => {
  const inner = (cause as { cause?: unknown }).cause
  if (inner instanceof Error) return inner.message
  return cause instanceof Error ? cause.message : String(cause)
}

/**
 * Supavisor's metadata database as an import plan. Only reads (SELECTs); a password that does not
 * decrypt fails the whole import, since writing part of a store with a wrong key helps nobody.
 */
export const supavisorPlan = Effect.fn("migrate.supavisorPlan")(function* (options: SupavisorOptions) {
  const schema = options.schema ?? "_supavisor"
  const url = options.databaseUrl.replace(/^ecto:\/\//, "postgresql://")
  if (!/^postgres(ql)?:\/\//.test(url)) {
    return yield* new ImportError({ message: "--database-url must be a postgres://, postgresql:// or ecto:// URL" })
  }
  return yield* Effect.scoped(
    readPlan(schema, options.vaultKey).pipe(
      Effect.provide(
        PgClient.layerFrom(
          PgClient.make({ url: Redacted.make(url), applicationName: "tidepool-import", maxConnections: 1 }).pipe(
            Effect.mapError(
              (e) => new ImportError({ message: `cannot connect to Supavisor's database: ${messageOf(e)}` })
            )
          )
        )
      )
    )
  )
})
