import { chmodSync, mkdtempSync, rmSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import * as path from "node:path"
import pg from "pg"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { peakRssKb, runCli } from "../support/cli.ts"
import { freePort } from "../support/ports.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { hasTool, run } from "../support/tools.ts"

const hasPsql = await hasTool("psql")

let db: PostgresServer
let dir: string

beforeAll(async () => {
  db = await startPostgres({ roles: [{ name: "app", password: "app-secret", superuser: true }] })
  dir = mkdtempSync(path.join(tmpdir(), "tidepool-cli-"))
  // The demo runs PostgreSQL as an unprivileged user when we are root; it must reach its data dir.
  chmodSync(dir, 0o755)
})

afterAll(async () => {
  await db?.stop()
  if (dir) rmSync(dir, { recursive: true, force: true })
})

let runs = 0
const ports = async () => ({
  PROXY_PORT_SESSION: String(await freePort()),
  PROXY_PORT_TRANSACTION: String(await freePort()),
  PORT: String(await freePort()),
  TIDEPOOL_LISTEN_ADDR: "127.0.0.1",
  // A store of its own per run, never ./.tidepool in the checkout.
  TIDEPOOL_DATA_DIR: path.join(dir, `data-${++runs}`)
})

const VAULT_ENC_KEY = "0f".repeat(32)

/** A config file with tenant `acme` on the test database (user app / app-secret), plus `server:` lines. */
const writeConfig = (name: string, options: { server?: ReadonlyArray<string>; user?: ReadonlyArray<string> } = {}) => {
  const file = path.join(dir, name)
  writeFileSync(
    file,
    [
      ...(options.server !== undefined ? ["server:", ...options.server.map((line) => `  ${line}`)] : []),
      "tenants:",
      "  - external_id: acme",
      `    db_host: ${db.host}`,
      `    db_port: ${db.port}`,
      "    db_database: postgres",
      "    users:",
      "      - db_user: app",
      "        db_password: app-secret",
      ...(options.user ?? []).map((line) => `        ${line}`)
    ].join("\n")
  )
  return file
}

describe("tidepool serve", () => {
  it("streams 250 MB of results in bounded memory, then shuts down gracefully on SIGTERM", async () => {
    const config = writeConfig("tidepool.yaml", { user: ["pool_size: 4"] })
    const env = await ports()
    const cli = runCli(["serve", "--config", config], {
      ...env,
      VAULT_ENC_KEY,
      TIDEPOOL_SHUTDOWN_TIMEOUT: "20000",
      TIDEPOOL_LOG_LEVEL: "debug"
    })
    // Under TIDEPOOL_WORKERS (npm run test:e2e:workers) the supervisor says when every worker listens.
    const workers = Number(process.env.TIDEPOOL_WORKERS ?? "1") || 1
    try {
      await cli.waitFor(workers > 1 ? /workers listening/ : /tidepool listening/)
      const url = `postgresql://app.acme:app-secret@127.0.0.1:${env.PROXY_PORT_SESSION}/postgres`

      if (hasPsql) {
        await run("psql", [url, "-XAtc", "SELECT 1"])
        const before = await peakRssKb(cli.child.pid!)
        // 50 000 rows of 1 000 bytes; psql reads it all, the pooler must only pass it through.
        const { stdout } = await run(
          "sh",
          ["-c", `psql '${url}' -XAtc "SELECT repeat('x', 1000) FROM generate_series(1, 50000)" | wc -c`],
          { maxBuffer: 1024 * 1024 }
        )
        expect(Number(stdout.trim())).toBe(50_000 * 1001)
        // 200 MB more through COPY: memory that grew with the payload would show here.
        const copy = await run(
          "sh",
          [
            "-c",
            `psql '${url}' -XAtc "COPY (SELECT repeat('y', 1000) FROM generate_series(1, 200000)) TO STDOUT" | wc -c`
          ],
          { maxBuffer: 1024 * 1024 }
        )
        expect(Number(copy.stdout.trim())).toBe(200_000 * 1001)
        const grown = (await peakRssKb(cli.child.pid!)) - before
        expect(grown).toBeLessThan(64 * 1024)
      } else {
        console.log("psql not found: skipping the 50 MB streaming check")
      }

      // A failed login is logged once, as one JSON line with its code and context, and no secret.
      const wrong = await new pg.Client({
        connectionString: `postgresql://app.acme:not-the-password@127.0.0.1:${env.PROXY_PORT_SESSION}/postgres`
      })
        .connect()
        .then(
          () => undefined,
          (e: { code?: string }) => e.code
        )
      expect(wrong).toBe("28P01")
      const [line] = await cli.waitFor(/^\{.*"code":"EWRONGPASSWORD".*\}$/m)
      expect(JSON.parse(line)).toMatchObject({
        level: "warning",
        code: "EWRONGPASSWORD",
        tenant: "acme",
        user: "app",
        mode: "session",
        peer_ip: "127.0.0.1"
      })
      expect(JSON.parse(line).time).toMatch(/^\d{4}-\d\d-\d\dT/)
      expect(cli.output()).not.toContain("not-the-password")
      expect(cli.output()).not.toContain("app-secret")

      const client = new pg.Client({ connectionString: url })
      const ended = new Promise<{ code?: string }>((resolve) =>
        client.on("error", (e) => resolve(e as { code?: string }))
      )
      await client.connect()
      const sleeping = client.query("SELECT pg_sleep(1) AS slept, 'finished' AS state")
      for (;;) {
        const rows = await db.query(
          "SELECT 1 FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(1)%' AND state = 'active'"
        )
        if (rows.length > 0) break
      }
      cli.child.kill("SIGTERM")
      await cli.waitFor(/draining 1 client session/)
      // Under TIDEPOOL_WORKERS (npm run test:e2e:workers) the workers stop accepting one after
      // another: a login reaching one that has not stopped yet completes during its drain and is
      // refused with 57P01, and a connection the kernel had queued on a worker's listening socket
      // as it closed is reset (SO_REUSEPORT gives each its own queue); once all have stopped,
      // connects are refused.
      let refused: string | undefined
      for (const end = Date.now() + 20_000; Date.now() < end; ) {
        const late = new pg.Client({ connectionString: url })
        late.on("error", () => undefined)
        refused = await late.connect().then(
          () => "connected",
          (e: NodeJS.ErrnoException) => e.code
        )
        if (workers === 1 || (refused !== "57P01" && refused !== "ECONNRESET")) break
      }
      expect(refused).toBe("ECONNREFUSED")
      expect((await sleeping).rows[0].state).toBe("finished")
      expect((await ended).code).toBe("57P01")
      expect(await cli.exited).toBe(0)
    } catch (e) {
      console.log(cli.output())
      throw e
    } finally {
      cli.child.kill("SIGKILL")
    }
  })

  it("refuses to store the config file's passwords without VAULT_ENC_KEY, saying so", async () => {
    const config = writeConfig("keyless.yaml")
    const cli = runCli(["serve", "--config", config], await ports())
    expect(await cli.exited).toBe(1)
    expect(cli.output()).toContain("VAULT_ENC_KEY is not set: it is required to store user passwords")
    expect(cli.output()).not.toContain("app-secret")
    const malformed = runCli(["serve"], { ...(await ports()), VAULT_ENC_KEY: "too-short" })
    expect(await malformed.exited).toBe(1)
    expect(malformed.output()).toContain("VAULT_ENC_KEY")
    expect(malformed.output()).not.toContain("too-short")
  })

  it("exits gracefully on the admin console's SHUTDOWN, after the open transaction ends", async () => {
    const config = writeConfig("shutdown.yaml", { server: ["admin_users: ops=ops-secret"] })
    const env = await ports()
    const cli = runCli(["serve", "--config", config], { ...env, VAULT_ENC_KEY, TIDEPOOL_SHUTDOWN_TIMEOUT: "20000" })
    try {
      await cli.waitFor(/tidepool listening/)
      const port = env.PROXY_PORT_TRANSACTION
      const client = new pg.Client({ connectionString: `postgresql://app.acme:app-secret@127.0.0.1:${port}/postgres` })
      client.on("error", () => undefined)
      await client.connect()
      await client.query("BEGIN")
      const admin = new pg.Client({ connectionString: `postgresql://ops:ops-secret@127.0.0.1:${port}/pgbouncer` })
      admin.on("error", () => undefined)
      await admin.connect()
      await admin.query("SHUTDOWN")
      await cli.waitFor(/shutdown requested from the admin console/)
      // The transaction finishes on its server; the client is closed at its boundary, then the process exits.
      expect((await client.query("SELECT 1 AS one")).rows[0].one).toBe(1)
      await client.query("COMMIT").catch(() => undefined)
      expect(await cli.exited).toBe(0)
    } catch (e) {
      console.log(cli.output())
      throw e
    } finally {
      cli.child.kill("SIGKILL")
    }
  })

  it("fails start-up naming the variable of a taken port", async () => {
    const env = await ports()
    const taken = await new Promise<import("node:net").Server>((resolve) => {
      import("node:net").then(({ createServer }) => {
        const s = createServer()
        s.listen(Number(env.PROXY_PORT_SESSION), "127.0.0.1", () => resolve(s))
      })
    })
    try {
      const cli = runCli(["serve"], env)
      expect(await cli.exited).toBe(1)
      expect(cli.output()).toContain("PROXY_PORT_SESSION")
    } finally {
      taken.close()
    }
  })

  it("fails start-up and config check on an unreadable TLS certificate, naming the variable", async () => {
    const missing = path.join(dir, "missing.crt")
    const tls = { GLOBAL_DOWNSTREAM_CERT_PATH: missing, GLOBAL_DOWNSTREAM_KEY_PATH: missing }
    const serve = runCli(["serve"], { ...(await ports()), ...tls })
    expect(await serve.exited).toBe(1)
    expect(serve.output()).toContain(`GLOBAL_DOWNSTREAM_CERT_PATH: cannot read ${missing}: ENOENT`)
    const empty = path.join(dir, "empty.yaml")
    writeFileSync(empty, "tenants: []\n")
    const check = runCli(["config", "check", empty], tls)
    expect(await check.exited).toBe(1)
    expect(check.output()).toContain(`GLOBAL_DOWNSTREAM_CERT_PATH: cannot read ${missing}: ENOENT`)
  })

  it("documents every command in --help", async () => {
    const cli = runCli(["--help"], {})
    expect(await cli.exited).toBe(0)
    for (const command of [
      "tidepool serve",
      "tidepool demo",
      "tidepool config check",
      "tidepool import supavisor",
      "tidepool import pgbouncer"
    ]) {
      expect(cli.output()).toContain(command)
    }
  })

  it("config check warns that serve will need VAULT_ENC_KEY for the file's passwords, and says how to make one", async () => {
    const config = writeConfig("keyless-check.yaml")
    const keyless = runCli(["config", "check", config], { VAULT_ENC_KEY: "" })
    expect(await keyless.exited).toBe(0)
    expect(keyless.output()).toContain(`${config}: OK`)
    expect(keyless.output()).toContain(
      "warning: VAULT_ENC_KEY is not set, and `tidepool serve` will refuse to start with this file"
    )
    expect(keyless.output()).toContain("openssl rand -base64 32")
    const keyed = runCli(["config", "check", config], { VAULT_ENC_KEY })
    expect(await keyed.exited).toBe(0)
    expect(keyed.output()).not.toContain("warning")
    // No tenant, no password to store: nothing to warn about.
    const empty = path.join(dir, "no-tenants.yaml")
    writeFileSync(empty, "tenants: []\n")
    const bare = runCli(["config", "check", empty], { VAULT_ENC_KEY: "" })
    expect(await bare.exited).toBe(0)
    expect(bare.output()).not.toContain("warning")
  })

  it("lists every problem of an invalid config file", async () => {
    const bad = path.join(dir, "bad.yaml")
    writeFileSync(
      bad,
      ["tenants:", "  - external_id: acme", "    db_host: localhost", "    db_port: nope", "    users: []"].join("\n")
    )
    const cli = runCli(["config", "check", bad], {})
    expect(await cli.exited).toBe(1)
    expect(cli.output()).toContain("db_port")
    expect(cli.output()).toContain("db_database")
  })
})

describe("tidepool demo", () => {
  it("starts an embedded PostgreSQL and prints a string a client connects with", async () => {
    const env = await ports()
    // Workers are serve's: the demo runs one process and says so.
    const cli = runCli(["demo"], { ...env, TIDEPOOL_DATA_DIR: path.join(dir, "demo"), TIDEPOOL_WORKERS: "2" })
    try {
      await cli.waitFor(/Press Ctrl\+C/)
      expect(cli.output()).toContain("tidepool demo runs one process")
      const urls = [...cli.output().matchAll(/psql '(postgresql:\/\/[^']+)'/g)].map((m) => m[1]!)
      expect(urls.map((u) => new URL(u).port)).toEqual([env.PROXY_PORT_TRANSACTION, env.PROXY_PORT_SESSION])
      for (const url of urls) {
        const client = new pg.Client({ connectionString: url })
        await client.connect()
        const { rows } = await client.query("SELECT current_user AS who")
        expect(rows[0].who).toBe("postgres")
        await client.end()
      }
      // The printed API line works as printed.
      const [, token, apiUrl] = cli.output().match(/curl -H 'authorization: Bearer ([^']+)' (\S+)/)!
      expect(new URL(apiUrl!).port).toBe(env.PORT)
      const answer = await fetch(apiUrl!, { headers: { authorization: `Bearer ${token}` } })
      expect(answer.status).toBe(200)
      const text = await answer.text()
      expect(JSON.parse(text).data.external_id).toBe("demo")
      expect(text).not.toContain("db_password")
      cli.child.kill("SIGTERM")
      expect(await cli.exited).toBe(0)
      // The demo logs its signals as serve does.
      expect(cli.output()).toContain("SIGTERM received: shutting down gracefully")
    } finally {
      cli.child.kill("SIGKILL")
    }
  })
})
