import { mkdtempSync, rmSync, writeFileSync } from "node:fs"
import * as net from "node:net"
import { tmpdir } from "node:os"
import * as path from "node:path"
import pg from "pg"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { slotOf } from "../../src/cluster/index.ts"
import { cancelWhileBusy } from "../support/cancel.ts"
import { writeConfig } from "../support/config.ts"
import { freePort } from "../support/ports.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import {
  type ClusterHost,
  processIdOf,
  sample,
  serversOf,
  startClusterHost,
  stopClusterHost
} from "../support/scale.ts"
import { hasTool, run } from "../support/tools.ts"

/**
 * TIDEPOOL_CLUSTER=on (docs/scale-out.md#several-hosts): three `tidepool serve` processes on their
 * own ports share one PostgreSQL store, and each pool's pool_size through the permit ledger in it.
 * Real processes, real PostgreSQL (one server as store and tenant database), pgbench and node-postgres.
 */
const hasPgbench = await hasTool("pgbench")
const PASSWORD = "app-secret"
const POOL = 10
const LEASE_MS = 1_500
const dir = mkdtempSync(path.join(tmpdir(), "tidepool-hosts-"))
afterAll(() => rmSync(dir, { recursive: true, force: true }))

type Runner = ClusterHost

const writeTenantConfig = (
  name: string,
  db: PostgresServer,
  users: ReadonlyArray<readonly [string, number] | readonly [string, number, number]>
) =>
  writeConfig(path.join(dir, name), [
    {
      external_id: "acme",
      db_host: db.host,
      db_port: db.port,
      users: users.map(([user, size, maxClients]) => ({
        db_user: user,
        db_password: PASSWORD,
        pool_size: size,
        ...(maxClients === undefined ? {} : { max_clients: maxClients })
      }))
    }
  ])

/** A runner: `tidepool serve` in cluster mode (or, under TIDEPOOL_WORKERS, a host of workers); only the first seeds the tenants. */
const startRunner = async (storeUrl: string, config: string | undefined, n: number): Promise<Runner> =>
  (await startClusterHost({ dir, storeUrl, config, n, leaseMs: LEASE_MS })).ready

const stopRunner = stopClusterHost

const url = (port: number, user = "app") => `postgresql://${user}.acme:${PASSWORD}@127.0.0.1:${port}/postgres`

const connect = async (port: number, user = "app") => {
  const c = new pg.Client({ connectionString: url(port, user) })
  c.on("error", () => undefined)
  await c.connect()
  return c
}

