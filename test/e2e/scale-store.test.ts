import { mkdtempSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import * as path from "node:path"
import pg from "pg"
import { afterAll, describe, expect, it } from "vitest"
import { runCli } from "../support/cli.ts"
import { writeConfig } from "../support/config.ts"
import { freePort } from "../support/ports.ts"
import { startPostgres } from "../support/postgres.ts"

/**
 * TIDEPOOL_WORKERS=2 with the tenant store in PostgreSQL (DATABASE_URL), and that store going away
 * (docs/scale-out.md#failure-table): the permit ledger is the supervisor's, so pooling carries on —
 * running clients, new logins of known tenants, servers opened for them — on the tenant database.
 */
const dir = mkdtempSync(path.join(tmpdir(), "tidepool-scale-store-"))
afterAll(() => rmSync(dir, { recursive: true, force: true }))

describe("TIDEPOOL_WORKERS=2 with a PostgreSQL store", () => {
  it("keeps serving, within pool_size, while the store is down", async () => {
    const db = await startPostgres({ roles: [{ name: "app", password: "app-secret" }] })
    const store = await startPostgres()
    const config = writeConfig(path.join(dir, "tidepool.yaml"), [
      {
        external_id: "acme",
        db_host: db.host,
        db_port: db.port,
        users: [{ db_user: "app", db_password: "app-secret", pool_size: 4 }]
      }
    ])
    const port = await freePort()
    const cli = runCli(["serve", "--config", config], {
      DATABASE_URL: store.url(),
      TIDEPOOL_WORKERS: "2",
      PROXY_PORT_TRANSACTION: String(port),
      PROXY_PORT_SESSION: String(await freePort()),
      PORT: String(await freePort()),
      TIDEPOOL_LISTEN_ADDR: "127.0.0.1",
      TIDEPOOL_DATA_DIR: path.join(dir, "data"),
      TIDEPOOL_TENANT_REFRESH_MS: "500",
      VAULT_ENC_KEY: "0f".repeat(32)
    })
    const clients: Array<pg.Client> = []
    const connect = async () => {
      const c = new pg.Client({ connectionString: `postgresql://app.acme:app-secret@127.0.0.1:${port}/postgres` })
      c.on("error", () => undefined)
      await c.connect()
      clients.push(c)
      return c
    }
    try {
      await cli.waitFor(/2 workers listening/)
      const before = await Promise.all(Array.from({ length: 4 }, connect))
      await Promise.all(before.map((c) => c.query("SELECT 1")))
      const mark = cli.output().length
      await store.stop()
      // Both workers' refreshes fail from now on, and say so.
      const deadline = Date.now() + 20_000
      while (
        (
          cli
            .output()
            .slice(mark)
            .match(/listing tenant versions failed/g) ?? []
        ).length < 2
      ) {
        if (Date.now() > deadline) throw new Error(`no worker noticed the store outage:\n${cli.output().slice(mark)}`)
        await new Promise((r) => setTimeout(r, 50))
      }
      // Running clients continue; new logins of a cached tenant are served; 12 clients share 4 servers.
      const after = await Promise.all(Array.from({ length: 8 }, connect))
      const all = [...before, ...after]
      for (let round = 0; round < 3; round++) {
        const sums = await Promise.all(
          all.map((c) => c.query("SELECT sum(x)::int AS s FROM generate_series(1, 100) x"))
        )
        expect(sums.map((r) => r.rows[0].s)).toEqual(all.map(() => 5050))
      }
      const servers = await db.query("SELECT count(*)::int AS n FROM pg_stat_activity WHERE usename = 'app'")
      expect(servers[0].n).toBeLessThanOrEqual(4)
    } finally {
      await Promise.all(clients.map((c) => c.end().catch(() => undefined)))
      cli.child.kill("SIGTERM")
      await cli.exited
      await store.stop()
      await db.stop()
    }
  }, 90_000)
})
