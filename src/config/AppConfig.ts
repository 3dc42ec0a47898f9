import { readFileSync } from "node:fs"
import { isIP } from "node:net"
import { availableParallelism } from "node:os"
import { getHeapStatistics } from "node:v8"
import { Config, ConfigProvider, Context, Effect, Layer, Option, Redacted, Result } from "effect"
import { ConfigError, type ConfigProblem } from "./ConfigError.ts"

export type LogLevel = "trace" | "debug" | "info" | "warning" | "error" | "none"
export type LogFormat = "json" | "pretty"

/** An admin console login: a SCRAM-SHA-256 verifier (as in pg_authid) or a plaintext password. */
export interface AdminUser {
  readonly name: string
  readonly secret: string
}

export interface AppConfigShape {
  readonly listenAddr: string
  readonly transactionPort: number
  readonly sessionPort: number
  readonly apiPort: number
  readonly dataDir: string
  readonly logLevel: LogLevel
  readonly logFormat: LogFormat
  /** The whole startup + authentication exchange; exceeding it is EAUTHTIMEOUT. */
  readonly handshakeTimeoutMs: number
  readonly authFailureDelayMs: number
  readonly upstreamConnectTimeoutMs: number
  /** How long SIGTERM waits for clients to drain before closing them. */
  readonly shutdownTimeoutMs: number
  /** Largest client message accepted, in bytes. */
  readonly maxMessageSize: number
  /** How long a JIT token check (the tenant's API, or its JWKS) may take (EJITREQUESTFAILED beyond). */
  readonly jitTimeoutMs: number
  /** Named statements the pooler keeps prepared on each server (transaction mode), LRU-evicted beyond. */
  readonly preparedCacheSize: number
  /** Named prepared statements one transaction-mode client may hold (EMAXPREPARED beyond). */
  readonly maxPreparedStatements: number
  /** Bytes of statement text one transaction-mode client may hold prepared (EMAXPREPAREDMEM beyond). */
  readonly maxPreparedMemory: number
  /** 0 disables the idle reap. */
  readonly serverIdleTimeoutMs: number
  /** 0 disables the lifetime limit. */
  readonly serverLifetimeMs: number
  /** Grace period an empty pool keeps its servers before shutting down. */
  readonly poolShutdownAfterMs: number
  /** Servers each pool keeps open even when idle (never more than its pool size). */
  readonly minPoolSize: number
  /** Pools one tenant may have on this node (EMAXPOOLSREACHED beyond). */
  readonly maxPoolsPerTenant: number
  /** Client connections open at once on this node, both ports, every tenant (EMAXCLIENTCONNS beyond). */
  readonly maxClientConnections: number
  /** Client connections accepted and not yet authenticated (EMAXHANDSHAKES beyond). */
  readonly maxHandshakes: number
  /** auth_query secrets unused by any login this long are dropped from the cache. */
  readonly authQueryCacheTtlMs: number
  /** How often cached auth_query secrets are re-checked (with jitter); 0 disables the re-check. */
  readonly authQueryRecheckIntervalMs: number
  /** Client TLS certificate chain(s), comma-separated and paired with the keys; "" = no client TLS. */
  readonly downstreamCertPath: string
  readonly downstreamKeyPath: string
  /** CA bundle for `upstream_verify: peer` tenants without their own `upstream_tls_ca`; "" = none. */
  readonly upstreamCaPath: string
  /** postgres:// URL of a shared tenant store; unset = SQLite under dataDir. */
  readonly databaseUrl: Redacted.Redacted<string> | undefined
  /** 32-byte AES-256-GCM key for passwords at rest (validated by the vault when used). */
  readonly vaultEncKey: Redacted.Redacted<string> | undefined
  readonly apiJwtSecret: Redacted.Redacted<string> | undefined
  readonly metricsJwtSecret: Redacted.Redacted<string> | undefined
  /** Claims every API/metrics token must carry with exactly these values. */
  readonly jwtClaimValidators: Readonly<Record<string, unknown>>
  /** How far ahead an API/metrics token's `exp` may be, in seconds; 0: no bound. */
  readonly jwtMaxLifetimeSeconds: number
  /** Refused tokens: the token itself or its SHA-256 (hex). */
  readonly apiTokenBlocklist: ReadonlyArray<string>
  readonly metricsTokenBlocklist: ReadonlyArray<string>
  /** Full reload of a shared (PostgreSQL) tenant store, behind LISTEN/NOTIFY; 0 = never. */
  readonly tenantRefreshMs: number
  /** Also trace every Nth checkout that did not wait (0: only waited checkouts are traced). */
  readonly traceCheckoutEvery: number
  /** Who may log in to the admin console (database `pgbouncer` or `tidepool`); empty disables it. */
  readonly adminUsers: ReadonlyArray<AdminUser>
  /** Worker processes on this host (docs/scale-out.md); 1 = one process, no supervisor. */
  readonly workers: number
  /** Several hosts share each pool_size through the PostgreSQL store (docs/scale-out.md#several-hosts). */
  readonly cluster: boolean
  /** Cluster mode: a runner whose lease is not renewed this long (store up) may have its permits reclaimed. */
  readonly leaseMs: number
  /** Cluster mode: the host other runners forward CancelRequests to; "" = listenAddr, or the host name if that is a wildcard. */
  readonly advertiseHost: string
  readonly workerHangTimeoutMs: number
  /** Committed V8 heap growth after which a quiet process gives memory back (src/telemetry/MemoryReclaim.ts); 0 = never. */
  readonly memoryReclaimBytes: number
  readonly configFile: Option.Option<string>
}

/** The settings that come from the environment or the config file's `server:` section. */
export type SettingField = Exclude<keyof AppConfigShape, "configFile">

export interface SettingSpec<A> {
  readonly env: string
  /** Key in the config file's `server:` section. */
  readonly fileKey: string
  readonly type: string
  readonly description: string
  readonly default: () => A
  readonly parse: (raw: string) => Result.Result<A, string>
}

