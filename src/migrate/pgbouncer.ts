import { readFileSync } from "node:fs"
import { isIP } from "node:net"
import { Effect, Result, Schema } from "effect"
import { formatProblem, problemsFromParseError, strictParseOptions, Tenant, tenantIssues } from "../config/index.ts"
import { ImportError, type ImportPlan, type Unmapped } from "./ImportPlan.ts"
import {
  type AuthFileUser,
  type IniEntry,
  locateFile,
  parseConnString,
  readAuthFile,
  readIni,
  secretKind
} from "./pgbouncerIni.ts"

/**
 * Maps a PgBouncer configuration (pgbouncer.ini and its auth_file) to Tidepool tenants. What it
 * decides, and why, is in docs/migrating.md ("From PgBouncer"); in short:
 *
 * - One tenant per `[databases]` entry, named after the entry (or, `tenantPerDatabase: false`, one
 *   per upstream host and port, whose clients name the database, as with PgBouncer's `*`).
 * - Users come from the auth_file (plain passwords only: Tidepool logs in upstream with the
 *   password, and an MD5 hash or SCRAM verifier cannot be turned back into one), from a forced
 *   `user=`, or, with `auth_user`, the tenant is an auth_query tenant and every role logs in with
 *   SCRAM pass-through, which needs no password at all.
 * - PgBouncer's effective values are kept even where they are its defaults and differ from
 *   Tidepool's (pool size 20, query_wait_timeout 120 s, session mode), so pools behave as before.
 * - Everything else is in `unmapped`, with what to do instead.
 */

export interface PgbouncerOptions {
  /** Path of pgbouncer.ini. */
  readonly ini: string
  /** Path of the auth_file; default: the ini's `auth_file`. */
  readonly authFile?: string | undefined
  /** One tenant per `[databases]` entry (default), or per upstream host and port. */
  readonly tenantPerDatabase?: boolean
}

// PgBouncer's defaults where Tidepool's differ and the plan sets them explicitly.
const PGBOUNCER_DEFAULT_POOL_SIZE = 20
const PGBOUNCER_QUERY_WAIT_TIMEOUT_S = 120
const PGBOUNCER_DEFAULT_AUTH_QUERY =
  "SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END FROM pg_authid WHERE rolname=$1 AND rolcanlogin"

type Mode = "transaction" | "session"

/** Stands for the tenant's id in notes written before tenants are named. */
const TENANT = "\u0000tenant\u0000"

const seconds = (value: string): number | undefined => {
  const n = Number(value.trim())
  return value.trim() !== "" && Number.isFinite(n) ? n : undefined
}

const wholeNumber = (value: string): number | undefined => {
  const text = value.trim()
  return /^\d+$/.test(text) ? Number(text) : undefined
}

