import * as NodeHttpServerRequest from "@effect/platform-node/NodeHttpServerRequest"
import { DateTime, Effect, Option, Redacted, Result, Schema } from "effect"
import { HttpRouter, HttpServerRequest, HttpServerResponse } from "effect/http"
import { CircuitBreaker } from "../auth/index.ts"
import { HostViews } from "../cluster/HostViews.ts"
import { storeViews } from "../cluster/StoreViews.ts"
import {
  type AppConfig,
  formatPath,
  problemsFromParseError,
  strictParseOptions,
  Tenant,
  type TenantIssue,
  tenantIssues
} from "../config/index.ts"
import { PoolRegistry, type TenantPool } from "../pool/index.ts"
import { TenantChanges } from "../session/index.ts"
import { TenantStore, Tenants } from "../tenants/index.ts"
import { tenantJson } from "./TenantJson.ts"
import { checkUpstream } from "./UpstreamCheck.ts"

export type Method = "GET" | "PUT" | "PATCH" | "POST" | "DELETE"

/** One route: the router is built from this table, and so is the OpenAPI document. */
export interface Route {
  readonly method: Method
  /** Express-style (`:id`); OpenAPI spells it `{id}`. */
  readonly path: `/${string}`
  readonly summary: string
  /** Public routes need no token. */
  readonly public?: boolean
  readonly requestBody?: Readonly<Record<string, unknown>>
  readonly responses: Readonly<Record<string, string>>
  readonly handler: Effect.Effect<
    HttpServerResponse.HttpServerResponse,
    never,
    RouteEnv | HttpServerRequest.HttpServerRequest | HttpRouter.RouteContext
  >
}

export type RouteEnv = AppConfig | Tenants | TenantStore | TenantChanges | PoolRegistry | CircuitBreaker

const json = (status: number, body: unknown) => HttpServerResponse.jsonUnsafe(body, { status })
const notFound = json(404, { error: "not found" })

/**
 * Field errors by path. A Map, not an object: a client's key is a path here, and `toString`,
 * `constructor` or `__proto__` would otherwise find Object.prototype's members under it.
 */
type FieldErrors = Map<string, Array<string>>

const fieldErrors = (errors: FieldErrors) => json(422, { errors: Object.fromEntries(errors) })

const addError = (errors: FieldErrors, path: string, message: string) => {
  const key = path === "" ? "body" : path
  const list = errors.get(key)
  if (list === undefined) errors.set(key, [message])
  else if (!list.includes(message)) list.push(message)
}

// Tenant bodies are a few kB; a megabyte is a mistake or an attack, not a tenant.
const MAX_BODY_BYTES = 1_048_576

const tooLarge = json(413, { error: `request body too large (at most ${MAX_BODY_BYTES} bytes)` })
const badJson = json(400, { error: "invalid JSON body" })

/**
 * The raw body, or undefined once it is over the limit. Read here rather than with the platform's
 * body size limit, which destroys the request stream and so resets the connection before the
 * client reads the answer: an over-long body is discarded as it arrives (a declared one without
 * being read, by Node after the answer), so the client gets its 413.
 */
const readBody = (request: HttpServerRequest.HttpServerRequest): Effect.Effect<string | undefined> => {
  const source = NodeHttpServerRequest.toIncomingMessage(request)
  if (Number(source.headers["content-length"]) > MAX_BODY_BYTES) return Effect.succeed(undefined)
  return Effect.callback<string | undefined>((resume) => {
    const chunks: Array<Buffer> = []
    let size = 0
    const detach = () => {
      source.off("data", onData)
      source.off("end", onEnd)
      source.off("error", onError)
    }
    const stop = (result: string | undefined) => {
      detach()
      resume(Effect.succeed(result))
    }
    const onData = (chunk: Buffer) => {
      size += chunk.length
      if (size <= MAX_BODY_BYTES) chunks.push(chunk)
      else {
        stop(undefined)
        source.resume()
      }
    }
    const onEnd = () => stop(Buffer.concat(chunks).toString("utf8"))
    // The client went away mid-body: nobody is left to read an answer.
    const onError = () => stop(undefined)
    source.on("data", onData)
    source.once("end", onEnd)
    source.once("error", onError)
    // Interrupted when the client hangs up mid-body (the server's own close watch).
    return Effect.sync(detach)
  })
}

/** The request body as JSON, or the answer to give instead (400 malformed, 413 too large). */
const body: Effect.Effect<
  Result.Result<unknown, HttpServerResponse.HttpServerResponse>,
  never,
  HttpServerRequest.HttpServerRequest
