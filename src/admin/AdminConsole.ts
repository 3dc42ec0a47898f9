import { Deferred, Effect, Option, Result } from "effect"
import { ADDRESS_BLOCKED, AUTH_FAILURES, annotateOutcome, authenticateScram, CircuitBreaker } from "../auth/index.ts"
import { type Gathered, HostViews } from "../cluster/HostViews.ts"
import { storeViews } from "../cluster/StoreViews.ts"
import { AppConfig } from "../config/index.ts"
import { renderErrorResponse, type TidepoolError, tidepoolError } from "../errors/index.ts"
import { PoolRegistry } from "../pool/index.ts"
import {
  backendKeyData,
  commandComplete,
  createScramSecret,
  dataRow,
  emptyQueryResponse,
  noticeResponse,
  parameterStatus,
  parseScramSecret,
  readyForQuery,
  rowDescription
} from "../protocol/index.ts"
// Not the session index: it re-exports ClientSession, which calls into this module.
import type { ClientSocket } from "../session/ClientSocket.ts"
import { SessionRegistry } from "../session/SessionRegistry.ts"
import { TenantRegistry } from "../tenants/index.ts"
import { runPoolCommand } from "./AdminCommands.ts"
import { AdminControl } from "./AdminControl.ts"
import {
  type AdminSnapshot,
  type ResultSet,
  showClients,
  showConfig,
  showDatabases,
  showLists,
  showPermits,
  showPools,
  showRunners,
  showServers,
  showStats,
  showUsers,
  showVersion
} from "./AdminViews.ts"

/** The database names that mean "the admin console", as in PgBouncer (plus our own name). */
export const isAdminDatabase = (database: string | undefined): boolean =>
  database === "pgbouncer" || database === "tidepool"

/** Breaker key of admin logins: failures from one address block it like a tenant's. */
const BREAKER_TENANT = "\u0000admin"

export interface AdminLogin {
  readonly user: string
}

/**
 * Authenticates an admin console login with SCRAM-SHA-256 against `TIDEPOOL_ADMIN_USERS`. The user
 * name is taken whole (no tenant part). Under the same per-address breaker as tenant logins, counted
 * from the check's start, so concurrent guesses cannot outrun it; refusals come after the failure delay.
 */
export const authenticateAdmin = Effect.fn("client.auth")(
  function* (client: ClientSocket, startup: Readonly<Record<string, string>>, address: string) {
    const config = yield* AppConfig
    const breaker = yield* CircuitBreaker
    const user = startup.user ?? ""
    yield* Effect.annotateCurrentSpan({ "db.user": user, method: "scram-sha-256 admin" })
    const attempt = yield* breaker.attempt(BREAKER_TENANT, address)
    if (attempt === undefined) return yield* tidepoolError("ECIRCUITBREAKER", ADDRESS_BLOCKED)
    const refuse = (error: TidepoolError) =>
      Effect.gen(function* () {
        // Logged once, when it trips: the refusals that follow are logged at debug level.
        if (yield* attempt.failed) {
          yield* Effect.logWarning(
            `${address} blocked for ${AUTH_FAILURES.blockMs / 1000} s after ${AUTH_FAILURES.failures} failed admin console logins`
          ).pipe(Effect.annotateLogs({ user, peer_ip: address, code: "ECIRCUITBREAKER" }))
        }
        client.stopReading()
        yield* Effect.sleep(config.authFailureDelayMs)
        return yield* error
      })
    // An unknown name is a guess like a wrong password, and costs the same delay.
    const admin = config.adminUsers.find((u) => u.name === user)
    if (admin === undefined) return yield* refuse(tidepoolError("ENOTADMIN", user))
    const secret = parseScramSecret(admin.secret) ?? createScramSecret(admin.secret)
    const proof = yield* Effect.result(authenticateScram(client, secret, user, 0))
    if (Result.isFailure(proof)) {
      return yield* proof.failure.code === "EWRONGPASSWORD" ? refuse(proof.failure) : proof.failure
    }
    yield* attempt.succeeded
    // The caller ends the handshake (its slot, AuthenticationOk) as it does a tenant login's.
    return { user } satisfies AdminLogin
  },
  Effect.scoped,
  annotateOutcome
)