/** What to do about a `[pgbouncer]` setting Tidepool has no per-tenant place for, by name. */
const globalAdvice: Readonly<Record<string, (value: string) => string>> = {
  listen_port: (v) =>
    `Tidepool listens on PROXY_PORT_TRANSACTION (6543) and PROXY_PORT_SESSION (5432); set PROXY_PORT_TRANSACTION=${v} (or PROXY_PORT_SESSION=${v} for session-mode clients) to keep clients' port`,
  listen_addr: (v) =>
    `set TIDEPOOL_LISTEN_ADDR=${v === "*" ? ":: (all IPv4 and IPv6 addresses)" : v.split(",")[0]?.trim()}; Tidepool listens on one address`,
  unix_socket_dir: () => "Tidepool listens on TCP only; clients that used the socket connect to 127.0.0.1",
  unix_socket_mode: () => "Tidepool listens on TCP only",
  unix_socket_group: () => "Tidepool listens on TCP only",
  max_client_conn: () =>
    "Tidepool has no process-wide client limit; each user's pool admits max_clients (the tenant's default_max_clients, 1000) and the OS file limit bounds the rest",
  min_pool_size: (v) => `set TIDEPOOL_MIN_POOL_SIZE=${v} (one value for every pool)`,
  reserve_pool_size: () => "Tidepool has no reserve pool; add the reserve to pool_size instead",
  reserve_pool_timeout: () => "Tidepool has no reserve pool",
  max_db_connections: () =>
    "Tidepool has no per-database cap across pools; keep the sum of the users' pool_size under it",
  max_db_client_connections: () => "Tidepool limits clients per user pool (max_clients), not per database",
  max_user_connections: () => "Tidepool caps servers per user pool (pool_size), not per user across databases",
  server_round_robin: () => "Tidepool hands out the most recently used idle server",
  track_extra_parameters: () => "Tidepool tracks the parameters it forwards by itself",
  ignore_startup_parameters: () =>
    "not needed: Tidepool does not refuse unknown startup parameters such as extra_float_digits",
  disable_pqexec: () => "not supported: Tidepool passes multi-statement simple queries through",
  application_name_add_host: () => "not supported",
  peer_id: () => "Tidepool routes cancel requests within a node by itself; it has no peering",
  max_prepared_statements: (v) =>
    `Tidepool always supports named prepared statements in transaction mode; TIDEPOOL_PREPARED_CACHE_SIZE=${v === "0" ? "200" : v} is the per-server cache (docs/prepared-statements.md)`,
  scram_iterations: () => "Tidepool derives client verifiers with 4096 iterations",
  auth_type: (v) =>
    v === "trust" || v === "any"
      ? "not supported: every Tidepool client authenticates (SCRAM-SHA-256)"
      : `not supported (${v}): Tidepool authenticates clients with SCRAM-SHA-256 against the users' passwords or auth_query; use allow_list for address rules`,
  auth_hba_file: () => "not supported: use each tenant's allow_list (client CIDR ranges) and enforce_ssl",
  auth_ident_file: () => "not supported",
  auth_ldap_options: () => "not supported",
  auth_dbname: () => "Tidepool runs auth_query in the tenant's db_database",
  syslog: () => "Tidepool logs JSON lines to standard output (TIDEPOOL_LOG_FORMAT); ship them from there",
  syslog_ident: () => "Tidepool logs to standard output",
  syslog_facility: () => "Tidepool logs to standard output",
  logfile: () => "Tidepool logs to standard output (TIDEPOOL_LOG_FORMAT=json|pretty)",
  pidfile: () => "not needed: run Tidepool under a supervisor (systemd, Docker)",
  user: () => "not needed: run Tidepool as an unprivileged user from its supervisor",
  log_connections: () => "TIDEPOOL_LOG_LEVEL=debug logs connections; metrics count them",
  log_disconnections: () => "TIDEPOOL_LOG_LEVEL=debug logs disconnections; metrics count them",
  log_pooler_errors: () => "Tidepool's errors reach clients with a code (docs/errors.md) and are logged",
  log_stats: () => "Tidepool exports statistics as Prometheus metrics (/metrics) and SHOW STATS",
  stats_period: () => "Prometheus scrapes /metrics at its own interval",
  verbose: (v) => `set TIDEPOOL_LOG_LEVEL=${Number(v) >= 2 ? "trace" : Number(v) >= 1 ? "debug" : "info"}`,
  admin_users: (v) =>
    `set TIDEPOOL_ADMIN_USERS=${v
      .split(",")
      .map((u) => `${u.trim()}=<password or SCRAM verifier>`)
      .join(",")} for the admin console (psql … dbname=pgbouncer)`,
  stats_users: (v) =>
    `Tidepool's admin console has no read-only users; list them in TIDEPOOL_ADMIN_USERS (${v}) or give them /metrics`,
  server_reset_query: () => "Tidepool resets session-mode servers with DISCARD ALL (and ROLLBACK) itself",
  server_reset_query_always: () => "Tidepool resets only session-mode servers",
  server_check_delay: () => "Tidepool checks a server's state from its last ReadyForQuery instead of a query",
  server_check_query: () => "Tidepool checks a server's state from its last ReadyForQuery instead of a query",
  server_fast_close: () => "Tidepool drains servers on reconfiguration (PUT of a tenant) by itself",
  server_lifetime: (v) => `set TIDEPOOL_SERVER_LIFETIME=${Math.round((seconds(v) ?? 3600) * 1000)} (milliseconds)`,
  server_idle_timeout: (v) =>
    `set TIDEPOOL_SERVER_IDLE_TIMEOUT=${Math.round((seconds(v) ?? 600) * 1000)} (milliseconds)`,
  server_connect_timeout: (v) =>
    `set TIDEPOOL_UPSTREAM_CONNECT_TIMEOUT=${Math.round((seconds(v) ?? 15) * 1000)} (milliseconds)`,
  server_login_retry: () => "Tidepool retries a failed connect while clients wait (pool_checkout_timeout)",
  client_login_timeout: (v) =>
    `set TIDEPOOL_HANDSHAKE_TIMEOUT=${Math.max(1, Math.round((seconds(v) ?? 60) * 1000))} (milliseconds)`,
  autodb_idle_timeout: (v) =>
    `TIDEPOOL_POOL_SHUTDOWN_AFTER=${Math.round((seconds(v) ?? 3600) * 1000)} is the closest (how long an unused pool stays)`,
  pool_idle_timeout: (v) => `TIDEPOOL_POOL_SHUTDOWN_AFTER=${Math.round((seconds(v) ?? 0) * 1000)} is the closest`,
  dns_max_ttl: () => "Tidepool resolves host names at each connect",
  dns_nxdomain_ttl: () => "Tidepool resolves host names at each connect",
  dns_zone_check_period: () => "Tidepool resolves host names at each connect",
  resolv_conf: () => "Tidepool uses the system resolver",
  query_wait_notify: () => "not supported",
  login_notify_message: () => "not supported",
  client_tls_key_file: (v) => `set GLOBAL_DOWNSTREAM_KEY_PATH=${v}`,
  client_tls_cert_file: (v) => `set GLOBAL_DOWNSTREAM_CERT_PATH=${v}`,
  client_tls_ca_file: () => "not supported: Tidepool does not verify client certificates",
  client_tls_protocols: () => "Tidepool uses Node's TLS defaults (TLS 1.2 and 1.3)",
  client_tls_ciphers: () => "Tidepool uses Node's TLS defaults",
  client_tls13_ciphers: () => "Tidepool uses Node's TLS defaults",
  client_tls_ecdhcurve: () => "Tidepool uses Node's TLS defaults",
  client_tls_dheparams: () => "Tidepool uses Node's TLS defaults",
  server_tls_key_file: () => "not supported: Tidepool does not present client certificates to PostgreSQL",
  server_tls_cert_file: () => "not supported: Tidepool does not present client certificates to PostgreSQL",
  server_tls_protocols: () => "Tidepool uses Node's TLS defaults",
  server_tls_ciphers: () => "Tidepool uses Node's TLS defaults",
  server_tls13_ciphers: () => "Tidepool uses Node's TLS defaults",
  query_timeout: () => "not supported: set statement_timeout on the role or database (ALTER ROLE … SET)",
  cancel_wait_timeout: () => "not supported",
  idle_transaction_timeout: () =>
    "not supported: set idle_in_transaction_session_timeout on the role or database (ALTER ROLE … SET)",
  transaction_timeout: () => "not supported: set transaction_timeout on the role or database (PostgreSQL 17+)",
  suspend_timeout: () => "not needed: Tidepool has no online restart (SUSPEND); it drains on SIGTERM",
  pkt_buf: () => "not needed",
  max_packet_size: (v) => `set TIDEPOOL_MAX_MESSAGE_SIZE=${v}`,
  listen_backlog: () => "not needed",
  sbuf_loopcnt: () => "not needed",
  so_reuseport: () => "not supported: run one Tidepool per port",
  tcp_defer_accept: () => "not needed",
  tcp_socket_buffer: () => "not needed",
  tcp_keepalive: () => "Tidepool enables TCP keepalive on every socket",
  tcp_keepcnt: () => "Tidepool uses the system's keepalive settings",
  tcp_keepidle: () => "Tidepool uses the system's keepalive settings",
  tcp_keepintvl: () => "Tidepool uses the system's keepalive settings",
  tcp_user_timeout: () => "not supported",
  conffile: () => "not needed",
  service_name: () => "not needed",
  job_name: () => "not needed"
}

