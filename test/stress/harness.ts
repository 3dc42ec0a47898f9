/**
 * The differential stress harness: many clients run seeded scripts (script.ts) through Tidepool on a
 * small transaction-mode pool and, at the same time, directly against PostgreSQL; then
 *
 * 1. each client must have observed exactly the same backend messages both ways (differences.ts);
 * 2. every client must finish before the run's deadline (otherwise: a hang report naming each stuck
 *    client, what it last sent and received);
 * 3. the pool must never have more than `pool_size` servers (the pool's own count, checked on every
 *    message a pooled client receives, and PostgreSQL's, sampled from pg_stat_activity);
 * 4. afterwards every pooled server must be idle, with no transaction open and nothing a client left
 *    behind (settings, SQL-level prepared statements, temporary tables, cursors, listens, advisory
 *    locks), and every table must hold the same rows both ways.
 *
 * One PostgreSQL serves both sides: database `direct` for the direct clients, `pooled<P>` behind the
 * Tidepool tenant `stress<P>` (pool size P). Each run creates its tables in a fresh schema in both.
 */
import { Effect } from "effect"
import fc from "fast-check"
import pg from "pg"
import { PoolRegistry, type TenantPool } from "../../src/pool/index.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { type RunningTidepool, startTidepool } from "../support/tidepool.ts"
import { DIFFERENCES, normalizeError, normalizeStep } from "./differences.ts"
import { Epochs } from "./epochs.ts"
import {
  type Act,
  type ClientScript,
  encode,
  type Feature,
  type Gate,
  gateText,
  type RenderContext,
  runScripts,
  SHARED_TABLES,
  scriptText,
  stepText,
  substitute
} from "./script.ts"
import { Closed, type Endpoint, Stuck, sendCancel, WireClient } from "./wire.ts"

const PASSWORD = "stress-secret"
const USER = "app"

export interface EnvOptions {
  /** Pool sizes to serve (one tenant, and one pooled database, each). */
  readonly pools: ReadonlyArray<number>
  /** Tidepool's per-server statement cache: small, so that eviction happens under stress. */
  readonly cacheSize?: number
}

export interface RunOptions {
  readonly clients: number
  readonly pool: number
  /** Intents per client script, on average. */
  readonly length: number
  /** Every client must be done by then (ms from the start of the run). */
  readonly deadlineMs: number
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms))

/** Retries `probe` until it returns a value, or throws `failure()` at the deadline. Polling, bounded. */
const poll = async <A>(
  deadline: number,
  probe: () => Promise<A | undefined>,
  failure: () => Promise<string> | string
): Promise<A> => {
  for (;;) {
    const value = await probe()
    if (value !== undefined) return value
    if (Date.now() >= deadline) throw new Error(await failure())
    await sleep(10)
  }
}

let schemas = 0

const SIDES = ["direct", "pooled"] as const

/** The application_name of the harness's own direct connections, which pg_stat_activity checks leave out. */
const HARNESS = "stress-harness"

export class StressEnv {
  private constructor(
    readonly db: PostgresServer,
    readonly tidepool: RunningTidepool,
    /** Superuser connections to `postgres`, for pg_stat_activity (cancels poll concurrently). */
    private readonly monitor: pg.Pool,
    /** A second one for the sampler, so it never waits behind a cancel's polling. */
    private readonly sampler: pg.Client
  ) {}

  static async start(options: EnvOptions): Promise<StressEnv> {
    const db = await startPostgres({
      roles: [{ name: USER, password: PASSWORD }],
      settings: { max_connections: "300" }
    })
    const clients: Array<pg.Client> = []
    let tidepool: RunningTidepool | undefined
    try {
      for (const name of ["direct", ...options.pools.map((p) => `pooled${p}`)]) {
        await db.query(`CREATE DATABASE ${name} OWNER ${USER}`)
      }
      tidepool = await startTidepool({
        tenants: options.pools.map((p) => ({
          external_id: `stress${p}`,
          db_host: db.host,
          db_port: db.port,
          db_database: `pooled${p}`,
          users: [
            // A checkout that waits this long is a hang, and is reported as one, with everyone's state.
            { db_user: USER, db_password: PASSWORD, pool_size: p, pool_checkout_timeout: 600_000 }
          ]
        })),
        config: { preparedCacheSize: options.cacheSize ?? 20 }
      })
      const sampler = new pg.Client({ connectionString: db.url() })
      sampler.on("error", () => {})
      await sampler.connect()
      clients.push(sampler)
      const monitor = new pg.Pool({ connectionString: db.url(), max: 4 })
      monitor.on("error", () => {})
      return new StressEnv(db, tidepool, monitor, sampler)
    } catch (error) {
      for (const c of clients) await c.end().catch(() => {})
      await tidepool?.stop()
      await db.stop()
      throw error
    }
  }

