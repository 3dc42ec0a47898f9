import pg from "pg"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { startTidepool, upstreamOf } from "../support/tidepool.ts"

let db: PostgresServer

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: "app-secret" }] })
})

afterAll(async () => {
  await db?.stop()
})

describe("graceful shutdown", () => {
  for (const mode of ["transaction", "session"] as const) {
    it(`closes a client still inside a transaction with 57P01 once the drain timeout ends (${mode})`, async () => {
      const tidepool = await startTidepool({
        tenants: [
          {
            external_id: "acme",
            ...upstreamOf(db),
            users: [{ db_user: "app", db_password: "app-secret", pool_size: 2 }]
          }
        ],
        config: { shutdownTimeoutMs: 300 }
      })
      const client = new pg.Client({
        connectionString: tidepool.url({ user: "app.acme", password: "app-secret", mode })
      })
      const closed = new Promise<{ code?: string }>((resolve) =>
        client.on("error", (e) => resolve(e as { code?: string }))
      )
      await client.connect()
      await client.query("BEGIN")
      await tidepool.stop()
      expect((await closed).code).toBe("57P01")
      // The server it held was closed, not returned: PostgreSQL rolled the transaction back.
      for (;;) {
        const rows = await db.query(
          "SELECT 1 FROM pg_stat_activity WHERE usename = 'app' AND state LIKE 'idle in transaction%'"
        )
        if (rows.length === 0) break
      }
    })
  }
})
