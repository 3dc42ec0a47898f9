import { execFile } from "node:child_process"
import { existsSync, readFileSync } from "node:fs"
import * as path from "node:path"
import { promisify } from "node:util"
import { it as effect } from "@effect/vitest"
import { Effect } from "effect"
import pg from "pg"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { type PgAuthMethod, type PostgresServer, scopedPostgres, startPostgres } from "../support/postgres.ts"

const run = promisify(execFile)

const hasPsql = await run("psql", ["--version"]).then(
  () => true,
  () => false
)
if (!hasPsql) console.log("harness.test: `psql` is not on PATH, so the psql login checks are skipped")

const methods: ReadonlyArray<PgAuthMethod> = ["scram-sha-256", "md5", "password", "trust"]
const servers = new Map<PgAuthMethod, PostgresServer>()
const server = (auth: PgAuthMethod) => servers.get(auth)!

const alice = { name: "alice", password: "alice's secret" }

const login = async (target: PostgresServer, user: string, password: string, database = "postgres") => {
  const client = new pg.Client({ host: target.host, port: target.port, user, password, database })
  client.on("error", () => undefined)
  await client.connect()
  try {
    const result = await client.query<{ user: string; database: string }>(
      "select current_user as user, current_database() as database"
    )
    return result.rows[0]
  } finally {
    await client.end()
  }
}

const outcome = (attempt: Promise<unknown>) =>
  attempt.then(
    () => "ok",
    (error: { code?: unknown }) => error.code ?? String(error)
  )

const psql = (url: string) =>
  run("psql", [url, "--no-psqlrc", "-tAc", "select current_user"], {
    env: { ...process.env, PGCONNECT_TIMEOUT: "10", PGPASSWORD: "" }
  }).then(({ stdout }) => stdout.trim())

beforeAll(async () => {
  // Started together, which also shows several servers coexist.
  const started = await Promise.allSettled(
    methods.map(async (auth) => {
      const started = await startPostgres({
        auth,
        roles: [
          alice,
          { name: "boss", password: "boss-pw", superuser: true },
          { name: "auditor", login: false },
          // md5-hashed so the per-role md5 line below really runs the md5 exchange.
          { name: "legacy", password: "old-pw", passwordEncryption: "md5" }
        ],
        databases: ["app"],
        settings: { work_mem: "7MB" },
        hba: auth === "scram-sha-256" ? ["host all legacy 127.0.0.1/32 md5"] : []
      })
      servers.set(auth, started)
    })
  )
  const failure = started.find((result) => result.status === "rejected")
  if (failure !== undefined) throw failure.reason
})

afterAll(async () => {
  await Promise.all([...servers.values()].map((started) => started.stop()))
})

describe.each(methods)("auth %s", (auth) => {
  const usesPassword = auth !== "trust"

  it("lets a role log in with pg, using the configured method and hash", async () => {
    const target = server(auth)
    expect(await login(target, alice.name, alice.password)).toEqual({ user: "alice", database: "postgres" })
    const [rule] = await target.query<{ auth_method: string }>(
      "select auth_method from pg_hba_file_rules where type = 'host' and user_name = '{all}' order by rule_number desc limit 1"
    )
    expect(rule?.auth_method).toBe(auth)
    const [stored] = await target.query<{ hash: string }>(
      "select rolpassword as hash from pg_authid where rolname = 'alice'"
    )
    expect(stored?.hash).toMatch(auth === "md5" ? /^md5/ : /^SCRAM-SHA-256\$/)
  })

  it(usesPassword ? "rejects a wrong password with 28P01" : "accepts any password", async () => {
    const code = await outcome(login(server(auth), alice.name, "wrong"))
    expect(code).toBe(usesPassword ? "28P01" : "ok")
  })

  it("always authenticates the superuser by password", async () => {
    const target = server(auth)
    expect(await login(target, target.superuser, target.superPassword)).toMatchObject({ user: "postgres" })
    expect(await outcome(login(target, target.superuser, "wrong"))).toBe("28P01")
  })

  it.skipIf(!hasPsql)("lets a role log in with psql", async () => {
    const target = server(auth)
    expect(await psql(target.url({ user: alice.name }))).toBe("alice")
    const wrong = await outcome(psql(target.url({ user: alice.name, password: "wrong" })))
    expect(wrong).toBe(usesPassword ? 2 : "ok")
  })
})

