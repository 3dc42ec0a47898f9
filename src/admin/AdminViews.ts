import type { PermitRow, RunnerRow } from "../cluster/StoreViews.ts"
import {
  type AppConfigShape,
  settingFields,
  settings,
  type Tenant,
  userMaxClients,
  userPoolSize
} from "../config/index.ts"
import type { TenantPool } from "../pool/index.ts"
import type { ColumnDescription } from "../protocol/index.ts"
import type { RegisteredSession } from "../session/SessionRegistry.ts"
import { VERSION } from "../version.ts"

/** A result set in text format: what every SHOW answers. */
export interface ResultSet {
  readonly columns: ReadonlyArray<ColumnDescription>
  readonly rows: ReadonlyArray<ReadonlyArray<string | null>>
}

/** Everything a view reads, captured once per command. */
export interface AdminSnapshot {
  readonly config: AppConfigShape
  readonly tenants: ReadonlyArray<Tenant>
  readonly pools: ReadonlyArray<TenantPool>
  readonly sessions: ReadonlyArray<RegisteredSession>
  readonly now: number
}

const text = (name: string): ColumnDescription => ({ name, typeOid: 25 })
const int8 = (name: string): ColumnDescription => ({ name, typeOid: 20 })
const int4 = (name: string): ColumnDescription => ({ name, typeOid: 23 })

const columns = (spec: string): Array<ColumnDescription> =>
  spec
    .trim()
    .split(/\s+/)
    .map((c) => {
      const [name, type] = c.split(":") as [string, string | undefined]
      return type === "i8" ? int8(name) : type === "i4" ? int4(name) : text(name)
    })

/** The name PgBouncer calls `database`: the tenant is part of it, as clients cannot see tenants otherwise. */
export const databaseName = (pool: TenantPool): string => `${pool.settings.tenant}/${pool.settings.database}`

/** PgBouncer's timestamp format. */
const timestamp = (ms: number): string => `${new Date(ms).toISOString().replace("T", " ").slice(0, 19)} UTC`
const hex = (n: number): string => `0x${n.toString(16)}`
const n = (v: number): string => String(Math.trunc(v))

/** Pools in a stable order: by database name, then user, then mode. */
const ordered = (pools: ReadonlyArray<TenantPool>) =>
  [...pools].sort(
    (a, b) =>
      databaseName(a).localeCompare(databaseName(b)) ||
      a.settings.user.localeCompare(b.settings.user) ||
      a.settings.mode.localeCompare(b.settings.mode)
  )

export const showPools = (s: AdminSnapshot): ResultSet => ({
  columns: columns(`database user cl_active:i4 cl_waiting:i4 cl_active_cancel_req:i4 cl_waiting_cancel_req:i4
    sv_active:i4 sv_active_cancel:i4 sv_being_canceled:i4 sv_idle:i4 sv_used:i4 sv_tested:i4 sv_login:i4
    maxwait:i4 maxwait_us:i4 pool_mode`),
  rows: ordered(s.pools).map((pool) => {
    const st = pool.stats
    const since = pool.oldestWaitSince
    const waitUs = since === undefined ? 0 : Math.max(0, s.now - since) * 1000
    return [
      databaseName(pool),
      pool.settings.user,
      n(Math.max(0, st.clients - st.waiting)),
      n(st.waiting),
      "0",
      "0",
      n(st.busy),
      "0",
      "0",
      n(st.idle),
      "0",
      "0",
      n(st.opening),
      n(waitUs / 1e6),
      n(waitUs % 1e6),
      pool.settings.mode
    ]
  })
})

/** Which client holds each server, for the `link` columns. */
const holders = (sessions: ReadonlyArray<RegisteredSession>) => {
  const byServer = new Map<unknown, RegisteredSession>()
  for (const session of sessions) {
    const server = session.handle.info?.server()
    if (server !== undefined) byServer.set(server, session)
  }
  return byServer
}

export const showClients = (s: AdminSnapshot): ResultSet => ({
  // PgBouncer's columns, then Tidepool's own: `pinned` says what keeps a transaction-mode client on its server.
  columns: columns(`type user database state addr port:i4 local_addr local_port:i4 connect_time request_time
    wait:i4 wait_us:i4 close_needed:i4 ptr link remote_pid:i4 tls application_name prepared_statements:i4 id:i8
    pinned`),
  rows: s.sessions.flatMap((session) => {
    const info = session.handle.info
    if (info === undefined) return []
    const server = info.server()
    return [
      [
        "C",
        info.user,
        databaseName(info.pool),
        info.state(),
        info.address,
        n(info.port),
        info.localAddress,
        n(info.localPort),
        timestamp(info.connectedAt),
        timestamp(info.connectedAt),
        "0",
        "0",
        "0",
        hex(session.processId),
        server === undefined || server.backendPid === 0 ? "" : hex(server.backendPid),
        "0",
        info.tls ? "TLS" : "",
        info.applicationName,
        "0",
        n(session.processId),
        info.pinnedBy() ?? ""
      ]
    ]
  })
})

