import { Effect, Redacted } from "effect"
import pg from "pg"
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest"
import { AuthQuery } from "../../src/auth/index.ts"
import { TenantRegistry } from "../../src/tenants/index.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { type RunningTidepool, startTidepool, upstreamOf } from "../support/tidepool.ts"
import { hasTool, run } from "../support/tools.ts"

const hasPsql = await hasTool("psql")
if (!hasPsql) console.log("auth-query.test: `psql` is not on PATH, so the psql login is skipped")

// The recommended setup (docs/authentication.md): a non-superuser manager that may only call a
// SECURITY DEFINER function returning (rolname, rolpassword) for one login role.
const SETUP = `
  CREATE SCHEMA tidepool;
  CREATE FUNCTION tidepool.get_auth(p_usename text) RETURNS TABLE (username text, password text)
    LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog
    AS $$ SELECT rolname::text, rolpassword::text FROM pg_authid WHERE rolname = p_usename AND rolcanlogin $$;
  REVOKE ALL ON FUNCTION tidepool.get_auth(text) FROM PUBLIC;
  GRANT USAGE ON SCHEMA tidepool TO tidepool_manager;
  GRANT EXECUTE ON FUNCTION tidepool.get_auth(text) TO tidepool_manager;
  -- The same, counting its calls.
  CREATE TABLE tidepool.calls (n int NOT NULL);
  INSERT INTO tidepool.calls VALUES (0);
  CREATE FUNCTION tidepool.get_auth_counted(p_usename text) RETURNS TABLE (username text, password text)
    LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog
    AS $$ UPDATE tidepool.calls SET n = n + 1;
          SELECT rolname::text, rolpassword::text FROM pg_authid WHERE rolname = p_usename AND rolcanlogin $$;
  GRANT EXECUTE ON FUNCTION tidepool.get_auth_counted(text) TO tidepool_manager;
`
const FUNCTION_QUERY = "SELECT * FROM tidepool.get_auth($1)"
const AUTHID_QUERY = "SELECT rolname, rolpassword FROM pg_authid WHERE rolname=$1"

let db: PostgresServer
let tidepool: RunningTidepool

const manager = { db_user: "tidepool_manager", db_password: "manager-pw", is_manager: true, pool_size: 3 }
const authQueryTenant = (external_id: string, auth_query: string, user: object = manager) => ({
  external_id,
  ...upstreamOf(db),
  require_user: false,
  auth_query,
  users: [user]
})

beforeAll(async () => {
  db = await startPostgres({
    roles: [
      { name: "tidepool_manager", password: "manager-pw" },
      { name: "boss", password: "boss-pw", superuser: true },
      { name: "alice", password: "alice-pw" },
      { name: "carol", password: "carol-pw" },
      { name: "dave", password: "dave-pw" },
      { name: "mallory", password: "mallory-pw" },
      { name: "erin", password: "erin-pw" },
      { name: "frank", password: "frank-pw" },
      { name: "grace", password: "grace-pw" },
      { name: "henry", password: "henry-pw" },
      { name: "ivan", password: "ivan-pw" },
      { name: "o'brien; drop table x --", password: "ob-pw" },
      { name: "app", password: "app-secret" }
    ]
  })
  await db.query(SETUP)
  tidepool = await startTidepool({
    tenants: [
      authQueryTenant("aq", FUNCTION_QUERY),
      // The simplest setup: a superuser manager reading pg_authid itself.
      authQueryTenant("aqsuper", AUTHID_QUERY, { db_user: "boss", db_password: "boss-pw", is_manager: true }),
      authQueryTenant("aqlock", FUNCTION_QUERY),
      authQueryTenant("aqlimit", FUNCTION_QUERY),
      authQueryTenant("aqcount", "SELECT * FROM tidepool.get_auth_counted($1)"),
      authQueryTenant("aqbroken", "SELECT rolname, rolpassword FROM no_such_table WHERE rolname=$1"),
      authQueryTenant("aqformat", "SELECT rolname, rolpassword, 1 FROM pg_authid WHERE rolname=$1", {
        ...manager,
        db_user: "boss",
        db_password: "boss-pw"
      }),
      authQueryTenant("aqbadmgr", FUNCTION_QUERY, { ...manager, db_password: "not-the-password" }),
      {
        external_id: "plain",
        ...upstreamOf(db),
        users: [{ db_user: "app", db_password: "app-secret" }]
      }
    ],
    // Re-checks are run by hand below, so every outcome is deterministic.
    config: { authQueryRecheckIntervalMs: 0 }
  })
})