> = Effect.gen(function* () {
  const text = yield* readBody(yield* HttpServerRequest.HttpServerRequest)
  if (text === undefined) return Result.fail(tooLarge)
  if (text.trim() === "") return Result.succeed({})
  try {
    return Result.succeed(JSON.parse(text) as unknown)
  } catch {
    return Result.fail(badJson)
  }
})

const idParam = Effect.map(HttpRouter.params, (p) => p.id ?? "")

const isRecord = (u: unknown): u is Record<string, unknown> => typeof u === "object" && u !== null && !Array.isArray(u)

const BAN_FIELDS = ["banned_at", "ban_reason", "banned_until"] as const

/** Decodes a PUT body; a failure holds the field errors (Supavisor's `{"errors": {field: [msg]}}`). */
const decodeTenant = (id: string, input: unknown): Result.Result<Tenant, FieldErrors> => {
  const errors: FieldErrors = new Map()
  if (!isRecord(input) || !isRecord(input.tenant)) {
    addError(errors, "tenant", "is required (a JSON object of tenant fields)")
    return Result.fail(errors)
  }
  const raw = input.tenant
  if (raw.external_id !== undefined && raw.external_id !== id) {
    addError(errors, "external_id", "must match the id in the URL")
  }
  for (const field of BAN_FIELDS) {
    if (raw[field] !== undefined) addError(errors, field, "is set only through PATCH /api/tenants/:id")
  }
  const candidate = { ...raw, external_id: id }
  const decoded = Schema.decodeUnknownResult(Tenant, strictParseOptions)(candidate)
  if (Result.isFailure(decoded)) {
    for (const p of problemsFromParseError(decoded.failure, candidate)) addError(errors, p.path, p.reason)
  }
  for (const issue of tenantIssues(candidate) as ReadonlyArray<TenantIssue>) {
    addError(errors, formatPath(issue.path), issue.message)
  }
  if (errors.size > 0 || Result.isFailure(decoded)) return Result.fail(errors)
  return Result.succeed(decoded.success)
}

const Ban = Schema.Struct({
  banned: Schema.Boolean,
  ban_reason: Schema.optionalKey(Schema.String),
  banned_until: Schema.optionalKey(Schema.NullOr(Schema.DateTimeUtcFromString))
})

const NonEmpty = Schema.String.check(Schema.isMinLength(1, { message: "must not be empty" }))

const Credentials = Schema.Struct({ db_user: NonEmpty, db_password: NonEmpty })

const Addresses = Schema.Struct({ ipv4_addresses: Schema.Array(Schema.String) })

const validate = <S extends Schema.ConstraintDecoder<unknown>>(schema: S, input: unknown) =>
  Result.mapError(Schema.decodeUnknownResult(schema, strictParseOptions)(input), (e) => {
    const errors: FieldErrors = new Map()
    for (const p of problemsFromParseError(e, input)) addError(errors, p.path, p.reason)
    return errors
  })

const bansJson = (bans: ReadonlyArray<{ readonly address: string; readonly until: number }>) => ({
  banned_ipv4_addresses: bans.map((b) => ({ banned_address: b.address, banned_until: Math.ceil(b.until / 1000) }))
})

const tenantRef = { $ref: "#/components/schemas/TenantInput" }

