import { mkdtempSync, rmSync } from "node:fs"
import * as net from "node:net"
import { tmpdir } from "node:os"
import * as path from "node:path"
import pg from "pg"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { ownerOf, slotOf } from "../../src/cluster/index.ts"
import { callApi, mintToken } from "../support/api.ts"
import { type CliProcess, runCli } from "../support/cli.ts"
import { writeConfig } from "../support/config.ts"
import { freePort } from "../support/ports.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { type Exposition, parseExposition } from "../support/prometheus.ts"
import { processIdOf } from "../support/scale.ts"
import { TEST_JWT_SECRET } from "../support/tidepool.ts"

/**
 * TIDEPOOL_CLUSTER=on, two hosts sharing one PostgreSQL store (host A one process, host B a supervisor
 * and two workers, the supervisor its runner;
 * docs/scale-out.md#several-hosts), and a third host of two workers outside cluster mode on the
 * same store: the HTTP API answers the same on every host (a terminate through one ends the
 * tenant's clients on the others, every worker's), and operators see the store ledger on either host
 * (`SHOW RUNNERS`, `SHOW PERMITS`) and each host's own runner in its `/metrics`. Host A reaches the
 * store through a relay the test silences at the end: its views then answer a coded
 * error within their bound (2 s) instead of hanging.
 */
const PASSWORD = "app-secret"
const POOL = 4
const VAULT_ENC_KEY = "0f".repeat(32)
const DEADLINE_MS = 10_000
const dir = mkdtempSync(path.join(tmpdir(), "tidepool-hosts-views-"))

interface Host {
  readonly cli: CliProcess
  readonly port: number
  readonly apiPort: number
}

/**
 * A host: `tidepool serve` on ports of its own, of `workers` processes, in cluster mode or (`cluster`
 * false) outside it on the same store (the API answers the same there too).
 */
const startHost = async (
  storeUrl: string,
  config: string | undefined,
  n: number,
  workers = 1,
  cluster = true
): Promise<Host> => {
  const port = await freePort()
  const apiPort = await freePort()
  const cli = runCli(config === undefined ? ["serve"] : ["serve", "--config", config], {
    DATABASE_URL: storeUrl,
    ...(cluster ? { TIDEPOOL_CLUSTER: "on" } : {}),
    TIDEPOOL_WORKERS: String(workers),
    PROXY_PORT_TRANSACTION: String(port),
    PROXY_PORT_SESSION: String(await freePort()),
    PORT: String(apiPort),
    API_JWT_SECRET: TEST_JWT_SECRET,
    METRICS_JWT_SECRET: TEST_JWT_SECRET,
    TIDEPOOL_ADMIN_USERS: `ops=${PASSWORD}`,
    TIDEPOOL_LISTEN_ADDR: "127.0.0.1",
    TIDEPOOL_DATA_DIR: path.join(dir, `data-${n}`),
    VAULT_ENC_KEY
  })
  await cli.waitFor(workers === 1 ? /tidepool listening/ : /workers listening/)
  return { cli, port, apiPort }
}

const stopHost = async (host: Host | undefined) => {
  if (host === undefined || host.cli.child.exitCode !== null || host.cli.child.signalCode !== null) return
  host.cli.child.kill("SIGTERM")
  await host.cli.exited
}

/**
 * A TCP relay to the store that can go silent: its connections stay open but carry nothing, and new
 * ones are accepted but get no answer, as when the store's host vanishes (the case that hangs a
 * client without a deadline). `restore` forwards again: the connections held meanwhile go through,
 * the silenced ones are cut (their bytes are lost).
 */
const storeLink = async (target: PostgresServer) => {
  const sockets = new Set<net.Socket>()
  const held = new Set<net.Socket>()
  let open = true
  const forward = (client: net.Socket) => {
    const upstream = net.connect({ host: target.host, port: target.port })
    for (const [from, to] of [
      [client, upstream],
      [upstream, client]
    ] as const) {
      sockets.add(from)
      from.on("error", () => undefined)
      from.on("data", (chunk) => {
        if (open) to.write(chunk)
      })
      from.on("close", () => {
        sockets.delete(from)
        to.destroy()
      })
    }
  }
  const port = await freePort()
  const server = net.createServer((client) => {
    if (open) forward(client)
    else {
      // Not read: what it sends waits in the socket until `restore`.
      held.add(client)
      client.on("error", () => undefined)
      client.on("close", () => held.delete(client))
    }
  })
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject)
    server.listen(port, "127.0.0.1", () => resolve())
  })
  return {
    url: `postgresql://postgres:${encodeURIComponent(target.superPassword)}@127.0.0.1:${port}/postgres`,
    silence: () => {
      open = false
    },
    restore: () => {
      for (const socket of sockets) socket.destroy()
      open = true
      for (const client of held) forward(client)
      held.clear()
    },
    close: async () => {
      const closed = new Promise<void>((resolve) => server.close(() => resolve()))
      for (const socket of [...sockets, ...held]) socket.destroy()
      await closed
    }
  }
}