/** `[pgbouncer]` settings the mapping itself reads. */
const mappedGlobals = new Set([
  "pool_mode",
  "default_pool_size",
  "query_wait_timeout",
  "client_idle_timeout",
  "auth_file",
  "auth_user",
  "auth_query",
  "server_tls_sslmode",
  "server_tls_ca_file",
  "client_tls_sslmode",
  "max_user_client_connections"
])

/** `[databases]` keys the mapping reads; the rest of loader.c's are reported. */
const databaseAdvice: Readonly<Record<string, string>> = {
  min_pool_size: "Tidepool has one TIDEPOOL_MIN_POOL_SIZE for every pool",
  reserve_pool: "Tidepool has no reserve pool; add it to pool_size instead",
  reserve_pool_size: "Tidepool has no reserve pool; add it to pool_size instead",
  max_db_connections: "Tidepool has no per-database cap across pools; keep the sum of the users' pool_size under it",
  server_lifetime: "Tidepool has one TIDEPOOL_SERVER_LIFETIME for every pool",
  load_balance_hosts: "Tidepool connects to one host per tenant",
  connect_query:
    "not supported: for settings, use ALTER ROLE … SET or ALTER DATABASE … SET, which every new server picks up",
  client_encoding: "set it on the database instead: ALTER DATABASE … SET client_encoding = …",
  datestyle: "set it on the database instead: ALTER DATABASE … SET datestyle = …",
  timezone: "set it on the database instead: ALTER DATABASE … SET timezone = …",
  application_name: "clients' application_name is passed to the server; set a default with ALTER ROLE … SET",
  auth_dbname: "Tidepool runs auth_query in the tenant's db_database"
}

const userAdvice: Readonly<Record<string, string>> = {
  reserve_pool_size: "Tidepool has no reserve pool; add it to pool_size instead",
  max_user_connections: "Tidepool caps servers per user pool (pool_size), not per user across databases",
  query_timeout: "not supported: ALTER ROLE … SET statement_timeout = …",
  idle_transaction_timeout: "not supported: ALTER ROLE … SET idle_in_transaction_session_timeout = …",
  transaction_timeout: "not supported: ALTER ROLE … SET transaction_timeout = … (PostgreSQL 17+)",
  client_idle_timeout: "Tidepool's client_idle_timeout is per tenant"
}