  async stop(): Promise<void> {
    await this.monitor.end().catch(() => {})
    await this.sampler.end().catch(() => {})
    await this.tidepool.stop()
    await this.db.stop()
  }

  /** Where a side's clients log in. */
  endpoint(side: "direct" | "pooled", pool: number): Endpoint {
    return side === "direct"
      ? { port: this.db.port, user: USER, password: PASSWORD, database: "direct" }
      : {
          port: this.tidepool.transactionPort,
          user: `${USER}.stress${pool}`,
          password: PASSWORD,
          database: `pooled${pool}`
        }
  }

  /** The pooled database of `pool`, directly (for setting up what goes through Tidepool later). */
  directUrl(pool: number): string {
    // Named like the harness's other direct connections, which the pool-size checks leave out.
    return `postgresql://${USER}:${PASSWORD}@127.0.0.1:${this.db.port}/pooled${pool}?application_name=${HARNESS}`
  }

  /** node-postgres connection string for a side (drivers.ts). */
  url(side: "direct" | "pooled", pool: number): string {
    const e = this.endpoint(side, pool)
    return `postgresql://${encodeURIComponent(e.user)}:${PASSWORD}@127.0.0.1:${e.port}/${e.database}`
  }

  /** The Tidepool pool serving `stress<pool>`, once a client has made it. */
  tenantPool(pool: number): TenantPool | undefined {
    return this.tidepool.runtime.runSync(
      Effect.map(PoolRegistry, (r) =>
        r.all().find((p) => p.settings.tenant === `stress${pool}` && p.settings.mode === "transaction")
      )
    )
  }

  /** A fresh schema (never used before in this process) with `clients` clients' tables in both databases. */
  async newSchema(clients: number, pool: number): Promise<string> {
    const schema = `r${++schemas}`
    await this.createSchema(schema, clients, pool)
    return schema
  }

  private async createSchema(schema: string, clients: number, pool: number): Promise<void> {
    const ddl = [`CREATE SCHEMA ${schema}`]
    for (let i = 0; i < clients; i++) {
      ddl.push(`CREATE TABLE ${schema}.t${i} (id int PRIMARY KEY, v int NOT NULL, s text)`)
      ddl.push(`INSERT INTO ${schema}.t${i} SELECT g, g * 10, 'row' || g FROM generate_series(0, 5) g`)
      ddl.push(`CREATE TABLE ${schema}.d${i} (id int PRIMARY KEY, v int)`)
      ddl.push(`INSERT INTO ${schema}.d${i} VALUES (1, 10), (2, 20)`)
    }
    for (let i = 0; i < SHARED_TABLES; i++) {
      ddl.push(`CREATE TABLE ${schema}.s${i} (id int PRIMARY KEY, x integer)`)
      ddl.push(`INSERT INTO ${schema}.s${i} SELECT g, g FROM generate_series(1, 3) g`)
    }
    await Promise.all(SIDES.map((side) => this.asOwner(side, pool, ddl.join(";\n"))))
  }

  async dropSchema(schema: string, pool: number): Promise<void> {
    await Promise.all(SIDES.map((side) => this.asOwner(side, pool, `DROP SCHEMA IF EXISTS ${schema} CASCADE`)))
  }

  /** Runs SQL directly on a side's database (never through Tidepool) as the clients' role. */
  async asOwner<T extends pg.QueryResultRow>(side: "direct" | "pooled", pool: number, sql: string): Promise<Array<T>> {
    const e = this.endpoint("direct", pool)
    const database = side === "direct" ? "direct" : `pooled${pool}`
    const c = new pg.Client({
      host: "127.0.0.1",
      port: e.port,
      user: USER,
      password: PASSWORD,
      database,
      application_name: HARNESS
    })
    c.on("error", () => {})
    await c.connect()
    try {
      const result = (await c.query<T>(sql)) as pg.QueryResult<T> | Array<pg.QueryResult<T>>
      return Array.isArray(result) ? (result.at(-1)?.rows ?? []) : result.rows
    } finally {
      await c.end().catch(() => {})
    }
  }

