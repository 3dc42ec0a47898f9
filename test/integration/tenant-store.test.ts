import { randomBytes } from "node:crypto"
import { mkdtempSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import * as path from "node:path"
import { DatabaseSync } from "node:sqlite"
import { Deferred, Effect, Redacted } from "effect"
import pg from "pg"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import type { AppConfigShape } from "../../src/config/index.ts"
import { Tenants } from "../../src/tenants/index.ts"
import { callApi } from "../support/api.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"

let db: PostgresServer
const dirs: Array<string> = []

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: "app-secret" }], databases: ["tidepool_store"] })
})

afterAll(async () => {
  await db?.stop()
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true })
})

const tenant = (id: string) => ({
  tenant: { external_id: id, ...upstreamOf(db), users: [{ db_user: "app", db_password: "app-secret", pool_size: 2 }] }
})

const start = (config: Partial<AppConfigShape>) => startTidepool({ tenants: [], api: true, store: "config", config })

const selectOne = async (tidepool: RunningTidepool, id: string) => {
  const client = new pg.Client({ connectionString: tidepool.url({ user: `app.${id}`, password: "app-secret" }) })
  client.on("error", () => {})
  await client.connect()
  try {
    return (await client.query("select 1 as one")).rows[0].one as number
  } finally {
    await client.end()
  }
}

/** Resolves when `tidepool`'s tenant cache has applied a change to `id` (an API write elsewhere). */
const nextChange = async (tidepool: RunningTidepool, id: string) => {
  const seen = await tidepool.runtime.runPromise(Deferred.make<void>())
  await tidepool.runtime.runPromise(
    Effect.flatMap(Tenants, (t) =>
      t.onChange((change) =>
        (change._tag === "Removed" ? change.before : change.after).external_id === id
          ? Deferred.succeed(seen, undefined)
          : Effect.void
      )
    )
  )
  return tidepool.runtime.runPromise(Deferred.await(seen))
}

describe("SQLite tenant store", () => {
  const dataDir = mkdtempSync(path.join(tmpdir(), "tidepool-store-"))
  dirs.push(dataDir)
  const key = randomBytes(32).toString("hex")

  it("keeps API tenants across a restart, passwords encrypted at rest", async () => {
    const first = await start({ dataDir, vaultEncKey: Redacted.make(key) })
    expect((await callApi(first, "PUT", "/api/tenants/kept", { body: tenant("kept") })).status).toBe(201)
    await first.stop()

    // Read with Node's own SQLite, not Tidepool's client: this is what any other reader of the file sees.
    const file = new DatabaseSync(path.join(dataDir, "tidepool.db"), { readOnly: true })
    const rows = file.prepare("SELECT config FROM tidepool_tenants").all() as Array<{ config: string }>
    file.close()
    expect(rows).toHaveLength(1)
    expect(rows[0]!.config).not.toContain("app-secret")
    expect(JSON.parse(rows[0]!.config).users[0].db_password_enc).toMatch(/^v1:/)

    const second = await start({ dataDir, vaultEncKey: Redacted.make(key) })
    expect((await callApi(second, "GET", "/api/tenants/kept")).json.data.external_id).toBe("kept")
    expect(await selectOne(second, "kept")).toBe(1)
    await second.stop()
  })

  it("config-file tenants win over the store at start, but keep a ban set through the API", async () => {
    const dir = mkdtempSync(path.join(tmpdir(), "tidepool-store-"))
    dirs.push(dir)
    const config = { dataDir: dir, vaultEncKey: Redacted.make(key) }
    const filed = { ...tenant("filed").tenant, default_pool_size: 4 }
    const first = await startTidepool({ tenants: [filed], api: true, store: "config", config })
    await callApi(first, "PUT", "/api/tenants/filed", { body: { tenant: { ...filed, default_pool_size: 9 } } })
    await callApi(first, "PATCH", "/api/tenants/filed", { body: { banned: true, ban_reason: "kept" } })
    await callApi(first, "PUT", "/api/tenants/apionly", { body: tenant("apionly") })
    await first.stop()
    const second = await startTidepool({ tenants: [filed], api: true, store: "config", config })
    try {
      const shown = (await callApi(second, "GET", "/api/tenants/filed")).json.data
      expect(shown).toMatchObject({ default_pool_size: 4, ban_reason: "kept" })
      expect((await callApi(second, "GET", "/api/tenants/apionly")).status).toBe(200)
    } finally {
      await second.stop()
    }
  })

  it("refuses to start without the key, or with another key, saying so", async () => {
    const stored = mkdtempSync(path.join(tmpdir(), "tidepool-store-"))
    dirs.push(stored)
    const writer = await start({ dataDir: stored, vaultEncKey: Redacted.make(key) })
    await callApi(writer, "PUT", "/api/tenants/locked", { body: tenant("locked") })
    await writer.stop()
    await expect(start({ dataDir: stored })).rejects.toThrow(/VAULT_ENC_KEY is not set/)
    await expect(
      start({ dataDir: stored, vaultEncKey: Redacted.make(randomBytes(32).toString("base64")) })
    ).rejects.toThrow(/VAULT_ENC_KEY differs/)
    const empty = mkdtempSync(path.join(tmpdir(), "tidepool-store-"))
    dirs.push(empty)
    await expect(
      startTidepool({
        tenants: [tenant("filed").tenant],
        store: "config",
        config: { dataDir: empty }
      })
    ).rejects.toThrow(/VAULT_ENC_KEY is not set: it is required to store user passwords/)
  })
})