interface UserSettings {
  readonly poolSize?: number | undefined
  readonly mode?: string | undefined
  readonly queryWaitTimeout?: number | undefined
  readonly maxClients?: number | undefined
}

interface Context {
  readonly unmapped: Array<Unmapped>
  readonly globals: ReadonlyMap<string, string>
  readonly authUsers: ReadonlyMap<string, AuthFileUser>
  readonly authFile: string | undefined
  readonly userSettings: ReadonlyMap<string, UserSettings>
  readonly iniFile: string
}

/** The tenant one `[databases]` entry becomes, before naming and grouping. */
interface Draft {
  readonly source: string
  readonly entry: string
  readonly host: string
  readonly port: number
  readonly database: string
  readonly fields: Record<string, unknown>
  readonly users: ReadonlyArray<Record<string, unknown>>
}

/** Reports once: a setting inherited by many users or tenants is one line, where it is written. */
const note = (ctx: Context, source: string, field: string, reason: string) => {
  if (!ctx.unmapped.some((u) => u.source === source && u.field === field && u.reason === reason)) {
    ctx.unmapped.push({ source, field, reason })
  }
}

/** A pool_mode as written, checked once where it is written (the users inherit it silently). */
const checkMode = (ctx: Context, source: string, mode: string | undefined) => {
  if (mode === undefined) return
  const m = mode.toLowerCase()
  if (m === "transaction" || m === "session") return
  note(
    ctx,
    source,
    "pool_mode",
    m === "statement"
      ? "statement: Tidepool has no statement mode; mapped to transaction (clients connect to PROXY_PORT_TRANSACTION)"
      : `unknown pool_mode ${JSON.stringify(mode)} (PgBouncer refuses it); mapped to session`
  )
}

/** The first pool_mode set (user, database, global), PgBouncer's default session otherwise. */
const effectiveMode = (...modes: ReadonlyArray<string | undefined>): Mode => {
  const mode = (modes.find((m) => m !== undefined) ?? "session").toLowerCase()
  return mode === "transaction" || mode === "statement" ? "transaction" : "session"
}

/** query_wait_timeout of the user, else the database, else the global one, as milliseconds. */
const checkoutTimeout = (
  ctx: Context,
  ...candidates: ReadonlyArray<readonly [source: string, seconds: number | undefined]>
): number | undefined => {
  const [source, s] = candidates.find(([, value]) => value !== undefined) ?? [
    "[pgbouncer]",
    seconds(ctx.globals.get("query_wait_timeout") ?? "") ?? PGBOUNCER_QUERY_WAIT_TIMEOUT_S
  ]
  if (s !== undefined && s > 0) return Math.max(1, Math.round(s * 1000))
  note(
    ctx,
    source,
    "query_wait_timeout",
    "0 (wait for ever) has no equivalent: Tidepool always bounds the wait; pool_checkout_timeout is left at its default (60 s)"
  )
  return undefined
}

/** A user whose password PgBouncer would send upstream, if it is one Tidepool can use. */
const plainPassword = (ctx: Context, name: string): string | undefined => {
  const entry = ctx.authUsers.get(name)
  return entry !== undefined && secretKind(entry.secret) === "plain" ? entry.secret : undefined
}

const userObject = (
  ctx: Context,
  source: string,
  name: string,
  password: string,
  dbMode: string | undefined,
  dbWait: number | undefined
): Record<string, unknown> => {
  const settings = ctx.userSettings.get(name) ?? {}
  const wait = checkoutTimeout(ctx, [`[users] ${name}`, settings.queryWaitTimeout], [source, dbWait])
  return {
    db_user: name,
    db_password: password,
    mode_type: effectiveMode(settings.mode, dbMode, ctx.globals.get("pool_mode")),
    ...(settings.poolSize !== undefined ? { pool_size: settings.poolSize } : {}),
    ...(settings.maxClients !== undefined ? { max_clients: settings.maxClients } : {}),
    ...(wait !== undefined ? { pool_checkout_timeout: wait } : {})
  }
}

const positive = (ctx: Context, source: string, field: string, value: string): number | undefined => {
  const n = wholeNumber(value)
  if (n !== undefined && n > 0) return n
  note(ctx, source, field, `${JSON.stringify(value)} is not a size Tidepool accepts (an integer >= 1); left out`)
  return undefined
}

