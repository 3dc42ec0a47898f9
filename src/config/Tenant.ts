import { BlockList, isIP } from "node:net"
import { Effect, Schema, type SchemaAST, SchemaTransformation } from "effect"

// One sentence in our own words, on the type and on every check, so a failure never reads as the
// library's "Expected number, got …", which would echo the offending value (possibly a secret).
const says = (text: string) => ({ message: text })

const Str = Schema.String.annotate(says("expected a string"))

// A string check whose predicate returns the reason (a string) or undefined when the value is fine.
const rule = (reason: (s: string) => string | undefined) => Str.check(Schema.makeFilter(reason))

const Bool = Schema.Boolean.annotate(says("expected true or false"))

const int = (text: string, ...checks: ReadonlyArray<SchemaAST.Filter<number>>) =>
  Schema.Number.annotate(says(text)).check(Schema.isInt(says(text)), ...checks)

const PositiveInt = int("expected a positive integer", Schema.isGreaterThan(0, says("expected a positive integer")))

const NonNegativeInt = int(
  "expected an integer >= 0",
  Schema.isGreaterThanOrEqualTo(0, says("expected an integer >= 0"))
)

const Port = int(
  "expected an integer between 1 and 65535",
  Schema.isBetween({ minimum: 1, maximum: 65535 }, says("expected an integer between 1 and 65535"))
)

const NonEmpty = rule((s) => (s.trim() !== "" ? undefined : "must not be empty"))

const utf8 = new TextEncoder()

/** PostgreSQL truncates identifiers to NAMEDATALEN - 1 = 63 bytes. */
const DbName = rule((s) => {
  const bytes = utf8.encode(s).length
  if (bytes === 0 || bytes > 63) return "expected a name of 1 to 63 bytes"
  if (/[\u0000-\u001f\u007f]/.test(s)) return "must not contain control characters"
  return undefined
})

/**
 * What an `external_id` may be once stored: printable ASCII without spaces or dots. A new tenant's
 * id must also pass `externalIdProblem` (checked by `tenantIssues`, as the config file and the API
 * create tenants); stored tenants keep the looser rule, so an upgrade never locks a node out of its
 * own store.
 */
export const ExternalId = rule((s) => {
  if (s.length === 0 || s.length > 63) return "expected 1 to 63 characters"
  if (!/^[\x21-\x7e]+$/.test(s)) return "expected printable ASCII without spaces"
  if (s.includes(".")) return "must not contain '.' (a client username is split at its last dot)"
  return undefined
})

const isExternalId = Schema.is(ExternalId)

/**
 * The rule for a new tenant's id: 1–63 ASCII letters, digits, `_` and `-`, starting with a letter
 * or digit. Supabase project refs and Supavisor's own tenant names fit; each character left out
 * breaks a place where operators type tenant names (`/` the admin console's `tenant/database` and
 * API paths, quotes, `;` and spaces its commands, `%`, `?` and `#` URLs). Only for ids that are
 * otherwise valid: those that are not already have their problem.
 */
export const externalIdProblem = (id: unknown): string | undefined =>
  isExternalId(id) && !/^[A-Za-z0-9][A-Za-z0-9_-]*$/.test(id)
    ? "expected ASCII letters, digits, '_' and '-' only, starting with a letter or digit"
    : undefined

const hostnamePattern = /^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$/

const Host = rule((s) =>
  isIP(s) !== 0 || (s.length <= 253 && hostnamePattern.test(s)) ? undefined : "expected a host name or IP address"
)

export interface Cidr {
  readonly address: string
  readonly prefix: number
  readonly family: "ipv4" | "ipv6"
}

/** Parses `10.0.0.0/8`, `2001:db8::/32`, or a bare address (a single host). */
export const parseCidr = (text: string): Cidr | undefined => {
  const slash = text.indexOf("/")
  const address = (slash === -1 ? text : text.slice(0, slash)).trim()
  const version = isIP(address)
  if (version === 0) return undefined
  const family = version === 4 ? "ipv4" : "ipv6"
  const max = version === 4 ? 32 : 128
  if (slash === -1) return { address, prefix: max, family }
  const prefixText = text.slice(slash + 1).trim()
  if (!/^\d{1,3}$/.test(prefixText)) return undefined
  const prefix = Number(prefixText)
  return prefix <= max ? { address, prefix, family } : undefined
}

const CidrString = rule((s) =>
  parseCidr(s) !== undefined ? undefined : "expected an address range in CIDR notation, such as 10.0.0.0/8 or ::/0"
)

/** A BlockList holding the tenant's allowed client ranges (entries are validated by the schema). */
export const allowListOf = (cidrs: ReadonlyArray<string>): BlockList => {
  const list = new BlockList()
  for (const text of cidrs) {
    const cidr = parseCidr(text)
    if (cidr !== undefined) list.addSubnet(cidr.address, cidr.prefix, cidr.family)
  }
  return list
}

/** Whether a peer address is allowed; IPv4 clients of a dual-stack socket arrive as `::ffff:a.b.c.d`. */
export const isAllowed = (list: BlockList, address: string): boolean => {
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address)
  if (mapped !== null) return list.check(mapped[1], "ipv4")
  const version = isIP(address)
  return version !== 0 && list.check(address, version === 4 ? "ipv4" : "ipv6")
}

