import { createCipheriv, randomBytes, X509Certificate } from "node:crypto"
import { existsSync, mkdtempSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import * as path from "node:path"
import { Effect, type Layer, Redacted } from "effect"
import pg from "pg"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { applyPlan, formatReport, type ImportReport, supavisorPlan } from "../../src/migrate/index.ts"
import { parseVaultKey, postgresStore, TenantRegistry, TenantStore, Vault } from "../../src/tenants/index.ts"
import { makeTestCerts, type TestCerts } from "../support/certs.ts"
import { runCli } from "../support/cli.ts"
import { type PostgresServer, startPostgres } from "../support/postgres.ts"
import { type RunningTidepool, startTidepool } from "../support/tidepool.ts"

/*
 * A real PostgreSQL holds Supavisor's metadata schema (written here from its migrations in
 * priv/repo/migrations, current columns only) and a second database serves as Tidepool's store.
 * Passwords are stored as Supavisor stores them: Cloak AES.GCM.V1 ciphertexts in a bytea, under
 * Supavisor's 32-character VAULT_ENC_KEY used as the key's raw bytes.
 */

/** Supavisor's config/test.exs key. */
const SUPAVISOR_KEY = "aHD8DZRdk2emnkdktFZRh3E9RNg4aOY7"
/** A key of Tidepool's own (hex), for the run that keeps Supavisor's key apart. */
const TIDEPOOL_KEY = "5a".repeat(32)

/** Cloak.Ciphers.AES.GCM's encrypt: 0x01, tag length, tag, 16-byte IV, GCM tag, ciphertext; AAD "AES256GCM". */
const cloakEncrypt = (plain: string): Buffer => {
  const iv = randomBytes(16)
  const cipher = createCipheriv("aes-256-gcm", Buffer.from(SUPAVISOR_KEY), iv)
  cipher.setAAD(Buffer.from("AES256GCM"))
  const body = Buffer.concat([cipher.update(plain, "utf8"), cipher.final()])
  const tag = Buffer.from("AES.GCM.V1")
  return Buffer.concat([Buffer.from([1, tag.length]), tag, iv, cipher.getAuthTag(), body])
}

const SCHEMA = `
CREATE SCHEMA _supavisor;
CREATE TABLE _supavisor.tenants (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  external_id varchar(255) NOT NULL,
  db_host varchar(255) NOT NULL,
  db_port integer NOT NULL,
  db_database varchar(255) NOT NULL,
  inserted_at timestamp(0) NOT NULL DEFAULT now(),
  updated_at timestamp(0) NOT NULL DEFAULT now(),
  default_parameter_status jsonb NOT NULL,
  ip_version varchar(255) NOT NULL DEFAULT 'auto' CONSTRAINT ip_version_values CHECK (ip_version IN ('auto', 'v4', 'v6')),
  upstream_ssl boolean NOT NULL DEFAULT false,
  upstream_verify varchar(255) CONSTRAINT upstream_verify_values CHECK (upstream_verify IN ('none', 'peer')),
  upstream_tls_ca bytea,
  enforce_ssl boolean NOT NULL DEFAULT false,
  require_user boolean NOT NULL DEFAULT true,
  auth_query varchar(255),
  default_pool_size integer NOT NULL DEFAULT 15,
  sni_hostname varchar(255),
  default_max_clients integer NOT NULL DEFAULT 1000,
  client_idle_timeout integer NOT NULL DEFAULT 0,
  default_pool_strategy varchar(255) NOT NULL DEFAULT 'fifo'
    CONSTRAINT default_pool_strategy_values CHECK (default_pool_strategy IN ('fifo', 'lifo')),
  client_heartbeat_interval integer NOT NULL DEFAULT 60,
  allow_list varchar(255)[] NOT NULL DEFAULT ARRAY['0.0.0.0/0', '::/0'],
  availability_zone varchar(255),
  use_jit boolean DEFAULT false,
  jit_api_url varchar(255),
  feature_flags jsonb DEFAULT '{}',
  banned_at timestamp(0),
  ban_reason varchar(255),
  banned_until timestamp(0),
  CONSTRAINT upstream_constraints CHECK ((upstream_ssl = false AND upstream_verify IS NULL) OR (upstream_ssl = true AND upstream_verify IS NOT NULL)),
  CONSTRAINT auth_query_constraints CHECK ((require_user = true) OR (require_user = false AND auth_query IS NOT NULL))
);
CREATE UNIQUE INDEX tenants_external_id_index ON _supavisor.tenants (external_id);
CREATE TABLE _supavisor.users (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  db_user_alias varchar(255) NOT NULL,
  db_user varchar(255) NOT NULL,
  db_pass_encrypted bytea NOT NULL,
  pool_size integer NOT NULL,
  mode_type varchar(255) NOT NULL,
  is_manager boolean NOT NULL DEFAULT false,
  tenant_external_id varchar(255) REFERENCES _supavisor.tenants (external_id) ON DELETE CASCADE,
  inserted_at timestamp(0) NOT NULL DEFAULT now(),
  updated_at timestamp(0) NOT NULL DEFAULT now(),
  pool_checkout_timeout integer NOT NULL DEFAULT 60000,
  max_clients integer
);
CREATE UNIQUE INDEX users_db_user_alias_tenant_external_id_mode_type_index
  ON _supavisor.users (db_user_alias, tenant_external_id, mode_type);
CREATE TABLE _supavisor.clusters (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  active boolean NOT NULL DEFAULT false,
  alias varchar(255) NOT NULL UNIQUE,
  inserted_at timestamp(0) NOT NULL DEFAULT now(),
  updated_at timestamp(0) NOT NULL DEFAULT now()
);
CREATE TABLE _supavisor.cluster_tenants (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  type varchar(255) NOT NULL CONSTRAINT type CHECK (type IN ('read', 'write')),
  active boolean NOT NULL DEFAULT false,
  cluster_alias varchar(255) REFERENCES _supavisor.clusters (alias) ON DELETE CASCADE,
  tenant_external_id varchar(255) UNIQUE REFERENCES _supavisor.tenants (external_id),
  inserted_at timestamp(0) NOT NULL DEFAULT now(),
  updated_at timestamp(0) NOT NULL DEFAULT now()
)`

let db: PostgresServer
let meta: pg.Client
let dir: string
let certs: TestCerts
const running: Array<RunningTidepool> = []

const insertUser = (tenant: string, user: string, password: string, fields: Record<string, unknown> = {}) => {
  const row: Record<string, unknown> = {
    db_user_alias: user,
    db_user: user,
    db_pass_encrypted: cloakEncrypt(password),
    pool_size: 3,
    mode_type: "transaction",
    tenant_external_id: tenant,
    ...fields
  }
  const names = Object.keys(row)
  return meta.query(
    `INSERT INTO _supavisor.users (${names.join(", ")}) VALUES (${names.map((_, i) => `$${i + 1}`).join(", ")})`,
    Object.values(row)
  )
}

beforeAll(async () => {
  db = await startPostgres({
    roles: [{ name: "app", password: "app-secret" }],
    databases: ["supavisor", "tidepool_store", "tidepool_store_2"]
  })
  dir = mkdtempSync(path.join(tmpdir(), "tidepool-import-"))
  meta = new pg.Client({ connectionString: db.url({ database: "supavisor" }) })
  await meta.connect()
  await meta.query(SCHEMA)
  // acme: what a Supabase-style tenant looks like, with settings that map and two that do not.
  await meta.query(
    `INSERT INTO _supavisor.tenants (external_id, db_host, db_port, db_database, default_parameter_status,
       default_pool_size, default_max_clients, client_idle_timeout, client_heartbeat_interval, allow_list,
       feature_flags, sni_hostname, default_pool_strategy, availability_zone)
     VALUES ('acme', $1, $2, 'postgres', '{"server_version": "15.1"}', 7, 200, 30000, 20,
       ARRAY['127.0.0.0/8', '::1/128'], '{"named_prepared_statements": true, "rollout": {"percent": 5}}', 'acme.example.com', 'lifo', 'eu-1a')`,
    [db.host, db.port]
  )
  await insertUser("acme", "app", "app-secret", { pool_size: 3, max_clients: 50, pool_checkout_timeout: 5000 })
  // The same login name in session mode: Tidepool has one user per name, so this one is reported.
  await insertUser("acme", "app", "app-secret", { mode_type: "session", pool_size: 9 })
  // Banned in Supavisor: imported banned.
  await meta.query(
    `INSERT INTO _supavisor.tenants (external_id, db_host, db_port, db_database, default_parameter_status,
       banned_at, ban_reason, banned_until)
     VALUES ('banned-co', $1, $2, 'postgres', '{}', '2026-03-23 10:00:00', 'unpaid', '2099-01-01 00:00:00')`,
    [db.host, db.port]
  )
  await insertUser("banned-co", "app", "app-secret")
  // An id Tidepool refuses for a new tenant (':' breaks the admin console's tenant/database).
  await meta.query(
    `INSERT INTO _supavisor.tenants (external_id, db_host, db_port, db_database, default_parameter_status)
     VALUES ('legacy:1', $1, $2, 'postgres', '{}')`,
    [db.host, db.port]
  )
  await insertUser("legacy:1", "app", "app-secret")
  // Upstream TLS with the CA as Supavisor keeps it (DER bytes, converted by its API from PEM).
  certs = await makeTestCerts()
  await meta.query(
    `INSERT INTO _supavisor.tenants (external_id, db_host, db_port, db_database, default_parameter_status,
       upstream_ssl, upstream_verify, upstream_tls_ca)
     VALUES ('tls-co', $1, $2, 'postgres', '{}', true, 'peer', $3)`,
    [db.host, db.port, new X509Certificate(certs.ca.certPem).raw]
  )
  await insertUser("tls-co", "app", "app-secret")
  // auth_query: the one user is the manager that runs it.
  await meta.query(
    `INSERT INTO _supavisor.tenants (external_id, db_host, db_port, db_database, default_parameter_status,
       require_user, auth_query)
     VALUES ('pooled', $1, $2, 'postgres', '{}', false, 'SELECT rolname, rolpassword FROM pg_authid WHERE rolname = $1')`,
    [db.host, db.port]
  )
  await insertUser("pooled", "pooler", "pooler-secret", { is_manager: true })
  await meta.query(`INSERT INTO _supavisor.clusters (alias, active) VALUES ('main', true)`)
  await meta.query(
    `INSERT INTO _supavisor.cluster_tenants (type, active, cluster_alias, tenant_external_id)
     VALUES ('write', true, 'main', 'acme')`
  )
})

afterAll(async () => {
  for (const t of running) await t.stop()
  await meta?.end()
  await certs?.remove()
  await db?.stop()
  if (dir) rmSync(dir, { recursive: true, force: true })
})

const key = parseVaultKey(SUPAVISOR_KEY) as Buffer

/** Reads Supavisor's database and applies the plan to the PostgreSQL store `database`. */
const importInto = (database: string, dryRun: boolean): Promise<ImportReport> =>
  Effect.runPromise(
    Effect.gen(function* () {
      const plan = yield* supavisorPlan({ databaseUrl: db.url({ database: "supavisor" }), vaultKey: key })
      return yield* applyPlan(plan, { dryRun })
    }).pipe(Effect.provide(postgresStore(Redacted.make(db.url({ database })), new Vault(key))))
  )

/** external_id → version in the PostgreSQL store `database`: every write bumps a version. */
const storedVersions = (database: string) =>
  Effect.runPromise(
    Effect.flatMap(TenantStore, (s) => s.versions).pipe(
      Effect.map((versions) => Object.fromEntries([...versions].sort())),
      Effect.provide(postgresStore(Redacted.make(db.url({ database })), new Vault(key)) as Layer.Layer<TenantStore>)
    )
  )

const selectThrough = async (tidepool: RunningTidepool, user: string) => {
  const client = new pg.Client({
    connectionString: tidepool.url({ user, password: "app-secret", mode: "transaction" })
  })
  client.on("error", () => {})
  await client.connect()
  try {
    return (await client.query("select current_user as who, 40 + 2 as answer")).rows[0]
  } finally {
    await client.end()
  }
}

describe("import supavisor (into a PostgreSQL store)", () => {
  it("dry run lists what would change and writes nothing", async () => {
    const report = await importInto("tidepool_store", true)
    expect(report.outcomes.map((o) => [o.externalId, o.action])).toEqual([
      ["acme", "create"],
      ["banned-co", "create"],
      ["pooled", "create"],
      ["tls-co", "create"]
    ])
    expect(formatReport(report)).toMatch(/dry run: would create 4, would update 0, unchanged 0; nothing was written/)
    expect(await storedVersions("tidepool_store")).toEqual({})
  })

  it("creates the tenants, reports every field it could not map, and the second run changes nothing", async () => {
    const first = await importInto("tidepool_store", false)
    const text = formatReport(first)
    expect(text).toMatch(/^created 4, updated 0, unchanged 0$/m)
    const unmapped = first.unmapped.map((u) => `${u.source} · ${u.field}`)
    expect(unmapped).toEqual(
      expect.arrayContaining([
        "tenant acme · feature_flags.rollout",
        "tenant acme · default_pool_strategy",
        "tenant acme · user app (session mode)",
        "tenant legacy:1 · (whole tenant)",
        "cluster main · write tenant acme"
      ])
    )
    expect(unmapped).toHaveLength(5)
    expect(text).not.toContain("app-secret")
    const versions = await storedVersions("tidepool_store")
    expect(Object.keys(versions)).toEqual(["acme", "banned-co", "pooled", "tls-co"])

    const second = await importInto("tidepool_store", false)
    expect(formatReport(second)).toMatch(/^created 0, updated 0, unchanged 4$/m)
    expect(await storedVersions("tidepool_store")).toEqual(versions)
  })

  it("maps the settings, keeps the ban, and a client logs in with the imported password and queries", async () => {
    const tidepool = await startTidepool({
      tenants: [],
      store: "config",
      config: {
        databaseUrl: Redacted.make(db.url({ database: "tidepool_store" })),
        vaultEncKey: Redacted.make(SUPAVISOR_KEY)
      }
    })
    running.push(tidepool)
    const acme = tidepool.runtime.runSync(Effect.map(TenantRegistry, (r) => r.get("acme")))
    expect(acme).toMatchObject({
      default_pool_size: 7,
      default_max_clients: 200,
      client_idle_timeout: 30000,
      client_heartbeat_interval: 20,
      allow_list: ["127.0.0.0/8", "::1/128"],
      feature_flags: { named_prepared_statements: true },
      sni_hostname: "acme.example.com",
      availability_zone: "eu-1a",
      default_parameter_status: { server_version: "15.1" }
    })
    expect(acme?.feature_flags).toEqual({ named_prepared_statements: true })
    expect(acme?.users).toHaveLength(1)
    expect(acme?.users[0]).toMatchObject({ db_user: "app", pool_size: 3, max_clients: 50, pool_checkout_timeout: 5000 })
    const banned = tidepool.runtime.runSync(Effect.map(TenantRegistry, (r) => r.get("banned-co")))
    expect(banned?.ban_reason).toBe("unpaid")
    expect(String(banned?.banned_at)).toContain("2026-03-23T10:00:00")

    const tls = tidepool.runtime.runSync(Effect.map(TenantRegistry, (r) => r.get("tls-co")))
    expect(tls).toMatchObject({ upstream_ssl: true, upstream_verify: "peer" })
    expect(new X509Certificate(tls?.upstream_tls_ca ?? "").fingerprint256).toBe(
      new X509Certificate(certs.ca.certPem).fingerprint256
    )
    const pooled = tidepool.runtime.runSync(Effect.map(TenantRegistry, (r) => r.get("pooled")))
    expect(pooled).toMatchObject({ require_user: false, auth_query: expect.stringContaining("pg_authid") })
    expect(pooled?.users.map((u) => [u.db_user, u.is_manager])).toEqual([["pooler", true]])

    expect(await selectThrough(tidepool, "app.acme")).toEqual({ who: "app", answer: 42 })
  })

  it("a column a newer Supavisor adds is reported, not dropped", async () => {
    await meta.query(`ALTER TABLE _supavisor.tenants ADD COLUMN max_prepared_statements integer`)
    try {
      await meta.query(`UPDATE _supavisor.tenants SET max_prepared_statements = 50 WHERE external_id = 'acme'`)
      const report = await importInto("tidepool_store", true)
      expect(report.unmapped.filter((u) => u.field === "max_prepared_statements")).toEqual([
        { source: "tenant acme", field: "max_prepared_statements", reason: expect.stringMatching(/does not know/) }
      ])
    } finally {
      await meta.query(`ALTER TABLE _supavisor.tenants DROP COLUMN max_prepared_statements`)
    }
  })

  it("a change in Supavisor is an update naming the field, never its value", async () => {
    await meta.query(
      `UPDATE _supavisor.users SET pool_size = 4 WHERE tenant_external_id = 'acme' AND mode_type = 'transaction'`
    )
    try {
      const dry = await importInto("tidepool_store", true)
      expect(dry.outcomes.find((o) => o.externalId === "acme")).toEqual({
        externalId: "acme",
        action: "update",
        changed: ["users[app].pool_size"]
      })
      expect(formatReport(await importInto("tidepool_store", false))).toMatch(/^created 0, updated 1, unchanged 3$/m)
    } finally {
      await meta.query(
        `UPDATE _supavisor.users SET pool_size = 3 WHERE tenant_external_id = 'acme' AND mode_type = 'transaction'`
      )
    }
  })

  it("a wrong key fails the whole import and writes nothing", async () => {
    const wrong = Effect.runPromise(
      supavisorPlan({ databaseUrl: db.url({ database: "supavisor" }), vaultKey: Buffer.alloc(32, 1) }).pipe(Effect.flip)
    )
    expect((await wrong).message).toMatch(/cannot decrypt the password of user app of tenant acme: .*key differs/)
  })
})

describe("tidepool import supavisor (the command, into the SQLite store)", () => {
  // The usual move: Supavisor's VAULT_ENC_KEY, as it is, becomes Tidepool's.
  const env = () => ({
    VAULT_ENC_KEY: SUPAVISOR_KEY,
    SUPAVISOR_VAULT_ENC_KEY: "",
    TIDEPOOL_DATA_DIR: path.join(dir, "data"),
    DATABASE_URL: ""
  })
  // Supavisor's own DATABASE_URL is written with the ecto:// scheme; it is taken as it is.
  const args = (...more: Array<string>) => [
    "import",
    "supavisor",
    "--database-url",
    db.url({ database: "supavisor" }).replace(/^postgres(ql)?:/, "ecto:"),
    ...more
  ]

  const runImport = async (more: ReadonlyArray<string>, extra: Record<string, string> = {}) => {
    const cli = runCli(args(...more), { ...env(), ...extra })
    const code = await cli.exited
    return { code, output: cli.output() }
  }

  // Each run starts a Node process from the sources: generous bounds for a loaded two-core machine.
  const CLI_DEADLINE = 180_000

  it(
    "dry run lists the changes and creates no store (Supavisor's key given apart from Tidepool's)",
    async () => {
      const dry = await runImport(["--dry-run"], {
        VAULT_ENC_KEY: TIDEPOOL_KEY,
        SUPAVISOR_VAULT_ENC_KEY: SUPAVISOR_KEY
      })
      expect(dry).toMatchObject({ code: 0 })
      expect(dry.output).toMatch(/would create tenant acme/)
      expect(dry.output).toMatch(/tenant legacy:1 · \(whole tenant\): not imported/)
      expect(dry.output).toMatch(/dry run: would create 4, would update 0, unchanged 0; nothing was written/)
      expect(existsSync(path.join(dir, "data", "tidepool.db"))).toBe(false)
    },
    CLI_DEADLINE
  )

  it(
    "imports, then a second run changes nothing",
    async () => {
      const first = await runImport([])
      expect(first).toMatchObject({ code: 0 })
      expect(first.output).toMatch(/^created 4, updated 0, unchanged 0$/m)
      const second = await runImport([])
      expect(second.output).toMatch(/^created 0, updated 0, unchanged 4$/m)
    },
    2 * CLI_DEADLINE
  )

  it("a client logs in through a Tidepool on that store, with the imported password", async () => {
    const tidepool = await startTidepool({
      tenants: [],
      store: "config",
      config: { dataDir: path.join(dir, "data"), vaultEncKey: Redacted.make(SUPAVISOR_KEY) }
    })
    running.push(tidepool)
    expect(await selectThrough(tidepool, "app.acme")).toEqual({ who: "app", answer: 42 })
  })

  it("without Supavisor's key, says which variable to set and exits 1", { timeout: CLI_DEADLINE }, async () => {
    const cli = runCli(args(), {
      ...env(),
      VAULT_ENC_KEY: "",
      SUPAVISOR_VAULT_ENC_KEY: "",
      TIDEPOOL_DATA_DIR: path.join(dir, "data-nokey")
    })
    expect(await cli.exited).toBe(1)
    expect(cli.output()).toMatch(/tidepool: Supavisor's VAULT_ENC_KEY is needed/)
  })
})
