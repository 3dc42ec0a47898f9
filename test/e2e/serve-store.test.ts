import { copyFileSync, mkdirSync, mkdtempSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import * as path from "node:path"
import { afterAll, describe, expect, it } from "vitest"
import { callApi, mintToken } from "../support/api.ts"
import { runCli } from "../support/cli.ts"
import { freePort } from "../support/ports.ts"
import { TEST_JWT_SECRET } from "../support/tidepool.ts"

// A data directory as Tidepool 0.1.0 on Effect 3 (better-sqlite3) left it; see
// test/unit/tenants/TenantStore.test.ts for what it holds and the key it was written with.
const fixture = new URL("../fixtures/tenant-store-effect3.db", import.meta.url).pathname
const fixtureKey = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"

const dir = mkdtempSync(path.join(tmpdir(), "tidepool-upgrade-"))
afterAll(() => rmSync(dir, { recursive: true, force: true }))

describe("tidepool serve after an upgrade", () => {
  it("keeps the tenants of a data directory written by the Effect 3 version", async () => {
    const dataDir = path.join(dir, "data")
    mkdirSync(dataDir)
    copyFileSync(fixture, path.join(dataDir, "tidepool.db"))
    const apiPort = await freePort()
    const cli = runCli(["serve"], {
      TIDEPOOL_DATA_DIR: dataDir,
      VAULT_ENC_KEY: fixtureKey,
      API_JWT_SECRET: TEST_JWT_SECRET,
      TIDEPOOL_LISTEN_ADDR: "127.0.0.1",
      PROXY_PORT_SESSION: String(await freePort()),
      PROXY_PORT_TRANSACTION: String(await freePort()),
      PORT: String(apiPort)
    })
    try {
      await cli.waitFor(/tidepool listening/)
      const listed = await callApi({ apiPort }, "GET", "/api/tenants", { token: await mintToken() })
      expect(listed.status).toBe(200)
      expect(listed.json.data.map((t: { external_id: string }) => t.external_id).sort()).toEqual(["acme", "jit_tenant"])
      const acme = (await callApi({ apiPort }, "GET", "/api/tenants/acme")).json.data
      expect(acme).toMatchObject({ default_pool_size: 7, allow_list: ["10.0.0.0/8"] })
      expect(acme.users.map((u: { db_user_alias: string }) => u.db_user_alias)).toEqual(["app", "reader"])
    } finally {
      cli.child.kill("SIGTERM")
      await cli.exited
    }
    expect(cli.output()).not.toMatch(/app-secret|ro-secret|owner-secret/)
  })
})