/** Upstream TLS from server_tls_sslmode and server_tls_ca_file, the same for every tenant. */
const upstreamTls = (ctx: Context): Record<string, unknown> => {
  const mode = (ctx.globals.get("server_tls_sslmode") ?? "prefer").toLowerCase()
  const caFile = ctx.globals.get("server_tls_ca_file")
  const fields: Record<string, unknown> = {}
  switch (mode) {
    case "disable":
      break
    case "allow":
    case "prefer":
      note(
        ctx,
        "[pgbouncer]",
        "server_tls_sslmode",
        `${mode}${ctx.globals.has("server_tls_sslmode") ? "" : " (PgBouncer's default)"}: Tidepool never falls back between TLS and plain TCP, so the tenants use plain TCP (upstream_ssl: false); set upstream_ssl: true where the server has TLS`
      )
      break
    case "require":
      fields.upstream_ssl = true
      fields.upstream_verify = "none"
      break
    case "verify-ca":
    case "verify-full":
      fields.upstream_ssl = true
      fields.upstream_verify = "peer"
      if (mode === "verify-ca") {
        note(
          ctx,
          "[pgbouncer]",
          "server_tls_sslmode",
          "verify-ca: mapped to upstream_verify: peer, which also checks the host name (as verify-full)"
        )
      }
      break
    default:
      note(ctx, "[pgbouncer]", "server_tls_sslmode", `unknown mode ${JSON.stringify(mode)}; tenants use plain TCP`)
  }
  if (caFile !== undefined) {
    const path = locateFile(caFile, ctx.iniFile)
    try {
      const pem = readFileSync(path, "utf8")
      if (fields.upstream_ssl === true) fields.upstream_tls_ca = pem
    } catch {
      note(
        ctx,
        "[pgbouncer]",
        "server_tls_ca_file",
        `cannot read ${path}; set GLOBAL_UPSTREAM_CA_PATH to the CA file on the Tidepool host`
      )
    }
  }
  return fields
}

const clientTls = (ctx: Context): Record<string, unknown> => {
  const mode = (ctx.globals.get("client_tls_sslmode") ?? "disable").toLowerCase()
  if (mode === "disable") return {}
  const certs =
    "Tidepool's client TLS is process-wide: set GLOBAL_DOWNSTREAM_CERT_PATH and GLOBAL_DOWNSTREAM_KEY_PATH (client_tls_cert_file, client_tls_key_file)"
  if (mode === "allow" || mode === "prefer") {
    note(ctx, "[pgbouncer]", "client_tls_sslmode", certs)
    return {}
  }
  note(
    ctx,
    "[pgbouncer]",
    "client_tls_sslmode",
    mode === "require"
      ? `mapped to enforce_ssl: true; ${certs}`
      : `mapped to enforce_ssl: true, but Tidepool does not verify client certificates (${mode}); ${certs}`
  )
  return { enforce_ssl: true }
}

