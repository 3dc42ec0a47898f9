import { execFileSync } from "node:child_process"
import { mkdtempSync, rmSync } from "node:fs"
import * as http from "node:http"
import { tmpdir } from "node:os"
import * as path from "node:path"
import pg from "pg"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { ownerOf } from "../../src/cluster/index.ts"
import { mintToken } from "../support/api.ts"
import { type CliProcess, runCli } from "../support/cli.ts"
import { writeConfig } from "../support/config.ts"
import { freePort } from "../support/ports.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { parseExposition } from "../support/prometheus.ts"
import { processIdOf } from "../support/scale.ts"
import { TEST_JWT_SECRET } from "../support/tidepool.ts"

/**
 * One host done properly (docs/scale-out.md): TIDEPOOL_WORKERS=2 with max_clients and session-mode
 * pool_size held for the whole host, /metrics and the admin console showing every worker, and a
 * hung worker (SIGSTOP) killed and replaced like a crashed one. Real processes, real PostgreSQL.
 */
const PASSWORD = "app-secret"
const VAULT_ENC_KEY = "0f".repeat(32)
const DEADLINE_MS = 20_000

let db: PostgresServer
let dir: string
let cli: CliProcess
let txPort: number
let sessionPort: number
let apiPort: number

const connect = async (user: string, port: number, database = "postgres"): Promise<pg.Client> => {
  const c = new pg.Client({ host: "127.0.0.1", port, user, password: PASSWORD, database })
  c.on("error", () => undefined)
  await c.connect()
  return c
}

/** A login's outcome: the client, or the SQLSTATE/Tidepool code of its refusal. */
const attempt = (user: string, port: number) =>
  connect(user, port).then(
    (client) => ({ client, refused: undefined }),
    (e: Error) => ({ client: undefined, refused: e.message })
  )

const scrape = async () => {
  const response = await fetch(`http://127.0.0.1:${apiPort}/metrics`, {
    headers: { authorization: `Bearer ${await mintToken({}, { secret: TEST_JWT_SECRET })}` }
  })
  expect(response.status).toBe(200)
  return parseExposition(await response.text())
}

/**
 * One API call on a connection of its own (no keep-alive): with SO_REUSEPORT each lands on a worker
 * chosen by the kernel, so calls in a row ask both.
 */
// biome-ignore lint/suspicious/noExplicitAny: the answer has whatever shape the route sends
const apiCall = async (method: string, route: string, body?: unknown): Promise<{ status: number; json: any }> => {
  const token = await mintToken({}, { secret: TEST_JWT_SECRET })
  return new Promise((resolve, reject) => {
    const request = http.request(
      {
        host: "127.0.0.1",
        port: apiPort,
        method,
        path: route,
        agent: false,
        headers: {
          authorization: `Bearer ${token}`,
          ...(body === undefined
            ? {}
            : { "content-type": "application/json", "content-length": Buffer.byteLength(JSON.stringify(body)) })
        }
      },
      (response) => {
        let text = ""
        response.setEncoding("utf8")
        response.on("data", (chunk: string) => {
          text += chunk
        })
        response.on("end", () =>
          resolve({ status: response.statusCode ?? 0, json: text === "" ? undefined : JSON.parse(text) })
        )
      }
    )
    request.on("error", reject)
    request.end(body === undefined ? undefined : JSON.stringify(body))
  })
}

const workerOf = (c: pg.Client): number => ownerOf(processIdOf(c)) + 1