  /** Waits until the query carrying `marker` sleeps in pg_sleep on `database` (a cancel then surely lands in it). */
  async untilSleeping(database: string, marker: string, deadline: number): Promise<void> {
    for (;;) {
      const { rows } = await this.monitor.query(
        "SELECT 1 FROM pg_stat_activity WHERE datname = $1 AND wait_event = 'PgSleep' AND query LIKE $2",
        [database, `%${marker} */%`]
      )
      if (rows.length > 0) return
      if (Date.now() >= deadline) throw new Stuck(`the query marked ${marker} to sleep on the server`)
      await sleep(10)
    }
  }

  /** Client backends of a database, from PostgreSQL's point of view. */
  async backends(database: string, client: pg.Client | pg.Pool = this.monitor) {
    const { rows } = await client.query<{
      pid: number
      state: string | null
      query: string
      xact: boolean
      app: string
      since: string
    }>(
      "SELECT pid, state, left(query, 120) AS query, xact_start IS NOT NULL AS xact, application_name AS app, " +
        "to_char(backend_start, 'HH24:MI:SS.MS') AS since FROM pg_stat_activity " +
        "WHERE datname = $1 AND backend_type = 'client backend' AND application_name <> $2 ORDER BY pid",
      [database, HARNESS]
    )
    return rows
  }

  // ---- one run ----------------------------------------------------------------------------------

  /** Runs the scripts both ways and checks everything; returns the problems found (none: a pass). */
  async run(scripts: ReadonlyArray<ClientScript>, options: RunOptions): Promise<Array<string>> {
    const pool = options.pool
    const schema = await this.newSchema(scripts.length, pool)
    const problems: Array<string> = []
    const started = Date.now()
    const deadline = started + options.deadlineMs
    const capacity = this.watchCapacity(pool)
    try {
      const [direct, pooled] = await Promise.all(
        SIDES.map((side) => {
          const epochs = new Epochs(scripts)
          return Promise.all(
            scripts.map((script, client) =>
              this.runClient(
                side,
                script,
                { schema, client },
                pool,
                deadline,
                epochs,
                side === "pooled" ? capacity.onMessage : undefined
              )
            )
          )
        })
      )
      const stuck = [...direct!, ...pooled!].filter((r) => r.stuck !== undefined)
      if (stuck.length > 0) {
        problems.push(
          `HANG: ${stuck.length} client(s) not done ${options.deadlineMs} ms after the start` +
            ` (pool: ${this.poolState(pool)})\n${stuck.map((r) => r.stuck).join("\n")}`
        )
      }
      for (let i = 0; i < scripts.length; i++) {
        const mismatch = compareClient(i, scripts, direct![i]!, pooled![i]!)
        if (mismatch !== undefined) problems.push(mismatch)
      }
      if (stuck.length === 0) problems.push(...(await this.afterwards(pool, { schema, clients: scripts.length })))
    } finally {
      problems.push(...(await capacity.stop()))
      if (problems.length === 0) await this.dropSchema(schema, pool)
    }
    return problems
  }

  /** The pool's counts, for reports. */
  poolState(pool: number): string {
    const p = this.tenantPool(pool)
    if (p === undefined) return "not started"
    const s = p.stats
    return `idle ${s.idle}, busy ${s.busy}, opening ${s.opening}, counted against the cap ${p.total}, waiting ${s.waiting}, clients ${s.clients}`
  }