/** One `[databases]` entry as a tenant draft, or undefined (reported) when it cannot be one. */
const draftOf = (ctx: Context, entry: IniEntry, tls: Record<string, unknown>): Draft | undefined => {
  const source = `[databases] ${entry.key}`
  const parsed = parseConnString(entry.value)
  if (Result.isFailure(parsed)) {
    note(ctx, source, "(entry)", `${parsed.failure} (${entry.file}:${entry.line}); PgBouncer refuses it too`)
    return undefined
  }
  if (entry.key === "pgbouncer") {
    note(ctx, source, "(entry)", "the name pgbouncer is reserved for the admin console (PgBouncer refuses it too)")
    return undefined
  }
  const params = new Map(parsed.success)
  const fallback = entry.key === "*"
  for (const [key, value] of params) {
    const advice = databaseAdvice[key]
    if (advice !== undefined) note(ctx, source, key, `${value}: ${advice}`)
    else if (
      ![
        "dbname",
        "host",
        "port",
        "user",
        "password",
        "auth_user",
        "auth_query",
        "pool_size",
        "pool_mode",
        "query_wait_timeout",
        "max_db_client_connections"
      ].includes(key)
    ) {
      note(ctx, source, key, "not a [databases] parameter PgBouncer knows (it refuses the entry)")
    }
  }

  let host = params.get("host")
  const hosts = host?.split(",").map((h) => h.trim()) ?? []
  if (hosts.length > 1) {
    note(
      ctx,
      source,
      "host",
      `Tidepool connects to one host per tenant; using ${hosts[0]}, not ${hosts.slice(1).join(", ")}`
    )
  }
  host = hosts[0]
  if (host === undefined || host === "" || host.startsWith("/") || host.startsWith("@")) {
    note(
      ctx,
      source,
      "host",
      `${host === undefined ? "not set (a Unix socket)" : host}: Tidepool connects over TCP; using 127.0.0.1 (pg_hba.conf must allow host connections from it)`
    )
    host = "127.0.0.1"
  } else if (isIP(host) === 0 && !/^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$/.test(host)) {
    note(ctx, source, "host", `${JSON.stringify(host)} is not a host name Tidepool accepts`)
    return undefined
  }
  const portText = params.get("port") ?? "5432"
  const port = wholeNumber(portText)
  if (port === undefined || port < 1 || port > 65535) {
    note(ctx, source, "port", `${JSON.stringify(portText)} is not a port`)
    return undefined
  }
  const database = params.get("dbname") ?? (fallback ? "postgres" : entry.key)
  if (fallback && !params.has("dbname")) {
    note(
      ctx,
      source,
      "(entry)",
      "the fallback database: Tidepool passes the database a client names to the server, so every database on this host works; db_database (used when a client names none) is postgres"
    )
  } else if (database !== entry.key && !fallback) {
    note(
      ctx,
      source,
      "dbname",
      `Tidepool passes the database a client names to the server: clients must name ${JSON.stringify(database)} instead of ${JSON.stringify(entry.key)}`
    )
  }

  const dbMode = params.get("pool_mode")
  checkMode(ctx, source, dbMode)
  const dbWaitText = params.get("query_wait_timeout")
  const dbWait = dbWaitText === undefined ? undefined : seconds(dbWaitText)
  const poolSizeText = params.get("pool_size") ?? ctx.globals.get("default_pool_size")
  const poolSize =
    poolSizeText === undefined ? PGBOUNCER_DEFAULT_POOL_SIZE : positive(ctx, source, "pool_size", poolSizeText)
  const clientIdle = seconds(ctx.globals.get("client_idle_timeout") ?? "0") ?? 0
  // PgBouncer's 0 is "no limit"; Tidepool's max_clients 0 refuses everyone, so 0 keeps the default.
  const maxUserClients = wholeNumber(ctx.globals.get("max_user_client_connections") ?? "")
  const fields: Record<string, unknown> = {
    db_host: host,
    db_port: port,
    db_database: database,
    ...(poolSize !== undefined ? { default_pool_size: poolSize } : {}),
    ...(clientIdle > 0 ? { client_idle_timeout: Math.round(clientIdle * 1000) } : {}),
    ...(maxUserClients !== undefined && maxUserClients > 0 ? { default_max_clients: maxUserClients } : {}),
    ...tls
  }
  const maxDbClients = params.get("max_db_client_connections")

  const forced = params.get("user")
  const authUser = params.get("auth_user") ?? ctx.globals.get("auth_user")
  let users: Array<Record<string, unknown>>
  if (forced !== undefined) {
    const password = params.get("password") ?? plainPassword(ctx, forced)
    if (password === undefined) {
      note(
        ctx,
        source,
        "user",
        `the forced user ${forced} has no plain password (neither password= nor a plain auth_file entry); Tidepool needs one to log in upstream: add password= and import again`
      )
      return undefined
    }
    note(
      ctx,
      source,
      "user",
      `every PgBouncer client of this database logged in upstream as ${forced}; in Tidepool clients log in as ${forced}.${TENANT} with ${forced}'s password`
    )
    const user = userObject(ctx, source, forced, password, dbMode, dbWait)
    if (maxDbClients !== undefined) {
      const n = wholeNumber(maxDbClients)
      if (n !== undefined && n > 0) user.max_clients = n
    }
    users = [user]
  } else if (authUser !== undefined) {
    const password = plainPassword(ctx, authUser)
    if (password === undefined) {
      note(
        ctx,
        source,
        "auth_user",
        `${authUser} has no plain password in the auth_file; Tidepool needs it to run auth_query: add "${authUser}" "<password>" to the auth_file and import again`
      )
      return undefined
    }
    const query = params.get("auth_query") ?? ctx.globals.get("auth_query") ?? PGBOUNCER_DEFAULT_AUTH_QUERY
    fields.require_user = false
    fields.auth_query = query
    const manager = userObject(ctx, source, authUser, password, dbMode, dbWait)
    delete manager.pool_size
    users = [{ ...manager, is_manager: true }]
    if (maxDbClients !== undefined) note(ctx, source, "max_db_client_connections", databaseAdvice.max_db_connections!)
  } else {
    users = []
    for (const user of ctx.authUsers.values()) {
      if (secretKind(user.secret) === "plain")
        users.push(userObject(ctx, source, user.name, user.secret, dbMode, dbWait))
    }
    if (maxDbClients !== undefined) {
      note(
        ctx,
        source,
        "max_db_client_connections",
        "Tidepool limits clients per user pool (max_clients), not per database"
      )
    }
    if (users.length === 0) {
      note(
        ctx,
        source,
        "(entry)",
        ctx.authFile === undefined
          ? "no auth_file and no auth_user: no user to create; pass --auth-file, or set auth_user"
          : "no user with a plain password in the auth_file and no auth_user: set auth_user (the tenant then logs every role in with auth_query and SCRAM pass-through)"
      )
      return undefined
    }
  }
  if (params.has("password") && forced === undefined) {
    note(ctx, source, "password", "ignored without user= (as PgBouncer ignores it)")
  }
  return { source, entry: entry.key, host, port, database, fields, users }
}

