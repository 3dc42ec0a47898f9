import { mkdtempSync, rmSync, writeFileSync } from "node:fs"
import type * as net from "node:net"
import { tmpdir } from "node:os"
import * as path from "node:path"
import pg from "pg"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { clusterOwnerOf, ownerOf } from "../../src/cluster/index.ts"
import { type PermitHolder, StoreRunner } from "../../src/cluster/StoreRunner.ts"
import { makeTestCerts, type TestCerts } from "../support/certs.ts"
import { runCli } from "../support/cli.ts"
import { writeConfig } from "../support/config.ts"
import { freePort } from "../support/ports.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import {
  CLUSTER_VAULT_KEY,
  type ClusterHost,
  processIdOf,
  sample,
  startClusterHost,
  stopClusterHost
} from "../support/scale.ts"
import { tlsOnlyFront } from "../support/tlsFront.ts"

/**
 * TIDEPOOL_CLUSTER=on with a TLS upstream (docs/scale-out.md#lease-timing): a runner that dies
 * leaves its backends' statements to be cancelled by the one that reclaims its permits, over TLS,
 * the way the dead runner reached them. The upstream sits behind a TLS-only front that drops any
 * connection opening with something else than an SSLRequest (PostgreSQL itself takes a plaintext
 * CancelRequest whatever pg_hba.conf says: cancels are handled before authentication).
 */
const PASSWORD = "app-secret"
const LEASE_MS = 1_500
const SLEEP = "SELECT pg_sleep(30)"
const dir = mkdtempSync(path.join(tmpdir(), "tidepool-hosts-tls-"))
afterAll(() => rmSync(dir, { recursive: true, force: true }))

type Runner = ClusterHost

const startRunner = async (storeUrl: string, config: string | undefined, n: number): Promise<Runner> =>
  (await startClusterHost({ dir, storeUrl, config, n, leaseMs: LEASE_MS })).ready

const stopRunner = stopClusterHost

const connect = async (port: number) => {
  const c = new pg.Client({ connectionString: `postgresql://app.acme:${PASSWORD}@127.0.0.1:${port}/postgres` })
  c.on("error", () => undefined)
  await c.connect()
  return c
}

/** Polls `probe` until it returns something, failing the test at `ms`. */
const until = async <A>(what: string, ms: number, probe: () => Promise<A | undefined>): Promise<A> => {
  const deadline = Date.now() + ms
  for (;;) {
    const found = await probe()
    if (found !== undefined) return found
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 20))
  }
}