export const routes: ReadonlyArray<Route> = [
  {
    method: "GET",
    path: "/api/health",
    summary: "Health: 204, or 503 with the failed checks",
    public: true,
    responses: { "204": "healthy", "503": '{"status":"unhealthy","timestamp":…,"failed_checks":[…]}' },
    handler: Effect.gen(function* () {
      const store = yield* TenantStore
      // A name no tenant can have (external_ids have no spaces): a read that touches the database.
      const ok = yield* store.get("health check").pipe(
        Effect.as(true),
        Effect.timeout("2 seconds"),
        Effect.orElseSucceed(() => false)
      )
      return ok
        ? HttpServerResponse.empty({ status: 204 })
        : json(503, { status: "unhealthy", timestamp: new Date().toISOString(), failed_checks: ["tenant_store"] })
    })
  },
  {
    method: "GET",
    path: "/api/tenants",
    summary: "List tenants (paginated: ?limit=1..1000, default 100; ?offset, default 0)",
    responses: { "200": '{"data":[tenant…],"total":n,"limit":n,"offset":n}', "422": "bad limit or offset" },
    handler: Effect.gen(function* () {
      const tenants = yield* Tenants
      const request = yield* HttpServerRequest.HttpServerRequest
      const url = new URL(request.url, "http://localhost")
      const limit = Number(url.searchParams.get("limit") ?? "100")
      const offset = Number(url.searchParams.get("offset") ?? "0")
      const errors: FieldErrors = new Map()
      if (!Number.isInteger(limit) || limit < 1 || limit > 1000) addError(errors, "limit", "expected 1 to 1000")
      if (!Number.isInteger(offset) || offset < 0) addError(errors, "offset", "expected an integer >= 0")
      if (errors.size > 0) return fieldErrors(errors)
      const all = [...tenants.registry.all()].sort((a, b) => a.external_id.localeCompare(b.external_id))
      return json(200, {
        data: all.slice(offset, offset + limit).map(tenantJson),
        total: all.length,
        limit,
        offset
      })
    })
  },
  {
    method: "GET",
    path: "/api/tenants/:id",
    summary: "Show a tenant (never with passwords)",
    responses: { "200": '{"data": tenant}', "404": '{"error":"not found"}' },
    handler: Effect.gen(function* () {
      const tenant = (yield* Tenants).get(yield* idParam)
      return tenant === undefined ? notFound : json(200, { data: tenantJson(tenant) })
    })
  },
  {
    method: "PUT",
    path: "/api/tenants/:id",
    summary:
      "Create or replace a tenant. New: credentials checked upstream (select version()). Existing: caches cleared, pools drained onto the new settings",
    requestBody: { type: "object", required: ["tenant"], properties: { tenant: tenantRef } },
    responses: {
      "201": '{"data": tenant} + location (created)',
      "200": '{"data": tenant} (replaced)',
      "400": '{"error": reason} (upstream check failed, or invalid JSON)',
      "422": '{"errors": {field: [message]}}'
    },
    handler: Effect.gen(function* () {
      const tenants = yield* Tenants
      const id = yield* idParam
      const input = yield* body
      if (Result.isFailure(input)) return input.failure
      const decoded = decodeTenant(id, input.success)
      if (Result.isFailure(decoded)) return fieldErrors(decoded.failure)
      const tenant = decoded.success
      if (tenants.get(id) === undefined) {
        const problem = yield* checkUpstream(tenant)
        if (problem !== undefined) return json(400, { error: problem })
      }
      const result = yield* Effect.result(tenants.put(tenant))
      if (Result.isFailure(result)) return json(500, { error: result.failure.message })
      yield* Effect.logInfo(
        result.success.created ? "tenant created through the API" : "tenant replaced through the API"
      ).pipe(Effect.annotateLogs({ tenant: id }))
      const stored = tenants.get(id) ?? tenant
      return result.success.created
        ? HttpServerResponse.jsonUnsafe(
            { data: tenantJson(stored) },
            { status: 201, headers: { location: `/api/tenants/${encodeURIComponent(id)}` } }
          )
        : json(200, { data: tenantJson(stored) })
    })
  },
  {
    method: "PATCH",
    path: "/api/tenants/:id",
    summary: "Ban or unban: banning ends every client of the tenant with EBANNED and refuses new ones",
    requestBody: {
      type: "object",
      required: ["banned"],
      properties: {
        banned: { type: "boolean" },
        ban_reason: { type: "string", description: "required when banning" },
        banned_until: { type: "string", format: "date-time", nullable: true }
      }
    },
    responses: { "200": '{"data": tenant}', "404": '{"error":"not found"}', "422": '{"errors": {…}}' },
    handler: Effect.gen(function* () {
      const tenants = yield* Tenants
      const id = yield* idParam
      const input = yield* body
      if (Result.isFailure(input)) return input.failure
      const decoded = validate(Ban, input.success)
      if (Result.isFailure(decoded)) return fieldErrors(decoded.failure)
      const ban = decoded.success
      if (ban.banned && (ban.ban_reason === undefined || ban.ban_reason.trim() === "")) {
        return fieldErrors(new Map([["ban_reason", ["is required when banning"]]]))
      }
      const tenant = tenants.get(id)
      if (tenant === undefined) return notFound
      const { banned_at: _a, ban_reason: _r, banned_until: _u, ...rest } = tenant
      const next: Tenant = ban.banned
        ? {
            ...rest,
            banned_at: DateTime.nowUnsafe(),
            ban_reason: ban.ban_reason!,
            ...(ban.banned_until != null ? { banned_until: ban.banned_until } : {})
          }
        : rest
      const result = yield* Effect.result(tenants.replace(next))
      if (Result.isFailure(result)) return json(500, { error: result.failure.message })
      return json(200, { data: tenantJson(tenants.get(id) ?? next) })
    })
  },
  {
    method: "DELETE",
    path: "/api/tenants/:id",
    summary: "Delete a tenant: its pools stop and its clients get ENOTFOUND",
    responses: { "204": "deleted", "404": '{"error":"not found"}' },
    handler: Effect.gen(function* () {
      const removed = yield* Effect.result((yield* Tenants).remove(yield* idParam))
      if (Result.isFailure(removed)) return json(500, { error: removed.failure.message })
      return removed.success ? HttpServerResponse.empty({ status: 204 }) : notFound
    })
  },
  {
    method: "GET",
    path: "/api/tenants/:id/terminate",
    summary: "Stop every pool of the tenant on every node sharing the store; its clients get 57P01",
    responses: {
      "200": '{"result":"success","disconnected":n,"reach":"all_nodes"|"this_node"}',
      "404": '{"error":"not found"}',
      "503": '{"error": …, "disconnected":n} (done on this node only: the store could not tell the others)'
    },
    handler: Effect.gen(function* () {
      const id = yield* idParam
      if ((yield* Tenants).get(id) === undefined) return notFound
      const { disconnected, reach } = yield* (yield* TenantChanges).terminate(id)
      if (reach._tag === "failed") {
        return json(503, {
          error: `terminated on this node only: the tenant store could not tell the other nodes (${reach.message}); call it again once the store is back`,
          disconnected
        })
      }
      return json(200, { result: "success", disconnected, reach: reach._tag === "store" ? "all_nodes" : "this_node" })
    })
  },
  {
    method: "POST",
    path: "/api/tenants/:id/update_auth_credentials",
    summary: "Rotate the manager user of an auth_query tenant (require_user: false); clients stay connected",
    requestBody: {
      type: "object",
      required: ["db_user", "db_password"],
      properties: { db_user: { type: "string" }, db_password: { type: "string", writeOnly: true } }
    },
    responses: {
      "204": "updated",
      "400": '{"error": …} (require_user tenant)',
      "404": '{"error":"not found"}',
      "422": '{"errors": {…}}'
    },
    handler: Effect.gen(function* () {
      const tenants = yield* Tenants
      const id = yield* idParam
      const input = yield* body
      if (Result.isFailure(input)) return input.failure
      const decoded = validate(Credentials, input.success)
      if (Result.isFailure(decoded)) return fieldErrors(decoded.failure)
      const tenant = tenants.get(id)
      if (tenant === undefined) return notFound
      if (tenant.require_user) {
        return json(400, { error: "the tenant has require_user: true; its users' credentials are set with PUT" })
      }
      const { db_user, db_password } = decoded.success
      const users = tenant.users.map((u) =>
        u.is_manager
          ? {
              ...u,
              db_user,
              db_user_alias: u.db_user_alias === u.db_user ? db_user : u.db_user_alias,
              db_password: Redacted.make(db_password)
            }
          : u
      )
      const result = yield* Effect.result(tenants.replace({ ...tenant, users }))
      if (Result.isFailure(result)) return json(500, { error: result.failure.message })
      return HttpServerResponse.empty({ status: 204 })
    })
  },
  {
    method: "GET",
    path: "/api/tenants/:id/network_bans",
    summary:
      "Client addresses blocked by the authentication circuit breaker (IPv4 and IPv6); worker mode: every worker's",
    responses: {
      "200": '{"banned_ipv4_addresses":[{"banned_address":…,"banned_until":<unix s>}]}',
      "404": '{"error":"not found"}'
    },
    handler: Effect.gen(function* () {
      const id = yield* idParam
      if ((yield* Tenants).get(id) === undefined) return notFound
      return json(200, bansJson(yield* hostBans(id)))
    })
  },
  {
    method: "DELETE",
    path: "/api/tenants/:id/network_bans",
    summary: "Lift circuit-breaker blocks; answers the blocks left",
    requestBody: {
      type: "object",
      required: ["ipv4_addresses"],
      properties: { ipv4_addresses: { type: "array", items: { type: "string" } } }
    },
    responses: { "200": '{"banned_ipv4_addresses":[…]} (what is left)', "404": '{"error":"not found"}', "422": "…" },
    handler: Effect.gen(function* () {
      const id = yield* idParam
      const input = yield* body
      if (Result.isFailure(input)) return input.failure
      const decoded = validate(Addresses, input.success)
      if (Result.isFailure(decoded)) return fieldErrors(decoded.failure)
      if ((yield* Tenants).get(id) === undefined) return notFound
      const host = Option.getOrUndefined(yield* Effect.serviceOption(HostViews))
      if (host === undefined) yield* (yield* CircuitBreaker).clear(id, decoded.success.ipv4_addresses)
      // Worker mode: each worker's breaker blocks on its own; the blocks are lifted on every one.
      else yield* host.gather(`${NETWORK_BANS_CLEAR_VIEW}:${JSON.stringify([id, decoded.success.ipv4_addresses])}`)
      return json(200, bansJson(yield* hostBans(id)))
    })
  },
  {
    method: "GET",
    path: "/api/tenants/:id/pools",
    summary:
      "This node's pools of the tenant (worker mode: every worker's, with its number): clients active and waiting, servers active and idle, longest wait; in cluster mode also the store ledger's permits of its pools on every host",
    responses: {
      "200":
        '{"data":[{"user","database","mode","pool_size","clients_active","clients_waiting","servers_active","servers_idle","servers_opening","longest_wait_ms","worker"?}],"cluster"?:[{"user","database","mode","runner_id","slot","held","want","keep","press"}]|null,"cluster_error"?}',
      "404": '{"error":"not found"}'
    },
    handler: Effect.gen(function* () {
      const id = yield* idParam
      if ((yield* Tenants).get(id) === undefined) return notFound
      const host = Option.getOrUndefined(yield* Effect.serviceOption(HostViews))
      const data: Array<unknown> = []
      if (host === undefined) data.push(...tenantPoolRows((yield* PoolRegistry).poolsOf(id)))
      else {
        // Worker mode: every worker's pools, each row naming its worker (as SHOW POOLS does), so any
        // worker the request reaches answers the same.
        const gathered = yield* host.gather(`${TENANT_POOLS_VIEW}:${id}`)
        for (const part of gathered.parts)
          if (Array.isArray(part.data)) for (const row of part.data) data.push({ ...row, worker: part.worker })
      }
      const ledger = yield* storeViews
      if (ledger === undefined) return json(200, { data })
      // Cluster mode: `data` is this host's, `cluster` the store ledger's rows of the tenant's pools,
      // the same whichever host answers (SHOW PERMITS, one tenant's part).
      const permits = yield* Effect.result(ledger.permits)
      if (Result.isFailure(permits)) return json(200, { data, cluster: null, cluster_error: permits.failure.message })
      const cluster = permits.success
        .filter((p) => p.tenant === id)
        .map((p) => ({
          user: p.user,
          database: p.database,
          mode: p.mode,
          runner_id: p.runnerId,
          slot: p.slot,
          held: p.held,
          want: p.want,
          keep: p.keep,
          press: p.press
        }))
      return json(200, { data, cluster })
    })
  }
]