const deadline = (what: string) => {
  const end = Date.now() + DEADLINE_MS
  return () => {
    if (Date.now() > end) throw new Error(`gave up waiting: ${what}`)
  }
}

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: PASSWORD }] })
  dir = mkdtempSync(path.join(tmpdir(), "tidepool-scale-host-"))
  const config = writeConfig(path.join(dir, "tidepool.yaml"), [
    // max_clients 4 over two workers.
    {
      external_id: "capped",
      db_host: db.host,
      db_port: db.port,
      users: [{ db_user: "app", db_password: PASSWORD, pool_size: 3, max_clients: 4 }]
    },
    // Session mode: pool_size 1 is one client for the host.
    {
      external_id: "solo",
      db_host: db.host,
      db_port: db.port,
      users: [{ db_user: "app", db_password: PASSWORD, pool_size: 1 }]
    }
  ])
  txPort = await freePort()
  sessionPort = await freePort()
  apiPort = await freePort()
  cli = runCli(["serve", "--config", config], {
    PROXY_PORT_TRANSACTION: String(txPort),
    PROXY_PORT_SESSION: String(sessionPort),
    PORT: String(apiPort),
    API_JWT_SECRET: TEST_JWT_SECRET,
    METRICS_JWT_SECRET: TEST_JWT_SECRET,
    TIDEPOOL_ADMIN_USERS: `ops=${PASSWORD}`,
    TIDEPOOL_LISTEN_ADDR: "127.0.0.1",
    TIDEPOOL_DATA_DIR: path.join(dir, "data"),
    TIDEPOOL_WORKERS: "2",
    TIDEPOOL_WORKER_HANG_TIMEOUT: "1000",
    VAULT_ENC_KEY
  })
  await cli.waitFor(/2 workers listening/)
}, 60_000)

afterAll(async () => {
  if (cli !== undefined && cli.child.exitCode === null) {
    cli.child.kill("SIGTERM")
    await cli.exited
  }
  await db?.stop()
  if (dir) rmSync(dir, { recursive: true, force: true })
})