  /**
   * The pool-size invariant, watched two ways while the run lasts: the pool's own count of servers
   * (idle, lent or opening) on every message a pooled client receives, and PostgreSQL's count of
   * backends on the pooled database, sampled. (The pool's `total` is not used: it also counts, on
   * purpose, the cancel a discarded server's statement gets, so it may exceed the servers.) A
   * backend whose server the pool held and has since closed is not counted: PostgreSQL lists it
   * until its process has noticed the closed socket and exited, which on a loaded machine can be
   * after the pool's replacement has logged in (a CI run saw that once).
   */
  watchCapacity(pool: number) {
    const problems: Array<string> = []
    let tenantPool: TenantPool | undefined
    let running = true
    // Backend pids of the servers the pool has held, and of those it holds now.
    const everHeld = new Set<number>()
    const held = () => {
      const now = new Set<number>()
      for (const { server } of tenantPool?.servers() ?? []) {
        if (server.backendPid === 0) continue
        now.add(server.backendPid)
        everHeld.add(server.backendPid)
      }
      return now
    }
    const onMessage = () => {
      tenantPool ??= this.tenantPool(pool)
      if (tenantPool === undefined || problems.length > 0) return
      held()
      const s = tenantPool.stats
      if (s.idle + s.busy + s.opening > pool) {
        problems.push(
          `POOL SIZE: the pool had ${s.idle + s.busy + s.opening} servers (pool_size ${pool}): ${this.poolState(pool)}`
        )
      }
    }
    const sampling = (async () => {
      let worst: Awaited<ReturnType<StressEnv["backends"]>> = []
      while (running) {
        onMessage()
        const all = await this.backends(`pooled${pool}`, this.sampler).catch(() => [])
        const holds = held()
        const rows = all.filter((row) => holds.has(row.pid) || !everHeld.has(row.pid))
        if (rows.length > worst.length) worst = rows
        await sleep(20)
      }
      if (worst.length > pool) {
        problems.push(
          `POOL SIZE: PostgreSQL had ${worst.length} backends on pooled${pool} (pool_size ${pool}):\n` +
            worst
              .map((r) => `    pid ${r.pid} (${JSON.stringify(r.app)}, since ${r.since}) ${r.state}: ${r.query}`)
              .join("\n")
        )
      }
    })()
    return {
      onMessage,
      stop: async () => {
        running = false
        await sampling
        return problems
      }
    }
  }

  private async runClient(
    side: "direct" | "pooled",
    script: ClientScript,
    ctx: RenderContext,
    pool: number,
    deadline: number,
    epochs: Epochs,
    onMessage: (() => void) | undefined
  ): Promise<ClientResult> {
    const marks: Array<number> = []
    let client: WireClient | undefined
    let stepIndex = -1
    let done = 0
    try {
      client = await WireClient.connect(this.endpoint(side, pool), normalizeError, deadline)
      client.onMessage = onMessage
      for (const [i, step] of script.steps.entries()) {
        stepIndex = i
        marks.push(client.log.length)
        if (step.gate !== undefined) await epochs.enter(step.gate, ctx.client, deadline)
        await this.perform(side, pool, client, step.act, ctx, deadline)
        if (step.gate !== undefined) epochs.done(step.gate, ctx.client)
        done = i + 1
      }
      return { log: client.log, marks }
    } catch (error) {
      epochs.retire(script.steps.slice(done), ctx.client)
      const log = client?.log ?? []
      if (error instanceof Closed) {
        log.push("<connection closed>")
        return { log, marks }
      }
      client?.socket.destroy()
      if (error instanceof Stuck) {
        const step = script.steps[stepIndex]
        return {
          log,
          marks,
          stuck:
            `  client ${ctx.client} (${side}), ${step === undefined ? "login" : `step ${stepIndex} ${JSON.stringify(step.label)}`}: waiting for ${error.waitingFor}\n` +
            `    last sent:     ${(client?.sent ?? []).join(" | ") || "nothing"}\n` +
            `    last received: ${(client?.received ?? []).join(" | ") || "nothing"}`
        }
      }
      throw error
    }
  }