export const showServers = (s: AdminSnapshot): ResultSet => {
  const held = holders(s.sessions)
  return {
    columns: columns(`type user database state addr port:i4 local_addr local_port:i4 connect_time request_time
      wait:i4 wait_us:i4 close_needed:i4 ptr link remote_pid:i4 tls application_name prepared_statements:i4 id:i8`),
    rows: ordered(s.pools).flatMap((pool) =>
      pool.servers().map(({ server, state }) => {
        const socket = server.socket
        const client = held.get(server)
        const pid = server.backendPid
        return [
          "S",
          pool.settings.user,
          databaseName(pool),
          state,
          socket.remoteAddress ?? "",
          n(socket.remotePort ?? 0),
          socket.localAddress ?? "",
          n(socket.localPort ?? 0),
          timestamp(server.createdAt),
          timestamp(server.lastUsedAt),
          "0",
          "0",
          "0",
          hex(pid),
          client === undefined ? "" : hex(client.processId),
          n(pid),
          "",
          client?.handle.info?.applicationName ?? "",
          "0",
          n(pid)
        ]
      })
    )
  }
}

/**
 * Per database (`tenant/db`), summed over its pools. Times are in microseconds as in PgBouncer;
 * `xact_time` and `query_time` both measure how long transactions held a server (transaction mode;
 * Tidepool does not time single queries). `avg_*` counts are per second over the pools' lifetime.
 */
export const showStats = (s: AdminSnapshot): ResultSet => {
  const byDatabase = new Map<string, Array<TenantPool>>()
  for (const pool of ordered(s.pools)) {
    const name = databaseName(pool)
    byDatabase.set(name, [...(byDatabase.get(name) ?? []), pool])
  }
  return {
    columns: columns(`database total_server_assignment_count:i8 total_xact_count:i8 total_query_count:i8
      total_received:i8 total_sent:i8 total_xact_time:i8 total_query_time:i8 total_wait_time:i8
      avg_server_assignment_count:i8 avg_xact_count:i8 avg_query_count:i8 avg_recv:i8 avg_sent:i8
      avg_xact_time:i8 avg_query_time:i8 avg_wait_time:i8`),
    rows: [...byDatabase].map(([name, pools]) => {
      let checkouts = 0
      let xacts = 0
      let queries = 0
      let received = 0
      let sent = 0
      let xactUs = 0
      let waitUs = 0
      let waited = 0
      let ageS = 0
      for (const pool of pools) {
        const c = pool.counters
        checkouts += c.checkouts
        xacts += c.transactions
        queries += c.queries
        received += c.clientBytes
        sent += c.serverBytes
        xactUs += c.transactionTime.sumMs * 1000
        waitUs += c.checkoutWaitMs * 1000
        waited += c.checkouts
        ageS = Math.max(ageS, (s.now - pool.startedAt) / 1000)
      }
      const rate = (v: number) => n(ageS > 0 ? v / ageS : 0)
      const avg = (total: number, count: number) => n(count > 0 ? total / count : 0)
      return [
        name,
        n(checkouts),
        n(xacts),
        n(queries),
        n(received),
        n(sent),
        n(xactUs),
        n(xactUs),
        n(waitUs),
        rate(checkouts),
        rate(xacts),
        rate(queries),
        rate(received),
        rate(sent),
        avg(xactUs, xacts),
        avg(xactUs, xacts),
        avg(waitUs, waited)
      ]
    })
  }
}

/** One row per tenant database: the tenant's own, plus any other database a pool was opened for. */
export const showDatabases = (s: AdminSnapshot): ResultSet => {
  const rows: Array<Array<string | null>> = []
  for (const tenant of [...s.tenants].sort((a, b) => a.external_id.localeCompare(b.external_id))) {
    const pools = s.pools.filter((p) => p.settings.tenant === tenant.external_id)
    const databases = new Set([tenant.db_database, ...pools.map((p) => p.settings.database)])
    for (const database of databases) {
      const mine = pools.filter((p) => p.settings.database === database)
      rows.push([
        `${tenant.external_id}/${database}`,
        tenant.db_host,
        n(tenant.db_port),
        database,
        null,
        n(tenant.default_pool_size),
        n(s.config.minPoolSize),
        "0",
        n(s.config.serverLifetimeMs / 1000),
        tenant.users[0]?.mode_type ?? "transaction",
        n(0),
        n(mine.reduce((sum, p) => sum + p.total, 0)),
        n(tenant.default_max_clients),
        n(mine.reduce((sum, p) => sum + p.clients, 0)),
        mine.some((p) => p.isPaused) ? "1" : "0",
        tenant.banned_at !== undefined ? "1" : "0"
      ])
    }
  }
  return {
    columns: columns(`name host port:i4 database force_user pool_size:i4 min_pool_size:i4 reserve_pool:i4
      server_lifetime:i4 pool_mode max_connections:i4 current_connections:i4 max_client_connections:i4
      current_client_connections:i4 paused:i4 disabled:i4`),
    rows
  }
}

