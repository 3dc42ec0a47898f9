/**
 * Every failure a client or an operator can see, keyed by its stable code.
 *
 * The `text` renders the human message; unless `prefix` is false the client sees `(CODE) text` in the
 * ErrorResponse `M` field, so the code survives drivers that only surface the message.
 */
export interface CatalogEntry<Args extends ReadonlyArray<unknown>> {
  readonly sqlstate: string
  readonly severity: "FATAL" | "ERROR" | "LOG"
  readonly prefix: boolean
  readonly text: (...args: Args) => string
  readonly meaning: string
  readonly remedy: string
}

const entry = <Args extends ReadonlyArray<unknown>>(e: CatalogEntry<Args>): CatalogEntry<Args> => e

const fatal = "FATAL" as const

export const catalog = {
  EADDRNOTALLOWED: entry({
    sqlstate: "XX000",
    severity: fatal,
    prefix: true,
    text: (ip: string) => `address not in tenant allow_list: ${ip}`,
    meaning: "The client's IP address is outside the tenant's `allow_list`.",
    remedy: "Connect from an allowed network or add the address range to the tenant's `allow_list`."
  }),
  EAUTHPROTOCOL: entry({
    sqlstate: "08P01",
    severity: fatal,
    prefix: true,
    text: (reason?: string) => `protocol violation during authentication${reason ? `: ${reason}` : ""}`,
    meaning: "The client sent an unexpected or malformed message during the authentication exchange.",
    remedy: "Use a PostgreSQL driver that supports SCRAM-SHA-256; check for proxies that rewrite traffic."
  }),
  EAUTHQUERY: entry({
    sqlstate: "XX000",
    severity: fatal,
    prefix: true,
    text: (reason: string) => reason,
    meaning: "Fetching the user's secret with the tenant's `auth_query` failed or returned something unusable.",
    remedy: "Check the tenant's `auth_query`, the manager user's credentials and that the role exists upstream."
  }),
  EAUTHTIMEOUT: entry({
    sqlstate: "08006",
    severity: fatal,
    prefix: true,
    text: () => "timeout while waiting for message",
    meaning: "The client did not finish the startup and authentication exchange within the handshake timeout.",
    remedy: "Check client connectivity; raise `TIDEPOOL_HANDSHAKE_TIMEOUT` for very slow links."
  }),
  ECHECKOUTFAILED: entry({
    sqlstate: "08006",
    severity: fatal,
    prefix: false,
    text: (upstreamMessage: string) => upstreamMessage,
    meaning:
      "A server connection could not be opened: the upstream was unreachable (`08006 Failed to connect to database: …`) or rejected the pooler's login (the upstream's own SQLSTATE and message are passed on). Clients get it at once, or when the checkout wait ends while a pool waits out an outage (a pool that had reached its database keeps clients waiting up to `pool_checkout_timeout` for it to come back).",
    remedy:
      "Check that the tenant's database is up and reachable and that its credentials are valid; raise `pool_checkout_timeout` if clients should wait out longer restarts."
  }),
  ECHECKOUTTIMEOUT: entry({
    sqlstate: "XX000",
    severity: fatal,
    prefix: true,
    text: (ms: number, mode: "Transaction" | "Session") =>
      `unable to check out connection from the pool after ${ms}ms in ${mode} mode`,
    meaning: "Every server connection of the pool stayed busy for the whole checkout timeout.",
    remedy: "Raise the user's `pool_size` or `pool_checkout_timeout`, or shorten the transactions holding servers."
  }),
  ECIRCUITBREAKER: entry({
    sqlstate: "XX000",
    severity: fatal,
    prefix: true,
    text: (reason: string) => reason,
    meaning: "Too many authentication failures from this address (or auth_query failures) tripped the breaker.",
    remedy: "Wait for the block to expire or clear it through the `network_bans` API; fix the client's password."
  }),
  ECLIENTSOCKETCLOSED: entry({
    sqlstate: "08006",
    severity: "LOG",
    prefix: true,
    text: () => "client socket closed",
    meaning: "The client's connection ended without a Terminate message (log only; no client left to tell).",
    remedy: "Usually benign; frequent occurrences point to client crashes or network trouble."
  }),
  EPREPAREDDUP: entry({
    sqlstate: "42P05",
    severity: "ERROR",
    prefix: true,
    text: (name: string) => `prepared statement "${name}" already exists`,
    meaning: "The client parsed a named statement under a name it already uses.",
    remedy: "Close the statement first, or use a new name (as PostgreSQL requires)."
  }),
  EPREPAREDNOTFOUND: entry({
    sqlstate: "26000",
    severity: "ERROR",
    prefix: true,
    text: (name: string) => `prepared statement "${name}" does not exist`,
    meaning: "The client bound or described a statement name it never prepared.",
    remedy: "Prepare the statement before using it."
  }),
  EMAXPREPARED: entry({
    sqlstate: "XX000",
    severity: "ERROR",
    prefix: true,
    text: (limit: number) => `max prepared statements limit reached. Limit: ${limit} per connection`,
    meaning: "The client holds as many named prepared statements as allowed.",
    remedy: "Close unused statements or raise the per-client limit."
  }),
  EMAXPREPAREDMEM: entry({
    sqlstate: "XX000",
    severity: "ERROR",
    prefix: true,
    text: (limit: string) => `max prepared statements memory limit reached. Limit: ${limit} per connection`,
    meaning: "The client's named prepared statements use as much memory as allowed.",
    remedy: "Close unused statements or raise the per-client memory limit."
  }),
  EINVALIDUSERINFO: entry({
    sqlstate: "XX000",
    severity: fatal,
    prefix: true,
    text: () => `Authentication error, reason: "Invalid format for user or db_name"`,
    meaning: "The user, tenant or database name is empty, longer than 63 bytes or contains non-printable bytes.",
    remedy: "Use names of 1–63 printable characters."
  }),
  EJITREQUESTFAILED: entry({
    sqlstate: "XX000",
    severity: fatal,
    prefix: true,
    text: (user: string) => `failed to reach JIT provider for user "${user}"`,
    meaning: "The tenant's JIT API could not be reached or answered unexpectedly.",
    remedy: "Check the tenant's `jit_api_url` and the API's health."
  }),
  EJITUNAUTHORIZED: entry({
    sqlstate: "28P01",
    severity: fatal,
    prefix: false,
    text: (user: string) => `password authentication failed for user "${user}"`,
    meaning: "The JIT API refused the presented token, or granted it for another role.",
    remedy: "Obtain a fresh token for this role."
  }),
  EMAXCONN: entry({
    sqlstate: "XX000",
    severity: fatal,
    prefix: true,
    text: (limit: number) => `max client connections reached, limit: ${limit}`,
    meaning: "The pool already has `max_clients` clients connected (in worker mode, across all the host's workers).",
    remedy: "Raise the user's `max_clients` (or the tenant's `default_max_clients`) or close idle clients."
  }),
  EMAXCONNSESSION: entry({
    sqlstate: "XX000",
    severity: fatal,
    prefix: true,
    text: (limit: number) => `max clients reached in session mode - max clients are limited to pool_size: ${limit}`,
    meaning:
      "In session mode each client holds a server, so clients per pool are capped at `pool_size` (in worker mode, across all the host's workers).",
    remedy: "Use transaction mode (port 6543) for many clients, or raise `pool_size`."
  }),
  EMAXPOOLSREACHED: entry({
    sqlstate: "XX000",
    severity: fatal,
    prefix: true,
    text: () => "max pools count reached",
    meaning: "The tenant already has the maximum number of pools on this node.",
    remedy: "Use fewer distinct (user, database, search_path) combinations."
  }),
  EMULTIPLEUSERS: entry({
    sqlstate: "XX000",
    severity: fatal,
    prefix: true,
    text: (user: string, tenant: string) => `multiple users matched for ${user}.${tenant}, check tenant configuration`,
    meaning: "More than one configured user matches the client's username.",
    remedy: "Make `db_user_alias` values unique within the tenant."
  }),
  ENOIDENTIFIER: entry({
    sqlstate: "XX000",
    severity: fatal,
    prefix: true,
    text: () => "no tenant identifier provided (external_id or sni_hostname required)",
    meaning: "The client named no tenant: no `user.tenant` username, no `options=reference=…`, no matching SNI.",
    remedy: "Connect as `user.tenant`, or pass `options=reference=<tenant>`."
  }),
  ESSLHANDSHAKE: entry({
    sqlstate: "08006",
    severity: fatal,
    prefix: true,
    text: (reason: string) => `SSL handshake failed: ${reason}`,
    meaning:
      "The TLS handshake with a client failed (TLS below 1.2, no shared cipher, certificate rejected); logged, the client sees the TLS alert. Direct TLS without ALPN `postgresql` gets this message.",
    remedy: "Check the client's TLS settings (sslmode, sslrootcert) and the pooler's certificate (docs/tls.md)."
  }),
  ESSLREQUIRED: entry({
    sqlstate: "XX000",
    severity: fatal,
    prefix: true,
    text: (user: string) => `SSL connection is required for user: ${user}`,
    meaning: "The tenant requires TLS (`enforce_ssl`) or JIT access, and the client connected without it.",
    remedy: "Connect with `sslmode=require` or stronger."
  }),
  ESTARTUPMESSAGE: entry({
    sqlstate: "08P01",
    severity: fatal,
    prefix: true,
    text: (reason: string) => `Invalid startup message: ${reason}`,
    meaning:
      "The first packet was not a valid startup packet or asked for an unsupported protocol, or unencrypted bytes followed an SSLRequest before its answer (CVE-2021-23214).",
    remedy: "Connect with a PostgreSQL client speaking protocol 3."
  }),
  ESTARTUPPACKETTOOLARGE: entry({
    sqlstate: "08P01",
    severity: fatal,
    prefix: true,
    text: (size: number, max: number) => `Startup packet too large: ${size} bytes (max ${max} bytes)`,
    meaning: "The startup packet exceeds PostgreSQL's 10 000-byte limit.",
    remedy: "Send fewer or shorter startup parameters."
  }),
  EMESSAGETOOLARGE: entry({
    sqlstate: "08P01",
    severity: fatal,
    prefix: true,
    text: (size: number, max: number) => `message too large: ${size} bytes (max ${max} bytes)`,
    meaning:
      "A client message exceeds `TIDEPOOL_MAX_MESSAGE_SIZE`, or (transaction port) a named Parse exceeds " +
      "`TIDEPOOL_MAX_PREPARED_MEMORY`: it is kept whole while the statement lives, so it is refused from its header.",
    remedy: "Send smaller messages (split COPY data, bind smaller parameters) or raise the limit."
  }),
  EPROTOCOL: entry({
    sqlstate: "08P01",
    severity: fatal,
    prefix: true,
    text: (reason: string) => `invalid frontend message: ${reason}`,
    meaning: "The client sent bytes that are not a valid PostgreSQL message.",
    remedy: "Check the client driver; the connection is closed and its server is not reused."
  }),
  EINTERNAL: entry({
    sqlstate: "XX000",
    severity: fatal,
    prefix: true,
    text: () => "internal error in the pooler; this connection was closed",
    meaning:
      "A defect in Tidepool's own code hit this client's session. Only this session ends: its server is " +
      "discarded (never reused) and every other client carries on. The log line (level error) has the cause.",
    remedy: "Reconnect. Report the log line (it carries the stack) as a bug."
  }),
  ESERVERCLOSED: entry({
    sqlstate: "08006",
    severity: fatal,
    prefix: true,
    text: (reason: string) => `server connection lost: ${reason}`,
    meaning: "The upstream connection serving this client ended unexpectedly.",
    remedy: "Check the database's logs (restart, crash, `pg_terminate_backend`); reconnect."
  }),
  EBANNED: entry({
    sqlstate: "XX000",
    severity: fatal,
    prefix: true,
    text: (reason: string) => `tenant is banned: ${reason}`,
    meaning:
      "An operator banned the tenant (`PATCH /api/tenants/:id`); its connected clients are ended at once, mid-query too.",
    remedy: "Ask the operator; the ban ends when lifted or at `banned_until`."
  }),
  ENOTFOUND: entry({
    sqlstate: "XX000",
    severity: fatal,
    prefix: true,
    text: (user: string, tenant: string) => `tenant/user ${user}.${tenant} not found`,
    meaning:
      "No tenant with that external_id, or no such user in it; also sent to connected clients when their tenant is deleted (or their user removed) through the API.",
    remedy: "Check the username (`user.tenant`) and the tenant's configuration."
  }),
  EWRONGPASSWORD: entry({
    sqlstate: "28P01",
    severity: fatal,
    prefix: false,
    text: (user: string) => `password authentication failed for user "${user}"`,
    meaning: "The password the client proved does not match the user's.",
    remedy: "Use the right password. Failures are answered after a delay to slow guessing."
  }),
  ETLSRELOAD: entry({
    sqlstate: "F0000",
    severity: "LOG",
    prefix: true,
    text: (reason: string) => reason,
    meaning:
      "Log only: a reload of the client TLS certificate failed (a file unreadable or invalid, or certificate and key not matching; the current certificate stays in use), or a certificate directory cannot be watched, so renewals there take effect only on SIGHUP. The message names the file or directory.",
    remedy:
      "Fix the files named (certificate and key must match), then rewrite them or send SIGHUP; for a watch failure check that the directory exists and the inotify limits (`fs.inotify.max_user_watches`)."
  }),
  ENOTADMIN: entry({
    sqlstate: "28000",
    severity: fatal,
    prefix: true,
    text: (user: string) => `user "${user}" may not use the admin console`,
    meaning:
      "A client asked for the admin console (database `pgbouncer` or `tidepool`) with a user name that is not in `TIDEPOOL_ADMIN_USERS`.",
    remedy:
      "Log in as an admin user, or connect to a tenant database (`user.tenant`); those two database names are reserved."
  }),
  EADMINCOMMAND: entry({
    sqlstate: "42601",
    severity: "ERROR",
    prefix: true,
    text: (reason: string) => reason,
    meaning: "The admin console did not understand a command, or its argument names no pool.",
    remedy: "Run `SHOW HELP` for the commands; name pools as `tenant` or `tenant/database`."
  }),
  ECLUSTERVIEW: entry({
    sqlstate: "55000",
    severity: "ERROR",
    prefix: true,
    text: (reason: string) => reason,
    meaning:
      "An admin console view of the store's permit ledger (`SHOW RUNNERS`, `SHOW PERMITS`) cannot be answered: cluster mode is off, or the tenant store did not answer within 2 s.",
    remedy:
      "Set `TIDEPOOL_CLUSTER=on` on every host sharing the store, or check that the store (`DATABASE_URL`) is reachable; the console stays usable."
  }),
  ECLIENTIDLETIMEOUT: entry({
    sqlstate: "57P05",
    severity: fatal,
    prefix: true,
    text: (ms: number) => `terminating connection due to client idle timeout (${ms}ms)`,
    meaning:
      "The client sent nothing for the tenant's `client_idle_timeout` while it was outside any transaction and had no query running (what PostgreSQL's `idle_session_timeout` does, counted by the pooler, so an idle client holds no pooler memory forever).",
    remedy:
      "Reconnect (drivers' pools do this by themselves); raise or turn off (`0`) the tenant's `client_idle_timeout`, or have the client pool close idle connections sooner than it."
  }),
  EADMINSHUTDOWN: entry({
    sqlstate: "57P01",
    severity: fatal,
    prefix: false,
    text: () => "terminating connection due to administrator command",
    meaning: "The pooler is shutting down (SIGTERM) and the drain timeout ended while the client was connected.",
    remedy: "Reconnect; a restarted or another pooler node takes the connection."
  }),
  EMAXCLIENTCONNS: entry({
    sqlstate: "53300",
    severity: fatal,
    prefix: true,
    text: (limit: number) => `sorry, too many clients already (this node's limit: ${limit})`,
    meaning:
      "The node already holds `TIDEPOOL_MAX_CLIENT_CONNECTIONS` client connections (both ports, every tenant, logged in or not). Checked as soon as the connection is accepted; the error answers its first packet, which is not parsed, with PostgreSQL's SQLSTATE for too many connections; connections already open are not affected.",
    remedy:
      'Close idle clients, spread them over more nodes, or raise `TIDEPOOL_MAX_CLIENT_CONNECTIONS` together with the open-files limit and the memory it needs (docs/configuration.md, "Limits that protect the node").'
  }),
  EMAXHANDSHAKES: entry({
    sqlstate: "53300",
    severity: fatal,
    prefix: true,
    text: (limit: number) => `too many connections logging in at once (this node's limit: ${limit}); retry shortly`,
    meaning:
      "`TIDEPOOL_MAX_HANDSHAKES` connections were already accepted and not yet authenticated: a login storm. Checked as soon as the connection is accepted; the error answers its first packet, which is not parsed; logged-in clients are not affected.",
    remedy:
      "Retry after a short, jittered delay; open connections gradually (a driver pool's minimum size, a connect rate limit); raise `TIDEPOOL_MAX_HANDSHAKES` if the node has CPU to spare."
  }),
  ELISTENLOST: entry({
    sqlstate: "08006",
    severity: fatal,
    prefix: true,
    text: (reason: string) => `listening connection lost, notifications may have been missed: ${reason}`,
    meaning:
      "Transaction mode: the pool's listening connection (the one that LISTENs for its clients, docs/session-state.md) ended: the database restarted, `pg_terminate_backend`, a network failure, or the tenant's database address changed (a failover). Notifications sent meanwhile cannot be recovered, so every client that was listening is told and its LISTENs are dropped. Also when a listening client does not read its notifications (more than 100,000 waiting for its transaction to end, or 16 MiB unread in its socket).",
    remedy:
      "Reconnect and LISTEN again, then re-read whatever the notifications were about (postgres.js `sql.listen` does both by itself); the next LISTEN opens a new listening connection."
  }),
  ELISTENFAILED: entry({
    sqlstate: "08006",
    severity: fatal,
    prefix: true,
    text: (reason: string) => reason,
    meaning:
      "Transaction mode: a LISTEN could not take effect on the pool's listening connection: it could not be opened (`could not open the listening connection: …`, SQLSTATE 08006), or PostgreSQL refused the LISTEN (its own SQLSTATE and message are passed on, e.g. `25006` on a standby). The client's LISTEN had already succeeded on the server that ran it (the move to the listening connection happens at the end of its transaction), so the session ends with this error rather than leave the client believing it listens.",
    remedy: "Check the database's availability and logs, then reconnect and LISTEN again."
  })
} as const

export type Catalog = typeof catalog
export type ErrorCode = keyof Catalog
export type ErrorArgs<C extends ErrorCode> = Parameters<Catalog[C]["text"]>
export const errorCodes = Object.keys(catalog) as ReadonlyArray<ErrorCode>