  private async perform(
    side: "direct" | "pooled",
    pool: number,
    client: WireClient,
    act: Act,
    ctx: RenderContext,
    deadline: number
  ): Promise<void> {
    const offsets = (data: Buffer, cuts: ReadonlyArray<number>) => cuts.map((c) => Math.floor(c * data.length))
    switch (act.a) {
      case "send": {
        const data = encode(act.frames, ctx)
        await client.write(data, offsets(data, act.cuts))
        await client.untilReady(act.ready, deadline)
        return
      }
      case "flush":
        await client.write(encode(act.frames, ctx))
        await client.until(act.until, deadline)
        return
      case "copyIn": {
        await client.write(encode(act.start, ctx))
        const first = await client.until("GZ", deadline)
        if (first === "G") {
          const data = encode(act.data, ctx)
          await client.write(data, offsets(data, act.cuts))
          if (act.vanish) client.vanish(Buffer.alloc(0), 0)
          else await client.untilReady(1, deadline)
        } else if (act.vanish) client.vanish(Buffer.alloc(0), 0)
        return
      }
      case "cancel": {
        await client.write(encode(act.frames, ctx))
        const database = side === "direct" ? "direct" : `pooled${pool}`
        await this.untilSleeping(database, substitute(act.marker, ctx), deadline)
        const port = side === "direct" ? this.db.port : this.tidepool.transactionPort
        await sendCancel(port, client.pid, client.secret, deadline)
        await client.untilReady(act.ready, deadline)
        return
      }
      case "vanish": {
        const data = encode(act.frames, ctx)
        client.vanish(data, Math.floor(act.keep * data.length))
        return
      }
      case "terminate":
        client.terminate(encode(act.frames, ctx))
        return
    }
  }

  /**
   * After every client is gone: the pooled servers settle (every backend on the pooled database is a
   * server of the pool, idle, no transaction open), nothing of a client is left on any of them, and
   * each table holds the same rows both ways.
   */
  async afterwards(
    pool: number,
    tables?: { readonly schema: string; readonly clients: number }
  ): Promise<Array<string>> {
    const problems: Array<string> = []
    const settle = Date.now() + 15_000
    const pooledDb = `pooled${pool}`
    try {
      await poll(
        settle,
        async () => {
          const servers = new Set((this.tenantPool(pool)?.servers() ?? []).map((s) => s.server.backendPid))
          const rows = await this.backends(pooledDb)
          return rows.every((r) => servers.has(r.pid) && r.state === "idle" && !r.xact) ? true : undefined
        },
        async () => {
          const servers = (this.tenantPool(pool)?.servers() ?? []).map((s) => `${s.server.backendPid}:${s.state}`)
          const rows = await this.backends(pooledDb)
          return (
            `SERVERS NOT SETTLED 15 s after the last client: pool servers [${servers.join(", ")}], ${this.poolState(pool)}; backends:\n` +
            rows.map((r) => `    pid ${r.pid} ${r.state}${r.xact ? " (transaction open)" : ""}: ${r.query}`).join("\n")
          )
        }
      )
      await poll(
        settle,
        async () => ((await this.backends("direct")).length === 0 ? true : undefined),
        () => "direct backends still running 15 s after their clients left"
      )
    } catch (error) {
      problems.push((error as Error).message)
      return problems
    }
    problems.push(...(await this.leftovers(pool)))
    if (tables !== undefined) problems.push(...(await this.compareTables(tables.schema, tables.clients, pool)))
    return problems
  }

  /** Holds every server of the pool at once (one client each, inside a transaction) and looks for leftovers. */
  private async leftovers(pool: number): Promise<Array<string>> {
    const inspectors: Array<pg.Client> = []
    const problems: Array<string> = []
    try {
      for (let i = 0; i < pool; i++) {
        const c = new pg.Client({ connectionString: this.url("pooled", pool) })
        c.on("error", () => {})
        await c.connect()
        inspectors.push(c)
        await c.query("BEGIN")
      }
      const seen = new Set<number>()
      for (const c of inspectors) {
        const { rows } = await c.query(INSPECT)
        const row = rows[0]
        seen.add(row.pid)
        const found = [
          row.settings.length > 0 ? `settings ${row.settings.join(", ")}` : "",
          row.statements.length > 0 ? `prepared statements ${row.statements.join(", ")}` : "",
          Number(row.temp) > 0 ? `${row.temp} temporary tables` : "",
          Number(row.cursors) > 0 ? `${row.cursors} cursors` : "",
          Number(row.channels) > 0 ? `${row.channels} LISTEN channels` : "",
          Number(row.advisory) > 0 ? `${row.advisory} advisory locks` : ""
        ].filter((s) => s !== "")
        if (found.length > 0) problems.push(`LEFTOVER on server pid ${row.pid}: ${found.join("; ")}`)
      }
      if (seen.size !== pool) problems.push(`INSPECTION held ${seen.size} distinct servers, expected ${pool}`)
      for (const c of inspectors) await c.query("COMMIT")
    } finally {
      for (const c of inspectors) await c.end().catch(() => {})
    }
    return problems
  }