// Node's timers overflow above 2^31-1 ms and then fire at once, so a large
// timeout would silently become no timeout at all.
export const maxTimerMs = 2_147_483_647

const integer =
  (min: number, max: number, what: string) =>
  (raw: string): Result.Result<number, string> => {
    const text = raw.trim()
    const n = /^-?\d+$/.test(text) ? Number(text) : Number.NaN
    return Number.isSafeInteger(n) && n >= min && n <= max
      ? Result.succeed(n)
      : Result.fail(`expected ${what} between ${min} and ${max}, got ${JSON.stringify(raw)}`)
  }

/**
 * A number with an optional unit, as operators write it (`30s`, `5min`, `64MB`): a bare number is in
 * `base` (what the setting has always taken, so existing values keep their meaning); a unit scales it,
 * and the result must be a whole number of `base` units within range.
 */
const withUnits =
  (units: Readonly<Record<string, number>>, base: number, min: number, max: number, what: string, examples: string) =>
  (raw: string): Result.Result<number, string> => {
    const match = /^(\d+(?:\.\d+)?)\s*([A-Za-z]*)$/.exec(raw.trim())
    const factor = match === null ? undefined : match[2] === "" ? base : units[match[2]!.toLowerCase()]
    const exact = match === null || factor === undefined ? Number.NaN : (Number(match[1]) * factor) / base
    // 1.005s is 1004.9999999999999 ms in binary floating point; a whole number is what was meant.
    const value = Math.abs(exact - Math.round(exact)) < 1e-6 ? Math.round(exact) : exact
    return Number.isSafeInteger(value) && value >= min && value <= max
      ? Result.succeed(value)
      : Result.fail(
          `expected ${what} between ${min} and ${max} (or with a unit: ${examples}), got ${JSON.stringify(raw)}`
        )
  }

const timeUnits: Readonly<Record<string, number>> = {
  ms: 1,
  s: 1000,
  sec: 1000,
  secs: 1000,
  second: 1000,
  seconds: 1000,
  m: 60_000,
  min: 60_000,
  mins: 60_000,
  minute: 60_000,
  minutes: 60_000,
  h: 3_600_000,
  hour: 3_600_000,
  hours: 3_600_000,
  d: 86_400_000,
  day: 86_400_000,
  days: 86_400_000
}

// PostgreSQL's convention: kB, MB and GB are powers of 1024; the IEC spellings mean the same.
const sizeUnits: Readonly<Record<string, number>> = {
  b: 1,
  k: 1024,
  kb: 1024,
  kib: 1024,
  m: 1024 ** 2,
  mb: 1024 ** 2,
  mib: 1024 ** 2,
  g: 1024 ** 3,
  gb: 1024 ** 3,
  gib: 1024 ** 3
}

const port = integer(0, 65535, "a port number")
const onOff = (raw: string): Result.Result<boolean, string> => {
  const text = raw.trim().toLowerCase()
  if (["on", "true", "1", "yes"].includes(text)) return Result.succeed(true)
  if (["off", "false", "0", "no"].includes(text)) return Result.succeed(false)
  return Result.fail(`expected on or off, got ${JSON.stringify(raw)}`)
}
const millis = (min: number) =>
  withUnits(timeUnits, 1, min, maxTimerMs, "a duration in milliseconds", "500ms, 30s, 5min, 1h, 1d")
const bytes = (min: number, max: number) => withUnits(sizeUnits, 1, min, max, "a size in bytes", "64kB, 16MB, 1GB")

/**
 * Log level names as people write them, from other loggers (Elixir, syslog, PostgreSQL, PgBouncer's
 * docs): each means "this and more severe", so a name between two of Tidepool's levels picks the more
 * severe one (`notice`: warning), and the names above error pick error, Tidepool's most severe.
 */
const logLevelAliases: Readonly<Record<string, LogLevel>> = {
  trace: "trace",
  debug: "debug",
  info: "info",
  notice: "warning",
  warn: "warning",
  warning: "warning",
  err: "error",
  error: "error",
  crit: "error",
  critical: "error",
  alert: "error",
  emerg: "error",
  emergency: "error",
  fatal: "error",
  panic: "error",
  off: "none",
  none: "none",
  silent: "none"
}

export const parseLogLevel = (raw: string): Result.Result<LogLevel, string> => {
  const level = logLevelAliases[raw.trim().toLowerCase()]
  return level === undefined
    ? Result.fail(
        `expected one of trace, debug, info, warning, error, none (also warn, err, notice, fatal, off), got ${JSON.stringify(raw)}`
      )
    : Result.succeed(level)
}

const oneOf =
  <A extends string>(values: ReadonlyArray<A>) =>
  (raw: string): Result.Result<A, string> => {
    const text = raw.trim().toLowerCase()
    const found = values.find((v) => v === text)
    return found === undefined
      ? Result.fail(`expected one of ${values.join(", ")}, got ${JSON.stringify(raw)}`)
      : Result.succeed(found)
  }

/** Comma-separated file paths; empty means unset. */
const paths = (raw: string): Result.Result<string, string> => {
  const list = raw.split(",").map((p) => p.trim())
  if (raw.trim() === "") return Result.succeed("")
  return list.some((p) => p === "")
    ? Result.fail("expected file paths separated by commas")
    : Result.succeed(list.join(","))
}

const nonEmpty = (raw: string): Result.Result<string, string> =>
  raw.trim() === "" ? Result.fail("must not be empty") : Result.succeed(raw.trim())

const secret = (raw: string): Result.Result<Redacted.Redacted<string> | undefined, string> =>
  raw.trim() === "" ? Result.succeed(undefined) : Result.succeed(Redacted.make(raw.trim()))

