import { monitorEventLoopDelay } from "node:perf_hooks"
import { Context, Effect, Layer, Option, Result } from "effect"
import type { Gathered } from "../cluster/HostViews.ts"
import { HostViews } from "../cluster/HostViews.ts"
import { type OwnView, type StoreViewError, storeViews } from "../cluster/StoreViews.ts"
import { LATENCY_BUCKETS_SECONDS, type LatencyHistogram, PoolRegistry, type TenantPool } from "../pool/index.ts"
import { TenantRegistry } from "../tenants/index.ts"
import { EventCounters, type LabelledCounts } from "./EventCounters.ts"
import { reclaimTotals } from "./MemoryReclaim.ts"

/** Prometheus text exposition format 0.0.4. */
export const PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

const escapeLabel = (value: string) => value.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n")

const labels = (names: ReadonlyArray<string>, values: ReadonlyArray<string>): string =>
  names.length === 0 ? "" : `{${names.map((name, i) => `${name}="${escapeLabel(values[i] ?? "")}"`).join(",")}}`

/** Builds one exposition: every metric's HELP and TYPE once, then its samples. */
class Exposition {
  private readonly lines: Array<string> = []

  family(name: string, type: "counter" | "gauge" | "histogram", help: string): void {
    this.lines.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`)
  }

  sample(name: string, labelText: string, value: number): void {
    this.lines.push(`${name}${labelText} ${Number.isFinite(value) ? value : 0}`)
  }

  text(): string {
    return `${this.lines.join("\n")}\n`
  }
}

const POOL_LABELS = ["tenant", "user", "mode", "db_name"] as const

/** Pools merged by label set (two aliases of one database user share a label set, and must share a series). */
const poolGroups = (pools: ReadonlyArray<TenantPool>) => {
  const groups = new Map<string, Array<TenantPool>>()
  for (const pool of pools) {
    const { tenant, user, mode, database } = pool.settings
    const key = labels(POOL_LABELS, [tenant, user, mode, database])
    const group = groups.get(key)
    if (group === undefined) groups.set(key, [pool])
    else group.push(pool)
  }
  return groups
}

interface PoolMetric {
  readonly name: string
  readonly type: "counter" | "gauge"
  readonly help: string
  readonly value: (pool: TenantPool) => number
}

/** docs/observability.md#metrics, Supavisor's names under `tidepool_` (see docs/observability.md for the mapping). */
const POOL_METRICS: ReadonlyArray<PoolMetric> = [
  {
    name: "tidepool_connections_active",
    type: "gauge",
    help: "Clients attached to the pool.",
    value: (p) => p.clients
  },
  {
    name: "tidepool_clients_waiting",
    type: "gauge",
    help: "Checkouts queued for a server (clients waiting).",
    value: (p) => p.stats.waiting
  },
  {
    name: "tidepool_pool_connections_checked_out",
    type: "gauge",
    help: "Server connections lent to clients (active).",
    value: (p) => p.stats.busy
  },
  {
    name: "tidepool_pool_connections_idle",
    type: "gauge",
    help: "Server connections idle in the pool.",
    value: (p) => p.stats.idle
  },
  {
    name: "tidepool_pool_connections_opening",
    type: "gauge",
    help: "Server connections being opened.",
    value: (p) => p.stats.opening
  },
  {
    name: "tidepool_db_connection_count",
    type: "gauge",
    help: "Server connections that may exist (open, opening or closing), bounded by the pool size.",
    value: (p) => p.total
  },
  {
    name: "tidepool_pool_size",
    type: "gauge",
    help: "The pool's cap on server connections.",
    value: (p) => p.settings.size
  },
  {
    name: "tidepool_pool_paused",
    type: "gauge",
    help: "1 while an admin PAUSE holds the pool.",
    value: (p) => (p.isPaused ? 1 : 0)
  },
  {
    name: "tidepool_pool_checkouts_total",
    type: "counter",
    help: "Servers lent to clients.",
    value: (p) => p.counters.checkouts
  },
  {
    name: "tidepool_pool_checkout_timeouts_total",
    type: "counter",
    help: "Checkouts that gave up waiting (ECHECKOUTTIMEOUT).",
    value: (p) => p.counters.checkoutTimeouts
  },
  {
    name: "tidepool_pool_pinned_clients",
    type: "gauge",
    help: "Transaction-mode clients pinned to their server by state that cannot move (advisory lock, temporary table, WITH HOLD cursor, SQL PREPARE).",
    value: (p) => p.counters.pinnedClients
  },
  {
    name: "tidepool_session_probes_total",
    type: "counter",
    help: "Transaction boundaries where a server was asked what a client left in its session (after SET, LISTEN, advisory locks, …).",
    value: (p) => p.counters.sessionProbes
  },
  {
    name: "tidepool_transactions_total",
    type: "counter",
    help: "Transactions completed (transaction mode: one per server release).",
    value: (p) => p.counters.transactions
  },
  {
    name: "tidepool_client_queries_count_total",
    type: "counter",
    help: "Query, Sync and FunctionCall messages clients sent (transaction mode).",
    value: (p) => p.counters.queries
  },
  {
    name: "tidepool_client_network_recv_bytes_total",
    type: "counter",
    help: "Bytes received from clients (and relayed to servers).",
    value: (p) => p.counters.clientBytes
  },
  {
    name: "tidepool_client_network_send_bytes_total",
    type: "counter",
    help: "Bytes received from servers (and relayed to clients).",
    value: (p) => p.counters.serverBytes
  },
  {
    name: "tidepool_db_handler_started_total",
    type: "counter",
    help: "Server connections opened.",
    value: (p) => p.counters.serverConnects
  },
  {
    name: "tidepool_db_connect_failures_total",
    type: "counter",
    help: "Server connection attempts that failed.",
    value: (p) => p.counters.serverConnectFailures
  },
  {
    name: "tidepool_prepared_statements_prepared_total",
    type: "counter",
    help: "Named statements prepared on a server for the first time.",
    value: (p) => p.counters.statementsPrepared
  },
  {
    name: "tidepool_prepared_statements_reprepared_total",
    type: "counter",
    help: "Named statements prepared again on a server that lacked them.",
    value: (p) => p.counters.statementsReprepared
  },
  {
    name: "tidepool_prepared_statements_evicted_count_total",
    type: "counter",
    help: "Named statements closed to keep a server within its statement cache.",
    value: (p) => p.counters.statementsEvicted
  }
]

/** Adds one histogram's samples; `zeros` are observations of 0 s not stored in the histogram. */
const histogram = (
  out: Exposition,
  name: string,
  labelNames: ReadonlyArray<string>,
  labelValues: ReadonlyArray<string>,
  parts: ReadonlyArray<{ readonly histogram: LatencyHistogram; readonly zeros: number }>
) => {
  let cumulative = 0
  let sumMs = 0
  let count = 0
  for (const part of parts) {
    cumulative += part.zeros
    sumMs += part.histogram.sumMs
    count += part.histogram.count + part.zeros
  }
  const names = [...labelNames, "le"]
  LATENCY_BUCKETS_SECONDS.forEach((bound, i) => {
    for (const part of parts) cumulative += part.histogram.counts[i] ?? 0
    out.sample(`${name}_bucket`, labels(names, [...labelValues, String(bound)]), cumulative)
  })
  out.sample(`${name}_bucket`, labels(names, [...labelValues, "+Inf"]), count)
  out.sample(`${name}_sum`, labels(labelNames, labelValues), sumMs / 1000)
  out.sample(`${name}_count`, labels(labelNames, labelValues), count)
}

const counted = (
  out: Exposition,
  name: string,
  help: string,
  labelNames: ReadonlyArray<string>,
  counts: LabelledCounts,
  tenant: string | undefined
) => {
  out.family(name, "counter", help)
  for (const [key, value] of counts) {
    const values = key.split("\u0000")
    if (tenant !== undefined && values[0] !== tenant) continue
    out.sample(name, labels(labelNames, values), value)
  }
}

const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*/

/**
 * Worker mode (docs/observability.md#worker-mode): one exposition of the host from each worker's,
 * every sample labelled with its `worker` (so no two series are alike; sums are PromQL's
 * `sum without (worker)`), each family's HELP and TYPE once and its samples together, as the text
 * format requires; then the supervisor's view of the workers.
 */
export const mergeExpositions = (gathered: Gathered, tenant?: string): string => {
  interface Family {
    readonly head: Array<string>
    readonly samples: Array<string>
  }
  const families = new Map<string, Family>()
  const familyOf = (name: string): Family => {
    let f = families.get(name)
    if (f === undefined) {
      f = { head: [], samples: [] }
      families.set(name, f)
    }
    return f
  }
  for (const part of gathered.parts) {
    if (typeof part.data !== "string") continue
    const label = `worker="${part.worker}"`
    let current: Family | undefined
    for (const line of part.data.split("\n")) {
      if (line === "") continue
      if (line.startsWith("# ")) {
        const [, kind, name] = line.split(" ", 3)
        if (name === undefined) continue
        current = familyOf(name)
        if ((kind === "HELP" || kind === "TYPE") && current.head.length < 2 && !current.head.includes(line))
          current.head.push(line)
        continue
      }
      const name = line.match(METRIC_NAME)?.[0]
      if (name === undefined || current === undefined) continue
      const rest = line.slice(name.length)
      current.samples.push(
        rest.startsWith("{}")
          ? `${name}{${label}}${rest.slice(2)}`
          : rest.startsWith("{")
            ? `${name}{${label},${rest.slice(1)}`
            : `${name}{${label}}${rest}`
      )
    }
  }
  const lines: Array<string> = []
  for (const f of families.values()) lines.push(...f.head, ...f.samples)
  if (tenant === undefined && gathered.workers.length > 0) {
    const answered = new Set(gathered.parts.filter((p) => typeof p.data === "string").map((p) => p.worker))
    const perWorker = (name: string, type: string, help: string, value: (w: Gathered["workers"][number]) => number) => {
      lines.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`)
      for (const w of gathered.workers) lines.push(`${name}{worker="${w.worker}"} ${value(w)}`)
    }
    perWorker("tidepool_worker_up", "gauge", "1 if the worker answered this scrape.", (w) =>
      answered.has(w.worker) ? 1 : 0
    )
    perWorker(
      "tidepool_worker_restarts_total",
      "counter",
      "Times the supervisor restarted the worker after it died or hung.",
      (w) => w.restarts
    )
    perWorker(
      "tidepool_worker_hangs_total",
      "counter",
      "Times the worker was killed for missing its heartbeat (TIDEPOOL_WORKER_HANG_TIMEOUT).",
      (w) => w.hangs
    )
    perWorker(
      "tidepool_worker_heartbeat_age_seconds",
      "gauge",
      "Time since the worker's last heartbeat reached the supervisor, in seconds.",
      (w) => (w.beatAgeMs ?? 0) / 1000
    )
  }
  return `${lines.join("\n")}\n`
}

