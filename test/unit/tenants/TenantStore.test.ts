import { copyFileSync, mkdtempSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import * as path from "node:path"
import { DatabaseSync } from "node:sqlite"
import { afterAll, describe, expect, it } from "@effect/vitest"
import { DateTime, Effect, Option, Redacted, Schema } from "effect"
import { Tenant } from "../../../src/config/index.ts"
import { sqliteStore, TenantStore, Vault } from "../../../src/tenants/index.ts"

// Written by Tidepool 0.1.0 on Effect 3 (@effect/sql-sqlite-node 0.53 over better-sqlite3, commit
// 99cfb2e of main) with this key: two tenants, `acme` written twice (version 2), `jit_tenant` with
// an encrypted JIT key and a ban. The Effect 4 store (node:sqlite) must read it as it is.
const fixture = new URL("../../fixtures/tenant-store-effect3.db", import.meta.url).pathname
const fixtureKey = Buffer.from("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f", "hex")

const dirs: Array<string> = []
afterAll(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true })
})

/** A private copy: opening a store may write (WAL, migrations), and the fixture must stay as written. */
const copyOfFixture = () => {
  const dir = mkdtempSync(path.join(tmpdir(), "tidepool-store-"))
  dirs.push(dir)
  const file = path.join(dir, "tidepool.db")
  copyFileSync(fixture, file)
  return file
}

const withStore = <A, E>(file: string, use: (store: TenantStore["Service"]) => Effect.Effect<A, E>) =>
  TenantStore.use(use).pipe(Effect.provide(sqliteStore(file, new Vault(fixtureKey))))

const query = (file: string, sql: string) => {
  const db = new DatabaseSync(file, { readOnly: true })
  try {
    return db.prepare(sql).all()
  } finally {
    db.close()
  }
}

describe("SQLite tenant store", () => {
  it.effect("reads a store written by the Effect 3 version, secrets decrypted, versions kept", () =>
    Effect.gen(function* () {
      const file = copyOfFixture()
      const stored = yield* withStore(file, (store) => store.list)
      expect(stored.map((s) => [s.tenant.external_id, s.version])).toEqual([
        ["acme", 2],
        ["jit_tenant", 1]
      ])
      const [acme, jit] = stored.map((s) => s.tenant)
      expect(acme).toMatchObject({ default_pool_size: 7, allow_list: ["10.0.0.0/8"] })
      expect(acme!.users.map((u) => [u.db_user, u.db_user_alias, Redacted.value(u.db_password), u.mode_type])).toEqual([
        ["app", "app", "app-secret", "transaction"],
        ["ro", "reader", "ro-secret", "session"]
      ])
      expect(Redacted.value(jit!.jit_jwt_secret!)).toBe("jit-signing-key")
      expect(jit!.ban_reason).toBe("fixture")
      expect(DateTime.toEpochMillis(jit!.banned_at!)).toBe(Date.parse("2026-01-02T03:04:05Z"))
    })
  )

  it.effect("keeps writing to it without running its migration again", () =>
    Effect.gen(function* () {
      const file = copyOfFixture()
      const extra = Schema.decodeUnknownSync(Tenant)({
        external_id: "added",
        db_host: "127.0.0.1",
        db_port: 5432,
        db_database: "app",
        users: [{ db_user: "app", db_password: "new-secret" }]
      })
      const created = yield* withStore(file, (store) => store.upsert(extra))
      expect(created).toEqual({ created: true })
      // A second start over the same file: the migration row written by Effect 3 still counts.
      const reread = yield* withStore(file, (store) => store.get("added"))
      expect(Option.map(reread, (s) => Redacted.value(s.tenant.users[0]!.db_password))).toEqual(
        Option.some("new-secret")
      )
      expect(query(file, "SELECT migration_id, name FROM tidepool_migrations")).toEqual([
        { migration_id: 1, name: "create_tenants" }
      ])
      expect(query(file, "SELECT external_id FROM tidepool_tenants ORDER BY external_id")).toEqual([
        { external_id: "acme" },
        { external_id: "added" },
        { external_id: "jit_tenant" }
      ])
    })
  )

  it.effect("creates a new store, in WAL mode as before", () =>
    Effect.gen(function* () {
      const dir = mkdtempSync(path.join(tmpdir(), "tidepool-store-"))
      dirs.push(dir)
      const file = path.join(dir, "nested", "tidepool.db")
      expect(yield* withStore(file, (store) => store.list)).toEqual([])
      expect(query(file, "PRAGMA journal_mode")).toEqual([{ journal_mode: "wal" }])
      expect(query(file, "SELECT name FROM tidepool_migrations")).toEqual([{ name: "create_tenants" }])
    })
  )
})