  private async compareTables(schema: string, clients: number, pool: number): Promise<Array<string>> {
    const sql: Array<string> = []
    for (let i = 0; i < clients; i++) {
      sql.push(
        `SELECT ${i} AS client, (SELECT count(*) || ':' || coalesce(md5(string_agg(id || '/' || v || '/' || coalesce(s, '-'), ',' ORDER BY id)), '') FROM ${schema}.t${i}) AS t, ` +
          `(SELECT string_agg(id || '/' || coalesce(v::text, '-'), ',' ORDER BY id) FROM ${schema}.d${i}) AS d, ` +
          `(SELECT string_agg(attname || ':' || format_type(atttypid, atttypmod), ',' ORDER BY attnum) FROM pg_attribute WHERE attrelid = '${schema}.d${i}'::regclass AND attnum > 0 AND NOT attisdropped) AS dtype`
      )
    }
    // The shared tables as they are on the direct side; a table missing on the other side fails its query there.
    const exists = await this.asOwner<{ n: number }>(
      "direct",
      pool,
      `SELECT n FROM generate_series(0, ${SHARED_TABLES - 1}) n WHERE to_regclass('${schema}.s' || n) IS NOT NULL`
    )
    for (const { n } of exists) {
      const table = `${schema}.s${n}`
      sql.push(
        `SELECT ${-1 - n} AS client, (SELECT string_agg(id || '/' || x, ',' ORDER BY id) FROM ${table}) AS t, NULL AS d, ` +
          `(SELECT string_agg(attname || ':' || format_type(atttypid, atttypmod), ',' ORDER BY attnum) FROM pg_attribute WHERE attrelid = '${table}'::regclass AND attnum > 0 AND NOT attisdropped) AS dtype`
      )
    }
    const query = sql.join(" UNION ALL ")
    const [direct, pooled] = await Promise.all([
      this.asOwner("direct", pool, query),
      this.asOwner("pooled", pool, query).catch((error: Error) => [{ client: -1, error: error.message }])
    ])
    const problems: Array<string> = []
    for (let i = -SHARED_TABLES; i < clients; i++) {
      const a = JSON.stringify(direct.find((r) => Number(r.client) === i))
      const b = JSON.stringify(pooled.find((r) => Number(r.client) === i))
      const whose = i < 0 ? `shared table s${-1 - i}` : `of client ${i}`
      if (a !== b) problems.push(`TABLES ${whose} differ:\n    direct: ${a}\n    pooled: ${b}`)
    }
    return problems
  }
}

const INSPECT = `SELECT pg_backend_pid() AS pid,
  (SELECT coalesce(array_agg(name || '=' || setting ORDER BY name), '{}') FROM pg_settings WHERE source = 'session' AND setting IS DISTINCT FROM reset_val) AS settings,
  (SELECT coalesce(array_agg(name ORDER BY name), '{}') FROM pg_prepared_statements WHERE from_sql OR name NOT LIKE 'tp\\_%') AS statements,
  (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()) AS temp,
  (SELECT count(*) FROM pg_cursors) AS cursors,
  (SELECT count(*) FROM pg_listening_channels()) AS channels,
  (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()) AS advisory`

interface ClientResult {
  readonly log: ReadonlyArray<string>
  /** Where each step's observations start in `log`. */
  readonly marks: ReadonlyArray<number>
  readonly stuck?: string
}

const stepSlice = (r: ClientResult, i: number): ReadonlyArray<string> =>
  normalizeStep(
    i < r.marks.length ? r.log.slice(r.marks[i], i + 1 < r.marks.length ? r.marks[i + 1] : r.log.length) : []
  )