describe("servers", () => {
  it("are separate, on loopback, with the harness settings", async () => {
    const all = [...servers.values()]
    expect(new Set(all.map((s) => s.port)).size).toBe(all.length)
    expect(new Set(all.map((s) => s.dataDir)).size).toBe(all.length)
    const [settings] = await server("md5").query<Record<string, string>>(
      `select current_setting('listen_addresses') as listen, current_setting('fsync') as fsync,
              current_setting('max_connections')::int >= 100 as roomy, current_setting('work_mem') as work_mem`
    )
    expect(settings).toEqual({ listen: "127.0.0.1", fsync: "off", roomy: true, work_mem: "7MB" })
  })

  it("creates roles and databases, and roles can create tables in public", async () => {
    const target = server("password")
    const roles = await target.query<{ rolname: string; rolsuper: boolean; rolcanlogin: boolean }>(
      "select rolname, rolsuper, rolcanlogin from pg_roles where rolname = any($1) order by rolname",
      [["alice", "auditor", "boss"]]
    )
    expect(roles).toEqual([
      { rolname: "alice", rolsuper: false, rolcanlogin: true },
      { rolname: "auditor", rolsuper: false, rolcanlogin: false },
      { rolname: "boss", rolsuper: true, rolcanlogin: true }
    ])
    // url() fills in the listed role's password.
    const client = new pg.Client({ connectionString: target.url({ user: alice.name, database: "app" }) })
    await client.connect()
    try {
      await client.query("create table notes (body text)")
      await client.query("insert into notes values ($1)", ["hi"])
      expect((await client.query("select current_database() as db, body from notes")).rows).toEqual([
        { db: "app", body: "hi" }
      ])
    } finally {
      await client.end()
    }
  })

  it("puts extra hba lines ahead of the default method", async () => {
    const target = server("scram-sha-256")
    expect(await login(target, "legacy", "old-pw")).toMatchObject({ user: "legacy" })
    expect(await outcome(login(target, "legacy", "wrong"))).toBe("28P01")
    const [row] = await target.query<{ method: string; hash: string }>(
      `select r.auth_method as method, a.rolpassword as hash
         from pg_hba_file_rules r, pg_authid a where r.user_name = '{legacy}' and a.rolname = 'legacy'`
    )
    expect(row?.method).toBe("md5")
    expect(row?.hash).toMatch(/^md5/)
  })

  it("answers query() with parameters", async () => {
    expect(await server("trust").query("select $1::int + 1 as n", [41])).toEqual([{ n: 42 }])
  })

  it("reports why a server failed to start", async () => {
    const failure = await startPostgres({ settings: { max_connections: "lots" } }).then(
      () => "started",
      (error: Error) => error.message
    )
    expect(failure).toContain('invalid value for parameter "max_connections"')
  })

  effect.live("scopedPostgres stops the server and removes its data directory with the scope", () =>
    Effect.gen(function* () {
      const { started, pid } = yield* Effect.scoped(
        Effect.gen(function* () {
          const started = yield* scopedPostgres()
          expect(yield* Effect.promise(() => started.query("select 1 as one"))).toEqual([{ one: 1 }])
          const pid = Number(readFileSync(path.join(started.dataDir, "postmaster.pid"), "utf8").split("\n")[0])
          return { started, pid }
        })
      )
      expect(existsSync(started.dataDir)).toBe(false)
      expect(() => process.kill(pid, 0)).toThrow()
      // stop() after the scope already stopped it is a no-op.
      yield* Effect.promise(() => started.stop())
    })
  )
})
