import { mkdtempSync, rmSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { Effect, Redacted, Result } from "effect"
import { afterAll, describe, expect, it } from "vitest"
import type { Tenant } from "../../../src/config/index.ts"
import type { ImportPlan } from "../../../src/migrate/ImportPlan.ts"
import { pgbouncerPlan } from "../../../src/migrate/pgbouncer.ts"
import { parseConnString, readAuthFile, readIni, secretKind } from "../../../src/migrate/pgbouncerIni.ts"

const fixtures = join(import.meta.dirname, "../../fixtures/pgbouncer")
const temp = mkdtempSync(join(tmpdir(), "tidepool-pgbouncer-"))
afterAll(() => rmSync(temp, { recursive: true, force: true }))

const write = (name: string, text: string) => {
  const path = join(temp, name)
  writeFileSync(path, text)
  return path
}

const plan = (ini: string, options: { authFile?: string; tenantPerDatabase?: boolean } = {}) =>
  Effect.runPromise(pgbouncerPlan({ ini, ...options }))

const failure = (ini: string, options: { authFile?: string } = {}) =>
  Effect.runPromise(Effect.flip(pgbouncerPlan({ ini, ...options })))

const tenant = (p: ImportPlan, id: string): Tenant => {
  const found = p.tenants.find((t) => t.external_id === id)
  if (found === undefined) throw new Error(`no tenant ${id} in ${p.tenants.map((t) => t.external_id).join(", ")}`)
  return found
}

const user = (t: Tenant, name: string) => {
  const found = t.users.find((u) => u.db_user === name)
  if (found === undefined) throw new Error(`no user ${name} in ${t.external_id}`)
  return found
}

const reasonFor = (p: ImportPlan, source: string, field: string) =>
  p.unmapped.find((u) => u.source === source && u.field === field)?.reason

describe("pgbouncer.ini syntax, as PgBouncer reads it", () => {
  it("reads sections, both comment characters, quoted names and %include in file order", () => {
    const entries = Result.getOrThrow(readIni(join(fixtures, "full.ini")))
    const databases = entries.filter((e) => e.section === "databases").map((e) => e.key)
    expect(databases).toEqual(["app", "reports", "batch", "my.db", 'odd"name', "socket"])
    const included = entries.find((e) => e.key === "socket")!
    expect(included.file).toMatch(/databases-extra\.ini$/)
    expect(included.line).toBe(3)
    // [pgbouncer] keys are case-insensitive in PgBouncer; values keep everything after "=", trimmed.
    expect(entries.find((e) => e.key === "logfile")?.value).toBe("/var/log/pgbouncer/pgbouncer.log")
  })

  it("takes ; and # as comments only at the start of a line", () => {
    const path = write("inline.ini", "[pgbouncer]\n  ; indented comment\nlogfile = a.log ; not a comment\n")
    const entries = Result.getOrThrow(readIni(path))
    expect(entries).toHaveLength(1)
    expect(entries[0]!.value).toBe("a.log ; not a comment")
  })

  it("refuses what PgBouncer refuses, naming the file and line", () => {
    expect(readIni(write("bad-key.ini", "[databases]\n\nfoo bar = host=x\n"))).toEqual(
      Result.fail(expect.stringMatching(/syntax error in configuration \(.*bad-key\.ini:3\)/))
    )
    expect(readIni(write("bad-section.ini", "[pgbouncerr]\nx = 1\n"))).toEqual(
      Result.fail(expect.stringContaining('invalid section "pgbouncerr"'))
    )
    expect(readIni(write("loop.ini", "%include loop.ini\n"))).toEqual(
      Result.fail(expect.stringContaining("include nesting level too deep"))
    )
    expect(readIni(join(temp, "missing.ini"))).toEqual(Result.fail(expect.stringContaining("ENOENT")))
  })

  it("splits connection strings at spaces, with '…' quoting and '' for a quote", () => {
    expect(Result.getOrThrow(parseConnString("host=a  port=5433 password='x y''z' dbname = d"))).toEqual([
      ["host", "a"],
      ["port", "5433"],
      ["password", "x y'z"],
      ["dbname", "d"]
    ])
    expect(Result.isFailure(parseConnString("host="))).toBe(true)
    expect(Result.isFailure(parseConnString("host='open"))).toBe(true)
    expect(Result.isFailure(parseConnString("justaword"))).toBe(true)
  })

  it('reads auth_file lines: "" escapes, ; comments, trailing fields ignored, later lines win', () => {
    const users = Result.getOrThrow(readAuthFile(join(fixtures, "userlist.txt")))
    expect(users.map((u) => [u.name, secretKind(u.secret)])).toEqual([
      ["alice", "plain"],
      ["bob", "plain"],
      ["carol", "md5"],
      ["dave", "scram"]
    ])
    expect(users.find((u) => u.name === "bob")?.secret).toBe('bob"s secret')
    const twice = Result.getOrThrow(readAuthFile(write("twice.txt", '"a" "1"\n"a" "2"\n')))
    expect(twice).toEqual([{ name: "a", secret: "2", line: 2 }])
    expect(readAuthFile(write("broken.txt", '"a" "1"\nb "2"\n'))).toEqual(
      Result.fail(expect.stringMatching(/broken auth file \(.*broken\.txt:2\)/))
    )
  })
})

describe("pgbouncerPlan: one tenant per [databases] entry", () => {
  it("maps host, port, dbname, pool sizes, modes and the auth_file's plain passwords", async () => {
    const p = await plan(join(fixtures, "full.ini"))
    expect(p.source).toBe("pgbouncer")
    expect(p.tenants.map((t) => t.external_id)).toEqual(["app", "reports", "batch", "my-db", "odd-name", "socket"])

    const app = tenant(p, "app")
    expect(app).toMatchObject({
      db_host: "db1.internal",
      db_port: 5433,
      db_database: "app",
      default_pool_size: 30, // the entry's pool_size beats default_pool_size
      require_user: true,
      client_idle_timeout: 300_000,
      upstream_ssl: true, // server_tls_sslmode = require
      upstream_verify: "none"
    })
    // Plain passwords only: carol (md5) and dave (SCRAM) cannot log in upstream.
    expect(app.users.map((u) => u.db_user)).toEqual(["alice", "bob"])
    const alice = user(app, "alice")
    expect(Redacted.value(alice.db_password)).toBe("alice-secret")
    expect(alice).toMatchObject({
      pool_size: 7,
      mode_type: "transaction",
      max_clients: 50,
      pool_checkout_timeout: 5000
    })
    const bob = user(app, "bob")
    expect(Redacted.value(bob.db_password)).toBe('bob"s secret')
    // statement mode becomes transaction; query_wait_timeout falls back to the global 30 s.
    expect(bob).toMatchObject({ mode_type: "transaction", pool_checkout_timeout: 30_000 })
    expect(bob.pool_size).toBeUndefined()

    // An alias: the tenant points at the real database; the entry's query_wait_timeout applies.
    const reports = tenant(p, "reports")
    expect(reports).toMatchObject({ db_database: "analytics", default_pool_size: 25 })
    expect(user(reports, "bob").pool_checkout_timeout).toBe(15_000)
    expect(reasonFor(p, "[databases] reports", "dbname")).toContain('clients must name "analytics"')

    // A forced user: the only user, with the entry's quoted password and the database's client cap.
    const batch = tenant(p, "batch")
    expect(batch).toMatchObject({ db_host: "10.0.0.7", db_port: 5432, db_database: "batch" })
    expect(batch.users).toHaveLength(1)
    expect(Redacted.value(user(batch, "batcher").db_password)).toBe("pa ss'word")
    expect(user(batch, "batcher")).toMatchObject({ mode_type: "session", max_clients: 40 })
    expect(reasonFor(p, "[databases] batch", "user")).toContain("log in as batcher.batch with")
    expect(reasonFor(p, "[databases] batch", "connect_query")).toContain("ALTER ROLE")

    // A Unix socket host becomes 127.0.0.1, reported.
    expect(tenant(p, "socket").db_host).toBe("127.0.0.1")
    expect(reasonFor(p, "[databases] socket", "host")).toContain("over TCP")
  })

  it("renames entries outside Tidepool's id rule and says so", async () => {
    const p = await plan(join(fixtures, "full.ini"))
    expect(tenant(p, "my-db").db_database).toBe("mydb")
    expect(reasonFor(p, "[databases] my.db", "(tenant id)")).toContain("the tenant is my-db")
    expect(reasonFor(p, '[databases] odd"name', "(tenant id)")).toContain("the tenant is odd-name")
    expect(reasonFor(p, "[databases] app", "(tenant id)")).toBeUndefined()
  })

  it("reports every setting it cannot map, once, where it is written, with what to do instead", async () => {
    const p = await plan(join(fixtures, "full.ini"))
    expect(reasonFor(p, "[pgbouncer]", "listen_port")).toContain("PROXY_PORT_TRANSACTION=6432")
    expect(reasonFor(p, "[pgbouncer]", "listen_addr")).toContain("TIDEPOOL_LISTEN_ADDR=::")
    expect(reasonFor(p, "[pgbouncer]", "min_pool_size")).toContain("TIDEPOOL_MIN_POOL_SIZE=2")
    expect(reasonFor(p, "[pgbouncer]", "server_lifetime")).toContain("TIDEPOOL_SERVER_LIFETIME=1800000")
    expect(reasonFor(p, "[pgbouncer]", "server_idle_timeout")).toContain("TIDEPOOL_SERVER_IDLE_TIMEOUT=60000")
    expect(reasonFor(p, "[pgbouncer]", "admin_users")).toContain("TIDEPOOL_ADMIN_USERS=admin=")
    expect(reasonFor(p, "[pgbouncer]", "reserve_pool_size")).toContain("no reserve pool")
    expect(reasonFor(p, "[pgbouncer]", "max_client_conn")).toBeDefined()
    expect(reasonFor(p, "[pgbouncer]", "no_such_setting")).toContain("not a setting")
    // Mapped to the tenants (see above), so not reported.
    expect(reasonFor(p, "[pgbouncer]", "client_idle_timeout")).toBeUndefined()
    expect(reasonFor(p, "[users] bob", "pool_mode")).toContain("no statement mode")
    expect(reasonFor(p, "[users] bob", "query_timeout")).toContain("statement_timeout")
    expect(reasonFor(p, "[users] ghost", "(entry)")).toContain("not in the auth_file")
    expect(reasonFor(p, "auth_file carol", "password")).toContain("MD5")
    expect(reasonFor(p, "auth_file dave", "password")).toContain("SCRAM verifier")
    // Mapped settings are not reported; scram-sha-256 clients log in to Tidepool as they are.
    for (const mapped of ["auth_type", "auth_file", "pool_mode", "default_pool_size", "query_wait_timeout"]) {
      expect(reasonFor(p, "[pgbouncer]", mapped)).toBeUndefined()
    }
    // bob's statement mode is one line, not one per tenant he is in.
    expect(p.unmapped.filter((u) => u.field === "pool_mode")).toHaveLength(1)
    // In the order an operator works through the files: settings, databases, users, auth_file.
    const sections = p.unmapped.map((u) => u.source.split(" ")[0])
    expect([...new Set(sections)]).toEqual(["[pgbouncer]", "[databases]", "[users]", "auth_file"])
  })

  it("uses PgBouncer's defaults where they differ from Tidepool's: pool size 20, 120 s wait, session mode", async () => {
    const auth = write("defaults-users.txt", '"u" "pw"\n')
    const ini = write("defaults.ini", `[databases]\nd = host=127.0.0.1\n[pgbouncer]\nauth_file = ${auth}\n`)
    const p = await plan(ini)
    const d = tenant(p, "d")
    expect(d.default_pool_size).toBe(20)
    expect(user(d, "u")).toMatchObject({ mode_type: "session", pool_checkout_timeout: 120_000 })
    expect(reasonFor(p, "[pgbouncer]", "server_tls_sslmode")).toContain("PgBouncer's default")
    expect(d.upstream_ssl).toBe(false)
  })

  it("client limits: 0 is PgBouncer's no limit, never Tidepool's refuse everyone", async () => {
    const auth = write("limits-users.txt", '"u" "pw"\n"v" "pw"\n')
    const ini = write(
      "limits.ini",
      `[databases]\nd = host=db\nf = host=db user=u max_db_client_connections=0\n[users]\nu = max_user_client_connections=0\nv = max_user_client_connections=9\n[pgbouncer]\nauth_file = ${auth}\nmax_user_client_connections = 300\n`
    )
    const p = await plan(ini)
    const d = tenant(p, "d")
    expect(d.default_max_clients).toBe(300)
    expect(user(d, "u").max_clients).toBeUndefined()
    expect(user(d, "v").max_clients).toBe(9)
    expect(user(tenant(p, "f"), "u").max_clients).toBeUndefined()
    expect(reasonFor(p, "[pgbouncer]", "max_user_client_connections")).toBeUndefined()
    const unlimited = await plan(
      write(
        "limits0.ini",
        `[databases]\nd = host=db\n[pgbouncer]\nauth_file = ${auth}\nmax_user_client_connections = 0\n`
      )
    )
    expect(tenant(unlimited, "d").default_max_clients).toBe(1000)
  })

  it("--auth-file wins over the ini's auth_file", async () => {
    const other = write("other-users.txt", '"zed" "zed-pw"\n')
    const p = await plan(join(fixtures, "full.ini"), { authFile: other })
    expect(tenant(p, "app").users.map((u) => u.db_user)).toEqual(["zed"])
  })

  it("auth_user makes auth_query tenants whose manager is the auth_user; * is the fallback tenant", async () => {
    const p = await plan(join(fixtures, "auth-user.ini"))
    const fallback = tenant(p, "default")
    expect(fallback).toMatchObject({
      db_host: "127.0.0.1",
      db_port: 5432,
      db_database: "postgres",
      require_user: false,
      auth_query:
        "SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END FROM pg_authid WHERE rolname=$1 AND rolcanlogin",
      upstream_ssl: false
    })
    expect(fallback.users).toHaveLength(1)
    expect(user(fallback, "pooler")).toMatchObject({ is_manager: true })
    expect(reasonFor(p, "[databases] *", "(entry)")).toContain("every database on this host")
    // shop's own auth_user has only a SCRAM verifier: no tenant, and the reason says how to fix it.
    expect(p.tenants.some((t) => t.external_id === "shop")).toBe(false)
    expect(reasonFor(p, "[databases] shop", "auth_user")).toContain('add "shop_manager" "<password>"')
    // server_tls_sslmode = disable is mapped as it is: nothing to report.
    expect(reasonFor(p, "[pgbouncer]", "server_tls_sslmode")).toBeUndefined()
  })

  it("a per-database auth_query is kept, quoted as PgBouncer quotes it", async () => {
    const auth = write("aq-users.txt", '"mgr" "mgr-pw"\n')
    const ini = write(
      "aq.ini",
      `[databases]\nshop = host=127.0.0.1 auth_user=mgr auth_query='SELECT usename, passwd FROM f($1) WHERE x = ''y'''\n[pgbouncer]\nauth_file = ${auth}\n`
    )
    const shop = tenant(await plan(ini), "shop")
    expect(shop.auth_query).toBe("SELECT usename, passwd FROM f($1) WHERE x = 'y'")
    expect(user(shop, "mgr").is_manager).toBe(true)
  })

  it("maps server TLS verification and client TLS requirements", async () => {
    const ca = write("ca.pem", "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    const auth = write("tls-users.txt", '"u" "pw"\n')
    const ini = write(
      "tls.ini",
      `[databases]\nd = host=db\n[pgbouncer]\nauth_file = ${auth}\nserver_tls_sslmode = verify-full\nserver_tls_ca_file = ${ca}\nclient_tls_sslmode = require\nclient_tls_cert_file = /etc/c.pem\n`
    )
    const p = await plan(ini)
    expect(tenant(p, "d")).toMatchObject({
      upstream_ssl: true,
      upstream_verify: "peer",
      upstream_tls_ca: expect.stringContaining("BEGIN CERTIFICATE"),
      enforce_ssl: true
    })
    expect(reasonFor(p, "[pgbouncer]", "client_tls_cert_file")).toContain("GLOBAL_DOWNSTREAM_CERT_PATH=/etc/c.pem")
  })

  it("leaves out, with the reason, entries that cannot be a tenant", async () => {
    const auth = write("bad-users.txt", '"u" "pw"\n')
    const ini = write(
      "bad.ini",
      `[databases]\nnoquote = host='x\npgbouncer = host=x\nzero = host=x pool_size=0\nforced = host=x user=nopw\n[pgbouncer]\nauth_file = ${auth}\n`
    )
    const p = await plan(ini)
    expect(p.tenants.map((t) => t.external_id)).toEqual(["zero"])
    expect(reasonFor(p, "[databases] noquote", "(entry)")).toContain("unterminated quote")
    expect(reasonFor(p, "[databases] pgbouncer", "(entry)")).toContain("reserved")
    expect(reasonFor(p, "[databases] zero", "pool_size")).toContain("left out")
    expect(reasonFor(p, "[databases] forced", "user")).toContain("no plain password")
  })

  it("fails with ImportError when PgBouncer could not start from the files", async () => {
    expect((await failure(join(temp, "nope.ini")))._tag).toBe("ImportError")
    expect((await failure(join(fixtures, "full.ini"), { authFile: join(temp, "nope.txt") })).message).toContain(
      "cannot read"
    )
    expect((await failure(write("syntax.ini", "[databases]\n= host=x\n"))).message).toContain("syntax error")
  })
})

describe("pgbouncerPlan: grouped by upstream host and port", () => {
  it("makes one tenant per host:port with every database's users, reporting what differs", async () => {
    const p = await plan(join(fixtures, "full.ini"), { tenantPerDatabase: false })
    expect(p.tenants.map((t) => t.external_id)).toEqual(["db1-internal-5433", "10-0-0-7", "db2-internal", "127-0-0-1"])
    const db1 = tenant(p, "db1-internal-5433")
    // The first entry's settings; its clients name the database (app, analytics, mydb).
    expect(db1).toMatchObject({ db_host: "db1.internal", db_port: 5433, db_database: "app", default_pool_size: 30 })
    expect(db1.users.map((u) => u.db_user)).toEqual(["alice", "bob"])
    expect(reasonFor(p, "db1.internal:5433", "(tenant id)")).toContain("app, reports, my.db")
    expect(reasonFor(p, "[databases] reports", "default_pool_size")).toContain("differs from [databases] app")
  })
})
