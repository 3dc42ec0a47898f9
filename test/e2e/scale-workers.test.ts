import { mkdtempSync, rmSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import * as path from "node:path"
import pg from "pg"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { LeanClient, ScramKeyCache } from "../../bench/leanClient.ts"
import { ownerOf } from "../../src/cluster/index.ts"
import { callApi, mintToken } from "../support/api.ts"
import { cancelWhileBusy } from "../support/cancel.ts"
import { type CliProcess, runCli } from "../support/cli.ts"
import { writeConfig } from "../support/config.ts"
import { freePort } from "../support/ports.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { parseExposition } from "../support/prometheus.ts"
import { processIdOf, sample, serversOf } from "../support/scale.ts"
import { TEST_JWT_SECRET } from "../support/tidepool.ts"
import { deadline, hasTool, openFilesLimit, run } from "../support/tools.ts"

/**
 * TIDEPOOL_WORKERS=3 (docs/scale-out.md): three worker processes share the ports and one pool of 10
 * through the supervisor's permit ledger. Real processes, real PostgreSQL, pgbench and node-postgres.
 */
const hasPgbench = await hasTool("pgbench")
const PASSWORD = "app-secret"
const POOL = 10
const VAULT_ENC_KEY = "0f".repeat(32)

/**
 * Logins of the storm test: a thousand or so per worker. Each is a socket of this process (the
 * workers are other processes), so a machine whose open-files limit is lower runs fewer.
 */
const STORM = Math.min(3000, openFilesLimit() - 500)

let db: PostgresServer
let dir: string
let cli: CliProcess
let port: number
let apiPort: number

const url = (user = "app") => `postgresql://${user}.acme:${PASSWORD}@127.0.0.1:${port}/postgres`

const client = async (user = "app") => {
  const c = new pg.Client({ connectionString: url(user) })
  c.on("error", () => undefined)
  await c.connect()
  return c
}

beforeAll(async () => {
  db = await startPostgres({
    roles: [
      { name: "app", password: PASSWORD },
      { name: "tiny", password: PASSWORD },
      { name: "crowd", password: PASSWORD }
    ]
  })
  dir = mkdtempSync(path.join(tmpdir(), "tidepool-scale-"))
  const config = writeConfig(path.join(dir, "tidepool.yaml"), [
    {
      external_id: "acme",
      db_host: db.host,
      db_port: db.port,
      users: [
        { db_user: "app", db_password: PASSWORD, pool_size: POOL },
        { db_user: "tiny", db_password: PASSWORD, pool_size: 1 },
        { db_user: "crowd", db_password: PASSWORD, pool_size: 3, max_clients: 5000 }
      ]
    }
  ])
  port = await freePort()
  apiPort = await freePort()
  cli = runCli(["serve", "--config", config], {
    PROXY_PORT_TRANSACTION: String(port),
    PROXY_PORT_SESSION: String(await freePort()),
    PORT: String(apiPort),
    API_JWT_SECRET: TEST_JWT_SECRET,
    METRICS_JWT_SECRET: TEST_JWT_SECRET,
    TIDEPOOL_LISTEN_ADDR: "127.0.0.1",
    TIDEPOOL_DATA_DIR: path.join(dir, "data"),
    TIDEPOOL_WORKERS: "3",
    TIDEPOOL_ADMIN_USERS: `ops=${PASSWORD}`,
    TIDEPOOL_LOG_LEVEL: "debug",
    VAULT_ENC_KEY
  })
  await cli.waitFor(/3 workers listening/)
  if (hasPgbench) await run("pgbench", ["-i", "-s", "1", "-q", db.url({ user: "app", password: PASSWORD })])
}, 60_000)

afterAll(async () => {
  if (process.env.SCALE_DEBUG) writeFileSync("/tmp/scale-cli.log", cli?.output() ?? "")
  if (cli !== undefined && cli.child.exitCode === null) {
    cli.child.kill("SIGTERM")
    await cli.exited
  }
  await db?.stop()
  if (dir) rmSync(dir, { recursive: true, force: true })
})

describe("TIDEPOOL_WORKERS=3", () => {
  it.skipIf(!hasPgbench)(
    "pgbench through all three workers never has more than pool_size servers",
    async () => {
      const bench = run("pgbench", ["-c", "24", "-j", "3", "-T", "6", "-n", url()])
      const { max, samples } = await sample(db, bench)
      const { stdout } = await bench
      expect(stdout).toMatch(/number of failed transactions: 0 /)
      const done = Number(stdout.match(/number of transactions actually processed: (\d+)/)?.[1])
      expect(done).toBeGreaterThan(100)
      expect(samples).toBeGreaterThan(10)
      expect(max).toBeLessThanOrEqual(POOL)
      // The pool was really shared out under load, not served by one server.
      expect(max).toBeGreaterThan(3)
    },
    30_000
  )

  it(`${STORM} logins at once on a new pool of 3 (one server a worker) are all greeted, then all answer`, async () => {
    // Each worker's logins queue for its one server, which learns the new pool's parameters (here
    // behind a PAUSE, so every one of them is queued), then are lent it in turn as it comes back: a
    // long queue once overflowed the stack, and the logins past that point were never greeted
    // (TenantPool's hand-off, docs/architecture.md).
    const admin = new pg.Client({
      connectionString: `postgresql://ops:${PASSWORD}@127.0.0.1:${port}/pgbouncer`
    })
    admin.on("error", () => undefined)
    await admin.connect()
    await admin.query("PAUSE acme")
    const keys = new ScramKeyCache()
    const target = { host: "127.0.0.1", port, user: "crowd.acme", password: PASSWORD, database: "postgres" }
    // A login that fails is reported as itself, not as a queue that never fills.
    let failed: unknown
    const logins = Promise.all(
      Array.from({ length: STORM }, () =>
        LeanClient.login(target, keys).catch((error: unknown) => {
          failed ??= error
          throw error
        })
      )
    )
    logins.catch(() => undefined)
    const waiting = async () => {
      const { rows } = await admin.query("SHOW POOLS")
      return rows.filter((row) => row.user === "crowd").reduce((n, row) => n + Number(row.cl_waiting), 0)
    }
    try {
      await deadline(
        (async () => {
          while ((await waiting()) < STORM) {
            if (failed !== undefined) throw failed
            await new Promise((resolve) => setTimeout(resolve, 100))
          }
        })(),
        90_000,
        "logins not yet queued behind the PAUSE"
      )
    } finally {
      // Whatever happened, the pool is not left paused for the tests after this one.
      await admin.query("RESUME acme").catch(() => undefined)
      await admin.end().catch(() => undefined)
    }
    const clients = await deadline(logins, 60_000, "logins still waiting for their greeting")
    expect(clients).toHaveLength(STORM)
    await deadline(Promise.all(clients.map((c) => c.query("select 1"))), 60_000, "queries still waiting")
    for (const c of clients) c.terminate()
  }, 240_000)

  it("a cancel reaching another worker than the client's cancels its query", async () => {
    let forwarded = 0
    const before = (cli.output().match(/forwarded to worker/g) ?? []).length
    // The kernel picks the worker of each connection; twelve tries make "never another worker" a 1 in 500 000 event.
    for (let i = 0; i < 12; i++) {
      const victim = await client()
      const owner = ownerOf(processIdOf(victim))
      expect(owner).toBeGreaterThanOrEqual(0)
      expect(owner).toBeLessThan(3)
      const { victimCode } = await cancelWhileBusy({ db, port, victim })
      expect(victimCode).toBe("57014")
      await victim.end()
      forwarded = (cli.output().match(/forwarded to worker/g) ?? []).length - before
    }
    expect(forwarded).toBeGreaterThan(0)
  }, 60_000)

  it("a pool of 1 shared by three busy workers: every server opened serves a client before it is handed on", async () => {
    // Servers of the pool opened so far, on every worker (each worker's first login may open one).
    const opened = async () => {
      const response = await fetch(`http://127.0.0.1:${apiPort}/metrics`, {
        headers: { authorization: `Bearer ${await mintToken({}, { secret: TEST_JWT_SECRET })}` }
      })
      expect(response.status).toBe(200)
      return parseExposition(await response.text())
        .samples.filter((s) => s.name === "tidepool_db_handler_started_total" && s.labels.user === "tiny")
        .reduce((sum, s) => sum + s.value, 0)
    }
    const clients = await Promise.all(Array.from({ length: 9 }, () => client("tiny")))
    const owners = new Set(clients.map((c) => ownerOf(processIdOf(c))))
    // Nine connections on three workers all landing on one: a 1 in 2 000 event.
    expect(owners.size).toBeGreaterThan(1)
    const before = await opened()
    // Servers open now (opened by the logins) are not among those the work opens.
    const earlier = new Set(
      (await db.query("SELECT pid FROM pg_stat_activity WHERE usename = 'tiny'")).map((r) => Number(r.pid))
    )
    const served = new Set<number>()
    const work = Promise.all(
      clients.map(async (c) => {
        for (let k = 0; k < 4; k++) served.add((await c.query("SELECT pg_backend_pid() AS pid")).rows[0].pid)
      })
    )
    const { max } = await sample(db, work, "tiny")
    await work
    expect(max).toBeLessThanOrEqual(1)
    // The permit rotated among the workers, and every server opened meanwhile served a query: none
    // was closed unused because a directive to hand the permit on came while it connected.
    expect(served.size).toBeGreaterThan(1)
    const servedByNew = [...served].filter((pid) => !earlier.has(pid)).length
    expect((await opened()) - before).toBeLessThanOrEqual(servedByNew)
    await Promise.all(clients.map((c) => c.end()))
  }, 30_000)

  it("kill -9 of a worker mid-load: the others keep serving, its permits come back, never above pool_size", async () => {
    const pids = [...cli.output().matchAll(/worker (\d) started \(pid (\d+)\)/g)].map((m) => [
      Number(m[1]),
      Number(m[2])
    ])
    const [victimWorker, victimPid] = pids.find(([w]) => w === 2)!
    let stop = false
    let served = 0
    const failures: Array<string> = []
    const connected = async (): Promise<pg.Client | undefined> => {
      // A worker being replaced may refuse for a moment; the test's own deadline bounds the retries.
      while (!stop) {
        try {
          return await client()
        } catch (e) {
          failures.push(String((e as Error).message))
        }
      }
      return undefined
    }
    const loop = async () => {
      let c = await connected()
      while (!stop && c !== undefined) {
        try {
          await c.query("SELECT pg_sleep(0.005)")
          served++
        } catch (e) {
          // Only the killed worker's clients may fail; they reconnect (to any worker).
          failures.push(String((e as Error).message))
          await c.end().catch(() => undefined)
          c = await connected()
        }
      }
      await c?.end().catch(() => undefined)
    }
    const clients = Array.from({ length: 30 }, loop)
    let stopSampling: () => void = () => undefined
    const sampling = sample(db, new Promise<void>((resolve) => (stopSampling = resolve)))
    try {
      // Load reaches every worker before the kill.
      const deadline = Date.now() + 20_000
      while (served < 200) {
        if (Date.now() > deadline) throw new Error("load never got going")
        await new Promise((r) => setTimeout(r, 10))
      }
      process.kill(victimPid!, "SIGKILL")
      await cli.waitFor(new RegExp(`worker ${victimWorker} \\(pid ${victimPid}\\) died`))
      const killedAt = Date.now()
      const servedAtKill = served
      // Its share returns: the survivors (and its replacement) get back to all 10 servers.
      for (;;) {
        if ((await serversOf(db)) === POOL) break
        if (Date.now() - killedAt > 10_000) throw new Error("the dead worker's permits never came back")
      }
      await cli.waitFor(new RegExp(`worker ${victimWorker} started \\(pid (?!${victimPid}\\))\\d+\\)`))
      expect(served).toBeGreaterThan(servedAtKill)
    } finally {
      stop = true
      stopSampling()
      await Promise.all(clients)
    }
    const { max } = await sampling
    expect(max).toBeLessThanOrEqual(POOL)
    // Only clients of the killed worker lost their connection (30 at most, each once or so).
    for (const f of failures) expect(f).toMatch(/terminated|ECONNRESET|ECONNREFUSED|closed/i)
  }, 60_000)

  it("a ban through the HTTP API (worker 1) ends the tenant's clients on every worker", async () => {
    const clients = await Promise.all(Array.from({ length: 9 }, client))
    const owners = new Set(clients.map((c) => ownerOf(processIdOf(c))))
    // The kernel picks each connection's worker; a worker replaced by the test before may not be
    // listening yet ("started" is logged at its fork), and nine on two workers all land on one once
    // in 256 (seen in CI). Then one of them is swapped for a connection to another worker (nine
    // still, within the pool's ten servers): this test is about the ban.
    for (let tries = 0; owners.size < 2 && tries < 40; tries++) {
      const other = await client()
      const owner = ownerOf(processIdOf(other))
      if (owners.has(owner)) {
        await other.end()
        continue
      }
      await clients.pop()!.end()
      clients.push(other)
      owners.add(owner)
    }
    expect(owners.size).toBeGreaterThan(1)
    const outcomes = clients.map((c) =>
      c.query("SELECT pg_sleep(20)").then(
        () => "completed",
        (e: Error) => e.message
      )
    )
    for (;;) {
      const rows = await db.query(
        "SELECT 1 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(20)' AND state = 'active'"
      )
      if (rows.length === clients.length) break
    }
    const ban = await callApi({ apiPort }, "PATCH", "/api/tenants/acme", {
      body: { banned: true, ban_reason: "abuse" }
    })
    expect(ban.status).toBe(200)
    expect(await Promise.all(outcomes)).toEqual(clients.map(() => "(EBANNED) tenant is banned: abuse"))
    await Promise.all(clients.map((c) => c.end().catch(() => undefined)))
  }, 60_000)
})