const HELP = [
  "SHOW POOLS|CLIENTS|SERVERS|STATS|DATABASES|USERS|CONFIG|LISTS|VERSION|WORKERS|RUNNERS|PERMITS|HELP",
  "SHOW view LOCAL  worker mode: this worker only (without LOCAL: every worker of the host)",
  "SHOW RUNNERS|PERMITS  cluster mode: the permit ledger in the tenant store, every host",
  "PAUSE [db]    hold new transactions (db: tenant or tenant/database); waits for running ones",
  "RESUME [db]   release held transactions",
  "RECONNECT [db] replace every server connection once it is idle",
  "KILL db       close the clients and server connections of db (clients get 57P01)",
  "RELOAD        nothing to reload: tenants change through the HTTP API",
  "SHUTDOWN      graceful shutdown of the whole pooler, as on SIGTERM"
].join("\n")

const Q = 0x51
const X = 0x58
const S = 0x53

const render = (out: Array<Buffer>, result: ResultSet, tag: string) => {
  out.push(rowDescription(result.columns))
  for (const row of result.rows) out.push(dataRow(row))
  out.push(commandComplete(tag))
}

const notice = (message: string, detail?: string) =>
  noticeResponse({ severity: "NOTICE", code: "00000", message, ...(detail !== undefined ? { detail } : {}) })

/** Worker mode: views with a row per object of one process, shown with a `worker` column last. */
const PER_WORKER = new Set(["POOLS", "CLIENTS", "SERVERS", "STATS"])
/** Worker mode: views with a row per configured thing, whose counts are summed over the workers. */
const SUMMED: Record<string, { readonly sum: ReadonlySet<string>; readonly max: ReadonlySet<string> }> = {
  DATABASES: { sum: new Set(["current_connections", "current_client_connections"]), max: new Set(["paused"]) },
  USERS: { sum: new Set(["current_connections", "current_client_connections"]), max: new Set() },
  LISTS: { sum: new Set(["pools:items", "used_clients:items", "used_servers:items"]), max: new Set() }
}
const WORKER_COLUMN = { name: "worker", typeOid: 23 }

type Rows = ReadonlyArray<ReadonlyArray<string | null>>

/** The rows of every worker that answered, each with its worker number appended. */
const perWorker = (gathered: Gathered): Rows =>
  gathered.parts.flatMap((part) =>
    Array.isArray(part.data) ? (part.data as Rows).map((row) => [...row, String(part.worker)]) : []
  )

/**
 * Rows keyed by their first column, merged over the workers: the `sum` columns added up (LISTS: the
 * rows named there), the `max` ones at their largest, the rest (configuration, the same everywhere)
 * as the first worker has them.
 */
const summed = (result: ResultSet, gathered: Gathered, spec: (typeof SUMMED)[string]): Rows => {
  const names = result.columns.map((c) => c.name)
  const merged = new Map<string | null, Array<string | null>>()
  for (const part of gathered.parts) {
    if (!Array.isArray(part.data)) continue
    for (const row of part.data as Rows) {
      const key = row[0] ?? null
      const into = merged.get(key)
      if (into === undefined) {
        merged.set(key, [...row])
        continue
      }
      row.forEach((value, i) => {
        const name = names[i]!
        const add = spec.sum.has(name) || spec.sum.has(`${key}:${name}`)
        if (add) into[i] = String(Number(into[i] ?? 0) + Number(value ?? 0))
        else if (spec.max.has(name)) into[i] = String(Math.max(Number(into[i] ?? 0), Number(value ?? 0)))
      })
    }
  }
  return [...merged.values()]
}

const showWorkers = (gathered: Gathered): ResultSet => ({
  columns: [
    WORKER_COLUMN,
    { name: "pid", typeOid: 23 },
    { name: "state", typeOid: 25 },
    { name: "started", typeOid: 25 },
    { name: "restarts", typeOid: 23 },
    { name: "hangs", typeOid: 23 },
    { name: "heartbeat_age_ms", typeOid: 23 }
  ],
  rows: gathered.workers.map((w) => [
    String(w.worker),
    w.pid === null ? null : String(w.pid),
    w.pid === null ? "restarting" : w.ready ? "ready" : "starting",
    `${new Date(w.startedAt).toISOString().replace("T", " ").slice(0, 19)} UTC`,
    String(w.restarts),
    String(w.hangs),
    w.beatAgeMs === null ? null : String(w.beatAgeMs)
  ])
})