/**
 * Cluster mode (docs/observability.md#cluster-mode): this host's runner as the store ledger has it,
 * read at scrape time. Each host exports only its own runner, so a sum over hosts in PromQL is the
 * whole ledger (the store is never counted twice). `own` is undefined when the store could not be
 * read: then only `tidepool_cluster_store_up 0`, every family still declared.
 */
const clusterSeries = (out: Exposition, own: OwnView | undefined, tenant: string | undefined) => {
  if (tenant === undefined) {
    out.family(
      "tidepool_cluster_store_up",
      "gauge",
      "1 if this scrape read this host's runner from the tenant store (cluster mode), within 2 s."
    )
    out.sample("tidepool_cluster_store_up", "", own === undefined ? 0 : 1)
    out.family(
      "tidepool_cluster_runner_registered",
      "gauge",
      "1 if the store ledger has this host's runner; 0 after another runner reclaimed it (until it registers again)."
    )
    if (own !== undefined) out.sample("tidepool_cluster_runner_registered", "", own.registered ? 1 : 0)
    out.family(
      "tidepool_cluster_store_connected",
      "gauge",
      "1 if this host's runner has its store session, as the store sees it (it holds its runner lock)."
    )
    if (own?.registered === true) out.sample("tidepool_cluster_store_connected", "", own.connected ? 1 : 0)
    out.family(
      "tidepool_cluster_lease_age_seconds",
      "gauge",
      "Time since this host's runner last renewed its lease, by the store's clock, in seconds."
    )
    if (own?.leaseAgeMs !== undefined) out.sample("tidepool_cluster_lease_age_seconds", "", own.leaseAgeMs / 1000)
  }
  // Rows with one label set (a JIT pool per token) are added up, as pool metrics are.
  const byLabels = new Map<string, { held: number; want: number; keep: number | null; press: number }>()
  for (const row of own?.permits ?? []) {
    if (tenant !== undefined && row.tenant !== tenant) continue
    const key = labels(POOL_LABELS, [row.tenant, row.user, row.mode, row.database])
    const into = byLabels.get(key) ?? { held: 0, want: 0, keep: null, press: 0 }
    into.held += row.held
    into.want += row.want
    if (row.keep !== null) into.keep = (into.keep ?? 0) + row.keep
    if (row.press) into.press = 1
    byLabels.set(key, into)
  }
  const family = (
    name: string,
    help: string,
    value: (v: { held: number; want: number; keep: number | null; press: number }) => number | null
  ) => {
    out.family(name, "gauge", help)
    for (const [labelText, v] of byLabels) {
      const x = value(v)
      if (x !== null) out.sample(name, labelText, x)
    }
  }
  family(
    "tidepool_cluster_permits_held",
    "Permits of the pool this host's runner holds in the store ledger (sum over hosts: the pool's servers).",
    (v) => v.held
  )
  family(
    "tidepool_cluster_permits_wanted",
    "Permits this host's runner asks the store ledger for beyond those it holds (its waiting clients).",
    (v) => v.want
  )
  family(
    "tidepool_cluster_permits_keep",
    "The share the ledger tells this host to keep while another host's want is unmet (absent: no directive).",
    (v) => v.keep
  )
  family(
    "tidepool_cluster_permits_pressed",
    "1 while the ledger presses this host to close idle servers its clients leave unused for 0.5 s (it wants nothing while others wait).",
    (v) => v.press
  )
}