describe("TIDEPOOL_CLUSTER=on over a TLS-only upstream", () => {
  let certs: TestCerts
  let db: PostgresServer
  /** TLS-only front of `db`: what it refused (the first packet's code). */
  let gate: net.Server
  /**
   * A tenant reaching PostgreSQL only through the TLS-only front, by a name (`localhost`), so a cancel
   * must carry the server name and verify the certificate for it.
   */
  const tlsTenant = (id: string, user: string) => ({
    external_id: id,
    db_host: "localhost",
    db_port: (gate.address() as net.AddressInfo).port,
    upstream_ssl: true,
    upstream_verify: "peer",
    upstream_tls_ca: certs.ca.certPem,
    users: [{ db_user: user, db_password: PASSWORD, pool_size: 1 }]
  })
  let refused: Array<number> = []
  const runners: Array<Runner> = []

  beforeAll(async () => {
    certs = await makeTestCerts()
    db = await startPostgres({
      roles: [
        { name: "app", password: PASSWORD },
        { name: "solo", password: PASSWORD }
      ],
      settings: { ssl: "on", ssl_cert_file: certs.localhostOnly.cert, ssl_key_file: certs.localhostOnly.key },
      hba: [
        "hostssl all app 127.0.0.1/32 scram-sha-256",
        "hostnossl all app 127.0.0.1/32 reject",
        "hostssl all solo 127.0.0.1/32 scram-sha-256",
        "hostnossl all solo 127.0.0.1/32 reject"
      ],
      databases: ["oldstore", "failstore"]
    })
    const front = await tlsOnlyFront(db.port)
    gate = front.server
    refused = front.refused
    const config = writeConfig(path.join(dir, "tls.yaml"), [tlsTenant("acme", "app")])
    // One at a time: the first creates the store's tables and seeds the tenant.
    runners.push(await startRunner(db.url(), config, 1))
    runners.push(await startRunner(db.url(), undefined, 2))
  }, 90_000)

  afterAll(async () => {
    if (process.env.SCALE_DEBUG)
      writeFileSync("/tmp/scale-hosts-tls.log", runners.map((r) => r.cli.output()).join("\n=====\n"))
    await Promise.all(runners.map(stopRunner))
    gate?.close()
    await db?.stop()
    await certs?.remove()
  })

  it("kill -9 of a runner: its statement on the TLS upstream is cancelled over TLS before its permit goes to the other runner", async () => {
    const [victim, survivor] = [runners[0]!, runners[1]!]
    const sleeper = await connect(victim.port)
    void sleeper.query(SLEEP).catch(() => undefined)
    const pid = await until("the sleeper's statement", 10_000, async () => {
      const rows = await db.query("SELECT pid FROM pg_stat_activity WHERE query = $1 AND state = 'active'", [SLEEP])
      return rows[0]?.pid as number | undefined
    })
    // Recorded with what a reclaimer needs to reach it as its owner did.
    const recorded = await until("the backend's row", 10_000, async () => {
      const rows = await db.query(
        "SELECT tls, tls_server_name, tls_verify, tenant FROM tidepool_backends WHERE pid = $1",
        [pid]
      )
      return rows[0]
    })
    expect(recorded).toEqual({ tls: true, tls_server_name: "localhost", tls_verify: true, tenant: "acme" })
    // The pool of 1 is held: the other runner's login waits for the permit.
    const waiting = connect(survivor.port).then(async (c) => {
      const { rows } = await c.query("SELECT 1 AS one")
      await c.end()
      return rows[0].one as number
    })
    let stopSampling: () => void = () => undefined
    const sampling = sample(db, new Promise<void>((resolve) => (stopSampling = resolve)))
    try {
      victim.cli.child.kill("SIGKILL")
      await victim.cli.exited
      const killedAt = Date.now()
      const served = await Promise.race([
        waiting,
        new Promise<never>((_, reject) =>
          setTimeout(() => reject(new Error(`never served:\n${survivor.cli.output()}`)), 15_000)
        )
      ])
      expect(served).toBe(1)
      if (process.env.SCALE_DEBUG)
        console.log(`kill -9: the other runner's client served ${Date.now() - killedAt} ms after`)
    } finally {
      stopSampling()
    }
    // Never the sleeper's backend and the survivor's at once: the cancel came before the grant.
    expect((await sampling).max).toBeLessThanOrEqual(1)
    expect(await db.query("SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active'", [pid])).toEqual([])
    expect(survivor.cli.output()).toMatch(/reclaimed runner \d+ .*; 1 backend\(s\) cancelled, 1 permit\(s\) freed/)
    expect(survivor.cli.output()).not.toMatch(/CancelRequest for runner \d+'s backend/)
    // Nothing reached the upstream in plaintext.
    expect(refused).toEqual([])
  }, 40_000)

  it("one host of two workers (no cluster): a dead worker's statement on the TLS upstream is cancelled over TLS, by a live worker, before its permit is given again", async () => {
    const config = writeConfig(path.join(dir, "solo.yaml"), [tlsTenant("solo", "solo")])
    const port = await freePort()
    const cli = runCli(["serve", "--config", config], {
      TIDEPOOL_WORKERS: "2",
      TIDEPOOL_CLUSTER: "off",
      PROXY_PORT_TRANSACTION: String(port),
      PROXY_PORT_SESSION: String(await freePort()),
      PORT: String(await freePort()),
      TIDEPOOL_LISTEN_ADDR: "127.0.0.1",
      TIDEPOOL_DATA_DIR: path.join(dir, "data-solo"),
      VAULT_ENC_KEY: CLUSTER_VAULT_KEY
    })
    const host = { cli, port }
    runners.push(host)
    await cli.waitFor(/"msg":"tidepool supervisor: \d+ workers listening/)
    const soloClient = async () => {
      const c = new pg.Client({ connectionString: `postgresql://solo.solo:${PASSWORD}@127.0.0.1:${port}/postgres` })
      c.on("error", () => undefined)
      await c.connect()
      return c
    }
    const sleeper = await soloClient()
    const owner = ownerOf(processIdOf(sleeper))
    void sleeper.query(SLEEP).catch(() => undefined)
    const pid = await until("the sleeper's statement", 10_000, async () => {
      const rows = await db.query(
        "SELECT pid FROM pg_stat_activity WHERE usename = 'solo' AND query = $1 AND state = 'active'",
        [SLEEP]
      )
      return rows[0]?.pid as number | undefined
    })
    const workerPid = Number(
      [...cli.output().matchAll(/worker (\d+) started \(pid (\d+)\)/g)]
        .filter((m) => Number(m[1]) === owner + 1)
        .at(-1)![2]
    )
    let stopSampling: () => void = () => undefined
    const sampling = sample(db, new Promise<void>((resolve) => (stopSampling = resolve)), "solo")
    try {
      process.kill(workerPid, "SIGKILL")
      await cli.waitFor(new RegExp(`worker ${owner + 1} \\(pid ${workerPid}\\) died`))
      // A client of the other worker (or of the restarted one: refused until it listens) takes the permit.
      const served = await until(`a client served:\n${cli.output()}`, 20_000, () =>
        soloClient().then(
          async (c) => {
            const { rows } = await c.query("SELECT 1 AS one")
            await c.end()
            return rows[0].one as number
          },
          () => undefined
        )
      )
      expect(served).toBe(1)
    } finally {
      stopSampling()
    }
    // Never the sleeper's backend and the new one's at once: the cancel came before the permit moved.
    expect((await sampling).max).toBeLessThanOrEqual(1)
    expect(await db.query("SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active'", [pid])).toEqual([])
    expect(cli.output()).not.toMatch(/freed without a CancelRequest|CancelRequest for a dead worker's backend/)
    expect(refused).toEqual([])
  }, 60_000)

  // A host of several workers (npm run test:e2e:workers): its supervisor cancels a dead worker's TLS backends.
  it.skipIf(Number(process.env.TIDEPOOL_WORKERS ?? 1) < 2)(
    "kill -9 of a cluster host's worker: its statement on the TLS upstream is cancelled over TLS before its permit is given again",
    async () => {
      const host = runners[1]!
      const sleeper = await connect(host.port)
      const owner = clusterOwnerOf(processIdOf(sleeper))
      void sleeper.query(SLEEP).catch(() => undefined)
      const pid = await until("the sleeper's statement", 10_000, async () => {
        const rows = await db.query("SELECT pid FROM pg_stat_activity WHERE query = $1 AND state = 'active'", [SLEEP])
        return rows[0]?.pid as number | undefined
      })
      const workerPid = Number(
        [...host.cli.output().matchAll(/worker (\d+) started \(pid (\d+)\)/g)]
          .filter((m) => Number(m[1]) === owner + 1)
          .at(-1)![2]
      )
      let stopSampling: () => void = () => undefined
      const sampling = sample(db, new Promise<void>((resolve) => (stopSampling = resolve)))
      try {
        process.kill(workerPid, "SIGKILL")
        await host.cli.waitFor(new RegExp(`worker ${owner + 1} \\(pid ${workerPid}\\) died`))
        // A client of the host's other worker (or of the restarted one) takes the permit.
        const waiting = connect(host.port).then(async (c) => {
          const { rows } = await c.query("SELECT 1 AS one")
          await c.end()
          return rows[0].one as number
        })
        const served = await Promise.race([
          waiting,
          new Promise<never>((_, reject) =>
            setTimeout(() => reject(new Error(`never served:\n${host.cli.output()}`)), 15_000)
          )
        ])
        expect(served).toBe(1)
      } finally {
        stopSampling()
      }
      expect((await sampling).max).toBeLessThanOrEqual(1)
      expect(await db.query("SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active'", [pid])).toEqual([])
      expect(host.cli.output()).not.toMatch(/CancelRequest for worker \d+'s backend/)
      expect(refused).toEqual([])
    },
    40_000
  )

  it("a store made by the previous version gets the new columns of tidepool_backends, and its rows keep working", async () => {
    const old = new pg.Client({ connectionString: db.url({ database: "oldstore" }) })
    await old.connect()
    try {
      // The ledger's tables as the previous version created them.
      await old.query(`
        CREATE TABLE tidepool_runners (runner_id BIGSERIAL PRIMARY KEY, slot INT NOT NULL UNIQUE, address TEXT NOT NULL,
          token TEXT NOT NULL DEFAULT '', started_at TIMESTAMPTZ NOT NULL DEFAULT now(), renewed_at TIMESTAMPTZ NOT NULL DEFAULT now());
        CREATE TABLE tidepool_permits (pool_key TEXT NOT NULL, runner_id BIGINT NOT NULL REFERENCES tidepool_runners ON DELETE CASCADE,
          held INT NOT NULL, want INT NOT NULL, want_since BIGINT NOT NULL DEFAULT 0, keep INT, press BOOLEAN NOT NULL DEFAULT false,
          PRIMARY KEY (pool_key, runner_id));
        CREATE INDEX tidepool_permits_runner ON tidepool_permits (runner_id);
        CREATE TABLE tidepool_seats (pool_key TEXT NOT NULL, runner_id BIGINT NOT NULL REFERENCES tidepool_runners ON DELETE CASCADE,
          held INT NOT NULL, reclaim BOOLEAN NOT NULL DEFAULT false, PRIMARY KEY (pool_key, runner_id));
        CREATE TABLE tidepool_backends (runner_id BIGINT NOT NULL REFERENCES tidepool_runners ON DELETE CASCADE,
          host TEXT NOT NULL, port INT NOT NULL, pid INT NOT NULL, secret TEXT NOT NULL, PRIMARY KEY (runner_id, host, port, pid));
        INSERT INTO tidepool_runners (slot, address, token) VALUES (7, '127.0.0.1:1', 'old');
        INSERT INTO tidepool_backends SELECT runner_id, '127.0.0.1', 5432, 1234, 'abcd' FROM tidepool_runners;
      `)
      const runner = await StoreRunner.start({
        url: db.url({ database: "oldstore" }),
        leaseMs: 60_000,
        address: "127.0.0.1:2",
        timeoutMs: 2_000,
        log: () => undefined
      })
      try {
        // The old row: a plaintext backend, as everything recorded before was.
        expect(
          (await old.query("SELECT tls, tls_server_name, tls_verify, tenant FROM tidepool_backends WHERE pid = 1234"))
            .rows
        ).toEqual([{ tls: false, tls_server_name: null, tls_verify: false, tenant: "" }])
        const holder: PermitHolder = {
          settings: { key: "acme\u0000app\u0000transaction\u0000postgres", size: 1 },
          isClosed: false,
          grant: () => undefined,
          direct: () => undefined
        }
        const line = runner.attachHolder(holder)
        const tlsBackend = {
          host: "localhost",
          port: 5432,
          pid: 4321,
          secret: "00ff00ff",
          tls: true,
          tlsServerName: "localhost",
          tlsVerify: true
        }
        line.opened(tlsBackend)
        const row = await until("the TLS backend's row", 10_000, async () => {
          const { rows } = await old.query(
            "SELECT tls, tls_server_name, tls_verify, tenant FROM tidepool_backends WHERE pid = 4321"
          )
          return rows[0]
        })
        expect(row).toEqual({ tls: true, tls_server_name: "localhost", tls_verify: true, tenant: "acme" })
        // Its close takes its row away, as a plaintext one's does.
        line.closed(tlsBackend)
        await until("the TLS backend's row gone", 10_000, async () =>
          (await old.query("SELECT 1 FROM tidepool_backends WHERE pid = 4321")).rows.length === 0 ? true : undefined
        )
      } finally {
        await runner.stop(1_000)
      }
    } finally {
      await old.end()
    }
  }, 20_000)

  it("a reclaim whose cancels fail logs each at warning and frees the permits all the same", async () => {
    const store = new pg.Client({ connectionString: db.url({ database: "failstore" }) })
    await store.connect()
    const closed = await freePort()
    const logs: Array<string> = []
    let runner: StoreRunner | undefined
    try {
      // The store's tables, then a dead runner's rows: expired, its lock free (no session holds it).
      await (
        await StoreRunner.start({
          url: db.url({ database: "failstore" }),
          leaseMs: 60_000,
          address: "127.0.0.1:3",
          timeoutMs: 2_000,
          log: () => undefined
        })
      ).stop(1_000)
      await store.query(`
        INSERT INTO tidepool_runners (slot, address, token, renewed_at) VALUES (9, '127.0.0.1:4', 'dead', now() - interval '1 hour');
        INSERT INTO tidepool_permits (pool_key, runner_id, held, want) SELECT '["ghost","app","transaction","postgres"]', runner_id, 2, 0 FROM tidepool_runners WHERE slot = 9;
        INSERT INTO tidepool_backends (runner_id, host, port, pid, secret, tls, tls_server_name, tls_verify, tenant)
          SELECT runner_id, '127.0.0.1', ${closed}, 111, '0000abcd', false, NULL, false, 'ghost' FROM tidepool_runners WHERE slot = 9
          UNION ALL SELECT runner_id, 'localhost', ${db.port}, 222, '0000abce', true, 'localhost', true, 'ghost' FROM tidepool_runners WHERE slot = 9;
      `)
      runner = await StoreRunner.start({
        url: db.url({ database: "failstore" }),
        leaseMs: 300,
        address: "127.0.0.1:5",
        timeoutMs: 2_000,
        log: (level, message) => logs.push(`${level}: ${message}`)
      })
      await until("the dead runner's reclaim", 10_000, async () =>
        (await store.query("SELECT 1 FROM tidepool_runners WHERE slot = 9")).rows.length === 0 ? true : undefined
      )
      const warnings = logs.filter((l) => l.startsWith("warning: "))
      // Refused in plaintext; over TLS, no CA to verify with: tenant "ghost" has no record, and no GLOBAL_UPSTREAM_CA_PATH.
      expect(warnings).toEqual(
        expect.arrayContaining([
          expect.stringMatching(
            new RegExp(`backend 111 at 127\\.0\\.0\\.1:${closed} failed \\(.*refused.*\\); its permit is freed anyway`)
          ),
          expect.stringMatching(
            /backend 222 at localhost:\d+ \(TLS, server name localhost\) failed \(.*no CA is configured.*\); its permit is freed anyway/
          )
        ])
      )
      expect(logs.join("\n")).toMatch(
        /reclaimed runner \d+ .*; 0 backend\(s\) cancelled \(2 cancel\(s\) failed\), 2 permit\(s\) freed/
      )
    } finally {
      await runner?.stop(1_000)
      await store.end()
    }
  }, 20_000)
})
