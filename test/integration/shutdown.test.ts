import { mkdtempSync, rmSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import * as path from "node:path"
import pg from "pg"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { runCli } from "../support/cli.ts"
import { freePort } from "../support/ports.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"
import { errorFields, loginUntilOk, Wire } from "../support/wire.ts"

let db: PostgresServer

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: "app-secret" }] })
})

afterAll(async () => {
  await db?.stop()
})

/** Waits for a log line matching `pattern`; the deadline turns a missing line into a failure that lists the lines. */
const logged = async (tidepool: RunningTidepool, pattern: RegExp, deadlineMs = 20_000) => {
  const deadline = Date.now() + deadlineMs
  for (;;) {
    const line = tidepool.logs.find((l) => pattern.test(l.message))
    if (line !== undefined) return line
    if (Date.now() > deadline) {
      throw new Error(`no log line matches ${pattern}:\n${tidepool.logs.map((l) => l.message).join("\n")}`)
    }
    await new Promise((resolve) => setTimeout(resolve, 5))
  }
}

const acme = () => ({
  tenants: [
    {
      external_id: "acme",
      ...upstreamOf(db),
      users: [{ db_user: "app", db_password: "app-secret", pool_size: 2 }]
    }
  ],
  captureLogs: true
})

describe("shutdown logs", () => {
  for (const mode of ["transaction", "session"] as const) {
    it(`name the client idle in a transaction that holds the shutdown, and say how many the timeout force-closes (${mode})`, async () => {
      const tidepool = await startTidepool({ ...acme(), config: { shutdownTimeoutMs: 300 } })
      const client = new pg.Client({
        connectionString: tidepool.url({ user: "app.acme", password: "app-secret", mode }),
        application_name: "idler"
      })
      client.on("error", () => undefined)
      const idle = new pg.Client({ connectionString: tidepool.url({ user: "app.acme", password: "app-secret", mode }) })
      idle.on("error", () => undefined)
      await client.connect()
      await idle.connect()
      await client.query("BEGIN")
      await client.query("SELECT 1")
      await tidepool.stop()
      const messages = tidepool.logs.filter((l) => l.message.startsWith("shutdown:"))
      const who = `acme/app 127\\.0\\.0\\.1:\\d+ \\(${mode} mode, application_name idler, idle in transaction\\)`
      expect(messages.map((l) => l.level)).toEqual(["INFO", "WARN", "WARN"])
      expect(messages[0]!.message).toMatch(
        /^shutdown: stopped accepting connections; draining 2 client session\(s\), each closed at its next transaction boundary, for at most 300 ms$/
      )
      expect(messages[1]!.message).toMatch(
        new RegExp(
          `^shutdown: 1 session\\(s\\) idle in a transaction hold the shutdown until their client ends the transaction, at most for the whole drain timeout \\(300 ms\\): ${who}$`
        )
      )
      expect(messages[2]!.message).toMatch(
        new RegExp(
          `^shutdown: drain timeout \\(300 ms\\) reached; force-closing 1 client session\\(s\\) with 57P01: ${who}$`
        )
      )
      expect(messages[2]!.code).toBe("EADMINSHUTDOWN")
    })
  }

  it("say whom the drain waits for, and that every session ended when none had to be force-closed", async () => {
    const tidepool = await startTidepool({ ...acme(), config: { shutdownTimeoutMs: 20_000 } })
    const locker = new pg.Client({ connectionString: db.url() })
    await locker.connect()
    await locker.query("SELECT pg_advisory_lock(42)")
    const client = new pg.Client({
      connectionString: tidepool.url({ user: "app.acme", password: "app-secret", mode: "transaction" })
    })
    client.on("error", () => undefined)
    await client.connect()
    const blocked = client.query("SELECT pg_advisory_lock(42) AS locked")
    for (;;) {
      const waiting = await db.query("SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
      if (waiting.length > 0) break
    }
    const stopped = tidepool.stop()
    await logged(
      tidepool,
      /^shutdown: waiting for 1 session\(s\) to reach a transaction boundary: acme\/app .*running a query\)$/
    )
    await locker.query("SELECT pg_advisory_unlock(42)")
    await blocked
    await stopped
    await locker.end()
    expect(tidepool.logs.filter((l) => l.message.startsWith("shutdown:")).map((l) => l.level)).toEqual([
      "INFO",
      "INFO",
      "INFO"
    ])
    await logged(tidepool, /^shutdown: every client session ended within \d+ ms$/)
  })
})

