import { type ChildProcess, execFileSync, spawn } from "node:child_process"
import { chownSync, mkdtempSync, rmSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { Effect, Schema } from "effect"
import pg from "pg"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { Tenant } from "../../src/config/index.ts"
import type { ImportPlan } from "../../src/migrate/ImportPlan.ts"
import { pgbouncerPlan } from "../../src/migrate/pgbouncer.ts"
import { callApi } from "../support/api.ts"
import { freePort } from "../support/ports.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { type RunningTidepool, startTidepool } from "../support/tidepool.ts"
import { hasTool } from "../support/tools.ts"

const hasPgbouncer = await hasTool("pgbouncer")
if (!hasPgbouncer) console.log("import-pgbouncer.test: `pgbouncer` is not on PATH, so the ini is not run by PgBouncer")

let db: PostgresServer
let tidepool: RunningTidepool
let dir: string
let pgbouncerPort: number
let pgbouncer: ChildProcess | undefined

/** What a PgBouncer deployment has: two databases, a plain password in userlist.txt, an auth_user. */
const writeConfig = () => {
  writeFileSync(
    join(dir, "userlist.txt"),
    ['"app_user" "app-pw"', '"pooler" "pooler-pw"', '"reader" "md5d0a8a9d50b7ac1b0fa0b8f8f7d1e5d1a"', ""].join("\n")
  )
  writeFileSync(
    join(dir, "pgbouncer.ini"),
    [
      "[databases]",
      `appdb = host=127.0.0.1 port=${db.port} pool_size=2`,
      `; every other database, with roles checked by auth_query`,
      `* = host=127.0.0.1 port=${db.port} auth_user=pooler`,
      "",
      "[pgbouncer]",
      "listen_addr = 127.0.0.1",
      `listen_port = ${pgbouncerPort}`,
      "unix_socket_dir =",
      "auth_type = scram-sha-256",
      "auth_file = userlist.txt",
      "auth_query = SELECT rolname, rolpassword FROM pg_authid WHERE rolname=$1",
      "pool_mode = transaction",
      "server_tls_sslmode = disable",
      "logfile =",
      "",
      "[users]",
      "app_user = pool_mode=session",
      ""
    ].join("\n")
  )
}

/** PgBouncer with the same ini, to prove the file is one PgBouncer runs (it refuses root). */
const startPgbouncer = async (): Promise<void> => {
  const asPostgres: { uid: number; gid: number } | undefined =
    process.getuid?.() === 0
      ? {
          uid: Number(execFileSync("id", ["-u", "postgres"]).toString().trim()),
          gid: Number(execFileSync("id", ["-g", "postgres"]).toString().trim())
        }
      : undefined
  if (asPostgres !== undefined) {
    for (const file of ["", "userlist.txt", "pgbouncer.ini"]) chownSync(join(dir, file), asPostgres.uid, asPostgres.gid)
  }
  const child = spawn("pgbouncer", ["pgbouncer.ini"], {
    ...(asPostgres ?? {}),
    cwd: dir,
    stdio: ["ignore", "ignore", "pipe"]
  })
  pgbouncer = child
  let log = ""
  await new Promise<void>((resolve, reject) => {
    const deadline = setTimeout(() => reject(new Error(`PgBouncer did not start in 20 s:\n${log}`)), 20_000)
    child.stderr!.setEncoding("utf8").on("data", (chunk: string) => {
      log += chunk
      if (log.includes("process up")) {
        clearTimeout(deadline)
        resolve()
      }
    })
    child.once("exit", (code) => {
      clearTimeout(deadline)
      reject(new Error(`PgBouncer exited (${code}):\n${log}`))
    })
  })
}

const query = async (connectionString: string, sql: string) => {
  const client = new pg.Client({ connectionString })
  await client.connect()
  try {
    return (await client.query(sql)).rows[0]
  } finally {
    await client.end()
  }
}

/** What `tidepool import` will do with a plan, by the route an operator has today: PUT per tenant. */
const upsert = async (plan: ImportPlan) => {
  for (const tenant of plan.tenants) {
    const { external_id, ...body } = Schema.encodeSync(Tenant)(tenant)
    const answer = await callApi(tidepool, "PUT", `/api/tenants/${external_id}`, { body: { tenant: body } })
    expect(answer.status, answer.text).toBe(201)
  }
}

beforeAll(async () => {
  db = await startPostgres({
    roles: [
      { name: "app_user", password: "app-pw" },
      { name: "pooler", password: "pooler-pw", superuser: true },
      { name: "alice", password: "alice-pw" }
    ],
    databases: ["appdb", "otherdb"]
  })
  dir = mkdtempSync(join(tmpdir(), "tidepool-import-pgbouncer-"))
  pgbouncerPort = await freePort()
  writeConfig()
  tidepool = await startTidepool({ tenants: [], api: true })
})

afterAll(async () => {
  if (pgbouncer !== undefined && pgbouncer.exitCode === null) {
    const exited = new Promise((resolve) => pgbouncer!.once("exit", resolve))
    pgbouncer.kill("SIGINT")
    await exited
  }
  await tidepool?.stop()
  await db?.stop()
  if (dir !== undefined) rmSync(dir, { recursive: true, force: true })
})

describe("tidepool import pgbouncer, end to end", () => {
  it.runIf(hasPgbouncer)("the ini is one PgBouncer runs: the clients' connection strings work there", async () => {
    await startPgbouncer()
    const via = (user: string, password: string, database: string) =>
      `postgresql://${user}:${password}@127.0.0.1:${pgbouncerPort}/${database}`
    expect(await query(via("app_user", "app-pw", "appdb"), "select current_user as u")).toEqual({ u: "app_user" })
    expect(await query(via("alice", "alice-pw", "otherdb"), "select current_database() as d")).toEqual({
      d: "otherdb"
    })
  })

  it("the plan, upserted into Tidepool, lets the same clients in with the tenant added to their username", async () => {
    const plan = await Effect.runPromise(pgbouncerPlan({ ini: join(dir, "pgbouncer.ini") }))
    expect(plan.tenants.map((t) => t.external_id)).toEqual(["appdb", "default"])
    expect(plan.unmapped).toContainEqual(expect.objectContaining({ source: "[pgbouncer]", field: "listen_port" }))
    expect(plan.unmapped).toContainEqual(expect.objectContaining({ source: "auth_file reader", field: "password" }))
    await upsert(plan)

    // app_user's pool is in session mode ([users]), so the session port; database unchanged.
    const session = tidepool.url({ user: "app_user.appdb", password: "app-pw", database: "appdb", mode: "session" })
    expect(await query(session, "select current_user as u, current_database() as d")).toEqual({
      u: "app_user",
      d: "appdb"
    })
    // The fallback entry became an auth_query tenant: any role, any database, no password stored.
    const fallback = tidepool.url({
      user: "alice.default",
      password: "alice-pw",
      database: "otherdb",
      mode: "transaction"
    })
    expect(await query(fallback, "select current_user as u, current_database() as d")).toEqual({
      u: "alice",
      d: "otherdb"
    })
    // options=reference= names the tenant instead, for clients whose username cannot change.
    const reference = `postgresql://app_user:app-pw@127.0.0.1:${tidepool.sessionPort}/appdb?options=${encodeURIComponent("-c reference=appdb")}`
    expect(await query(reference, "select 1 as one")).toEqual({ one: 1 })
  })
})
