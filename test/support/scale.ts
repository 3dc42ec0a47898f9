import type pg from "pg"
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
