import { Effect } from "effect"
import pg from "pg"
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest"
import { PoolRegistry } from "../../src/pool/index.ts"
import { PreparedStatements } from "../../src/session/PreparedStatements.ts"
import { SessionRelay } from "../../src/session/SessionRelay.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"

/*
 * Containment: an exception thrown by our own code in a socket callback (a bug) ends that client's
 * session with EINTERNAL and discards its server; the process and every other client carry on. The
 * faults are injected into the relays' code paths for the chunks that carry a marker.
 */

const PASSWORD = "app-secret"
let db: PostgresServer
let tidepool: RunningTidepool

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: PASSWORD, superuser: true }] })
  tidepool = await startTidepool({
    captureLogs: true,
    tenants: [
      { external_id: "acme", ...upstreamOf(db), users: [{ db_user: "app", db_password: PASSWORD, pool_size: 1 }] },
      { external_id: "other", ...upstreamOf(db), users: [{ db_user: "app", db_password: PASSWORD, pool_size: 1 }] }
    ]
  })
})

afterEach(() => {
  vi.restoreAllMocks()
})

afterAll(async () => {
  await tidepool?.stop()
  await db?.stop()
})

const connect = async (tenant: string, mode: "transaction" | "session") => {
  const c = new pg.Client({ connectionString: tidepool.url({ user: `app.${tenant}`, password: PASSWORD, mode }) })
  c.on("error", () => {})
  await c.connect()
  return c
}

const poolOf = (tenant: string, mode: string) =>
  tidepool.runtime.runPromise(
    Effect.map(PoolRegistry, (r) => r.all().find((p) => p.settings.key.includes(`${tenant}\u0000app\u0000${mode}`)))
  )

const marked = (chunk: Buffer, marker: string) => chunk.includes(marker)

/** `victim` runs `sql` and must get EINTERNAL; `bystander` and a fresh client of the same pool keep working. */
const expectContained = async (mode: "transaction" | "session", sql: string) => {
  const victim = await connect("acme", mode)
  const bystander = await connect("other", mode)
  const pid = async (c: pg.Client) => (await c.query("SELECT pg_backend_pid() AS pid")).rows[0].pid as number
  const victimPid = await pid(victim)
  await expect(victim.query(sql)).rejects.toThrow(/\(EINTERNAL\) internal error in the pooler/)
  expect((await bystander.query("SELECT 1 AS one")).rows).toEqual([{ one: 1 }])
  await bystander.end()
  // The victim's server was discarded, not returned: the pool of one lends a clean one.
  const after = await connect("acme", mode)
  expect(await pid(after)).not.toBe(victimPid)
  await after.end()
  if (mode === "transaction") expect((await poolOf("acme", mode))!.stats.busy).toBe(0)
  const logged = tidepool.logs.filter((l) => l.level === "ERROR" && l.message.includes("internal error in the relay"))
  expect(logged.length).toBeGreaterThan(0)
}

describe("an exception in a relay callback ends only that session", () => {
  it("transaction mode, client → server", async () => {
    const write = PreparedStatements.prototype.write
    vi.spyOn(PreparedStatements.prototype, "write").mockImplementation(function (this: PreparedStatements, s, data) {
      if (marked(data, "boom_client")) throw new Error("injected fault (client side)")
      return write.call(this, s, data)
    })
    await expectContained("transaction", "SELECT 'boom_client'")
  })

  it("transaction mode, server → client", async () => {
    const forward = PreparedStatements.prototype.forward
    vi.spyOn(PreparedStatements.prototype, "forward").mockImplementation(function (this: PreparedStatements, s, chunk) {
      if (marked(chunk, "boom_server")) throw new Error("injected fault (server side)")
      return forward.call(this, s, chunk)
    })
    await expectContained("transaction", "SELECT 'boom_' || 'server'")
  })

  it("transaction mode, in the prepared-statement tracking that reads the server's replies", async () => {
    // biome-ignore lint/suspicious/noExplicitAny: a private step of the server-side observer is the injection point.
    const proto = PreparedStatements.prototype as any
    const onTag = proto.onTag
    vi.spyOn(proto, "onTag").mockImplementation(function (
      this: unknown,
      body: unknown,
      start: unknown,
      length: unknown
    ) {
      if ((body as Buffer).toString("latin1", start as number, (start as number) + 2) === "DO") {
        throw new Error("injected fault (server reply observer)")
      }
      return onTag.call(this, body, start, length)
    })
    await expectContained("transaction", "DO $$ BEGIN END $$")
  })

  it("session mode, both directions", async () => {
    // biome-ignore lint/suspicious/noExplicitAny: the relay's private step is the injection point.
    const proto = SessionRelay.prototype as any
    const clientData = proto.clientData
    vi.spyOn(proto, "clientData").mockImplementation(function (this: unknown, chunk: unknown) {
      if (marked(chunk as Buffer, "boom_client")) throw new Error("injected fault (session, client side)")
      return clientData.call(this, chunk)
    })
    await expectContained("session", "SELECT 'boom_client'")
    const serverData = proto.serverData
    vi.spyOn(proto, "serverData").mockImplementation(function (this: unknown, chunk: unknown) {
      if (marked(chunk as Buffer, "boom_server")) throw new Error("injected fault (session, server side)")
      return serverData.call(this, chunk)
    })
    await expectContained("session", "SELECT 'boom_' || 'server'")
  })
})