const HttpUrl = rule((s) => {
  try {
    const url = new URL(s)
    return url.protocol === "https:" || url.protocol === "http:" ? undefined : "expected an http or https URL"
  } catch {
    return "expected an http or https URL"
  }
})

const PemCertificates = rule((s) =>
  s.includes("-----BEGIN CERTIFICATE-----") ? undefined : "expected PEM certificates (-----BEGIN CERTIFICATE-----)"
)

const DateTime = Schema.DateTimeUtcFromString.annotate(says("expected an ISO 8601 date-time"))

export const ModeType = Schema.Literals(["transaction", "session"]).annotate(
  says('expected "transaction" or "session"')
)
export type ModeType = typeof ModeType.Type

export const IpVersion = Schema.Literals(["v4", "v6", "auto"]).annotate(says('expected "v4", "v6" or "auto"'))
export type IpVersion = typeof IpVersion.Type

export const UpstreamVerify = Schema.Literals(["none", "peer"]).annotate(says('expected "none" or "peer"'))
export type UpstreamVerify = typeof UpstreamVerify.Type

// `null` is not read as "unset": an empty `auth_query:` in YAML is more likely
// a mistake than a wish for the default, and it keeps messages to one line.
// An optional key is absent, not `undefined`, which also keeps a spurious
// "expected undefined" out of every error report.
const optional = Schema.optionalKey
const withDefault = <S extends Schema.Top & { readonly DecodingServices: never }>(
  schema: S,
  value: () => S["Encoded"]
) => schema.pipe(Schema.withDecodingDefaultKey(Effect.sync(value)))

// Only "not a mapping at all" gets this sentence; field errors keep their own.
const mappingMessage = (text: string) => says(text)

const userFields = {
  db_user: DbName,
  db_password: Schema.RedactedFromValue(Str),
  pool_size: optional(PositiveInt),
  mode_type: withDefault(ModeType, () => "transaction" as const),
  max_clients: optional(NonNegativeInt),
  pool_checkout_timeout: withDefault(PositiveInt, () => 60_000),
  is_manager: withDefault(Bool, () => false)
}

const UserInput = Schema.Struct({ ...userFields, db_user_alias: optional(DbName) }).annotate(
  mappingMessage("expected a user (a mapping of user fields)")
)

/** Field names a user object may have. */
export const userFieldNames: ReadonlyArray<string> = Object.keys(UserInput.fields)

const UserOutput = Schema.Struct({
  db_user: DbName,
  db_user_alias: DbName,
  db_password: Schema.Redacted(Schema.String),
  pool_size: optional(PositiveInt),
  mode_type: ModeType,
  max_clients: optional(NonNegativeInt),
  pool_checkout_timeout: PositiveInt,
  is_manager: Schema.Boolean
})

/**
 * A user of a tenant, as the HTTP API and the config file spell it.
 * `db_user_alias` (the name clients log in with) defaults to `db_user`;
 * `pool_size` and `max_clients` fall back to the tenant's defaults at use, see
 * `userPoolSize` and `userMaxClients`.
 */
export const User = UserInput.pipe(
  Schema.decodeTo(
    UserOutput,
    SchemaTransformation.transform({
      decode: (user) => ({ ...user, db_user_alias: user.db_user_alias ?? user.db_user }),
      encode: (user) => user
    })
  )
).annotate({ identifier: "User" })
export type User = typeof User.Type

const isRecord = (u: unknown): u is Readonly<Record<string, unknown>> =>
  typeof u === "object" && u !== null && !Array.isArray(u)

export interface TenantIssue {
  readonly path: ReadonlyArray<string | number>
  readonly message: string
}

/**
 * Rules that span fields. Written against unvalidated input as well as decoded
 * tenants so the config loader can report them even when some other field of
 * the same tenant is invalid (a schema filter only runs once every field decodes).
 */
const crossFieldIssues = (tenant: unknown): Array<TenantIssue> => {
  if (!isRecord(tenant)) return []
  const issues: Array<TenantIssue> = []
  const users = Array.isArray(tenant.users) ? (tenant.users as ReadonlyArray<unknown>) : undefined
  const hasText = (value: unknown) => typeof value === "string" && value.trim() !== ""

  if (tenant.require_user === false) {
    if (!hasText(tenant.auth_query)) {
      issues.push({ path: ["auth_query"], message: "is required when require_user is false" })
    }
    if (users !== undefined && users.length !== 1) {
      issues.push({
        path: ["users"],
        message: `must hold exactly one user (the manager that runs auth_query) when require_user is false, got ${users.length}`
      })
    } else if (users !== undefined && isRecord(users[0]) && users[0].is_manager !== true) {
      issues.push({ path: ["users", 0, "is_manager"], message: "must be true when require_user is false" })
    }
  }

  // `upstream_verify: peer` without `upstream_tls_ca` is valid: GLOBAL_UPSTREAM_CA_PATH may supply
  // the CA, which a tenant document cannot know. Without either, connecting fails (ECHECKOUTFAILED).

  if (tenant.use_jit === true && !hasText(tenant.jit_api_url)) {
    issues.push({ path: ["jit_api_url"], message: "is required when use_jit is true" })
  }

  if (users !== undefined) {
    // Clients log in with the alias, so that is what must be unambiguous
    // (Supavisor answers duplicates at login time with EMULTIPLEUSERS).
    const firstIndex = new Map<string, number>()
    users.forEach((user, i) => {
      if (!isRecord(user)) return
      const alias = typeof user.db_user_alias === "string" ? user.db_user_alias : user.db_user
      if (typeof alias !== "string") return
      const first = firstIndex.get(alias)
      if (first === undefined) firstIndex.set(alias, i)
      else {
        issues.push({
          path: ["users", i],
          message: `username ${JSON.stringify(alias)} is already used by users[${first}]; usernames (db_user_alias, else db_user) must be unique within a tenant`
        })
      }
    })
  }
  return issues
}

