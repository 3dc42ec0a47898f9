import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import * as path from "node:path"
import pg from "pg"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { clusterOwnerOf, slotOf } from "../../src/cluster/index.ts"
import { cancelWhileBusy } from "../support/cancel.ts"
import { writeConfig } from "../support/config.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { type ClusterHost, processIdOf, sample, serversOf, startClusterHost } from "../support/scale.ts"
import { hasTool, run } from "../support/tools.ts"

/**
 * TIDEPOOL_CLUSTER=on with TIDEPOOL_WORKERS=2 (docs/scale-out.md#several-workers-on-each-of-several-hosts):
 * two hosts of two workers each share one PostgreSQL store and each pool's pool_size. Each host's
 * supervisor is its runner of the store ledger and shares what the store granted it among its
 * workers. Real processes, real PostgreSQL (one server as store and tenant database), pgbench and
 * node-postgres.
 */
const hasPgbench = await hasTool("pgbench")
const PASSWORD = "app-secret"
const POOL = 10
const LEASE_MS = 1_500
const dir = mkdtempSync(path.join(tmpdir(), "tidepool-hosts-workers-"))
afterAll(() => rmSync(dir, { recursive: true, force: true }))

type Host = ClusterHost

/** A host: `tidepool serve` in cluster mode with two workers on ports of its own; only the first seeds the tenants. */
const startHost = async (storeUrl: string, config: string | undefined, n: number): Promise<Host> =>
  (await startClusterHost({ dir, storeUrl, config, n, leaseMs: LEASE_MS, env: { TIDEPOOL_WORKERS: "2" } })).ready

const url = (port: number, user = "app") => `postgresql://${user}.acme:${PASSWORD}@127.0.0.1:${port}/postgres`

const connect = async (port: number, user = "app") => {
  const c = new pg.Client({ connectionString: url(port, user) })
  c.on("error", () => undefined)
  await c.connect()
  return c
}

