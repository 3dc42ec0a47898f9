import pg from "pg"
import { describe, expect, it } from "vitest"
import { type PgAuthMethod, startPostgres } from "../support/postgres.ts"
import { startTidepool, upstreamOf } from "../support/tidepool.ts"

// Tidepool logs in to the database with whatever method its pg_hba.conf asks for.
describe("upstream login methods", () => {
  for (const auth of ["scram-sha-256", "md5", "password", "trust"] as const satisfies ReadonlyArray<PgAuthMethod>) {
    it(`logs in upstream with ${auth}`, async () => {
      const db = await startPostgres({ auth, roles: [{ name: "app", password: "upstream-secret" }] })
      const tidepool = await startTidepool({
        tenants: [
          {
            external_id: "acme",
            ...upstreamOf(db),
            users: [{ db_user: "app", db_password: "upstream-secret", pool_size: 1 }]
          }
        ]
      })
      try {
        for (const mode of ["session", "transaction"] as const) {
          const client = new pg.Client({
            connectionString: tidepool.url({ user: "app.acme", password: "upstream-secret", mode })
          })
          await client.connect()
          const { rows } = await client.query("SELECT current_user AS who")
          expect(rows[0].who).toBe("app")
          await client.end()
        }
      } finally {
        await tidepool.stop()
        await db.stop()
      }
    })
  }
})