/**
 * Renders Prometheus metrics from the live pools and the event counters at scrape time: nothing is
 * kept per series between scrapes, so a pool that is gone (or a deleted tenant's counters, pruned
 * here) simply disappears from the next exposition.
 */
export class Metrics extends Context.Service<Metrics>()("tidepool/Metrics", {
  make: Effect.gen(function* () {
    const registry = yield* PoolRegistry
    const tenants = yield* TenantRegistry
    const events = yield* EventCounters
    const views = Option.getOrUndefined(yield* Effect.serviceOption(HostViews))
    const ledger = yield* storeViews
    const loopDelay = yield* Effect.acquireRelease(
      Effect.sync(() => {
        // A sample every 100 ms: at 10 ms its timer alone cost an idle process about 7 ms of CPU
        // a second on this class of VM (docs/benchmarks.md, "idle CPU"). A stall still shows in full:
        // the sample due during it reports the whole delay.
        const h = monitorEventLoopDelay({ resolution: 100 })
        h.enable()
        return h
      }),
      (h) => Effect.sync(() => h.disable())
    )

    const processMetrics = (out: Exposition) => {
      const memory = process.memoryUsage()
      const cpu = process.cpuUsage()
      const gauge = (name: string, help: string, value: number, type: "gauge" | "counter" = "gauge") => {
        out.family(name, type, help)
        out.sample(name, "", value)
      }
      gauge(
        "process_cpu_seconds_total",
        "User and system CPU time spent, in seconds.",
        (cpu.user + cpu.system) / 1e6,
        "counter"
      )
      gauge("process_resident_memory_bytes", "Resident memory size in bytes.", memory.rss)
      gauge(
        "process_start_time_seconds",
        "Start time of the process since the Unix epoch, in seconds.",
        Math.round(Date.now() / 1000 - process.uptime())
      )
      gauge("nodejs_heap_size_used_bytes", "V8 heap in use, in bytes.", memory.heapUsed)
      gauge("nodejs_heap_size_total_bytes", "V8 heap allocated, in bytes.", memory.heapTotal)
      gauge(
        "nodejs_external_memory_bytes",
        "Memory of C++ objects bound to JavaScript (buffers), in bytes.",
        memory.external
      )
      // Event-loop delay since the previous full scrape: how long a client's bytes could wait before
      // the pooler looked at them.
      gauge(
        "nodejs_eventloop_lag_mean_seconds",
        "Mean event-loop delay since the previous scrape, in seconds.",
        loopDelay.count > 0 ? loopDelay.mean / 1e9 : 0
      )
      gauge(
        "nodejs_eventloop_lag_p99_seconds",
        "99th percentile event-loop delay since the previous scrape, in seconds.",
        loopDelay.count > 0 ? loopDelay.percentile(99) / 1e9 : 0
      )
      gauge(
        "nodejs_eventloop_lag_max_seconds",
        "Largest event-loop delay since the previous scrape, in seconds.",
        loopDelay.count > 0 ? loopDelay.max / 1e9 : 0
      )
      loopDelay.reset()
      // TIDEPOOL_MEMORY_RECLAIM (docs/operations.md#memory-after-a-burst): 0 while it is off.
      out.family(
        "tidepool_memory_reclaim_steps_total",
        "counter",
        "Steps of the memory reclaim: collections it ran while quiet (minor, major) and heaps V8 gave back (reclaimed)."
      )
      for (const kind of ["minor", "major", "reclaimed"] as const)
        out.sample("tidepool_memory_reclaim_steps_total", labels(["kind"], [kind]), reclaimTotals[kind])
      gauge(
        "tidepool_memory_reclaim_pause_seconds_total",
        "Event-loop time spent in the collections the memory reclaim ran, in seconds.",
        reclaimTotals.pauseSeconds,
        "counter"
      )
      const resources = process.getActiveResourcesInfo()
      gauge(
        "tidepool_open_sockets",
        "Open TCP sockets (clients, servers and HTTP).",
        resources.filter((r) => r === "TCPSocketWrap").length
      )
    }

    /** The exposition for every tenant, or only one tenant's series (`/metrics/:tenant`, no process metrics). */
    const render = (tenant?: string, cluster?: Result.Result<OwnView, StoreViewError>): string => {
      events.prune()
      const out = new Exposition()
      const pools = registry.all().filter((p) => tenant === undefined || p.settings.tenant === tenant)
      const groups = poolGroups(pools)
      for (const metric of POOL_METRICS) {
        out.family(metric.name, metric.type, metric.help)
        for (const [labelText, group] of groups) {
          let value = 0
          for (const pool of group) value += metric.value(pool)
          out.sample(metric.name, labelText, value)
        }
      }
      out.family(
        "tidepool_pool_checkout_duration_seconds",
        "histogram",
        "Time a checkout waited for a server, in seconds."
      )
      for (const group of groups.values()) {
        const { tenant: t, user, mode, database } = group[0]!.settings
        histogram(
          out,
          "tidepool_pool_checkout_duration_seconds",
          POOL_LABELS,
          [t, user, mode, database],
          group.map((p) => ({
            histogram: p.counters.checkoutWait,
            zeros: p.counters.checkouts - p.counters.checkoutsWaited
          }))
        )
      }
      for (const [name, help, pick] of [
        [
          "tidepool_client_connection_duration_seconds",
          "Time from a client's TCP connect to its first ReadyForQuery (TLS, authentication, attach), in seconds.",
          (p: TenantPool) => p.counters.clientConnect
        ],
        [
          "tidepool_client_connection_lifetime_seconds",
          "How long clients stayed connected, in seconds (observed when they leave).",
          (p: TenantPool) => p.counters.clientLifetime
        ]
      ] as const) {
        out.family(name, "histogram", help)
        for (const group of groups.values()) {
          const { tenant: t, user, mode, database } = group[0]!.settings
          histogram(
            out,
            name,
            POOL_LABELS,
            [t, user, mode, database],
            group.map((p) => ({ histogram: pick(p), zeros: 0 }))
          )
        }
      }
      out.family(
        "tidepool_client_query_duration_seconds",
        "histogram",
        "Time a transaction held its server (transaction mode), in seconds."
      )
      for (const group of groups.values()) {
        const { tenant: t, user, mode, database } = group[0]!.settings
        if (mode !== "transaction") continue
        histogram(
          out,
          "tidepool_client_query_duration_seconds",
          POOL_LABELS,
          [t, user, mode, database],
          group.map((p) => ({ histogram: p.counters.transactionTime, zeros: 0 }))
        )
      }
      counted(
        out,
        "tidepool_client_errors_total",
        "Errors sent to clients (or logged for them), by code.",
        ["tenant", "code"],
        events.errors,
        tenant
      )
      counted(
        out,
        "tidepool_client_joins_ok_total",
        "Successful client logins, by method.",
        ["tenant", "user", "method"],
        events.joinsOk,
        tenant
      )
      counted(
        out,
        "tidepool_client_joins_fail_total",
        "Refused client logins, by method and reason (error code).",
        ["tenant", "method", "reason"],
        events.joinsFail,
        tenant
      )
      if (tenant === undefined) {
        const { admission } = events
        out.family(
          "tidepool_client_connections",
          "gauge",
          "Client connections open on both ports, logged in or not (TIDEPOOL_MAX_CLIENT_CONNECTIONS caps them)."
        )
        out.sample("tidepool_client_connections", "", admission.open)
        out.family(
          "tidepool_client_handshakes",
          "gauge",
          "Client connections accepted and not yet authenticated (TIDEPOOL_MAX_HANDSHAKES caps them)."
        )
        out.sample("tidepool_client_handshakes", "", admission.handshaking)
        out.family(
          "tidepool_client_connections_refused_total",
          "counter",
          "Connections refused as soon as they were accepted, by the limit that refused them."
        )
        out.sample(
          "tidepool_client_connections_refused_total",
          '{reason="max_client_connections"}',
          admission.refusedClients
        )
        out.sample(
          "tidepool_client_connections_refused_total",
          '{reason="max_handshakes"}',
          admission.refusedHandshakes
        )
        const active = new Set(registry.all().map((p) => p.settings.tenant))
        out.family("tidepool_tenants_active", "gauge", "Tenants with at least one live pool.")
        out.sample("tidepool_tenants_active", "", active.size)
        out.family("tidepool_tenants_configured", "gauge", "Tenants this node serves.")
        out.sample("tidepool_tenants_configured", "", tenants.all().length)
        processMetrics(out)
      }
      if (cluster !== undefined) clusterSeries(out, Result.isSuccess(cluster) ? cluster.success : undefined, tenant)
      return out.text()
    }

    views?.provide("metrics", (tenant) => render(tenant === "" ? undefined : tenant))

    /**
     * What `/metrics` answers: this process's exposition, or in worker mode the whole host's, every
     * series labelled with its worker.
     */
    const scrape = (tenant?: string): Effect.Effect<string> =>
      views === undefined
        ? ledger === undefined
          ? Effect.sync(() => render(tenant))
          : Effect.map(Effect.result(ledger.own), (own) => render(tenant, own))
        : Effect.map(
            Effect.all(
              [
                views.gather(tenant === undefined ? "metrics" : `metrics:${tenant}`),
                ledger === undefined ? Effect.succeed(undefined) : Effect.result(ledger.own)
              ],
              { concurrency: 2 }
            ),
            ([gathered, own]) => {
              // The supervisor going away answers nothing: this worker's own view is better than none.
              const text = gathered.parts.length === 0 ? render(tenant) : mergeExpositions(gathered, tenant)
              if (own === undefined) return text
              // The host's runner is the supervisor: its rows are the host's, exported once (not per
              // worker, which would count them once per worker in a sum over hosts).
              const out = new Exposition()
              clusterSeries(out, Result.isSuccess(own) ? own.success : undefined, tenant)
              return text + out.text()
            }
          )

    return { render, scrape } as const
  })
}) {
  static readonly layer = Layer.effect(this, this.make)
}