const connect = async (port: number, user = "app.acme", database = "postgres") => {
  const c = new pg.Client({ host: "127.0.0.1", port, user, password: PASSWORD, database })
  c.on("error", () => undefined)
  await c.connect()
  return c
}

const slotOfClient = (c: pg.Client): number => slotOf(processIdOf(c))

const scrape = async (host: Host): Promise<Exposition> => {
  const response = await fetch(`http://127.0.0.1:${host.apiPort}/metrics`, {
    headers: { authorization: `Bearer ${await mintToken({}, { secret: TEST_JWT_SECRET })}` }
  })
  expect(response.status).toBe(200)
  return parseExposition(await response.text())
}

/** `promise`, or a failure naming `what` once the deadline has passed. */
const within = <A>(what: string, promise: Promise<A>): Promise<A> => {
  let timer: NodeJS.Timeout | undefined
  return Promise.race([
    promise,
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`gave up waiting: ${what}`)), DEADLINE_MS)
    })
  ]).finally(() => clearTimeout(timer))
}

const POOL_LABELS = { tenant: "acme", user: "app", mode: "transaction", db_name: "postgres" }

describe("TIDEPOOL_CLUSTER=on: two hosts, the API and the store ledger's views", () => {
  let db: PostgresServer
  let link: Awaited<ReturnType<typeof storeLink>>
  const hosts: Array<Host> = []
  const clients: Array<pg.Client> = []

  beforeAll(async () => {
    db = await startPostgres({ roles: [{ name: "app", password: PASSWORD }] })
    link = await storeLink(db)
    const config = writeConfig(path.join(dir, "views.yaml"), [
      {
        external_id: "acme",
        db_host: db.host,
        db_port: db.port,
        users: [{ db_user: "app", db_password: PASSWORD, pool_size: POOL }]
      }
    ])
    hosts.push(await startHost(link.url, config, 1))
    hosts.push(
      ...(await Promise.all([startHost(db.url(), undefined, 2, 2), startHost(db.url(), undefined, 3, 2, false)]))
    )
  }, 60_000)

  afterAll(async () => {
    for (const c of clients) await c.end().catch(() => undefined)
    // Host A shuts down with its store back, as it would after the outage.
    link?.restore()
    await Promise.all(hosts.map(stopHost))
    await link?.close()
    await db?.stop()
    rmSync(dir, { recursive: true, force: true })
  })

  it("SHOW RUNNERS and SHOW PERMITS on either host show both runners; each host's /metrics shows its own", async () => {
    const [a, b] = [hosts[0]!, hosts[1]!]
    // A client on each host, each having run a transaction: each runner holds a permit.
    for (const host of [a, b]) {
      const c = await connect(host.port)
      clients.push(c)
      expect((await c.query("SELECT 1 AS one")).rows[0].one).toBe(1)
    }
    const [slotA, slotB] = clients.map(slotOfClient) as [number, number]
    expect(slotA).not.toBe(slotB)
    const store = await db.query(
      `SELECT r.slot, p.held FROM tidepool_permits p JOIN tidepool_runners r USING (runner_id)
       WHERE p.pool_key = '["acme","app","transaction","postgres"]' ORDER BY r.slot`
    )
    const heldBy = new Map(store.map((r) => [Number(r.slot), Number(r.held)]))
    expect(heldBy.get(slotA)).toBeGreaterThanOrEqual(1)
    expect(heldBy.get(slotB)).toBeGreaterThanOrEqual(1)

    const adminA = await connect(a.port, "ops", "pgbouncer")
    const adminB = await connect(b.port, "ops", "pgbouncer")
    try {
      for (const [admin, self] of [
        [adminA, slotA],
        [adminB, slotB]
      ] as const) {
        const runners = await admin.query("SHOW RUNNERS")
        expect(runners.fields.map((f) => f.name)).toEqual([
          "runner_id",
          "slot",
          "address",
          "started",
          "lease_age_ms",
          "state",
          "connected",
          "permits_held",
          "permits_wanted",
          "pools",
          "local"
        ])
        expect(runners.rows.map((r) => [r.slot, r.address, r.state, r.connected, r.permits_held, r.local])).toEqual(
          [
            [slotA, `127.0.0.1:${a.port}`, "live", 1, heldBy.get(slotA), self === slotA ? 1 : 0],
            [slotB, `127.0.0.1:${b.port}`, "live", 1, heldBy.get(slotB), self === slotB ? 1 : 0]
          ].sort((x, y) => Number(x[0]) - Number(y[0]))
        )
        expect(runners.rows.every((r) => /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$/.test(r.started))).toBe(true)
      }
      const permits = await adminB.query({ text: "SHOW PERMITS", rowMode: "array" })
      expect(permits.fields.map((f) => f.name)).toEqual([
        "database",
        "user",
        "pool_mode",
        "runner_id",
        "slot",
        "held",
        "want",
        "keep",
        "press"
      ])
      const rows = permits.rows.map((r) => [r[0], r[1], r[2], r[4], r[5], r[6], r[8]])
      expect(rows).toEqual([...heldBy].map(([slot, held]) => ["acme/postgres", "app", "transaction", slot, held, 0, 0]))
    } finally {
      await adminA.end()
      await adminB.end()
    }

    // The API's pools: each host its own `data`, and the same store rows in `cluster` on every host.
    const expected = [...heldBy].map(([slot, held]) =>
      expect.objectContaining({ user: "app", database: "postgres", mode: "transaction", slot, held, want: 0 })
    )
    for (const host of [a, b]) {
      const pools = await callApi(host, "GET", "/api/tenants/acme/pools")
      expect(pools.status).toBe(200)
      expect(pools.json.cluster).toEqual(expected)
      expect(pools.json.data.length).toBeGreaterThanOrEqual(1)
    }
    expect((await callApi(hosts[2]!, "GET", "/api/tenants/acme/pools")).json.cluster).toBeUndefined()

    // Each host exports its own runner only: the sum over hosts is the store's.
    for (const [host, slot] of [
      [a, slotA],
      [b, slotB]
    ] as const) {
      const m = await scrape(host)
      expect(m.value("tidepool_cluster_store_up")).toBe(1)
      expect(m.value("tidepool_cluster_runner_registered")).toBe(1)
      expect(m.value("tidepool_cluster_store_connected")).toBe(1)
      expect(m.value("tidepool_cluster_lease_age_seconds")).toBeGreaterThanOrEqual(0)
      expect(m.value("tidepool_cluster_permits_held", POOL_LABELS)).toBe(heldBy.get(slot))
      expect(m.value("tidepool_cluster_permits_wanted", POOL_LABELS)).toBe(0)
      expect(m.value("tidepool_cluster_permits_pressed", POOL_LABELS)).toBe(0)
      expect(m.samples.filter((s) => s.name === "tidepool_cluster_permits_held")).toHaveLength(1)
    }
  }, 30_000)

  it("a terminate through host A's API ends the tenant's clients on host B and on both workers of host C (57P01)", async () => {
    const [a, b, c] = [hosts[0]!, hosts[1]!, hosts[2]!]
    // Host C: clients until both of its workers have some (the kernel spreads them by a hash).
    const onC: Array<pg.Client> = []
    while (new Set(onC.map((x) => ownerOf(processIdOf(x)))).size < 2) {
      if (onC.length === 16) throw new Error("16 clients of host C all landed on one worker")
      const client = await connect(c.port)
      clients.push(client)
      onC.push(client)
      expect((await client.query("SELECT 1 AS one")).rows[0].one).toBe(1)
    }
    const ended = [clients[1]!, ...onC].map(
      (client) => new Promise<Error & { code?: string }>((resolve) => client.once("error", resolve))
    )
    const answer = await callApi(a, "GET", "/api/tenants/acme/terminate")
    expect(answer.status).toBe(200)
    // Host A's own client is counted; the others end when the store's notification reaches them.
    expect(answer.json).toEqual({ result: "success", disconnected: 1, reach: "all_nodes" })
    const codes = await within("the other hosts' clients to be terminated", Promise.all(ended))
    expect(codes.map((e) => e.code)).toEqual(ended.map(() => "57P01"))
    await within(
      "host B to log the terminate",
      b.cli.waitFor(/tenant terminated by another node: 1 client\(s\) disconnected/)
    )
    // New clients are served at once, on every host.
    for (const host of hosts) {
      const client = await connect(host.port)
      clients.push(client)
      expect((await client.query("SELECT 2 AS two")).rows[0].two).toBe(2)
    }
  }, 30_000)

  it("host A's store gone silent: its views answer a coded error within their bound, /metrics says store_up 0", async () => {
    const a = hosts[0]!
    const admins = await Promise.all([connect(a.port, "ops", "pgbouncer"), connect(a.port, "ops", "pgbouncer")])
    clients.push(...admins)
    link.silence()
    // All at once: each waits for the same silent store, each must answer within its own bound.
    const show = (i: number, view: string) =>
      admins[i]!.query(`SHOW ${view}`).then(
        () => undefined,
        (e: Error & { code?: string }) => e
      )
    const [runners, permits, m, answer] = await within(
      "the views and the terminate to answer",
      Promise.all([show(0, "RUNNERS"), show(1, "PERMITS"), scrape(a), callApi(a, "GET", "/api/tenants/acme/terminate")])
    )
    for (const [view, failed] of [
      ["RUNNERS", runners],
      ["PERMITS", permits]
    ] as const) {
      expect(failed?.code).toBe("55000")
      expect(failed?.message).toBe(
        `(ECLUSTERVIEW) SHOW ${view}: the tenant store did not answer within 2 s (${view === "RUNNERS" ? "tidepool_runners" : "tidepool_permits"})`
      )
    }
    expect(m.value("tidepool_cluster_store_up")).toBe(0)
    expect(m.samples.filter((s) => s.name.startsWith("tidepool_cluster_permits_"))).toEqual([])
    // The terminate is done here, and the answer says the other hosts were not told.
    expect(answer.status).toBe(503)
    expect(answer.json.error).toMatch(/^terminated on this node only: the tenant store could not tell the other nodes/)
  }, 30_000)
})
