import { mkdtempSync, rmSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import * as path from "node:path"
import pg from "pg"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { writeConfig } from "../support/config.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { type ClusterHost, startClusterHost } from "../support/scale.ts"

/**
 * TIDEPOOL_CLUSTER=on (docs/scale-out.md#how-per-key-records-live-and-go): a pool key used once —
 * a JIT token's, a deleted tenant's, here one of many users' — leaves nothing behind once its pools
 * are swept: no row in the store's ledger (`tidepool_permits`, `tidepool_seats`), no record in a
 * host supervisor (its host ledgers and its runner's lines), nor in a one-process runner's lines.
 * A host of two workers and a one-process runner share one embedded PostgreSQL as store and tenant
 * database; pools close at the first sweep after their last client leaves.
 */
const PASSWORD = "app-secret"
const USERS = Array.from({ length: 6 }, (_, i) => `u${i + 1}`)
const dir = mkdtempSync(path.join(tmpdir(), "tidepool-hosts-keys-"))
afterAll(() => rmSync(dir, { recursive: true, force: true }))

type Host = ClusterHost

/** Starts a host of `workers` workers; a pool whose last client left closes at the next sweep (about a second). */
const startHost = (storeUrl: string, config: string | undefined, n: number, workers: number) =>
  startClusterHost({
    dir,
    storeUrl,
    config,
    n,
    leaseMs: 3_000,
    env: { TIDEPOOL_WORKERS: String(workers), TIDEPOOL_POOL_SHUTDOWN_AFTER: "0" }
  })

const connect = async (port: number, user: string) => {
  const c = new pg.Client({ connectionString: `postgresql://${user}.acme:${PASSWORD}@127.0.0.1:${port}/postgres` })
  c.on("error", () => undefined)
  await c.connect()
  return c
}

/** The runner's removals of unused lines so far (its debug log): how many, and the lines left after the last. */
const removals = (host: Host) => {
  const all = [...host.cli.output().matchAll(/(\d+) permit and (\d+) seat line\(s\) left/g)]
  return { count: all.length, left: all.at(-1)?.slice(1, 3).join("/") }
}

describe("TIDEPOOL_CLUSTER=on: a pool key's records and store rows go once its pools are swept", () => {
  let db: PostgresServer
  const hosts: Array<Host> = []

  /** The ledger's rows per table, as `user:count` over the pool keys of the test's users. */
  const rows = async () => {
    const count = async (table: string) =>
      (await db.query(`SELECT pool_key::json->>1 AS u, count(*)::int AS n FROM ${table} GROUP BY 1 ORDER BY 1`)).map(
        (r) => `${r.u}:${r.n}`
      )
    return { permits: await count("tidepool_permits"), seats: await count("tidepool_seats") }
  }

  /**
   * Waits (bounded) until nothing of any key is left in the store, and each host's runner has removed
   * lines since `before` (its removal count then) and has none left.
   */
  const allGone = async (before: ReadonlyArray<number>) => {
    const deadline = Date.now() + 15_000
    for (;;) {
      const left = await rows()
      const lines = hosts.map(removals)
      if (
        left.permits.length === 0 &&
        left.seats.length === 0 &&
        lines.every((l, i) => l.count > before[i]! && l.left === "0/0")
      )
        return
      if (Date.now() > deadline)
        throw new Error(`still there after 15 s: store ${JSON.stringify(left)}, runner lines ${JSON.stringify(lines)}`)
      await new Promise((resolve) => setTimeout(resolve, 100))
    }
  }

  beforeAll(async () => {
    db = await startPostgres({ roles: USERS.map((name) => ({ name, password: PASSWORD })) })
    const config = writeConfig(path.join(dir, "keys.yaml"), [
      {
        external_id: "acme",
        db_host: db.host,
        db_port: db.port,
        users: USERS.map((u) => ({ db_user: u, db_password: PASSWORD, pool_size: 2, max_clients: 8 }))
      }
    ])
    // A host of two workers (its supervisor is the store's runner) and a one-process runner.
    // (The second starts once the first has written the tenants to the store.)
    const first = await startHost(db.url(), config, 1, 2)
    await first.seeded
    const second = await startHost(db.url(), undefined, 2, 1)
    hosts.push(...(await Promise.all([first.ready, second.ready])))
  }, 60_000)

  afterAll(async () => {
    if (process.env.SCALE_DEBUG)
      writeFileSync("/tmp/scale-hosts-keys.log", hosts.map((h) => h.cli.output()).join("\n=====\n"))
    for (const h of hosts) if (h.cli.child.exitCode === null) h.cli.child.kill("SIGTERM")
    await Promise.all(hosts.map((h) => h.cli.exited))
    await db?.stop()
  })

  it("six users' pools on both hosts, used once: their rows and records go, and a key used again is served", async () => {
    const clients = await Promise.all(hosts.flatMap((h) => USERS.map((u) => connect(h.port, u))))
    for (const c of clients) expect((await c.query("SELECT 1 AS one")).rows[0].one).toBe(1)
    // In use: each host holds a permit (an idle server) and seats for every key.
    const using = USERS.map((u) => `${u}:2`)
    expect(await rows()).toEqual({ permits: using, seats: using })
    const before = hosts.map((h) => removals(h).count)
    await Promise.all(clients.map((c) => c.end()))
    await allGone(before)

    // Used again, on both hosts at once, and left again: made anew, and gone again.
    const again = await Promise.all(hosts.map((h) => connect(h.port, "u1")))
    for (const c of again) expect((await c.query("SELECT 2 AS two")).rows[0].two).toBe(2)
    expect(await rows()).toEqual({ permits: ["u1:2"], seats: ["u1:2"] })
    const first = hosts.map((h) => removals(h).count)
    await Promise.all(again.map((c) => c.end()))
    await allGone(first)
  }, 45_000)
})
