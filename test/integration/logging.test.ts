import pg from "pg"
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"

let db: PostgresServer
let tidepool: RunningTidepool
const lines: Array<string> = []

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: "app-secret" }] })
  tidepool = await startTidepool({
    tenants: [
      { external_id: "quiet", ...upstreamOf(db), users: [{ db_user: "app", db_password: "app-secret" }] },
      {
        external_id: "loud",
        ...upstreamOf(db),
        feature_flags: { log_level: "debug" },
        users: [{ db_user: "app", db_password: "app-secret" }]
      }
    ],
    config: { logLevel: "info", logFormat: "json" }
  })
  const write = process.stdout.write.bind(process.stdout)
  vi.spyOn(process.stdout, "write").mockImplementation((chunk, ...rest) => {
    if (String(chunk).startsWith("{")) lines.push(String(chunk))
    else return write(chunk, ...(rest as []))
    return true
  })
})

afterAll(async () => {
  vi.restoreAllMocks()
  await tidepool?.stop()
  await db?.stop()
})

const session = async (tenant: string) => {
  const client = new pg.Client({ connectionString: tidepool.url({ user: `app.${tenant}`, password: "app-secret" }) })
  await client.connect()
  await client.query("SELECT 1")
  await client.end()
}

describe("per-tenant log level", () => {
  it("feature_flags.log_level lowers the level for that tenant's sessions only", async () => {
    await session("quiet")
    expect(lines.filter((l) => l.includes('"level":"debug"'))).toEqual([])
    await session("loud")
    const debug = lines.filter((l) => l.includes('"level":"debug"')).map((l) => JSON.parse(l) as { msg: string })
    expect(debug.map((l) => l.msg)).toContain("relay ended: ClientTerminated")
  })
})