afterAll(async () => {
  await tidepool?.stop()
  await db?.stop()
})

const clientOf = (user: string, password: string, mode: "session" | "transaction" = "session") => {
  const client = new pg.Client({ connectionString: tidepool.url({ user, password, mode }) })
  client.on("error", () => undefined)
  return client
}

const connected = async (user: string, password: string, mode: "session" | "transaction" = "session") => {
  const client = clientOf(user, password, mode)
  await client.connect()
  return client
}

const currentUser = async (client: pg.Client) => (await client.query("SELECT current_user AS u")).rows[0].u as string

const failure = (user: string, password: string) => {
  const client = clientOf(user, password)
  return client.connect().then(
    async () => {
      await client.end()
      throw new Error(`${user} connected, expected an error`)
    },
    (e: pg.DatabaseError) => ({ code: e.code, message: e.message })
  )
}

const backendsOf = async (user: string) =>
  Number((await db.query("SELECT count(*) AS n FROM pg_stat_activity WHERE usename = $1", [user]))[0].n)

const recheck = () => tidepool.runtime.runPromise(Effect.flatMap(AuthQuery, (a) => a.recheck))

const wrongPassword = (user: string) => ({
  code: "28P01",
  message: `password authentication failed for user "${user}"`
})

describe("auth_query tenants", () => {
  it("logs clients in with the database's own verifier, in both modes, and upstream by SCRAM pass-through", async () => {
    // Tidepool holds no password for alice: only the manager's.
    const tenant = (await tidepool.runtime.runPromise(TenantRegistry)).get("aq")!
    expect(tenant.users.map((u) => u.db_user)).toEqual(["tidepool_manager"])

    const session = await connected("alice.aq", "alice-pw")
    expect(await currentUser(session)).toBe("alice")
    const transaction = await connected("alice.aq", "alice-pw", "transaction")
    expect(await currentUser(transaction)).toBe("alice")
    // The pooler's own upstream sessions run as alice, which it could only log in as with the
    // ClientKey the client's proof revealed (pg_hba asks for scram-sha-256).
    expect(await backendsOf("alice")).toBeGreaterThanOrEqual(2)
    expect(
      await db.query("SELECT 1 FROM pg_stat_activity WHERE usename = 'alice' AND pid = $1", [
        (await session.query("SELECT pg_backend_pid() AS pid")).rows[0].pid
      ])
    ).toHaveLength(1)
    await session.end()
    await transaction.end()
  })

  it("runs auth_query once for a storm of logins of one role", async () => {
    const clients = await Promise.all(
      Array.from({ length: 20 }, () => connected("ivan.aqcount", "ivan-pw", "transaction"))
    )
    expect(await Promise.all(clients.map(currentUser))).toEqual(Array(20).fill("ivan"))
    expect((await db.query("SELECT n FROM tidepool.calls"))[0].n).toBe(1)
    await Promise.all(clients.map((c) => c.end()))
  })

  it("passes the username as a bound parameter, never as SQL", async () => {
    const client = await connected("o'brien; drop table x --.aqsuper", "ob-pw")
    expect(await currentUser(client)).toBe("o'brien; drop table x --")
    await client.end()
  })

  it("works with a superuser manager reading pg_authid", async () => {
    const client = await connected("carol.aqsuper", "carol-pw", "transaction")
    expect(await currentUser(client)).toBe("carol")
    await client.end()
  })

  it.skipIf(!hasPsql)("logs in with psql", async () => {
    const { stdout } = await run(
      "psql",
      [tidepool.url({ user: "carol.aq", password: "carol-pw" }), "--no-psqlrc", "-tAc", "select current_user"],
      { env: { ...process.env, PGCONNECT_TIMEOUT: "10", PGPASSWORD: "" } }
    )
    expect(stdout.trim()).toBe("carol")
  })

  it("never lets one user's password or key serve another", async () => {
    expect(await failure("carol.aq", "alice-pw")).toMatchObject(wrongPassword("carol"))
    const alice = await connected("alice.aq", "alice-pw", "transaction")
    const carol = await connected("carol.aq", "carol-pw", "transaction")
    expect(await Promise.all([currentUser(alice), currentUser(carol)])).toEqual(["alice", "carol"])
    await alice.end()
    await carol.end()
  })

  it("follows ALTER ROLE … PASSWORD: new password in, old password out, connected clients unharmed", async () => {
    const inSession = await connected("dave.aq", "dave-pw")
    const inTransactions = await connected("dave.aq", "dave-pw", "transaction")
    await db.query("ALTER ROLE dave PASSWORD 'dave-new'")

    // The cached verifier is stale: the proof was made with the old salt and cannot be checked
    // against the new one, so this attempt fails, but it re-fetches the secret…
    expect(await failure("dave.aq", "dave-new")).toMatchObject(wrongPassword("dave"))
    // …and the next login with the new password succeeds.
    const fresh = await connected("dave.aq", "dave-new", "transaction")
    expect(await currentUser(fresh)).toBe("dave")
    expect(await failure("dave.aq", "dave-pw")).toMatchObject(wrongPassword("dave"))

    // Clients connected before the change keep working on their old-key servers.
    expect(await currentUser(inSession)).toBe("dave")
    expect(await currentUser(inTransactions)).toBe("dave")

    // A new server of the transaction pool logs in with the new key: one client holds the pool's
    // server in a transaction while another needs one.
    const before = await backendsOf("dave")
    await inTransactions.query("BEGIN")
    await inTransactions.query("SELECT 1")
    expect(await currentUser(fresh)).toBe("dave")
    expect(await backendsOf("dave")).toBe(before + 1)
    await inTransactions.query("COMMIT")
    for (const c of [inSession, inTransactions, fresh]) await c.end()
  })

  it("notices a rotated password at the periodic re-check, before anyone fails", async () => {
    const client = await connected("mallory.aq", "mallory-pw")
    await db.query("ALTER ROLE mallory PASSWORD 'mallory-new'")
    await recheck()
    const fresh = await connected("mallory.aq", "mallory-new")
    expect(await currentUser(fresh)).toBe("mallory")
    expect(await failure("mallory.aq", "mallory-pw")).toMatchObject(wrongPassword("mallory"))
    expect(await currentUser(client)).toBe("mallory")
    await client.end()
    await fresh.end()
  })

  it("drops a verifier the upstream refused the pool's key for, so the next login fetches the new one", async () => {
    const holder = await connected("henry.aq", "henry-pw", "transaction")
    const other = await connected("henry.aq", "henry-pw", "transaction")
    await db.query("ALTER ROLE henry PASSWORD 'henry-new'")
    // The pool's only server is held, so the other client's query needs a new one, logged in with
    // the old key: PostgreSQL refuses it.
    await holder.query("BEGIN")
    const refused = await other.query("SELECT 1").then(
      () => undefined,
      (e: pg.DatabaseError) => e.code
    )
    expect(refused).toBe("28P01")
    await holder.query("COMMIT")
    // No failed login needed: the refusal already dropped the stale verifier.
    const fresh = await connected("henry.aq", "henry-new", "transaction")
    expect(await currentUser(fresh)).toBe("henry")
    expect(await currentUser(holder)).toBe("henry")
    for (const c of [holder, other, fresh]) await c.end().catch(() => undefined)
  })

  it("re-fetches after wrong passwords at most three times a minute", async () => {
    await (await connected("frank.aqlimit", "frank-pw")).end()
    // Three wrong passwords re-fetch the (unchanged) secret and use up the minute's re-fetches…
    for (let i = 0; i < 3; i++) expect(await failure("frank.aqlimit", "wrong")).toMatchObject(wrongPassword("frank"))
    await db.query("ALTER ROLE frank PASSWORD 'frank-new'")
    // …so the rotation goes unnoticed by failed logins, however many…
    for (let i = 0; i < 2; i++)
      expect(await failure("frank.aqlimit", "frank-new")).toMatchObject(wrongPassword("frank"))
    // …until the periodic re-check.
    await recheck()
    const client = await connected("frank.aqlimit", "frank-new")
    expect(await currentUser(client)).toBe("frank")
    await client.end()
  })

  it("forgets a cached verifier whose role switched to an MD5 password at the next re-check", async () => {
    await (await connected("grace.aq", "grace-pw")).end()
    await db.query("SET password_encryption = 'md5'; ALTER ROLE grace PASSWORD 'grace-pw'")
    await recheck()
    expect(await failure("grace.aq", "grace-pw")).toMatchObject({
      message: "(EAUTHQUERY) MD5 secrets are not supported for auth_query, use require_user instead"
    })
  })

  it("EAUTHQUERY: an md5 secret is refused with the MD5 message", async () => {
    await db.query("CREATE ROLE md5user LOGIN")
    await db.query("SET password_encryption = 'md5'; ALTER ROLE md5user PASSWORD 'md5-pw'")
    expect(await failure("md5user.aq", "md5-pw")).toMatchObject({
      code: "XX000",
      message: "(EAUTHQUERY) MD5 secrets are not supported for auth_query, use require_user instead"
    })
  })

  it("EAUTHQUERY: unknown role, no password, wrong result shape, manager login failure", async () => {
    expect(await failure("nobody.aq", "x")).toMatchObject({
      code: "XX000",
      message: "(EAUTHQUERY) user not found in the database"
    })
    await db.query("CREATE ROLE nopass LOGIN")
    expect(await failure("nopass.aq", "x")).toMatchObject({
      message: "(EAUTHQUERY) unsupported or invalid secret format"
    })
    expect(await failure("alice.aqformat", "alice-pw")).toMatchObject({
      message: "(EAUTHQUERY) authentication query returned wrong format"
    })
    expect(await failure("alice.aqbadmgr", "alice-pw")).toMatchObject({
      code: "XX000",
      message: '(EAUTHQUERY) auth_query connection failed: password authentication failed for user "tidepool_manager"'
    })
  })

  it("ECIRCUITBREAKER: five failed auth_query runs block the tenant's logins", async () => {
    for (let i = 0; i < 5; i++) {
      expect(await failure("alice.aqbroken", "alice-pw")).toMatchObject({
        code: "XX000",
        message: '(EAUTHQUERY) authentication query failed: relation "no_such_table" does not exist'
      })
    }
    expect(await failure("alice.aqbroken", "alice-pw")).toMatchObject({
      code: "XX000",
      message:
        "(ECIRCUITBREAKER) failed to retrieve database credentials after multiple attempts, new connections are temporarily blocked"
    })
  })

  for (const [tenant, user, password] of [
    ["aqlock", "alice", "alice-pw"],
    ["plain", "app", "app-secret"]
  ] as const) {
    it(`ECIRCUITBREAKER: ten wrong passwords from one address block the eleventh attempt (${tenant})`, async () => {
      for (let i = 0; i < 10; i++) {
        expect(await failure(`${user}.${tenant}`, `wrong-${i}`)).toMatchObject(wrongPassword(user))
      }
      // Blocked even with the right password, and only for this tenant.
      expect(await failure(`${user}.${tenant}`, password)).toMatchObject({
        code: "XX000",
        message: "(ECIRCUITBREAKER) too many authentication failures, new connections are temporarily blocked"
      })
      const other = await connected(`${user}.aq`, password)
      expect(await currentUser(other)).toBe(user)
      await other.end()
    })
  }

  it("reconnects auth_query as the rotated manager without touching clients", async () => {
    const client = await connected("alice.aq", "alice-pw", "transaction")
    const managerPids = async () =>
      new Set(
        (await db.query("SELECT pid FROM pg_stat_activity WHERE usename = 'tidepool_manager'")).map(
          (r) => r.pid as number
        )
      )
    const before = await managerPids()
    await db.query("ALTER ROLE tidepool_manager PASSWORD 'manager-new'")
    // What the tenant API's update_auth_credentials does: the registry now has the new password.
    const registry = await tidepool.runtime.runPromise(TenantRegistry)
    const tenant = registry.get("aq")!
    Object.assign(tenant, { users: [{ ...tenant.users[0]!, db_password: Redacted.make("manager-new") }] })

    // erin is not cached: her login needs the dedicated connection, made again as the new manager.
    const erin = await connected("erin.aq", "erin-pw")
    expect(await currentUser(erin)).toBe("erin")
    const after = await managerPids()
    expect([...after].filter((pid) => !before.has(pid))).toHaveLength(1)
    // The old connection, made with the old password, is closed.
    await vi.waitFor(async () => {
      const now = await managerPids()
      expect([...before].filter((pid) => !now.has(pid))).toHaveLength(1)
    })
    expect(await currentUser(client)).toBe("alice")
    await erin.end()
    await client.end()
  })
})