const postgresUrl = (raw: string): Result.Result<Redacted.Redacted<string> | undefined, string> => {
  const text = raw.trim()
  if (text === "") return Result.succeed(undefined)
  // Supavisor's DATABASE_URL is written `ecto://…`: the same URL under Elixir's scheme name.
  if (/^ecto:\/\//i.test(text)) return Result.succeed(Redacted.make(`postgresql://${text.slice("ecto://".length)}`))
  // The value is a credential: the message never echoes it.
  return /^postgres(ql)?:\/\//.test(text)
    ? Result.succeed(Redacted.make(text))
    : Result.fail("expected a postgres://, postgresql:// or ecto:// URL")
}

const vaultKey = (raw: string): Result.Result<Redacted.Redacted<string> | undefined, string> => {
  const text = raw.trim()
  if (text === "") return Result.succeed(undefined)
  if (/^[0-9a-fA-F]{64}$/.test(text)) return Result.succeed(Redacted.make(text))
  // Supavisor's form: 32 bytes of text used as the key itself (the vault reads it the same way).
  if (Buffer.byteLength(text, "utf8") === 32) return Result.succeed(Redacted.make(text))
  const decoded = /^[A-Za-z0-9+/_-]+={0,2}$/.test(text) ? Buffer.from(text, "base64").length : -1
  return decoded === 32
    ? Result.succeed(Redacted.make(text))
    : Result.fail(
        "expected 32 bytes as 64 hex characters, base64, or 32 characters used as they are (generate one with `openssl rand -base64 32`)"
      )
}

const claimValidators = (raw: string): Result.Result<Readonly<Record<string, unknown>>, string> => {
  if (raw.trim() === "") return Result.succeed({})
  try {
    const value: unknown = JSON.parse(raw)
    if (typeof value === "object" && value !== null && !Array.isArray(value)) {
      return Result.succeed(value as Record<string, unknown>)
    }
  } catch {}
  return Result.fail('expected a JSON object of claim names to values, e.g. {"role":"service_role"}')
}

const tokenList = (raw: string): Result.Result<ReadonlyArray<string>, string> =>
  Result.succeed(
    raw
      .split(",")
      .map((t) => t.trim())
      .filter((t) => t !== "")
  )
// `name=secret,name=secret`: names have no `=` or `,`, secrets no `,` (verifiers are base64, which has none).
// Errors never echo the value: it holds secrets.
const adminUsers = (raw: string): Result.Result<ReadonlyArray<AdminUser>, string> => {
  const users: Array<AdminUser> = []
  for (const item of raw.split(",")) {
    const text = item.trim()
    if (text === "") continue
    const eq = text.indexOf("=")
    const name = eq < 0 ? "" : text.slice(0, eq).trim()
    const secret = eq < 0 ? "" : text.slice(eq + 1)
    if (name === "" || secret === "") return Result.fail(`expected name=secret entries separated by commas`)
    if (users.some((u) => u.name === name)) return Result.fail(`admin user ${JSON.stringify(name)} is listed twice`)
    users.push({ name, secret })
  }
  return Result.succeed(users)
}

const hostname = /^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$/

const listenAddress = (raw: string): Result.Result<string, string> => {
  const text = raw.trim()
  return isIP(text) !== 0 || (text.length <= 253 && hostname.test(text))
    ? Result.succeed(text)
    : Result.fail(`expected an IP address or host name, got ${JSON.stringify(raw)}`)
}

export const logLevels: ReadonlyArray<LogLevel> = ["trace", "debug", "info", "warning", "error", "none"]

/** Descriptors kept back from clients: upstream servers, the tenant store, the HTTP API, logs. */
const RESERVED_FDS = 1024

/**
 * Heap a client may cost in the default cap's sum: a client in its handshake (fiber, buffers, SCRAM
 * state) costs several times an idle one, and a storm is exactly when many are in their handshake.
 */
const HEAP_PER_CLIENT = 64 * 1024

/** The open-files limit the process runs with (Node raises the soft limit to the hard one at start). */
const openFilesLimit = (): number => {
  try {
    const line = readFileSync("/proc/self/limits", "utf8")
      .split("\n")
      .find((l) => l.startsWith("Max open files"))
    const soft = line?.slice("Max open files".length).trim().split(/\s+/)[0]
    return soft === undefined || soft === "unlimited" ? Number.POSITIVE_INFINITY : Number(soft)
  } catch {
    // Not Linux: no cap from descriptors, the heap bound still applies.
    return Number.POSITIVE_INFINITY
  }
}

/**
 * The default client cap: what the process can hold without failing in a worse way. Past the
 * descriptor limit accept() fails with EMFILE and Node drops connections without a word; past the
 * heap limit the process dies with every client on it. So: the open-files limit less a reserve
 * (for servers, the store, the API), and at most the V8 heap limit divided by a handshaking client's
 * cost; at least 100, so a tiny limit still serves.
 */
export const defaultMaxClientConnections = (
  fds: number = openFilesLimit(),
  heapLimit: number = getHeapStatistics().heap_size_limit
): number => {
  const byHeap = Math.floor(heapLimit / HEAP_PER_CLIENT)
  const byFds = Number.isFinite(fds) ? fds - Math.min(RESERVED_FDS, Math.ceil(fds / 4)) : byHeap
  return Math.max(100, Math.min(byFds, byHeap))
}

const defaultLogFormat = (): LogFormat => (process.stdout.isTTY === true ? "pretty" : "json")

/**
 * Every setting, in the order docs/configuration.md lists them. The environment
 * variable names follow Supavisor where it has the setting, else `TIDEPOOL_*`.
 */
export const settings: { readonly [K in SettingField]: SettingSpec<AppConfigShape[K]> } = {
  listenAddr: {
    env: "TIDEPOOL_LISTEN_ADDR",
    fileKey: "listen_addr",
    type: "IP address or host name",
    description: "Address the proxy ports and the HTTP API listen on",
    default: () => "0.0.0.0",
    parse: listenAddress
  },
  transactionPort: {
    env: "PROXY_PORT_TRANSACTION",
    fileKey: "proxy_port_transaction",
    type: "port (0 = any free port)",
    description: "Transaction-mode proxy port",
    default: () => 6543,
    parse: port
  },
  sessionPort: {
    env: "PROXY_PORT_SESSION",
    fileKey: "proxy_port_session",
    type: "port (0 = any free port)",
    description: "Session-mode proxy port",
    default: () => 5432,
    parse: port
  },
  apiPort: {
    env: "PORT",
    fileKey: "port",
    type: "port (0 = any free port)",
    description: "HTTP management API and /metrics port",
    default: () => 4000,
    parse: port
  },
  dataDir: {
    env: "TIDEPOOL_DATA_DIR",
    fileKey: "data_dir",
    type: "path",
    description: "Directory for Tidepool's own state (the embedded tenant store)",
    default: () => "./.tidepool",
    parse: nonEmpty
  },
  logLevel: {
    env: "TIDEPOOL_LOG_LEVEL",
    fileKey: "log_level",
    type: `${logLevels.join(" | ")} (also warn, err, notice, fatal, off)`,
    description: "Least severe log level written",
    default: () => "info",
    parse: parseLogLevel
  },
  logFormat: {
    env: "TIDEPOOL_LOG_FORMAT",
    fileKey: "log_format",
    type: "json | pretty",
    description: "Log line format; defaults to pretty when stdout is a terminal, else json",
    default: defaultLogFormat,
    parse: oneOf<LogFormat>(["json", "pretty"])
  },
  handshakeTimeoutMs: {
    env: "TIDEPOOL_HANDSHAKE_TIMEOUT",
    fileKey: "handshake_timeout",
    type: "milliseconds",
    description: "Time a client has for the whole startup and authentication exchange (EAUTHTIMEOUT)",
    default: () => 15_000,
    parse: millis(1)
  },
  authFailureDelayMs: {
    env: "TIDEPOOL_AUTH_FAILURE_DELAY",
    fileKey: "auth_failure_delay",
    type: "milliseconds",
    description: "Delay before answering a wrong password or unknown tenant/user",
    default: () => 500,
    parse: millis(0)
  },
  upstreamConnectTimeoutMs: {
    env: "TIDEPOOL_UPSTREAM_CONNECT_TIMEOUT",
    fileKey: "upstream_connect_timeout",
    type: "milliseconds",
    description: "Time allowed to connect and log in to an upstream PostgreSQL server",
    default: () => 5_000,
    parse: millis(1)
  },
  shutdownTimeoutMs: {
    env: "TIDEPOOL_SHUTDOWN_TIMEOUT",
    fileKey: "shutdown_timeout",
    type: "milliseconds",
    description: "On SIGTERM, how long to let clients drain before closing them",
    default: () => 30_000,
    parse: millis(0)
  },
  maxMessageSize: {
    env: "TIDEPOOL_MAX_MESSAGE_SIZE",
    fileKey: "max_message_size",
    type: "bytes",
    description: "Largest message a client may send (PostgreSQL's own limit is 1 GiB)",
    default: () => 1_073_741_824,
    parse: bytes(1024, 1_073_741_824)
  },
  jitTimeoutMs: {
    env: "TIDEPOOL_JIT_TIMEOUT",
    fileKey: "jit_timeout",
    type: "milliseconds",
    description:
      "How long a JIT token check against the tenant's API may take before the login fails with EJITREQUESTFAILED",
    default: () => 5_000,
    parse: millis(1)
  },
  preparedCacheSize: {
    env: "TIDEPOOL_PREPARED_CACHE_SIZE",
    fileKey: "prepared_cache_size",
    type: "integer",
    description:
      "Named statements kept prepared on each upstream connection in transaction mode; the least recently used is closed beyond",
    default: () => 200,
    parse: integer(1, 100_000, "an integer")
  },
  maxPreparedStatements: {
    env: "TIDEPOOL_MAX_PREPARED_STATEMENTS",
    fileKey: "max_prepared_statements",
    type: "integer",
    description: "Named prepared statements one transaction-mode client may hold at once (EMAXPREPARED beyond)",
    default: () => 100,
    parse: integer(1, 1_000_000, "an integer")
  },
  maxPreparedMemory: {
    env: "TIDEPOOL_MAX_PREPARED_MEMORY",
    fileKey: "max_prepared_memory",
    type: "bytes",
    description:
      "Bytes of prepared statements (their Parse messages) one transaction-mode client may hold (EMAXPREPAREDMEM beyond)",
    default: () => 1_048_576,
    parse: bytes(1024, 1_073_741_824)
  },
  serverIdleTimeoutMs: {
    env: "TIDEPOOL_SERVER_IDLE_TIMEOUT",
    fileKey: "server_idle_timeout",
    type: "milliseconds (0 = never)",
    description: "Close an upstream connection idle in the pool this long",
    default: () => 300_000,
    parse: millis(0)
  },
  serverLifetimeMs: {
    env: "TIDEPOOL_SERVER_LIFETIME",
    fileKey: "server_lifetime",
    type: "milliseconds (0 = never)",
    description: "Close an upstream connection this old when it is next idle",
    default: () => 3_600_000,
    parse: millis(0)
  },
  poolShutdownAfterMs: {
    env: "TIDEPOOL_POOL_SHUTDOWN_AFTER",
    fileKey: "pool_shutdown_after",
    type: "milliseconds",
    description: "Keep a pool's servers this long after its last client leaves",
    default: () => 120_000,
    parse: millis(0)
  },
  minPoolSize: {
    env: "TIDEPOOL_MIN_POOL_SIZE",
    fileKey: "min_pool_size",
    type: "integer",
    description: "Warm servers each live pool keeps open while idle (capped at the pool size)",
    default: () => 1,
    parse: integer(0, 1000, "an integer")
  },
  maxPoolsPerTenant: {
    env: "TIDEPOOL_MAX_POOLS_PER_TENANT",
    fileKey: "max_pools_per_tenant",
    type: "integer",
    description: "Pools (user × database × mode) one tenant may have on this node",
    default: () => 50,
    parse: integer(1, 100_000, "an integer")
  },
  maxClientConnections: {
    env: "TIDEPOOL_MAX_CLIENT_CONNECTIONS",
    fileKey: "max_client_connections",
    type: "integer",
    description:
      "Client connections open at once on this node (both ports, every tenant); one more is refused with EMAXCLIENTCONNS. Default: from the file-descriptor limit and the heap limit",
    default: () => defaultMaxClientConnections(),
    parse: integer(1, 10_000_000, "an integer")
  },
  maxHandshakes: {
    env: "TIDEPOOL_MAX_HANDSHAKES",
    fileKey: "max_handshakes",
    type: "integer",
    description:
      "Client connections accepted and not yet authenticated at once; one more is refused with EMAXHANDSHAKES",
    default: () => 4096,
    parse: integer(1, 10_000_000, "an integer")
  },
  authQueryCacheTtlMs: {
    env: "TIDEPOOL_AUTH_QUERY_CACHE_TTL",
    fileKey: "auth_query_cache_ttl",
    type: "milliseconds",
    description: "Drop a cached auth_query secret no login has used for this long",
    default: () => 86_400_000,
    parse: millis(1)
  },
  authQueryRecheckIntervalMs: {
    env: "TIDEPOOL_AUTH_QUERY_RECHECK",
    fileKey: "auth_query_recheck",
    type: "milliseconds (0 = never)",
    description: "Re-run auth_query for cached secrets about this often (±50% jitter)",
    default: () => 15_000,
    parse: millis(0)
  },
  downstreamCertPath: {
    env: "GLOBAL_DOWNSTREAM_CERT_PATH",
    fileKey: "global_downstream_cert_path",
    type: "paths (PEM)",
    description: "Certificate chain for client TLS; an RSA and an ECDSA chain may be given, separated by a comma",
    default: () => "",
    parse: paths
  },
  downstreamKeyPath: {
    env: "GLOBAL_DOWNSTREAM_KEY_PATH",
    fileKey: "global_downstream_key_path",
    type: "paths (PEM)",
    description: "Private key(s) for GLOBAL_DOWNSTREAM_CERT_PATH, in the same order",
    default: () => "",
    parse: paths
  },
  upstreamCaPath: {
    env: "GLOBAL_UPSTREAM_CA_PATH",
    fileKey: "global_upstream_ca_path",
    type: "path (PEM)",
    description: "CA certificates for upstream_verify: peer tenants without upstream_tls_ca",
    default: () => "",
    parse: paths
  },
  databaseUrl: {
    env: "DATABASE_URL",
    fileKey: "database_url",
    type: "postgres:// URL (secret)",
    description:
      "Tenant store in PostgreSQL, shared by every node pointing at it; unset = SQLite file tidepool.db in the data dir",
    default: () => undefined,
    parse: postgresUrl
  },
  vaultEncKey: {
    env: "VAULT_ENC_KEY",
    fileKey: "vault_enc_key",
    type: "32 bytes: 64 hex characters or base64 (secret)",
    description: "Key that encrypts user passwords in the tenant store (AES-256-GCM); required to store a tenant",
    default: () => undefined,
    parse: vaultKey
  },
  apiJwtSecret: {
    env: "API_JWT_SECRET",
    fileKey: "api_jwt_secret",
    type: "string (secret)",
    description: "HMAC secret of the management API's bearer tokens (HS256/384/512); unset = every API call is refused",
    default: () => undefined,
    parse: secret
  },
  metricsJwtSecret: {
    env: "METRICS_JWT_SECRET",
    fileKey: "metrics_jwt_secret",
    type: "string (secret)",
    description: "HMAC secret of the bearer tokens for /metrics",
    default: () => undefined,
    parse: secret
  },
  jwtClaimValidators: {
    env: "JWT_CLAIM_VALIDATORS",
    fileKey: "jwt_claim_validators",
    type: "JSON object",
    description: "Claims every API and metrics token must carry with exactly these values",
    default: () => ({}),
    parse: claimValidators
  },
  jwtMaxLifetimeSeconds: {
    env: "TIDEPOOL_JWT_MAX_LIFETIME",
    fileKey: "jwt_max_lifetime",
    type: "seconds, 0–3153600000 (0 = no bound)",
    description:
      "How far ahead an API or metrics token's exp may be; a token expiring later is refused with 401 and the reason",
    // 366 days: a token minted for "1y" (365.25 days) passes; one minted for ever does not.
    default: () => 31_622_400,
    parse: withUnits(timeUnits, 1000, 0, 3_153_600_000, "a number of seconds", "3600s, 90min, 24h, 366d")
  },
  apiTokenBlocklist: {
    env: "API_TOKEN_BLOCKLIST",
    fileKey: "api_token_blocklist",
    type: "comma-separated tokens or SHA-256 hex digests",
    description: "Refused API tokens, even when valid",
    default: () => [],
    parse: tokenList
  },
  metricsTokenBlocklist: {
    env: "METRICS_TOKEN_BLOCKLIST",
    fileKey: "metrics_token_blocklist",
    type: "comma-separated tokens or SHA-256 hex digests",
    description: "Refused /metrics tokens, even when valid",
    default: () => [],
    parse: tokenList
  },
  tenantRefreshMs: {
    env: "TIDEPOOL_TENANT_REFRESH_MS",
    fileKey: "tenant_refresh_ms",
    type: "milliseconds (0 = never)",
    description:
      "With a PostgreSQL store: full reload of the tenant cache, a backstop to LISTEN/NOTIFY (which applies changes at once)",
    default: () => 30_000,
    parse: millis(0)
  },
  traceCheckoutEvery: {
    env: "TIDEPOOL_TRACE_CHECKOUT_EVERY",
    fileKey: "trace_checkout_every",
    type: "integer (0 = off)",
    description: "Besides every checkout that waited, emit a pool.checkout span for every Nth immediate one",
    default: () => 0,
    parse: integer(0, 1_000_000_000, "an integer")
  },
  adminUsers: {
    env: "TIDEPOOL_ADMIN_USERS",
    fileKey: "admin_users",
    type: "name=secret list, comma-separated (secret: SCRAM-SHA-256 verifier or password)",
    description: "Logins of the PgBouncer-style admin console (database pgbouncer or tidepool); empty disables it",
    default: () => [],
    parse: adminUsers
  },
  workers: {
    env: "TIDEPOOL_WORKERS",
    fileKey: "workers",
    type: "`auto` or integer, 1–255",
    description:
      "Worker processes on this host, sharing the ports and each pool's pool_size (docs/scale-out.md); 1 = one process; auto = one per core",
    default: () => 1,
    parse: (raw: string) =>
      raw.trim().toLowerCase() === "auto"
        ? Result.succeed(Math.min(255, availableParallelism()))
        : integer(1, 255, "`auto` or an integer")(raw)
  },
  cluster: {
    env: "TIDEPOOL_CLUSTER",
    fileKey: "cluster",
    type: "`on` or `off`",
    description:
      "Several hosts share each pool_size through the permit ledger in the PostgreSQL store (docs/scale-out.md); needs DATABASE_URL",
    default: () => false,
    parse: onOff
  },
  leaseMs: {
    env: "TIDEPOOL_LEASE_MS",
    fileKey: "lease_ms",
    type: "milliseconds, 300 or more",
    description:
      "Cluster mode: a host that has not renewed its lease in the store this long (while the store was up), and whose store session is gone, has its permits reclaimed",
    default: () => 15_000,
    parse: millis(300)
  },
  advertiseHost: {
    env: "TIDEPOOL_ADVERTISE_HOST",
    fileKey: "advertise_host",
    type: "IP address or host name",
    description:
      "Cluster mode: where other hosts send this host's CancelRequests (with PROXY_PORT_TRANSACTION); empty = TIDEPOOL_LISTEN_ADDR, or the host name when that is a wildcard",
    default: () => "",
    parse: (raw: string) => Result.succeed(raw.trim())
  },
  workerHangTimeoutMs: {
    env: "TIDEPOOL_WORKER_HANG_TIMEOUT",
    fileKey: "worker_hang_timeout",
    type: "milliseconds, 0 or at least 200 (0 = off)",
    description:
      "Worker mode: a worker whose heartbeat (sent every fifth of this, at most every second) is this late is killed with SIGKILL and handled like a crash (docs/scale-out.md#hang-detection)",
    default: () => 10_000,
    // Below 200 ms a busy event loop's ordinary pauses (a GC, a large write) would read as hangs.
    parse: (raw: string) =>
      Result.flatMap(millis(0)(raw), (ms) =>
        ms > 0 && ms < 200
          ? Result.fail(`expected 0 (off) or at least 200 ms, got ${JSON.stringify(raw)}`)
          : Result.succeed(ms)
      )
  },
  memoryReclaimBytes: {
    env: "TIDEPOOL_MEMORY_RECLAIM",
    fileKey: "memory_reclaim",
    type: "bytes (0 = off)",
    description:
      "When the process goes quiet after its V8 heap has grown this much (a burst of logins), it gives the memory back to the OS: one young-generation collection, then V8's own incremental memory reducer, whose compacting pause may land while transactions run; rarely needed, since the young generation is capped by default (docs/operations.md#memory-after-a-burst); 0 = off",
    // Off: once enabled, V8's reducer decides on the allocation rate alone, and the relay allocates
    // nothing per message, so its compacting pause can land while transactions run. The capped
    // young generation (src/telemetry/YoungGeneration.ts) is what keeps idle memory down by default.
    default: () => 0,
    parse: bytes(0, 1_099_511_627_776)
  }
}

export const settingFields = Object.keys(settings) as ReadonlyArray<SettingField>

export const configFileEnv = "TIDEPOOL_CONFIG"

/** Every environment variable AppConfig reads. */
export const envNames: ReadonlyArray<string> = [...settingFields.map((f) => settings[f].env), configFileEnv]

type Settings = Omit<AppConfigShape, "configFile">

/** Every setting's raw text, as the current ConfigProvider has it (none when unset). */
const rawSettingsConfig: Config.Config<{ readonly [K in SettingField]: Option.Option<string> }> = Config.all(
  Object.fromEntries(settingFields.map((field) => [field, Config.option(Config.String(settings[field].env))])) as {
    readonly [K in SettingField]: Config.Config<Option.Option<string>>
  }
)

const portFields = ["transactionPort", "sessionPort", "apiPort"] as const

// Two listeners on one port fail at bind time with EADDRINUSE, which names
// neither setting; catching it here names both.
const portProblems = (s: Settings): Array<ConfigProblem> => {
  const problems: Array<ConfigProblem> = []
  portFields.forEach((field, i) => {
    const clash = portFields.slice(0, i).find((other) => s[other] !== 0 && s[other] === s[field])
    if (clash !== undefined) {
      problems.push({
        path: settings[field].env,
        reason: `port ${s[field]} is also ${settings[clash].env} (server: ${settings[clash].fileKey}); the listener ports must differ`
      })
    }
  })
  return problems
}

// A certificate without its key (or the reverse) would otherwise start a pooler that silently
// answers every SSLRequest with N.
const tlsPairProblems = (s: Settings): Array<ConfigProblem> => {
  const certs = s.downstreamCertPath === "" ? 0 : s.downstreamCertPath.split(",").length
  const keys = s.downstreamKeyPath === "" ? 0 : s.downstreamKeyPath.split(",").length
  if (certs === keys) return []
  return [
    {
      path: certs < keys ? settings.downstreamCertPath.env : settings.downstreamKeyPath.env,
      reason: `${settings.downstreamCertPath.env} names ${certs} certificate(s) and ${settings.downstreamKeyPath.env} ${keys} key(s); give one key per certificate, in the same order`
    }
  ]
}

/** Cluster mode: workers per host, and client connections per worker (process ids: slot, worker, 14 random bits). */
export const MAX_CLUSTER_WORKERS = 63
export const MAX_CLUSTER_WORKER_CLIENTS = 12_288

// Cluster mode keeps its ledger in the PostgreSQL store and tells other hosts where to forward
// cancels: without either, it would silently be one host's pooler again.
const clusterProblems = (s: Settings): Array<ConfigProblem> => {
  if (!s.cluster) return []
  const problems: Array<ConfigProblem> = []
  const why = `${settings.cluster.env} (server: ${settings.cluster.fileKey}) is on`
  if (s.databaseUrl === undefined)
    problems.push({
      path: settings.cluster.env,
      reason: `${why}: it needs a PostgreSQL tenant store (${settings.databaseUrl.env}), where the hosts share their permits`
    })
  // Process ids carry the runner slot, then the worker's number in 6 bits (docs/scale-out.md#cancelrequest-across-hosts).
  if (s.workers > MAX_CLUSTER_WORKERS)
    problems.push({
      path: settings.workers.env,
      reason: `${why}: at most ${MAX_CLUSTER_WORKERS} workers per host (a client's process id carries the host's slot and the worker's number)`
    })
  if (s.workers > 1 && s.maxClientConnections > MAX_CLUSTER_WORKER_CLIENTS)
    problems.push({
      path: settings.maxClientConnections.env,
      reason: `${why} with ${settings.workers.env} > 1: at most ${MAX_CLUSTER_WORKER_CLIENTS} client connections per worker (a process id has 14 bits of its own); run more workers instead`
    })
  if (s.transactionPort === 0)
    problems.push({
      path: settings.transactionPort.env,
      reason: `${why}: other hosts forward CancelRequests to this port, so it cannot be 0`
    })
  return problems
}

/**
 * Parses raw setting values (absent: the default) with the parsers above, then checks the rules
 * across settings. Every problem is reported, by environment variable name, so one run lists them
 * all. The config file's `server:` section goes through the same function, so both accept exactly
 * the same things.
 */
export const parseSettings = (
  raw: Partial<Record<SettingField, string>>
): Result.Result<Settings, ReadonlyArray<ConfigProblem>> => {
  const problems: Array<ConfigProblem> = []
  const out: Record<string, unknown> = {}
  for (const field of settingFields) {
    const spec: SettingSpec<unknown> = settings[field]
    const text = raw[field]
    if (text === undefined) {
      out[field] = spec.default()
      continue
    }
    const parsed = spec.parse(text)
    if (Result.isSuccess(parsed)) out[field] = parsed.success
    else problems.push({ path: spec.env, reason: parsed.failure })
  }
  if (problems.length > 0) return Result.fail(problems)
  const parsed = out as Settings
  // Cluster mode with workers: each worker's clients share 14 bits of process id; the default
  // (from the file-descriptor and heap limits) is capped to fit, a value set higher is refused.
  if (parsed.cluster && parsed.workers > 1 && raw.maxClientConnections === undefined)
    (parsed as { maxClientConnections: number }).maxClientConnections = Math.min(
      parsed.maxClientConnections,
      MAX_CLUSTER_WORKER_CLIENTS
    )
  const crossField = [...portProblems(parsed), ...tlsPairProblems(parsed), ...clusterProblems(parsed)]
  return crossField.length > 0 ? Result.fail(crossField) : Result.succeed(parsed)
}

const configFileConfig: Config.Config<Option.Option<string>> = Config.option(Config.String(configFileEnv)).pipe(
  // `TIDEPOOL_CONFIG=` in a compose file means "no file", not a file named "".
  Config.map(Option.filter((path) => path.trim() !== ""))
)

export type ServerValue = string | number | boolean

/** A config file's `server:` section as written; values are checked by the same parsers as the environment. */
export type ServerSection = { readonly [key: string]: ServerValue | undefined }

const fieldByFileKey: ReadonlyMap<string, SettingField> = new Map(settingFields.map((f) => [settings[f].fileKey, f]))

/** Keys a config file's `server:` section accepts: the environment names lower-cased, `tidepool_` dropped. */
export const serverKeys: ReadonlyArray<string> = settingFields.map((f) => settings[f].fileKey)

/** A `server:` section as a ConfigProvider keyed by environment name, to sit behind the environment. */
export const fileConfigProvider = (server: ServerSection): ConfigProvider.ConfigProvider =>
  ConfigProvider.fromUnknown(
    Object.fromEntries(
      Object.entries(server).flatMap(([key, value]) => {
        const field = fieldByFileKey.get(key)
        return field === undefined || value === undefined ? [] : [[settings[field].env, String(value)] as const]
      })
    )
  )

/**
 * The process environment as Tidepool reads it: a variable set to the empty string is a value (so
 * `PORT=` is reported as not a port, as before Effect 4), where Effect's default `fromEnv()` would
 * read it as unset and silently fall back to the file or the default. Provide it at the root
 * (`ConfigProvider.layer(environment())`) so AppConfig.layer and layerFromFile read it.
 */
export const environment = (): ConfigProvider.ConfigProvider => ConfigProvider.fromEnv({ preserveEmptyStrings: true })

/** The precedence rule: environment, then the file's `server:` section, then the built-in defaults. */
export const configProviderFor = (
  server: ServerSection,
  env: ConfigProvider.ConfigProvider = environment()
): ConfigProvider.ConfigProvider => ConfigProvider.orElse(env, fileConfigProvider(server))

/** Loads AppConfig from the given provider, reporting problems by environment variable name. */
export const loadAppConfig = (provider: ConfigProvider.ConfigProvider): Effect.Effect<AppConfigShape, ConfigError> =>
  Effect.gen(function* () {
    const { raw, configFile } = yield* Config.all({ raw: rawSettingsConfig, configFile: configFileConfig }).pipe(
      Effect.provideService(ConfigProvider.ConfigProvider, provider),
      // Only the source itself can fail here (every value is read as optional text).
      Effect.mapError((error) => new ConfigError({ problems: [{ path: "", reason: error.message }] }))
    )
    const texts: Partial<Record<SettingField, string>> = {}
    for (const field of settingFields) if (Option.isSome(raw[field])) texts[field] = raw[field].value
    const parsed = parseSettings(texts)
    if (Result.isFailure(parsed)) return yield* new ConfigError({ problems: parsed.failure })
    return { ...parsed.success, configFile }
  })

const defaults = (): AppConfigShape => ({
  listenAddr: settings.listenAddr.default(),
  transactionPort: settings.transactionPort.default(),
  sessionPort: settings.sessionPort.default(),
  apiPort: settings.apiPort.default(),
  dataDir: settings.dataDir.default(),
  logLevel: settings.logLevel.default(),
  logFormat: settings.logFormat.default(),
  handshakeTimeoutMs: settings.handshakeTimeoutMs.default(),
  authFailureDelayMs: settings.authFailureDelayMs.default(),
  upstreamConnectTimeoutMs: settings.upstreamConnectTimeoutMs.default(),
  shutdownTimeoutMs: settings.shutdownTimeoutMs.default(),
  maxMessageSize: settings.maxMessageSize.default(),
  jitTimeoutMs: settings.jitTimeoutMs.default(),
  preparedCacheSize: settings.preparedCacheSize.default(),
  maxPreparedStatements: settings.maxPreparedStatements.default(),
  maxPreparedMemory: settings.maxPreparedMemory.default(),
  serverIdleTimeoutMs: settings.serverIdleTimeoutMs.default(),
  serverLifetimeMs: settings.serverLifetimeMs.default(),
  poolShutdownAfterMs: settings.poolShutdownAfterMs.default(),
  minPoolSize: settings.minPoolSize.default(),
  maxPoolsPerTenant: settings.maxPoolsPerTenant.default(),
  maxClientConnections: settings.maxClientConnections.default(),
  maxHandshakes: settings.maxHandshakes.default(),
  authQueryCacheTtlMs: settings.authQueryCacheTtlMs.default(),
  authQueryRecheckIntervalMs: settings.authQueryRecheckIntervalMs.default(),
  downstreamCertPath: settings.downstreamCertPath.default(),
  downstreamKeyPath: settings.downstreamKeyPath.default(),
  upstreamCaPath: settings.upstreamCaPath.default(),
  databaseUrl: settings.databaseUrl.default(),
  vaultEncKey: settings.vaultEncKey.default(),
  apiJwtSecret: settings.apiJwtSecret.default(),
  metricsJwtSecret: settings.metricsJwtSecret.default(),
  jwtClaimValidators: settings.jwtClaimValidators.default(),
  jwtMaxLifetimeSeconds: settings.jwtMaxLifetimeSeconds.default(),
  apiTokenBlocklist: settings.apiTokenBlocklist.default(),
  metricsTokenBlocklist: settings.metricsTokenBlocklist.default(),
  tenantRefreshMs: settings.tenantRefreshMs.default(),
  traceCheckoutEvery: settings.traceCheckoutEvery.default(),
  adminUsers: settings.adminUsers.default(),
  workers: settings.workers.default(),
  cluster: settings.cluster.default(),
  leaseMs: settings.leaseMs.default(),
  advertiseHost: settings.advertiseHost.default(),
  workerHangTimeoutMs: settings.workerHangTimeoutMs.default(),
  memoryReclaimBytes: settings.memoryReclaimBytes.default(),
  configFile: Option.none()
})

/**
 * Process-wide settings. `AppConfig.layer` reads only the current
 * ConfigProvider (the environment by default); `tidepool serve` uses
 * `ConfigFile.layer`, which also applies the config file's `server:` section.
 */
export class AppConfig extends Context.Service<AppConfig, AppConfigShape>()("tidepool/AppConfig") {
  static readonly layer: Layer.Layer<AppConfig, ConfigError> = Layer.effect(
    this,
    ConfigProvider.ConfigProvider.use(loadAppConfig)
  )

  /** Built-in defaults with `overrides` on top. Not validated: in-process callers (tests) are trusted. */
  static readonly make = (overrides: Partial<AppConfigShape> = {}): AppConfigShape => ({
    ...defaults(),
    ...overrides
  })

  static readonly layerFrom = (overrides: Partial<AppConfigShape> = {}): Layer.Layer<AppConfig> =>
    Layer.succeed(this, this.make(overrides))

  /**
   * What `tidepool serve` runs with: the environment (the current
   * ConfigProvider) over the loaded config file's `server:` section over the
   * defaults. Without a file this is `layer`.
   */
  static readonly layerFromFile = (
    file: { readonly file: Option.Option<string>; readonly server: ServerSection } | undefined
  ): Layer.Layer<AppConfig, ConfigError> =>
    file === undefined
      ? this.layer
      : Layer.effect(
          this,
          ConfigProvider.ConfigProvider.use((env) => loadAppConfig(configProviderFor(file.server, env))).pipe(
            Effect.map((config) => (Option.isSome(file.file) ? { ...config, configFile: file.file } : config))
          )
        )

  static readonly envNames = envNames
}