/** Tidepool's id rule for new tenants (Tenant.ts externalIdProblem): letters, digits, `_`, `-`. */
const sanitiseId = (name: string): string => {
  const cleaned = name
    .replace(/[^A-Za-z0-9_-]+/g, "-")
    .replace(/^[-_]+/, "")
    .slice(0, 63)
  return cleaned === "" ? "db" : cleaned
}

const uniqueId = (wanted: string, taken: Set<string>): string => {
  let id = wanted
  for (let n = 2; taken.has(id); n++) id = `${wanted.slice(0, 63 - String(n).length - 1)}-${n}`
  taken.add(id)
  return id
}

// Map.groupBy is Node 21+.
const groupBy = <A>(items: ReadonlyArray<A>, key: (a: A) => string): Map<string, Array<A>> => {
  const groups = new Map<string, Array<A>>()
  for (const item of items) {
    const k = key(item)
    const group = groups.get(k)
    if (group === undefined) groups.set(k, [item])
    else group.push(item)
  }
  return groups
}

const sameValue = (a: unknown, b: unknown) => JSON.stringify(a) === JSON.stringify(b)

/** Several drafts (one host:port) as one tenant: the first entry's settings, every entry's users. */
const merge = (ctx: Context, drafts: ReadonlyArray<Draft>): Draft => {
  const [first, ...rest] = drafts as [Draft, ...Array<Draft>]
  const users = [...first.users]
  for (const draft of rest) {
    for (const [field, value] of Object.entries(draft.fields)) {
      if (field !== "db_database" && !sameValue(first.fields[field], value)) {
        note(
          ctx,
          draft.source,
          field,
          `${JSON.stringify(value)} differs from ${first.source} (${JSON.stringify(first.fields[field])}), whose tenant this database joins; the tenant keeps ${first.source}'s`
        )
      }
    }
    for (const user of draft.users) {
      const same = users.find((u) => u.db_user === user.db_user)
      if (same === undefined) users.push(user)
      else if (!sameValue(same, user)) {
        note(
          ctx,
          draft.source,
          `user ${String(user.db_user)}`,
          `its settings differ from ${first.source}'s in the same tenant; the first is kept`
        )
      }
    }
  }
  return { ...first, users }
}

const describeParseError = (error: Schema.SchemaError, input: unknown) =>
  problemsFromParseError(error, input).map(formatProblem).join("; ")

/**
 * Reads pgbouncer.ini (and its auth_file) and maps it to Tidepool tenants. Fails only when the files
 * cannot be read or PgBouncer itself would refuse them; everything Tidepool cannot take is in
 * `unmapped`, with what to do instead.
 */