describe("PostgreSQL tenant store (DATABASE_URL)", () => {
  const key = Redacted.make(randomBytes(32).toString("base64"))
  const config = () => ({ databaseUrl: Redacted.make(db.url({ database: "tidepool_store" })), vaultEncKey: key })

  it("shares tenants between nodes at once (LISTEN/NOTIFY) and keeps them across restarts", async () => {
    const a = await start(config())
    const b = await start(config())
    try {
      const learnt = nextChange(b, "shared")
      expect((await callApi(a, "GET", "/api/health", { token: null })).status).toBe(204)
      expect((await callApi(a, "PUT", "/api/tenants/shared", { body: tenant("shared") })).status).toBe(201)
      await learnt
      expect(await selectOne(b, "shared")).toBe(1)

      // A ban made on node a reaches node b's clients.
      const client = new pg.Client({ connectionString: b.url({ user: "app.shared", password: "app-secret" }) })
      const ended = new Promise<Error>((resolve) => client.once("error", resolve))
      client.on("error", () => {})
      await client.connect()
      expect(
        (await callApi(a, "PATCH", "/api/tenants/shared", { body: { banned: true, ban_reason: "elsewhere" } })).status
      ).toBe(200)
      expect((await ended).message).toBe("(EBANNED) tenant is banned: elsewhere")
      const unbanned = nextChange(b, "shared")
      await callApi(a, "PATCH", "/api/tenants/shared", { body: { banned: false } })
      await unbanned
    } finally {
      await a.stop()
      await b.stop()
    }
    const raw = new pg.Client({ connectionString: db.url({ database: "tidepool_store" }) })
    await raw.connect()
    const { rows } = await raw.query("SELECT config FROM tidepool_tenants")
    await raw.end()
    expect(JSON.stringify(rows)).not.toContain("app-secret")
    const again = await startTidepool({ tenants: [], api: true, store: "config", config: config() })
    try {
      expect((await callApi(again, "GET", "/api/tenants/shared")).json.data.external_id).toBe("shared")
      expect(await selectOne(again, "shared")).toBe(1)
    } finally {
      await again.stop()
    }
  })

  it("a change no notification announced is picked up by the periodic refresh", async () => {
    const node = await start({ ...config(), tenantRefreshMs: 100 })
    try {
      expect((await callApi(node, "PUT", "/api/tenants/quiet", { body: tenant("quiet") })).status).toBe(201)
      const seen = nextChange(node, "quiet")
      // Behind Tidepool's back: no NOTIFY.
      const raw = new pg.Client({ connectionString: db.url({ database: "tidepool_store" }) })
      await raw.connect()
      await raw.query("DELETE FROM tidepool_tenants WHERE external_id = 'quiet'")
      await raw.end()
      await seen
      expect((await callApi(node, "GET", "/api/tenants/quiet")).status).toBe(404)
    } finally {
      await node.stop()
    }
  })
})