/** Every client's steps on a shared table up to the gate's epoch, in epoch order: what the mismatch depends on. */
const sharedHistory = (scripts: ReadonlyArray<ClientScript>, gate: Gate): string => {
  const lines: Array<{ epoch: number; ddl: boolean; text: string }> = []
  scripts.forEach((script, client) => {
    script.steps.forEach((step, i) => {
      const g = step.gate
      if (g === undefined || g.table !== gate.table || g.epoch > gate.epoch || (g.ddl && g.epoch === gate.epoch)) return
      lines.push({ epoch: g.epoch, ddl: g.ddl, text: `client ${client} step ${i} ${gateText(g)}${stepText(step)}` })
    })
  })
  // Within an epoch the uses ran in any order, and its DDL after all of them.
  lines.sort((a, b) => a.epoch - b.epoch || Number(a.ddl) - Number(b.ddl))
  return `  shared table s${gate.table} up to epoch ${gate.epoch}, every client's steps on it:\n${lines.map((l) => `    ${l.text}`).join("\n")}`
}

/** The first step whose observations differ (beyond a difference the step declares), described. */
const compareClient = (
  client: number,
  scripts: ReadonlyArray<ClientScript>,
  direct: ClientResult,
  pooled: ClientResult
): string | undefined => {
  const script = scripts[client]!
  if (direct.stuck !== undefined || pooled.stuck !== undefined) return undefined
  const steps = Math.max(direct.marks.length, pooled.marks.length)
  for (let i = 0; i < steps; i++) {
    const a = stepSlice(direct, i)
    const b = stepSlice(pooled, i)
    if (a.length === b.length && a.every((line, j) => line === b[j])) continue
    const step = script.steps[i]
    if (step?.allow !== undefined && DIFFERENCES[step.allow].accepts(a, b)) continue
    const width = Math.max(a.length, b.length)
    const rows: Array<string> = []
    for (let j = 0; j < width; j++) {
      const mark = a[j] === b[j] ? " " : "≠"
      rows.push(`    ${mark} direct: ${a[j] ?? "—"}\n      pooled: ${b[j] ?? "—"}`)
    }
    return (
      `MISMATCH: client ${client}, step ${i} ${step === undefined ? "" : `${gateText(step.gate)}${stepText(step)}`}\n${rows.join("\n")}\n` +
      `  client ${client}'s script:\n${scriptText(script)}` +
      (step?.gate === undefined ? "" : `\n${sharedHistory(scripts, step.gate)}`)
    )
  }
  return undefined
}

// ---- fast-check -------------------------------------------------------------------------------------

export interface PropertyOptions extends RunOptions {
  readonly seed: number
  /** Full runs spent shrinking a failure (0: report the failing scripts as generated). */
  readonly shrinkRuns: number
  readonly path?: string
  /** Patterns of known, unfixed defects to generate too (script.ts's FEATURES). */
  readonly features?: ReadonlySet<Feature>
}

export interface Outcome {
  readonly ok: boolean
  readonly report: string
}

/** One seeded run (plus shrinking on failure); the report says how to reproduce it. */
export const checkSeed = async (env: StressEnv, options: PropertyOptions): Promise<Outcome> => {
  let calls = 0
  let runs = 0
  let lastProblems: Array<string> = []
  const scripts = runScripts(options.clients, options.length, options.features)
  const property = fc.asyncProperty(scripts, async (value) => {
    calls++
    // Past the budget every candidate "passes", which ends shrinking at the smallest failure so far.
    if (calls > 1 + options.shrinkRuns) return true
    runs++
    const problems = await env.run(value, options)
    if (problems.length > 0) lastProblems = problems
    return problems.length === 0
  })
  const details = await fc.check(property, {
    seed: options.seed,
    numRuns: 1,
    ...(options.path !== undefined ? { path: options.path } : {}),
    endOnFailure: options.shrinkRuns === 0
  })
  if (!details.failed) return { ok: true, report: `seed ${options.seed}: ok` }
  const repro =
    `npm run stress -- --seed ${options.seed} --clients ${options.clients} --pool ${options.pool} --length ${options.length}` +
    (options.features !== undefined && options.features.size > 0
      ? ` --features ${[...options.features].join(",")}`
      : "") +
    (details.counterexamplePath !== null ? ` --path ${details.counterexamplePath}` : "")
  const failure = details.errorInstance instanceof Error ? `\n${details.errorInstance.stack}` : ""
  return {
    ok: false,
    report:
      `seed ${options.seed} FAILED (${details.numShrinks} shrinks in ${runs} runs); reproduce with:\n  ${repro}\n` +
      `${lastProblems.join("\n")}${failure}`
  }
}