/**
 * What is wrong with a tenant about to be created (config file, API): the rules across fields, and
 * the rule for new ids, which tenants already stored are not held to (see `ExternalId`).
 */
export const tenantIssues = (tenant: unknown): Array<TenantIssue> => {
  if (!isRecord(tenant)) return []
  const idProblem = externalIdProblem(tenant.external_id)
  return [
    ...(idProblem === undefined ? [] : [{ path: ["external_id"], message: idProblem }]),
    ...crossFieldIssues(tenant)
  ]
}

const Users = Schema.Array(User)
  .annotate(says("expected a list of users"))
  .check(Schema.isMinLength(1, says("must list at least one user")))

const TenantFields = Schema.Struct({
  external_id: ExternalId,
  db_host: Host,
  db_port: Port,
  db_database: DbName,
  require_user: withDefault(Bool, () => true),
  auth_query: optional(NonEmpty),
  default_pool_size: withDefault(PositiveInt, () => 15),
  default_max_clients: withDefault(NonNegativeInt, () => 1000),
  /** Milliseconds; 0 = never. */
  client_idle_timeout: withDefault(NonNegativeInt, () => 0),
  /** Seconds; 0 = never. */
  client_heartbeat_interval: withDefault(NonNegativeInt, () => 60),
  allow_list: withDefault(Schema.Array(CidrString).annotate(says("expected a list of CIDR ranges")), () => [
    "0.0.0.0/0",
    "::/0"
  ]),
  enforce_ssl: withDefault(Bool, () => false),
  sni_hostname: optional(Host),
  ip_version: withDefault(IpVersion, () => "auto" as const),
  upstream_ssl: withDefault(Bool, () => false),
  upstream_verify: optional(UpstreamVerify),
  upstream_tls_ca: optional(PemCertificates),
  default_parameter_status: optional(
    Schema.Record(Schema.String, Str).annotate(says("expected a mapping of parameter names to string values"))
  ),
  feature_flags: withDefault(
    Schema.Record(
      Schema.String,
      Schema.Union([Schema.Boolean, Schema.Number, Schema.String]).annotate(
        says("expected a boolean, number or string")
      )
    ).annotate(says("expected a mapping of flag names to values")),
    () => ({})
  ),
  use_jit: withDefault(Bool, () => false),
  jit_api_url: optional(HttpUrl),
  /** HS256/384/512 key for verifying JWT-shaped JIT tokens locally before the API call. */
  jit_jwt_secret: optional(Schema.RedactedFromValue(NonEmpty)),
  /** JWKS URL for verifying JWT-shaped JIT tokens locally before the API call. */
  jit_jwks_url: optional(HttpUrl),
  banned_at: optional(DateTime),
  ban_reason: optional(Str),
  banned_until: optional(DateTime),
  availability_zone: optional(Str),
  users: Users
}).annotate(mappingMessage("expected a tenant (a mapping of tenant fields)"))

/** Field names a tenant object may have. */
export const tenantFieldNames: ReadonlyArray<string> = Object.keys(TenantFields.fields)

/**
 * A tenant, in exactly the JSON shape of the HTTP API (Supavisor's snake_case
 * fields). Decoding applies every default; invalid combinations are rejected.
 */
export const Tenant = TenantFields.check(
  Schema.makeFilter((tenant) => crossFieldIssues(tenant).map(({ path, message }) => ({ path, issue: message })))
).annotate({ identifier: "Tenant" })
export type Tenant = typeof Tenant.Type

/** Parse options for tenants from outside: report everything, and reject unknown keys so typos surface. */
export const strictParseOptions = { errors: "all", onExcessProperty: "error" } as const

/** The pool size a user gets: its own `pool_size`, else the tenant's `default_pool_size`. */
export const userPoolSize = (tenant: Pick<Tenant, "default_pool_size">, user: Pick<User, "pool_size">): number =>
  user.pool_size ?? tenant.default_pool_size

/** The client limit a user gets: its own `max_clients`, else the tenant's `default_max_clients`. */
export const userMaxClients = (tenant: Pick<Tenant, "default_max_clients">, user: Pick<User, "max_clients">): number =>
  user.max_clients ?? tenant.default_max_clients
