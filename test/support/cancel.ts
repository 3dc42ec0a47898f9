import pg from "pg"
import type { PostgresServer } from "./postgres.ts"

/**
 * Runs `SELECT pg_sleep(30)` on `victim` and a short query on `bystander` (if any), cancels the victim's
 * query through `port` the way node-postgres does (a new connection carrying the BackendKeyData the
 * victim received), and reports what each saw.
 */
export const cancelWhileBusy = async (options: {
  readonly db: PostgresServer
  readonly port: number
  readonly victim: pg.Client
  readonly bystander?: pg.Client
}): Promise<{ readonly victimCode: string | undefined; readonly bystanderState: string | undefined }> => {
  const { db, port, victim, bystander } = options
  const query = new pg.Query("SELECT pg_sleep(30)")
  const sleeping = new Promise<{ code?: string } | undefined>((resolve) => {
    query.on("error", (e) => resolve(e as { code?: string }))
    query.on("end", () => resolve(undefined))
  })
  victim.query(query)
  const other = bystander?.query("SELECT pg_sleep(0.5), 'done' AS state")
  // Cancel once the server really runs the sleep.
  for (;;) {
    const rows = await db.query(
      "SELECT 1 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'"
    )
    if (rows.length > 0) break
  }
  const canceller = new pg.Client({ host: "127.0.0.1", port })
  ;(canceller as unknown as { cancel(c: pg.Client, q: pg.Query): void }).cancel(victim, query)
  return { victimCode: (await sleeping)?.code, bystanderState: (await other)?.rows[0].state }
}