describe("a login that completes while the pooler drains", () => {
  it("is told 57P01 at once rather than greeted and held until the drain timeout", async () => {
    const tidepool = await startTidepool({ ...acme(), config: { shutdownTimeoutMs: 60_000 } })
    const holder = new pg.Client({
      connectionString: tidepool.url({ user: "app.acme", password: "app-secret", mode: "transaction" })
    })
    holder.on("error", () => undefined)
    await holder.connect()
    await holder.query("BEGIN") // keeps the drain going
    const wire = await Wire.connect(tidepool.transactionPort)
    let stopped: Promise<void> | undefined
    try {
      // Accepted before the shutdown; its proof arrives once the drain has begun.
      await loginUntilOk(wire, "app.acme", "app-secret", {}, async () => {
        stopped = tidepool.stop()
        await logged(tidepool, /^shutdown: stopped accepting connections/)
      })
      const next = await wire.next()
      expect(next.type).toBe("E")
      expect(errorFields(next.body)).toMatchObject({
        C: "57P01",
        M: "terminating connection due to administrator command"
      })
    } finally {
      wire.socket.destroy()
      await holder.query("COMMIT").catch(() => undefined)
      await stopped
    }
  })
})

describe("tidepool serve's shutdown logs", () => {
  it("say when the process exits, and when a second signal cuts the drain short", async () => {
    const dir = mkdtempSync(path.join(tmpdir(), "tidepool-shutdown-"))
    const config = path.join(dir, "tidepool.yaml")
    writeFileSync(
      config,
      [
        "tenants:",
        "  - external_id: acme",
        `    db_host: ${db.host}`,
        `    db_port: ${db.port}`,
        "    db_database: postgres",
        "    users:",
        "      - db_user: app",
        "        db_password: app-secret"
      ].join("\n")
    )
    const start = async (timeoutMs: number) => {
      const env = {
        PROXY_PORT_SESSION: String(await freePort()),
        PROXY_PORT_TRANSACTION: String(await freePort()),
        PORT: String(await freePort()),
        TIDEPOOL_LISTEN_ADDR: "127.0.0.1",
        TIDEPOOL_DATA_DIR: path.join(dir, `data-${timeoutMs}`),
        VAULT_ENC_KEY: "0f".repeat(32),
        TIDEPOOL_SHUTDOWN_TIMEOUT: String(timeoutMs)
      }
      const cli = runCli(["serve", "--config", config], env)
      await cli.waitFor(/tidepool listening/)
      const client = new pg.Client({
        connectionString: `postgresql://app.acme:app-secret@127.0.0.1:${env.PROXY_PORT_TRANSACTION}/postgres`
      })
      client.on("error", () => undefined)
      await client.connect()
      await client.query("BEGIN")
      return { cli, client }
    }
    try {
      const graceful = await start(300)
      graceful.cli.child.kill("SIGTERM")
      expect(await graceful.cli.exited).toBe(0)
      const lines = graceful.cli
        .output()
        .split("\n")
        .filter((l) => l.startsWith("{"))
        .map((l) => JSON.parse(l) as { level: string; msg: string; code?: string })
      const said = lines.map((l) => l.msg)
      expect(lines.find((l) => l.msg.startsWith("SIGTERM received"))).toMatchObject({
        level: "info",
        msg: "SIGTERM received: shutting down gracefully (a second signal exits at once)"
      })
      expect(
        lines.find((l) =>
          l.msg.startsWith("shutdown: drain timeout (300 ms) reached; force-closing 1 client session(s)")
        )
      ).toMatchObject({ level: "warning", code: "EADMINSHUTDOWN" })
      expect(said.at(-1)).toMatch(/^tidepool stopped: exiting with status 0 after \d+ s$/)
      await graceful.client.end().catch(() => undefined)

      const impatient = await start(60_000)
      impatient.cli.child.kill("SIGTERM")
      await impatient.cli.waitFor(/idle in a transaction hold the shutdown/)
      impatient.cli.child.kill("SIGTERM")
      expect(await impatient.cli.exited).toBe(1)
      expect(impatient.cli.output()).toContain(
        "second signal (SIGTERM): exiting now with status 1, without waiting for the drain"
      )
      await impatient.client.end().catch(() => undefined)
    } finally {
      rmSync(dir, { recursive: true, force: true })
    }
  })
})

describe("graceful shutdown", () => {
  for (const mode of ["transaction", "session"] as const) {
    it(`closes a client still inside a transaction with 57P01 once the drain timeout ends (${mode})`, async () => {
      const tidepool = await startTidepool({
        tenants: [
          {
            external_id: "acme",
            ...upstreamOf(db),
            users: [{ db_user: "app", db_password: "app-secret", pool_size: 2 }]
          }
        ],
        config: { shutdownTimeoutMs: 300 }
      })
      const client = new pg.Client({
        connectionString: tidepool.url({ user: "app.acme", password: "app-secret", mode })
      })
      const closed = new Promise<{ code?: string }>((resolve) =>
        client.on("error", (e) => resolve(e as { code?: string }))
      )
      await client.connect()
      await client.query("BEGIN")
      await tidepool.stop()
      expect((await closed).code).toBe("57P01")
      // The server it held was closed, not returned: PostgreSQL rolled the transaction back.
      for (;;) {
        const rows = await db.query(
          "SELECT 1 FROM pg_stat_activity WHERE usename = 'app' AND state LIKE 'idle in transaction%'"
        )
        if (rows.length === 0) break
      }
    })
  }
})