/** One row per configured user, named as clients log in (`user.tenant`). */
export const showUsers = (s: AdminSnapshot): ResultSet => ({
  columns: columns(`name pool_size:i4 reserve_pool_size:i4 pool_mode max_user_connections:i4
    current_connections:i4 max_user_client_connections:i4 current_client_connections:i4`),
  rows: [...s.tenants]
    .sort((a, b) => a.external_id.localeCompare(b.external_id))
    .flatMap((tenant) =>
      tenant.users.map((user) => {
        const pools = s.pools.filter(
          (p) => p.settings.tenant === tenant.external_id && p.settings.user === user.db_user
        )
        return [
          `${user.db_user_alias}.${tenant.external_id}`,
          n(userPoolSize(tenant, user)),
          "0",
          user.mode_type,
          "0",
          n(pools.reduce((sum, p) => sum + p.total, 0)),
          n(userMaxClients(tenant, user)),
          n(pools.reduce((sum, p) => sum + p.clients, 0))
        ]
      })
    )
})

const shown = (value: unknown): string => {
  if (Array.isArray(value)) return value.map((v: { name?: unknown }) => `${String(v.name)}=********`).join(",")
  return String(value)
}

/** Settings by their config-file key. Admin secrets are never shown, only the user names. */
export const showConfig = (s: AdminSnapshot): ResultSet => ({
  columns: columns("key value default changeable"),
  rows: settingFields.map((field) => {
    const spec = settings[field]
    return [spec.fileKey, shown(s.config[field]), shown(spec.default()), "no"]
  })
})

export const showVersion = (): ResultSet => ({
  columns: columns("version"),
  // Tools parse PgBouncer's version out of this string; the console speaks PgBouncer 1.21's vocabulary.
  rows: [[`Tidepool ${VERSION} (PgBouncer 1.21.0 compatible admin console)`]]
})

export const showLists = (s: AdminSnapshot): ResultSet => {
  const clients = s.sessions.filter((x) => x.handle.info !== undefined).length
  const servers = s.pools.reduce((sum, p) => sum + p.total, 0)
  return {
    columns: columns("list items:i4"),
    rows: [
      ["databases", n(showDatabases(s).rows.length)],
      ["users", n(s.tenants.reduce((sum, t) => sum + t.users.length, 0))],
      ["pools", n(s.pools.length)],
      ["free_clients", "0"],
      ["used_clients", n(clients)],
      ["login_clients", "0"],
      ["free_servers", "0"],
      ["used_servers", n(servers)],
      ["dns_names", "0"],
      ["dns_zones", "0"],
      ["dns_queries", "0"],
      ["dns_pending", "0"]
    ]
  }
}

/** `SHOW RUNNERS` (cluster mode): every runner in the store ledger, as the store has it now. */
export const showRunners = (rows: ReadonlyArray<RunnerRow>, leaseMs: number): ResultSet => ({
  columns: columns(
    "runner_id:i8 slot:i4 address started lease_age_ms:i8 state connected:i4 permits_held:i4 permits_wanted:i4 pools:i4 local:i4"
  ),
  rows: rows.map((r) => [
    r.runnerId,
    n(r.slot),
    r.address,
    r.started,
    n(r.leaseAgeMs),
    // Expired is not yet reclaimed: a reclaimer also needs the runner's store session gone
    // (docs/scale-out.md#lease-timing).
    r.leaseAgeMs > leaseMs ? "expired" : "live",
    r.connected ? "1" : "0",
    n(r.held),
    n(r.want),
    n(r.pools),
    r.local ? "1" : "0"
  ])
})

/** `SHOW PERMITS` (cluster mode): one row per pool and runner of the store ledger. */
export const showPermits = (rows: ReadonlyArray<PermitRow>): ResultSet => ({
  columns: columns("database user pool_mode runner_id:i8 slot:i4 held:i4 want:i4 keep:i4 press:i4"),
  rows: rows.map((r) => [
    `${r.tenant}/${r.database}`,
    r.user,
    r.mode,
    r.runnerId,
    n(r.slot),
    n(r.held),
    n(r.want),
    r.keep === null ? null : n(r.keep),
    r.press ? "1" : "0"
  ])
})
