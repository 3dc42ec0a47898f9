import * as path from "node:path"
import type pg from "pg"
import { type CliProcess, runCli } from "./cli.ts"
import { freePort } from "./ports.ts"
import type { PostgresServer } from "./postgres.ts"

/**
 * What the scale-out tests (test/e2e/scale-*.test.ts) watch from outside: the servers a pool has
 * open as PostgreSQL sees them, sampled while the load runs, and the process id a client was given.
 */

/** Connections of `user` as PostgreSQL sees them (the sampler's and runners' store sessions are the superuser's). */
export const serversOf = async (db: PostgresServer, user = "app"): Promise<number> =>
  Number((await db.query("SELECT count(*) AS n FROM pg_stat_activity WHERE usename = $1", [user]))[0].n)

/** Samples `serversOf` until `stop` resolves; returns the largest count seen and how many samples. */
export const sample = async (db: PostgresServer, stop: Promise<unknown>, user = "app") => {
  let done = false
  void stop.finally(() => {
    done = true
  })
  let max = 0
  let samples = 0
  while (!done) {
    max = Math.max(max, await serversOf(db, user))
    samples++
  }
  return { max, samples }
}

/** The process id of a client's BackendKeyData (what CancelRequests carry). */
export const processIdOf = (c: pg.Client): number => (c as unknown as { processID: number }).processID

/** A `tidepool serve` process in cluster mode (test/e2e/scale-hosts*.test.ts): a runner, or a host of workers. */
export interface ClusterHost {
  readonly cli: CliProcess
  /** Its transaction-mode port. */
  readonly port: number
}

/** Every test host's vault key: hosts sharing a store must agree on it. */
export const CLUSTER_VAULT_KEY = "0f".repeat(32)

/**
 * Starts `tidepool serve` with `TIDEPOOL_CLUSTER=on` on ports of its own, its data in `dir/data-n`;
 * only a host given `config` seeds the tenants. `seeded`: the tenants are in the store (its first
 * process listens); `ready`: it all listens (one process, or a supervisor once every worker does).
 */
export const startClusterHost = async (options: {
  readonly dir: string
  readonly storeUrl: string
  readonly config?: string | undefined
  readonly n: number
  readonly leaseMs: number
  /** More settings (TIDEPOOL_WORKERS, …), over the defaults. */
  readonly env?: Readonly<Record<string, string>>
}): Promise<{ readonly seeded: Promise<ClusterHost>; readonly ready: Promise<ClusterHost> }> => {
  const port = await freePort()
  const cli = runCli(options.config === undefined ? ["serve"] : ["serve", "--config", options.config], {
    DATABASE_URL: options.storeUrl,
    TIDEPOOL_CLUSTER: "on",
    TIDEPOOL_LEASE_MS: String(options.leaseMs),
    PROXY_PORT_TRANSACTION: String(port),
    PROXY_PORT_SESSION: String(await freePort()),
    PORT: String(await freePort()),
    TIDEPOOL_LISTEN_ADDR: "127.0.0.1",
    TIDEPOOL_DATA_DIR: path.join(options.dir, `data-${options.n}`),
    TIDEPOOL_TENANT_REFRESH_MS: "1000",
    TIDEPOOL_LOG_LEVEL: "debug",
    VAULT_ENC_KEY: CLUSTER_VAULT_KEY,
    ...options.env
  })
  const host: ClusterHost = { cli, port }
  return {
    seeded: cli.waitFor(/"msg":"(worker 1: )?tidepool listening/).then(() => host),
    ready: cli.waitFor(/"msg":"(tidepool listening|tidepool supervisor: \d+ workers listening)/).then(() => host)
  }
}

/** SIGTERM, and waits for the exit (nothing if it has exited already). */
export const stopClusterHost = async (host: ClusterHost | undefined): Promise<void> => {
  if (host === undefined || host.cli.child.exitCode !== null || host.cli.child.signalCode !== null) return
  host.cli.child.kill("SIGTERM")
  await host.cli.exited
}