describe("TIDEPOOL_WORKERS=2: one host", () => {
  it("max_clients holds for the host: 4 admitted over both workers, the rest EMAXCONN, a seat freed is taken again", async () => {
    const admitted: Array<pg.Client> = []
    const refusals: Array<string> = []
    try {
      // The kernel spreads logins by a hash of their ports: keep logging in until both workers hold
      // clients and the host is full; every login after that must be refused, whichever worker has it.
      const wait = deadline("4 clients over both workers")
      while (admitted.length < 4 || new Set(admitted.map(workerOf)).size < 2) {
        wait()
        const { client, refused } = await attempt("app.capped", txPort)
        if (client !== undefined) admitted.push(client)
        else if (new Set(admitted.map(workerOf)).size < 2 && admitted.length === 4) {
          // All four landed on one worker: make room on it and try for the other.
          refusals.length = 0
          await admitted.shift()!.end()
        } else refusals.push(refused!)
      }
      expect(admitted).toHaveLength(4)
      for (let i = 0; i < 10; i++) {
        const { client, refused } = await attempt("app.capped", txPort)
        if (client !== undefined) admitted.push(client)
        else refusals.push(refused!)
      }
      expect(admitted).toHaveLength(4)
      expect(refusals.length).toBeGreaterThanOrEqual(10)
      for (const r of refusals) expect(r).toMatch(/^\(EMAXCONN\)/)
      await Promise.all(admitted.map((c) => c.query("SELECT 1")))

      // One leaves: the next login is admitted, on whichever worker it lands.
      await admitted.shift()!.end()
      const again = await connect("app.capped", txPort)
      admitted.push(again)
      expect((await again.query("SELECT 1 AS one")).rows[0].one).toBe(1)
      const { refused } = await attempt("app.capped", txPort)
      expect(refused).toMatch(/^\(EMAXCONN\)/)
    } finally {
      await Promise.all(admitted.map((c) => c.end().catch(() => undefined)))
    }
  }, 60_000)

  it("/metrics and the admin console show every worker, SHOW … LOCAL one; PAUSE and RESUME reach every worker", async () => {
    const clients: Array<pg.Client> = []
    try {
      const wait = deadline("clients on both workers")
      while (clients.length < 3 || new Set(clients.map(workerOf)).size < 2) {
        wait()
        clients.push(await connect("app.capped", txPort))
        if (clients.length > 3) await clients.shift()!.end()
      }
      const perWorker = [1, 2].map((w) => clients.filter((c) => workerOf(c) === w).length)

      // Strict: one TYPE per family, no series twice.
      const metrics = await scrape()
      const active = (worker: number) =>
        metrics.value("tidepool_connections_active", {
          worker: String(worker),
          tenant: "capped",
          user: "app",
          mode: "transaction",
          db_name: "postgres"
        })
      expect([active(1), active(2)]).toEqual(perWorker)
      expect(metrics.value("tidepool_worker_up", { worker: "1" })).toBe(1)
      expect(metrics.value("tidepool_worker_up", { worker: "2" })).toBe(1)
      expect(metrics.samples.filter((s) => s.name === "process_resident_memory_bytes")).toHaveLength(2)

      // The HTTP API: both workers listen on its port, and its per-process route answers for the host.
      const workerPids = [...cli.output().matchAll(/worker \d started \(pid (\d+)\)/g)].map((m) => m[1])
      const listening = execFileSync("ss", ["-Hltnp", `sport = :${apiPort}`], { encoding: "utf8" })
      const listeners = new Set([...listening.matchAll(/pid=(\d+)/g)].map((m) => m[1]))
      expect([...listeners].filter((pid) => workerPids.includes(pid))).toHaveLength(2)
      const response = await fetch(`http://127.0.0.1:${apiPort}/api/tenants/capped/pools`, {
        headers: { authorization: `Bearer ${await mintToken({}, { secret: TEST_JWT_SECRET })}` }
      })
      expect(response.status).toBe(200)
      const { data } = (await response.json()) as { data: Array<{ worker: number; clients_active: number }> }
      expect(data.map((row) => [row.worker, row.clients_active]).sort()).toEqual([
        [1, perWorker[0]],
        [2, perWorker[1]]
      ])

      const admin = await connect("ops", txPort, "pgbouncer")
      try {
        const host = await admin.query({ text: "SHOW POOLS", rowMode: "array" })
        const columns = host.fields.map((f) => f.name)
        expect(columns.at(-1)).toBe("worker")
        // pg reads int4 columns as numbers.
        const capped = (rows: Array<Array<unknown>>) =>
          rows
            .filter((r) => r[0] === "capped/postgres")
            .map((r) => [String(r.at(-1)), String(r[columns.indexOf("cl_active")])])
        expect(capped(host.rows).sort()).toEqual([
          ["1", String(perWorker[0])],
          ["2", String(perWorker[1])]
        ])
        const here = workerOf(admin)
        const local = await admin.query({ text: "SHOW POOLS LOCAL", rowMode: "array" })
        expect(capped(local.rows)).toEqual([[String(here), String(perWorker[here - 1])]])
        const clientRows = await admin.query({ text: "SHOW CLIENTS", rowMode: "array" })
        expect(clientRows.rows.filter((r) => r[2] === "capped/postgres")).toHaveLength(3)
        const users = await admin.query("SHOW USERS")
        expect(users.rows.find((r) => r.name === "app.capped")?.current_client_connections).toBe(3)
        const workers = await admin.query("SHOW WORKERS")
        expect(workers.rows.map((r) => [r.worker, r.state])).toEqual([
          [1, "ready"],
          [2, "ready"]
        ])

        // A command reaches every worker: PAUSE holds the pool on both, RESUME lifts it on both.
        const paused = async () => {
          const m = await scrape()
          return [1, 2].map((w) =>
            m.value("tidepool_pool_paused", {
              worker: String(w),
              tenant: "capped",
              user: "app",
              mode: "transaction",
              db_name: "postgres"
            })
          )
        }
        expect(await paused()).toEqual([0, 0])
        await admin.query("PAUSE capped")
        expect(await paused()).toEqual([1, 1])
        await admin.query("RESUME capped")
        expect(await paused()).toEqual([0, 0])
        await Promise.all(clients.map((c) => c.query("SELECT 1")))
      } finally {
        await admin.end()
      }
    } finally {
      await Promise.all(clients.map((c) => c.end().catch(() => undefined)))
    }
  }, 60_000)

  it("a hung worker (SIGSTOP) is killed and replaced: its backend cancelled, its session seat and permit freed", async () => {
    const pids = new Map([...cli.output().matchAll(/worker (\d) started \(pid (\d+)\)/g)].map((m) => [m[1], m[2]]))
    const victimPid = Number(pids.get("2"))
    // Session mode, pool_size 1: one client for the host. Find a login that lands on worker 2.
    let held: pg.Client | undefined
    const wait = deadline("a session client on worker 2")
    while (held === undefined) {
      wait()
      const c = await connect("app.solo", sessionPort)
      if (workerOf(c) === 2) held = c
      else await c.end()
    }
    const outcome = held.query("SELECT pg_sleep(60)").then(
      () => "completed",
      (e: Error) => e.message
    )
    const sleeping = async () =>
      (await db.query("SELECT 1 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'")).length
    const running = deadline("the query to start")
    while ((await sleeping()) === 0) running()

    // The host's one seat is taken: more session clients are refused, whichever worker they reach.
    for (let i = 0; i < 4; i++) {
      const { client, refused } = await attempt("app.solo", sessionPort)
      await client?.end()
      expect(refused).toMatch(/^\(EMAXCONNSESSION\)/)
    }

    process.kill(victimPid, "SIGSTOP")
    try {
      await cli.waitFor(new RegExp(`worker 2 \\(pid ${victimPid}\\) hung: no heartbeat`))
      await cli.waitFor(new RegExp(`worker 2 started \\(pid (?!${victimPid}\\))\\d+\\)`))
    } catch (e) {
      // The supervisor did not kill it: a stopped process must not outlive the test.
      process.kill(victimPid, "SIGKILL")
      throw e
    }
    expect(await outcome).not.toBe("completed")
    // Its backend was cancelled, not left running out its minute.
    const gone = deadline("the hung worker's backend to end")
    while ((await sleeping()) > 0) gone()
    // Seat and permit are free: a new session client gets the one server.
    const next = await connect("app.solo", sessionPort)
    try {
      expect((await next.query("SELECT 1 AS one")).rows[0].one).toBe(1)
    } finally {
      await next.end()
    }
  }, 60_000)

  it("network_bans answers for the whole host: a block made by either worker is listed by both, and DELETE lifts it on both", async () => {
    // Wrong passwords from 127.0.0.1 until a worker's breaker blocks the address (each worker
    // counts its own logins, so it is whichever reaches the limit first).
    const blocked = deadline("a worker's circuit breaker to block 127.0.0.1")
    for (;;) {
      blocked()
      const c = new pg.Client({
        host: "127.0.0.1",
        port: txPort,
        user: "app.solo",
        password: "wrong",
        database: "postgres"
      })
      const refused = await c.connect().then(
        () => undefined,
        (e: Error) => e.message
      )
      if (refused === undefined) await c.end()
      if (refused?.startsWith("(ECIRCUITBREAKER)")) break
    }
    // Eight calls, each on its own connection: both workers answer some, all with the block.
    for (let i = 0; i < 8; i++) {
      const listed = await apiCall("GET", "/api/tenants/solo/network_bans")
      expect(listed.status).toBe(200)
      expect(listed.json.banned_ipv4_addresses.map((b: { banned_address: string }) => b.banned_address)).toEqual([
        "127.0.0.1"
      ])
    }
    const cleared = await apiCall("DELETE", "/api/tenants/solo/network_bans", { ipv4_addresses: ["127.0.0.1"] })
    expect(cleared.status).toBe(200)
    expect(cleared.json.banned_ipv4_addresses).toEqual([])
    for (let i = 0; i < 8; i++)
      expect((await apiCall("GET", "/api/tenants/solo/network_bans")).json.banned_ipv4_addresses).toEqual([])
  }, 60_000)
})