export const pgbouncerPlan = Effect.fn("migrate.pgbouncerPlan")(function* (options: PgbouncerOptions) {
  const entries = yield* Result.match(readIni(options.ini), {
    onFailure: (message) => Effect.fail(new ImportError({ message })),
    onSuccess: Effect.succeed
  })
  const unmapped: Array<Unmapped> = []
  const globals = new Map<string, string>()
  for (const e of entries) if (e.section === "pgbouncer") globals.set(e.key, e.value)

  const authFile =
    options.authFile ??
    (globals.get("auth_file") === undefined ? undefined : locateFile(globals.get("auth_file")!, options.ini))
  const authList =
    authFile === undefined
      ? []
      : yield* Result.match(readAuthFile(authFile), {
          onFailure: (message) => Effect.fail(new ImportError({ message })),
          onSuccess: Effect.succeed
        })
  const authUsers = new Map(authList.map((u) => [u.name, u]))

  const ctx: Context = {
    unmapped,
    globals,
    authUsers,
    authFile,
    userSettings: new Map(),
    iniFile: options.ini
  }

  for (const [key, value] of globals) {
    if (mappedGlobals.has(key)) continue
    // Every client that could log in to PgBouncer with a password can log in to Tidepool with it
    // (SCRAM-SHA-256, which every current driver speaks): no line for these.
    if (key === "auth_type" && ["md5", "scram-sha-256", "plain"].includes(value.toLowerCase())) continue
    const advice = globalAdvice[key]
    note(
      ctx,
      "[pgbouncer]",
      key,
      advice === undefined ? `${value}: not a setting Tidepool knows` : `${value}: ${advice(value)}`
    )
  }

  const userSettings = ctx.userSettings as Map<string, UserSettings>
  for (const e of entries) {
    if (e.section === "peers") {
      note(ctx, "[peers]", e.key, globalAdvice.peer_id!(e.value))
      continue
    }
    if (e.section !== "users") continue
    const source = `[users] ${e.key}`
    const parsed = parseConnString(e.value)
    if (Result.isFailure(parsed)) {
      note(ctx, source, "(entry)", `${parsed.failure} (${e.file}:${e.line}); PgBouncer refuses it too`)
      continue
    }
    const settings: { -readonly [K in keyof UserSettings]: UserSettings[K] } = {}
    for (const [key, value] of parsed.success) {
      if (key === "pool_size") settings.poolSize = positive(ctx, source, key, value)
      else if (key === "pool_mode") {
        settings.mode = value
        checkMode(ctx, source, value)
      } else if (key === "query_wait_timeout") settings.queryWaitTimeout = seconds(value)
      // PgBouncer's 0 is "no limit"; Tidepool's max_clients 0 refuses everyone.
      else if (key === "max_user_client_connections") settings.maxClients = wholeNumber(value) || undefined
      else note(ctx, source, key, `${value}: ${userAdvice[key] ?? "not a [users] setting PgBouncer knows"}`)
    }
    userSettings.set(e.key, settings)
    if (!authUsers.has(e.key)) {
      note(
        ctx,
        source,
        "(entry)",
        "not in the auth_file: its settings apply only where it logs in through auth_query, where Tidepool sizes every role's pool from the manager"
      )
    }
  }

  for (const user of authList) {
    const kind = secretKind(user.secret)
    if (kind === "plain") continue
    note(
      ctx,
      `auth_file ${user.name}`,
      "password",
      `${kind === "md5" ? "an MD5 hash" : "a SCRAM verifier"}, which Tidepool cannot log in upstream with: set auth_user (its tenants then log ${user.name} in with auth_query and SCRAM pass-through, which needs the role's password stored as SCRAM-SHA-256 in PostgreSQL), or put the plain password in the tenant (PUT /api/tenants/:id)`
    )
  }

  checkMode(ctx, "[pgbouncer]", globals.get("pool_mode"))
  const tls = { ...upstreamTls(ctx), ...clientTls(ctx) }
  const drafts: Array<Draft> = []
  for (const e of entries) {
    if (e.section !== "databases") continue
    const draft = draftOf(ctx, e, tls)
    if (draft !== undefined) drafts.push(draft)
  }

  const byHost = options.tenantPerDatabase === false
  const grouped = byHost
    ? [...groupBy(drafts, (d) => `${d.host}:${d.port}`).values()].map((group) => ({
        draft: merge(ctx, group),
        name: `${group[0]!.host}${group[0]!.port === 5432 ? "" : `-${group[0]!.port}`}`,
        entries: group.map((d) => d.entry)
      }))
    : drafts.map((draft) => ({ draft, name: draft.entry === "*" ? "default" : draft.entry, entries: [draft.entry] }))

  const taken = new Set<string>()
  const tenants: Array<Tenant> = []
  const tenantOf = new Map<string, string>()
  for (const { draft, name, entries: names } of grouped) {
    const id = uniqueId(sanitiseId(name), taken)
    for (const entry of names) tenantOf.set(`[databases] ${entry}`, id)
    if (byHost) {
      note(
        ctx,
        `${draft.fields.db_host}:${draft.fields.db_port}`,
        "(tenant id)",
        `the tenant is ${id}, for the databases ${names.join(", ")}: clients name the database, as with PgBouncer`
      )
    } else if (id !== name) {
      note(
        ctx,
        draft.source,
        "(tenant id)",
        `the tenant is ${id} (Tidepool's ids are ASCII letters, digits, _ and -, starting with a letter or digit, unique)`
      )
    }
    const candidate = { external_id: id, ...draft.fields, users: draft.users }
    const issues = tenantIssues(candidate)
    const decoded = Schema.decodeUnknownResult(Tenant, strictParseOptions)(candidate)
    if (issues.length > 0 || Result.isFailure(decoded)) {
      const reasons = [
        ...issues.map((i) => `${i.path.join(".")}: ${i.message}`),
        ...(Result.isFailure(decoded) ? [describeParseError(decoded.failure, candidate)] : [])
      ]
      note(ctx, draft.source, "(entry)", `not a valid Tidepool tenant, left out: ${reasons.join("; ")}`)
      continue
    }
    tenants.push(decoded.success)
  }
  // Notes written before the tenants had ids name them now, so each line says what clients type.
  const named = unmapped.map((u) => {
    const id = tenantOf.get(u.source)
    return id === undefined ? u : { ...u, reason: u.reason.replaceAll(TENANT, id) }
  })
  // In the order of the file an operator will fix: settings, databases, users, then the auth_file.
  const rank = (source: string) =>
    ["[pgbouncer]", "[databases]", "[users]", "[peers]", "auth_file"].findIndex((prefix) => source.startsWith(prefix))
  const ordered = named
    .map((u, i) => ({ u, i, r: rank(u.source) === -1 ? 1 : rank(u.source) }))
    .sort((a, b) => a.r - b.r || a.i - b.i)
    .map(({ u }) => u)
  return { source: "pgbouncer", tenants, unmapped: ordered } satisfies ImportPlan
})