/** `"acme/app"`, `'acme/app'` or `acme/app` → `acme/app`. */
const unquote = (arg: string | undefined): string | undefined =>
  arg === undefined ? undefined : arg.replace(/^(["'])(.*)\1$/, "$2")

/**
 * The admin console session: PgBouncer's commands over the simple query protocol. Each statement of
 * a query string answers on its own; an error ends the query string, not the session.
 */
/**
 * An authenticated admin console session, until its client leaves or the pooler drains. `draining`:
 * the listeners drain (a login that completes now is refused with 57P01, as a tenant's is).
 */
export const adminConsole = (client: ClientSocket, login: AdminLogin, draining: () => boolean) =>
  Effect.gen(function* () {
    const config = yield* AppConfig
    const registry = yield* PoolRegistry
    const sessions = yield* SessionRegistry
    const tenants = yield* TenantRegistry
    const control = yield* AdminControl
    // Worker mode: SHOW answers for the whole host (docs/admin-console.md#worker-mode).
    const host = Option.getOrUndefined(yield* Effect.serviceOption(HostViews))
    // Cluster mode: the store ledger's views (docs/admin-console.md#cluster-mode).
    const ledger = yield* storeViews
    const drained = yield* Deferred.make<void>()

    const key = yield* Effect.acquireRelease(
      Effect.sync(() =>
        sessions.register({
          cancel: () => Effect.void,
          drain: () => Deferred.doneUnsafe(drained, Effect.void),
          // No tenant: tenant kicks never match an admin session.
          tenant: "",
          user: login.user,
          kick: () => Deferred.doneUnsafe(drained, Effect.void)
        })
      ),
      (key) => Effect.sync(() => sessions.unregister(key))
    )
    // Checked after registering, so a drain that starts in between has drained it anyway; a console
    // registered after the drain began would otherwise hold the shutdown for the whole drain timeout.
    if (draining()) return yield* tidepoolError("EADMINSHUTDOWN")
    client.write(
      Buffer.concat([
        // psql and drivers need these; server_version is PgBouncer's, so tools treat us as PgBouncer.
        parameterStatus("server_version", "1.21.0/bouncer"),
        parameterStatus("server_encoding", "UTF8"),
        parameterStatus("client_encoding", "UTF8"),
        parameterStatus("DateStyle", "ISO"),
        parameterStatus("integer_datetimes", "on"),
        parameterStatus("standard_conforming_strings", "on"),
        parameterStatus("application_name", "tidepool"),
        backendKeyData(key.processId, key.secretKey),
        readyForQuery("I")
      ])
    )
    yield* Effect.logInfo(`admin console login: ${login.user}`)

    const snapshot = (): AdminSnapshot => ({
      config,
      tenants: tenants.all(),
      pools: registry.all(),
      sessions: sessions.all(),
      now: Date.now()
    })

    /** A db argument must name a tenant (`acme`) or a tenant database (`acme/app`) this node serves. */
    const target = (arg: string | undefined, required: boolean): Effect.Effect<string | undefined, TidepoolError> => {
      const name = unquote(arg)
      if (name === undefined) {
        return required
          ? Effect.fail(tidepoolError("EADMINCOMMAND", "this command needs a database name"))
          : Effect.succeed(undefined)
      }
      const tenant = name.includes("/") ? name.slice(0, name.indexOf("/")) : name
      return tenants.get(tenant) === undefined
        ? Effect.fail(tidepoolError("EADMINCOMMAND", `no such database: ${name}`))
        : Effect.succeed(name)
    }
    const statement = (sql: string, out: Array<Buffer>): Effect.Effect<void, TidepoolError> =>
      Effect.gen(function* () {
        const words = sql.trim().split(/\s+/)
        const command = (words[0] ?? "").toUpperCase()
        const arg = words[1]
        const local = command === "SHOW" && words.length === 3 && words[2]!.toUpperCase() === "LOCAL"
        if (words.length > 2 && !local) {
          return yield* tidepoolError("EADMINCOMMAND", `too many arguments: ${sql.trim()}`)
        }
        switch (command) {
          case "SHOW": {
            const what = (arg ?? "").toUpperCase()
            const views: Record<string, (s: AdminSnapshot) => ResultSet> = {
              POOLS: showPools,
              CLIENTS: showClients,
              SERVERS: showServers,
              STATS: showStats,
              DATABASES: showDatabases,
              USERS: showUsers,
              CONFIG: showConfig,
              LISTS: showLists,
              VERSION: showVersion
            }
            if (what === "HELP") {
              out.push(notice("Console usage", HELP), commandComplete("SHOW"))
              return
            }
            if (what === "RUNNERS" || what === "PERMITS") {
              if (local) return yield* tidepoolError("EADMINCOMMAND", `SHOW ${what} has no LOCAL: it reads the store`)
              if (ledger === undefined) {
                return yield* tidepoolError(
                  "ECLUSTERVIEW",
                  `SHOW ${what}: cluster mode is off (TIDEPOOL_CLUSTER), so there is no permit ledger in the store`
                )
              }
              const result =
                what === "RUNNERS"
                  ? Effect.map(ledger.runners, (rows) => showRunners(rows, config.leaseMs))
                  : Effect.map(ledger.permits, showPermits)
              const answered = yield* Effect.result(result)
              if (Result.isFailure(answered)) {
                return yield* tidepoolError("ECLUSTERVIEW", `SHOW ${what}: ${answered.failure.message}`)
              }
              render(out, answered.success, "SHOW")
              return
            }
            if (what === "WORKERS") {
              const gathered = host === undefined ? { parts: [], workers: [] } : yield* host.gather("none")
              render(out, showWorkers(gathered), "SHOW")
              return
            }
            const view = views[what]
            if (view === undefined)
              return yield* tidepoolError("EADMINCOMMAND", `unknown SHOW: ${arg ?? ""}; try SHOW HELP`)
            const result = view(snapshot())
            const sum = SUMMED[what]
            if (host === undefined || (!PER_WORKER.has(what) && sum === undefined)) {
              render(out, result, "SHOW")
              return
            }
            // LOCAL, or no answer from the supervisor (it is going away): this worker's own rows.
            const gathered = local ? { parts: [], workers: [] } : yield* host.gather(`admin:${what}`)
            const parts =
              gathered.parts.length > 0
                ? gathered.parts
                : [{ worker: host.worker, pid: process.pid, data: result.rows }]
            if (!local && gathered.parts.length === 0)
              out.push(notice("the supervisor did not answer: this worker only"))
            const absent = parts.filter((p) => !Array.isArray(p.data)).map((p) => p.worker)
            if (absent.length > 0) out.push(notice(`worker ${absent.join(", ")} did not answer: not shown`))
            const whole: ResultSet = PER_WORKER.has(what)
              ? { columns: [...result.columns, WORKER_COLUMN], rows: perWorker({ parts, workers: [] }) }
              : { columns: result.columns, rows: summed(result, { parts, workers: [] }, sum!) }
            render(out, whole, "SHOW")
            return
          }
          case "PAUSE":
          case "RESUME":
          case "RECONNECT":
          case "KILL": {
            const name = yield* target(arg, command === "KILL")
            yield* Effect.logWarning(`admin ${login.user}: ${command} ${name ?? "(all)"}`)
            if (host === undefined) yield* runPoolCommand(registry, sessions, command, name)
            else {
              // Every worker carries it out (PAUSE: and waits for its running transactions).
              const done = yield* host.gather(`admin-command:${command} ${name ?? ""}`, 0)
              const missing = done.parts.filter((p) => p.data !== "done").map((p) => p.worker)
              if (done.parts.length === 0) out.push(notice("the supervisor did not answer: nothing was done"))
              else if (missing.length > 0) out.push(notice(`worker ${missing.join(", ")} went away before it was done`))
            }
            out.push(commandComplete(command))
            return
          }
          case "RELOAD":
            out.push(
              notice("RELOAD: nothing to reload", "Tenants change through the HTTP API; settings need a restart."),
              commandComplete("RELOAD")
            )
            return
          case "SHUTDOWN":
            yield* Effect.logWarning(`admin ${login.user}: SHUTDOWN`)
            out.push(commandComplete("SHUTDOWN"))
            yield* control.requestShutdown
            return
          default:
            return yield* tidepoolError("EADMINCOMMAND", `unknown command: ${words[0] ?? ""}; try SHOW HELP`)
        }
      })

    const query = (text: string) =>
      Effect.gen(function* () {
        const statements = text.split(";").filter((s) => s.trim() !== "")
        const out: Array<Buffer> = []
        if (statements.length === 0) out.push(emptyQueryResponse())
        for (const sql of statements) {
          const failed = yield* Effect.result(statement(sql, out))
          if (Result.isFailure(failed)) {
            out.push(renderErrorResponse(failed.failure))
            break
          }
        }
        out.push(readyForQuery("I"))
        client.write(Buffer.concat(out))
      })

    // The extended protocol is refused once per Sync-delimited batch; Sync answers ReadyForQuery.
    let refusedBatch = false
    for (;;) {
      const message = yield* Effect.raceFirst(client.readMessage, Effect.as(Deferred.await(drained), undefined))
      if (message === undefined) return yield* tidepoolError("EADMINSHUTDOWN")
      if (message.type === X) return
      if (message.type === Q) {
        const nul = message.body.indexOf(0)
        yield* query(message.body.toString("utf8", 0, nul < 0 ? message.body.length : nul))
      } else if (message.type === S) {
        refusedBatch = false
        client.write(readyForQuery("I"))
      } else if (!refusedBatch) {
        refusedBatch = true
        client.write(
          renderErrorResponse(tidepoolError("EADMINCOMMAND", "the admin console speaks the simple query protocol only"))
        )
      }
    }
  }).pipe(Effect.scoped)