/** Worker mode (registered by ApiServer): a worker's circuit-breaker blocks of a tenant, and lifting some. */
export const NETWORK_BANS_VIEW = "network-bans"
export const NETWORK_BANS_CLEAR_VIEW = "network-bans-clear"

/**
 * The blocks of `tenant`: this process's, or in worker mode every worker's (each breaker counts and
 * blocks on its own), an address blocked by several listed once, until the latest.
 */
const hostBans = (tenant: string) =>
  Effect.gen(function* () {
    const host = Option.getOrUndefined(yield* Effect.serviceOption(HostViews))
    if (host === undefined) return yield* (yield* CircuitBreaker).bans(tenant)
    const gathered = yield* host.gather(`${NETWORK_BANS_VIEW}:${tenant}`)
    const until = new Map<string, number>()
    for (const part of gathered.parts)
      if (Array.isArray(part.data))
        for (const ban of part.data as ReadonlyArray<{ address: string; until: number }>)
          until.set(ban.address, Math.max(until.get(ban.address) ?? 0, ban.until))
    return [...until].map(([address, at]) => ({ address, until: at }))
  })

/** The gathered view behind `GET /api/tenants/:id/pools` in worker mode (registered by ApiServer). */
export const TENANT_POOLS_VIEW = "tenant-pools"

/** A tenant's pools on this process, as `GET /api/tenants/:id/pools` shows them. */
export const tenantPoolRows = (pools: ReadonlyArray<TenantPool>, now: number = Date.now()) =>
  pools.map((pool) => {
    const s = pool.stats
    return {
      user: pool.settings.user,
      database: pool.settings.database,
      mode: pool.settings.mode,
      pool_size: pool.settings.size,
      clients_active: s.clients,
      clients_waiting: s.waiting,
      servers_active: s.busy,
      servers_idle: s.idle,
      servers_opening: s.opening,
      longest_wait_ms: pool.longestWaitMs(now)
    }
  })