describe("TIDEPOOL_CLUSTER=on: three runners sharing one store", () => {
  let db: PostgresServer
  const runners: Array<Runner> = []

  beforeAll(async () => {
    db = await startPostgres({
      roles: [
        { name: "app", password: PASSWORD },
        { name: "tiny", password: PASSWORD },
        { name: "capped", password: PASSWORD },
        { name: "blocks", password: PASSWORD }
      ]
    })
    const config = writeTenantConfig("hosts.yaml", db, [
      ["app", POOL],
      ["tiny", 1],
      ["capped", 3, 4],
      ["blocks", 3, 12]
    ])
    runners.push(await startRunner(db.url(), config, 1))
    runners.push(...(await Promise.all([startRunner(db.url(), undefined, 2), startRunner(db.url(), undefined, 3)])))
    if (hasPgbench) await run("pgbench", ["-i", "-s", "1", "-q", db.url({ user: "app", password: PASSWORD })])
  }, 60_000)

  afterAll(async () => {
    if (process.env.SCALE_DEBUG)
      writeFileSync("/tmp/scale-hosts.log", runners.map((r) => r.cli.output()).join("\n=====\n"))
    await Promise.all(runners.map(stopRunner))
    await db?.stop()
  })

  it.skipIf(!hasPgbench)(
    "pgbench through all three at once never has more than pool_size servers, and no failed transaction",
    async () => {
      const benches = Promise.all(
        runners.map((r) => run("pgbench", ["-c", "8", "-j", "2", "-T", "5", "-n", url(r.port)]))
      )
      const { max, samples } = await sample(db, benches)
      for (const { stdout } of await benches) {
        if (process.env.SCALE_DEBUG) console.log(stdout.match(/number of transactions actually processed: \d+/)?.[0])
        expect(stdout).toMatch(/number of failed transactions: 0 /)
        expect(Number(stdout.match(/number of transactions actually processed: (\d+)/)?.[1])).toBeGreaterThan(50)
      }
      expect(samples).toBeGreaterThan(10)
      expect(max).toBeLessThanOrEqual(POOL)
      // Really shared out under load, not one runner's share.
      expect(max).toBeGreaterThan(4)
    },
    40_000
  )

  it("a pool of 1 shared by three runners serves the clients of each", async () => {
    const clients = await Promise.all(runners.flatMap((r) => [connect(r.port, "tiny"), connect(r.port, "tiny")]))
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

  it("a cancel sent to another runner than the client's cancels its query", async () => {
    const [owner, other] = [runners[0]!, runners[1]!]
    const victim = await connect(owner.port)
    const processId = processIdOf(victim)
    expect(slotOf(processId)).toBeGreaterThan(0)
    const { victimCode } = await cancelWhileBusy({ db, port: other.port, victim })
    expect(victimCode).toBe("57014")
    expect(other.cli.output()).toMatch(/CancelRequest for runner \d+ forwarded to 127\.0\.0\.1:/)
    await victim.end()
  }, 30_000)

  it("max_clients holds across hosts: 4 admitted over two runners, the next refused EMAXCONN on any runner, a seat freed is taken again", async () => {
    const admitted: Array<pg.Client> = []
    const attempt = (port: number) =>
      connect(port, "capped").then(
        (client) => {
          admitted.push(client)
          return "admitted"
        },
        (e: Error) => e.message
      )
    try {
      for (const r of [runners[0]!, runners[1]!, runners[0]!, runners[1]!])
        expect(await attempt(r.port)).toBe("admitted")
      // Full: whichever runner a login reaches, it is refused, after the others gave back what they do not use.
      for (const r of [...runners, ...runners]) expect(await attempt(r.port)).toMatch(/^\(EMAXCONN\)/)
      expect(admitted).toHaveLength(4)
      await Promise.all(admitted.map((c) => c.query("SELECT 1")))
      // One leaves on runner 1: the next login, on runner 2, takes its seat.
      await admitted.shift()!.end()
      expect(await attempt(runners[1]!.port)).toBe("admitted")
      expect(await attempt(runners[2]!.port)).toMatch(/^\(EMAXCONN\)/)
    } finally {
      await Promise.all(admitted.map((c) => c.end().catch(() => undefined)))
    }
  }, 30_000)

  // The block arithmetic of a single-process runner (under npm run test:e2e:workers a host's
  // supervisor hands its workers blocks of its own, which this does not count).
  it.skipIf(Number(process.env.TIDEPOOL_WORKERS ?? 1) > 1)(
    "seats are taken in blocks, and a runner short of one takes back another runner's unused seats before refusing",
    async () => {
      // max_clients 12 over three runners: blocks of 12 / (4 × 3) = 1 spare seat.
      const admitted: Array<pg.Client> = []
      const attempt = (port: number) =>
        connect(port, "blocks").then(
          (client) => {
            admitted.push(client)
            return "admitted"
          },
          (e: Error) => e.message
        )
      try {
        // Runner 1 holds a client and a spare seat; runner 2 takes the rest, one by one.
        expect(await attempt(runners[0]!.port)).toBe("admitted")
        const seats = async (runner: number) =>
          Number(
            (
              await db.query(
                "SELECT coalesce(sum(s.held), 0)::int AS n FROM tidepool_seats s JOIN tidepool_runners r USING (runner_id) WHERE s.pool_key LIKE '%\"blocks\"%' AND r.slot = $1",
                [runner]
              )
            )[0].n
          )
        expect(await seats(1)).toBe(2)
        for (let i = 0; i < 11; i++) expect(await attempt(runners[1]!.port)).toBe("admitted")
        // The twelfth client on runner 2 got runner 1's spare seat back: the pool is full, not refused early.
        expect(admitted).toHaveLength(12)
        expect(await seats(1)).toBe(1)
        for (const r of runners) expect(await attempt(r.port)).toMatch(/^\(EMAXCONN\)/)
      } finally {
        await Promise.all(admitted.map((c) => c.end().catch(() => undefined)))
      }
    },
    30_000
  )

  it("the store restored empty: every runner registers again with what it holds, never above pool_size, and serves", async () => {
    const marks = runners.map((r) => r.cli.output().length)
    const clients = await Promise.all(runners.flatMap((r) => [connect(r.port), connect(r.port), connect(r.port)]))
    let stop = false
    const failures: Array<string> = []
    const loops = clients.map(async (c) => {
      while (!stop) await c.query("SELECT pg_sleep(0.01)").catch((e: Error) => failures.push(e.message))
    })
    let stopSampling: () => void = () => undefined
    const sampling = sample(db, new Promise<void>((resolve) => (stopSampling = resolve)))
    try {
      // A restore from before the ledger existed (or a new, empty store): its tables are gone.
      // The runners' transactions hold row locks on these tables: PostgreSQL may pick the DROP as a
      // deadlock's victim (seen in CI), so it is tried again, as an operator's restore would be.
      for (let attempt = 1; ; attempt++) {
        const dropped = await db
          .query("DROP TABLE tidepool_backends, tidepool_permits, tidepool_seats, tidepool_runners")
          .then(
            () => true,
            (e: Error & { code?: string }) => {
              if (e.code !== "40P01" || attempt >= 5) throw e
              return false
            }
          )
        if (dropped) break
      }
      for (const [i, r] of runners.entries()) {
        await logged(r, marks[i]!, /lease was reclaimed while it was away/)
        await logged(r, marks[i]!, /registered as slot \d+/)
      }
      // Each runner is its own row again (none took another's for its own), and each is served.
      const rows = await db.query("SELECT runner_id, slot FROM tidepool_runners")
      expect(rows).toHaveLength(runners.length)
      const fresh = await Promise.all(runners.map((r) => connect(r.port)))
      const ones = await Promise.all(fresh.map((c) => c.query("SELECT 1 AS one")))
      expect(ones.map((r) => r.rows[0].one)).toEqual(fresh.map(() => 1))
      await Promise.all(fresh.map((c) => c.end()))
    } finally {
      stop = true
      stopSampling()
      await Promise.all(loops)
      await Promise.all(clients.map((c) => c.end().catch(() => undefined)))
    }
    expect((await sampling).max).toBeLessThanOrEqual(POOL)
    expect(failures).toEqual([])
  }, 40_000)

  it("kill -9 of a runner mid-load: the others keep serving, its share comes back after the lease, never above pool_size", async () => {
    const victim = runners[2]!
    const survivors = runners.slice(0, 2)
    let stop = false
    let served = 0
    let servedBySurvivors = 0
    const failures: Array<string> = []
    const loop = async (runner: Runner) => {
      const c = await connect(runner.port)
      while (!stop) {
        try {
          await c.query("SELECT pg_sleep(0.005)")
          served++
          if (runner !== victim) servedBySurvivors++
        } catch (e) {
          // Only the killed runner's clients may fail; they stop.
          if (runner !== victim) failures.push(String((e as Error).message))
          return
        }
      }
      await c.end().catch(() => undefined)
    }
    const clients = runners.flatMap((r) => Array.from({ length: 10 }, () => loop(r)))
    let stopSampling: () => void = () => undefined
    const sampling = sample(db, new Promise<void>((resolve) => (stopSampling = resolve)))
    try {
      const deadline = Date.now() + 20_000
      while (served < 300) {
        if (Date.now() > deadline) throw new Error("load never got going")
        await new Promise((r) => setTimeout(r, 10))
      }
      // A statement the dead runner leaves running: its server must not count as free (the pool would
      // go above 10) until the reclaim has cancelled it.
      const sleeper = await connect(victim.port)
      void sleeper.query("SELECT pg_sleep(30)").catch(() => undefined)
      for (;;) {
        const rows = await db.query(
          "SELECT 1 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'"
        )
        if (rows.length > 0) break
      }
      victim.cli.child.kill("SIGKILL")
      await victim.cli.exited
      const killedAt = Date.now()
      const atKill = servedBySurvivors
      // Its share returns: the survivors, whose 20 clients want more than 10, reach all 10 servers.
      for (;;) {
        const log = survivors.map((r) => r.cli.output()).join("\n")
        if (/reclaimed runner \d+ .* [1-9]\d* backend\(s\) cancelled/.test(log) && (await serversOf(db)) === POOL) break
        if (Date.now() - killedAt > 15_000) {
          const sessions = await db.query(
            "SELECT pid, usename, application_name, state, wait_event_type, wait_event, left(query, 80) AS query FROM pg_stat_activity WHERE backend_type = 'client backend'"
          )
          throw new Error(`the dead runner's permits never came back:\n${JSON.stringify(sessions, null, 1)}\n${log}`)
        }
        await new Promise((r) => setTimeout(r, 20))
      }
      const backAfter = Date.now() - killedAt
      if (process.env.SCALE_DEBUG)
        console.log(`kill -9: the pool was back at ${POOL} servers ${backAfter} ms after the kill`)
      // The documented bound: the lease, a renewal period, and the cancels (generous on a loaded machine).
      expect(backAfter).toBeLessThan(LEASE_MS * 4 + 5_000)
      expect(servedBySurvivors).toBeGreaterThan(atKill)
    } finally {
      stop = true
      stopSampling()
      await Promise.all(clients)
    }
    const { max } = await sampling
    expect(max).toBeLessThanOrEqual(POOL)
    expect(failures).toEqual([])
  }, 60_000)

  it("a runner stopped with SIGTERM leaves the store: its row and permits are gone at once, not after the lease", async () => {
    const leaving = runners[1]!
    const c = await connect(leaving.port)
    await c.query("SELECT 1")
    await c.end()
    const before = await db.query("SELECT count(*)::int AS n FROM tidepool_runners")
    leaving.cli.child.kill("SIGTERM")
    expect(await leaving.cli.exited).toBe(0)
    expect(leaving.cli.output()).toMatch(/left the store; its permits are free/)
    const after = await db.query("SELECT count(*)::int AS n FROM tidepool_runners")
    expect(after[0].n).toBe(before[0].n - 1)
  }, 30_000)
})

/** A TCP relay to the store that can cut every connection and refuse new ones, then come back on the same port. */
const storeLink = async (target: PostgresServer) => {
  const sockets = new Set<net.Socket>()
  let server: net.Server | undefined
  const port = await freePort()
  const up = () =>
    new Promise<void>((resolve, reject) => {
      server = net.createServer((client) => {
        const upstream = net.connect({ host: target.host, port: target.port })
        for (const s of [client, upstream]) {
          sockets.add(s)
          s.on("error", () => undefined)
          s.on("close", () => {
            sockets.delete(s)
            client.destroy()
            upstream.destroy()
          })
        }
        client.pipe(upstream)
        upstream.pipe(client)
      })
      server.once("error", reject)
      server.listen(port, "127.0.0.1", () => resolve())
    })
  const down = async () => {
    const s = server
    server = undefined
    const closed = new Promise<void>((resolve) => (s === undefined ? resolve() : s.close(() => resolve())))
    for (const socket of sockets) socket.destroy()
    await closed
  }
  await up()
  return {
    url: `postgresql://postgres:${encodeURIComponent(target.superPassword)}@127.0.0.1:${port}/postgres`,
    up,
    down
  }
}

/** Waits (bounded) until `runner` has logged `pattern` after `from`. */
const logged = async (runner: Runner, from: number, pattern: RegExp) => {
  const deadline = Date.now() + 15_000
  while (!pattern.test(runner.cli.output().slice(from))) {
    if (Date.now() > deadline) throw new Error(`never logged ${pattern}:\n${runner.cli.output().slice(from)}`)
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
}

describe("TIDEPOOL_CLUSTER=on: the store goes away", () => {
  it("running clients continue, new transactions run on held servers, no new capacity; it recovers when the store returns", async () => {
    const [db, store] = await Promise.all([
      startPostgres({
        roles: [
          { name: "app", password: PASSWORD },
          { name: "tiny", password: PASSWORD }
        ]
      }),
      startPostgres()
    ])
    // One relay per runner: both are cut for the outage, then one alone.
    const links = [await storeLink(store), await storeLink(store)]
    const runners: Array<Runner> = []
    const clients: Array<pg.Client> = []
    try {
      const config = writeTenantConfig("outage.yaml", db, [
        ["app", 4],
        ["tiny", 1]
      ])
      runners.push(await startRunner(links[0]!.url, config, 11))
      runners.push(await startRunner(links[1]!.url, undefined, 12))
      for (const r of runners) clients.push(await connect(r.port), await connect(r.port))
      await Promise.all(clients.map((c) => c.query("SELECT 1")))
      const marks = runners.map((r) => r.cli.output().length)
      await Promise.all(links.map((l) => l.down()))
      for (const [i, r] of runners.entries()) await logged(r, marks[i]!, /lost the tenant store/)
      // A pool that holds nothing gets nothing while the store is away (its first login needs a server).
      const waiting = new pg.Client({ connectionString: url(runners[0]!.port, "tiny") })
      waiting.on("error", () => undefined)
      const tinyQuery = waiting.connect().then(() => waiting.query("SELECT 'served' AS s"))
      // Running clients continue, and new clients of the runners' held servers are served too.
      for (const r of runners) clients.push(await connect(r.port))
      for (let round = 0; round < 3; round++) {
        const sums = await Promise.all(
          clients.map((c) => c.query("SELECT sum(x)::int AS s FROM generate_series(1, 100) x"))
        )
        expect(sums.map((s) => s.rows[0].s)).toEqual(clients.map(() => 5050))
      }
      expect(await serversOf(db)).toBeLessThanOrEqual(4)
      expect(await serversOf(db, "tiny")).toBe(0)
      await Promise.all(links.map((l) => l.up()))
      // Back: the waiting pool gets its permit, each runner says the store is back.
      expect((await tinyQuery).rows[0].s).toBe("served")
      for (const r of runners) await r.cli.waitFor(/the tenant store is back/)
      await waiting.end()

      // Runner 2 alone cut off for longer than the lease: runner 1 reclaims its permits (the one
      // case where the pool may go above pool_size, until runner 2 is back). Back, runner 2 finds its
      // row gone and registers again with what it really holds, so the store grants nothing beyond
      // the pool's size: runner 1's four clients busy at once never make it more than 4 servers.
      const mark = runners[0]!.cli.output().length
      const mark2 = runners[1]!.cli.output().length
      await links[1]!.down()
      await logged(runners[0]!, mark, /reclaimed runner \d+ \(slot 2,/)
      // A runner that registers meanwhile does not take the freed slot (the lowest free one, as
      // slots were chosen before): runner 2 gets it back, so its clients' keys still name it.
      runners.push(await startRunner(store.url(), undefined, 13))
      expect(runners[2]!.cli.output()).not.toMatch(/registered as slot 2\b/)
      await links[1]!.up()
      await logged(runners[1]!, mark2, /lease was reclaimed while it was away/)
      await logged(runners[1]!, mark2, /registered as slot 2/)
      // A client of runner 2 from before the outage, cancelled through runner 1.
      const { victimCode } = await cancelWhileBusy({ db, port: runners[0]!.port, victim: clients[2]! })
      expect(victimCode).toBe("57014")
      const ofRunner1 = [clients[0]!, clients[1]!, clients[4]!, await connect(runners[0]!.port)]
      clients.push(ofRunner1[3]!)
      const busy = Promise.all(ofRunner1.map((c) => c.query("SELECT pg_sleep(0.5)")))
      const { max } = await sample(db, busy)
      await busy
      expect(max).toBeLessThanOrEqual(4)
      const ones = await Promise.all(clients.map((c) => c.query("SELECT 1 AS one")))
      expect(ones.map((r) => r.rows[0].one)).toEqual(clients.map(() => 1))
    } finally {
      if (process.env.SCALE_DEBUG)
        writeFileSync("/tmp/scale-hosts-outage.log", runners.map((r) => r.cli.output()).join("\n=====\n"))
      await Promise.all(clients.map((c) => c.end().catch(() => undefined)))
      await Promise.all(runners.map(stopRunner))
      await Promise.all(links.map((l) => l.down()))
      await store.stop()
      await db.stop()
    }
    // Two hosts start inside the test: under TIDEPOOL_WORKERS each is three processes.
  }, 120_000)
})
