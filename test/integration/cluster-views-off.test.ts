import { randomBytes } from "node:crypto"
import { Effect, Redacted } from "effect"
import pg from "pg"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { Metrics } from "../../src/telemetry/index.ts"
import { callApi } from "../support/api.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { parseExposition } from "../support/prometheus.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"

/**
 * Two nodes sharing a PostgreSQL store without TIDEPOOL_CLUSTER (docs/api.md, docs/admin-console.md):
 * a terminate still reaches the other node's clients (the HTTP API answers the same on every node),
 * and the store ledger's views say that cluster mode is off instead of showing anything.
 */
let db: PostgresServer
let a: RunningTidepool
let b: RunningTidepool
const DEADLINE_MS = 10_000

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: "app-secret" }], databases: ["tidepool_store"] })
  const config = {
    databaseUrl: Redacted.make(db.url({ database: "tidepool_store" })),
    vaultEncKey: Redacted.make(randomBytes(32).toString("hex")),
    adminUsers: [{ name: "ops", secret: "ops-secret" }]
  }
  const tenants = [{ external_id: "acme", ...upstreamOf(db), users: [{ db_user: "app", db_password: "app-secret" }] }]
  a = await startTidepool({ tenants, api: true, store: "config", config })
  b = await startTidepool({ tenants, api: true, store: "config", config })
}, 30_000)

afterAll(async () => {
  await a?.stop()
  await b?.stop()
  await db?.stop()
})

const connect = async (node: RunningTidepool, user: string, database = "postgres") => {
  const client = new pg.Client({
    connectionString: node.url({ user, password: user === "ops" ? "ops-secret" : "app-secret", database })
  })
  client.on("error", () => undefined)
  await client.connect()
  return client
}

/** `promise`, or a failure naming `what` once the deadline has passed. */
const within = <A>(what: string, promise: Promise<A>): Promise<A> => {
  let timer: NodeJS.Timeout | undefined
  return Promise.race([
    promise,
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`gave up waiting: ${what}`)), DEADLINE_MS)
    })
  ]).finally(() => clearTimeout(timer))
}

describe("several nodes on one PostgreSQL store, cluster mode off", () => {
  it("a terminate through node a's API ends the tenant's clients on node b with 57P01", async () => {
    const client = await connect(b, "app.acme")
    expect((await client.query("SELECT 1 AS one")).rows[0].one).toBe(1)
    const ended = new Promise<Error & { code?: string }>((resolve) => client.once("error", resolve))
    const answer = await callApi(a, "GET", "/api/tenants/acme/terminate")
    expect(answer.status).toBe(200)
    // No client of the tenant on node a: it counts only its own.
    expect(answer.json).toEqual({ result: "success", disconnected: 0, reach: "all_nodes" })
    expect((await within("node b's client to be terminated", ended)).code).toBe("57P01")
    // It may reconnect at once: only the clients of that moment are ended.
    const again = await connect(b, "app.acme")
    expect((await again.query("SELECT 2 AS two")).rows[0].two).toBe(2)
    await again.end()
  })

  it("SHOW RUNNERS and SHOW PERMITS answer that cluster mode is off; /metrics has no cluster series", async () => {
    const admin = await connect(b, "ops", "pgbouncer")
    try {
      for (const view of ["RUNNERS", "PERMITS"]) {
        await expect(admin.query(`SHOW ${view}`)).rejects.toThrow(
          `(ECLUSTERVIEW) SHOW ${view}: cluster mode is off (TIDEPOOL_CLUSTER), so there is no permit ledger in the store`
        )
      }
      // The session stays usable after the error.
      expect((await admin.query("SHOW VERSION")).rows).toHaveLength(1)
    } finally {
      await admin.end()
    }
    const exposition = parseExposition(await b.runtime.runPromise(Effect.flatMap(Metrics, (m) => m.scrape())))
    expect([...exposition.types.keys()].filter((name) => name.startsWith("tidepool_cluster_"))).toEqual([])
  })
})