describe("TIDEPOOL_CLUSTER=on, TIDEPOOL_WORKERS=2: two hosts of two workers sharing one store", () => {
  let db: PostgresServer
  const hosts: Array<Host> = []

  beforeAll(async () => {
    db = await startPostgres({
      roles: [
        { name: "app", password: PASSWORD },
        { name: "tiny", password: PASSWORD },
        { name: "capped", password: PASSWORD }
      ]
    })
    const config = writeConfig(path.join(dir, "hosts.yaml"), [
      {
        external_id: "acme",
        db_host: db.host,
        db_port: db.port,
        users: [
          { db_user: "app", db_password: PASSWORD, pool_size: POOL },
          { db_user: "tiny", db_password: PASSWORD, pool_size: 1 },
          { db_user: "capped", db_password: PASSWORD, pool_size: 3, max_clients: 4 }
        ]
      }
    ])
    hosts.push(await startHost(db.url(), config, 1))
    hosts.push(await startHost(db.url(), undefined, 2))
    if (hasPgbench) await run("pgbench", ["-i", "-s", "1", "-q", db.url({ user: "app", password: PASSWORD })])
  }, 90_000)

  afterAll(async () => {
    if (process.env.SCALE_DEBUG)
      writeFileSync("/tmp/scale-hosts-workers.log", hosts.map((h) => h.cli.output()).join("\n=====\n"))
    for (const h of hosts) if (h.cli.child.exitCode === null) h.cli.child.kill("SIGTERM")
    await Promise.all(hosts.map((h) => h.cli.exited))
    await db?.stop()
  })

  it.skipIf(!hasPgbench)(
    "pgbench through both hosts at once never has more than pool_size servers, and no failed transaction",
    async () => {
      const benches = Promise.all(
        hosts.map((h) => run("pgbench", ["-c", "10", "-j", "2", "-T", "5", "-n", url(h.port)]))
      )
      const { max, samples } = await sample(db, benches)
      for (const { stdout } of await benches) {
        if (process.env.SCALE_DEBUG)
          console.log(stdout.match(/number of transactions actually processed: \d+/)?.[0], `max ${max} servers`)
        expect(stdout).toMatch(/number of failed transactions: 0 /)
        expect(Number(stdout.match(/number of transactions actually processed: (\d+)/)?.[1])).toBeGreaterThan(50)
      }
      expect(samples).toBeGreaterThan(10)
      expect(max).toBeLessThanOrEqual(POOL)
      // Really shared out under load, not one host's or one worker's share.
      expect(max).toBeGreaterThan(5)
    },
    40_000
  )

  it("a pool of 1 shared by two hosts of two workers serves the clients of every worker", async () => {
    const clients = await Promise.all(hosts.flatMap((h) => Array.from({ length: 4 }, () => connect(h.port, "tiny"))))
    const ownerOfClient = (c: pg.Client) => `${slotOf(processIdOf(c))}/${clusterOwnerOf(processIdOf(c))}`
    const owners = new Set(clients.map(ownerOfClient))
    // The kernel picks each connection's worker by a hash: eight can land on two of the four workers
    // (seen in CI), so more connect, one host after the other, until at least three workers have some.
    for (let i = 0; owners.size < 3; i++) {
      if (i >= 40) throw new Error(`40 more connections reached only workers ${[...owners].join(", ")}`)
      const c = await connect(hosts[i % hosts.length]!.port, "tiny")
      clients.push(c)
      owners.add(ownerOfClient(c))
    }
    const work = Promise.all(
      clients.map(async (c, i) => {
        for (let k = 0; k < 4; k++) {
          const { rows } = await c.query("SELECT $1::int AS i", [i])
          expect(rows[0].i).toBe(i)
        }
      })
    )
    const { max } = await sample(db, work, "tiny")
    await work
    expect(max).toBeLessThanOrEqual(1)
    await Promise.all(clients.map((c) => c.end()))
  }, 30_000)

  it("a cancel sent to the other host cancels the query, whichever worker of either host gets it", async () => {
    const [owner, other] = [hosts[0]!, hosts[1]!]
    for (let i = 0; i < 3; i++) {
      const victim = await connect(owner.port)
      const processId = processIdOf(victim)
      expect(slotOf(processId)).toBeGreaterThan(0)
      expect(clusterOwnerOf(processId)).toBeGreaterThanOrEqual(0)
      expect(clusterOwnerOf(processId)).toBeLessThan(2)
      const { victimCode } = await cancelWhileBusy({ db, port: other.port, victim })
      expect(victimCode).toBe("57014")
      await victim.end()
    }
    expect(other.cli.output()).toMatch(/CancelRequest for runner \d+ forwarded to 127\.0\.0\.1:/)
  }, 60_000)

  it("max_clients holds across hosts of workers: 4 admitted over both, the next refused EMAXCONN on either, a seat freed is taken again", async () => {
    const admitted: Array<pg.Client> = []
    const attempt = (port: number) =>
      connect(port, "capped").then(
        (client) => {
          admitted.push(client)
          return "admitted"
        },
        (e: Error) => e.message
      )
    const [a, b] = [hosts[0]!.port, hosts[1]!.port]
    try {
      for (const port of [a, b, a, b]) expect(await attempt(port)).toBe("admitted")
      // Full: whichever host and worker a login reaches, it is refused, after the host's other
      // worker and the other host gave back what they do not use.
      for (const port of [a, b, a, b, a, b]) expect(await attempt(port)).toMatch(/^\(EMAXCONN\)/)
      expect(admitted).toHaveLength(4)
      await Promise.all(admitted.map((c) => c.query("SELECT 1")))
      // One leaves on host 1: the next login, on host 2, takes its seat.
      await admitted.shift()!.end()
      expect(await attempt(b)).toBe("admitted")
      expect(await attempt(a)).toMatch(/^\(EMAXCONN\)/)
    } finally {
      await Promise.all(admitted.map((c) => c.end().catch(() => undefined)))
    }
  }, 30_000)

  it("kill -9 of one worker of a host mid-load: its statement is cancelled, its permits come back, never above pool_size", async () => {
    const host = hosts[0]!
    const victimPid = Number(host.cli.output().match(/worker 2 started \(pid (\d+)\)/)?.[1])
    expect(victimPid).toBeGreaterThan(0)
    let stop = false
    let served = 0
    const failures: Array<string> = []
    const loop = async (port: number) => {
      let c: pg.Client | undefined
      while (!stop) {
        try {
          c ??= await connect(port)
          await c.query("SELECT pg_sleep(0.005)")
          served++
        } catch (e) {
          // Only the killed worker's clients may fail; they connect again (to any worker).
          failures.push(String((e as Error).message))
          await c?.end().catch(() => undefined)
          c = undefined
        }
      }
      await c?.end().catch(() => undefined)
    }
    const clients = hosts.flatMap((h) => Array.from({ length: 10 }, () => loop(h.port)))
    let stopSampling: () => void = () => undefined
    const sampling = sample(db, new Promise<void>((resolve) => (stopSampling = resolve)))
    try {
      const deadline = Date.now() + 20_000
      while (served < 300) {
        if (Date.now() > deadline) throw new Error("load never got going")
        await new Promise((r) => setTimeout(r, 10))
      }
      // A statement the dead worker leaves running: its server must not count as free (the pool
      // would go above 10) until the supervisor has cancelled it.
      let sleeper: pg.Client | undefined
      for (let i = 0; sleeper === undefined; i++) {
        if (i === 40) throw new Error("no connection reached worker 2")
        const c = await connect(host.port)
        if (clusterOwnerOf(processIdOf(c)) === 1) sleeper = c
        else await c.end()
      }
      const sleeping = sleeper.query("SELECT pg_sleep(30)").then(
        () => "completed",
        () => "ended"
      )
      for (;;) {
        const rows = await db.query(
          "SELECT 1 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'"
        )
        if (rows.length > 0) break
      }
      process.kill(victimPid!, "SIGKILL")
      await host.cli.waitFor(new RegExp(`worker 2 \\(pid ${victimPid}\\) died`))
      const killedAt = Date.now()
      const servedAtKill = served
      expect(await sleeping).toBe("ended")
      // Its permits return: the 15 or so clients left want more than 10, so the pool is back at 10.
      for (;;) {
        const active = await db.query(
          "SELECT 1 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'"
        )
        if (active.length === 0 && (await serversOf(db)) === POOL) break
        if (Date.now() - killedAt > 15_000) throw new Error("the dead worker's permits never came back")
        await new Promise((r) => setTimeout(r, 20))
      }
      expect(served).toBeGreaterThan(servedAtKill)
    } finally {
      stop = true
      stopSampling()
      await Promise.all(clients)
    }
    const { max } = await sampling
    expect(max).toBeLessThanOrEqual(POOL)
    for (const f of failures) expect(f).toMatch(/terminated|ECONNRESET|ECONNREFUSED|closed/i)
  }, 60_000)

  it("kill -9 of a host's supervisor: its workers exit at once, so the servers they held never outlive the lease", async () => {
    const [survivor, victim] = [hosts[0]!, hosts[1]!]
    // A session of the pool of 1 on the victim, idle in a transaction: a cancel does not end it,
    // only its worker going away does.
    const holder = await connect(victim.port, "tiny")
    await holder.query("BEGIN")
    await holder.query("SELECT 1")
    const workerPids = [...victim.cli.output().matchAll(/worker \d started \(pid (\d+)\)/g)].map((m) => Number(m[1]))
    // Exited, or a zombie: orphaned by the kill, the workers are reaped by whatever adopts them, when
    // it gets round to it (a zombie still answers kill 0: seen in CI). Its sockets are closed either way.
    const alive = (pid: number) => {
      try {
        const stat = readFileSync(`/proc/${pid}/stat`, "utf8")
        return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !== "Z"
      } catch {
        return false
      }
    }
    const waiting = connect(survivor.port, "tiny").then(async (c) => {
      const { rows } = await c.query("SELECT 'served' AS s")
      await c.end()
      return rows[0].s as string
    })
    const sampling = sample(db, waiting, "tiny")
    victim.cli.child.kill("SIGKILL")
    // The survivor gets the permit once the victim's lease has run out and it has been reclaimed.
    expect(await waiting).toBe("served")
    expect((await sampling).max).toBeLessThanOrEqual(1)
    expect(workerPids.filter(alive)).toEqual([])
    await holder.end().catch(() => undefined)
  }, 30_000)
})
