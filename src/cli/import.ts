import { existsSync } from "node:fs"
import * as path from "node:path"
import { Console, Effect, Layer, Redacted } from "effect"
import { AppConfig, loadConfigFile } from "../config/index.ts"
import {
  applyPlan,
  formatReport,
  ImportError,
  type ImportPlan,
  pgbouncerPlan,
  supavisorPlan
} from "../migrate/index.ts"
import { parseVaultKey, sqliteStore, tenantStoreLayer, Vault } from "../tenants/index.ts"
import { runtimeLayer } from "./serve.ts"

/**
 * The store `tidepool serve` would use with the same settings. A dry run on a SQLite store that
 * does not exist yet compares against an empty in-memory one, so it creates no file.
 */
const storeFor = (dryRun: boolean) =>
  Layer.unwrap(
    Effect.map(AppConfig, (config) => {
      const file = path.resolve(config.dataDir, "tidepool.db")
      return dryRun && config.databaseUrl === undefined && !existsSync(file)
        ? sqliteStore(":memory:", new Vault(undefined))
        : tenantStoreLayer
    })
  )

/** Reads a plan with AppConfig at hand, applies it to the store and prints the report. */
const run = <E, R>(
  configFile: string | undefined,
  dryRun: boolean,
  plan: Effect.Effect<ImportPlan, E, R | AppConfig>
) =>
  Effect.gen(function* () {
    const file = configFile === undefined ? undefined : yield* loadConfigFile(configFile)
    return yield* Effect.gen(function* () {
      const read = yield* plan
      const report = yield* applyPlan(read, { dryRun }).pipe(Effect.provide(storeFor(dryRun)))
      yield* Console.log(formatReport(report))
      if (!dryRun && report.store === "sqlite" && report.outcomes.some((o) => o.action !== "unchanged")) {
        yield* Console.log(
          "note: a `tidepool serve` already running on this SQLite store reads the changes when it restarts"
        )
      }
    }).pipe(Effect.provide(runtimeLayer(file)))
  })

/**
 * Supavisor's key, to decrypt its users' passwords: SUPAVISOR_VAULT_ENC_KEY when Tidepool gets a key
 * of its own, else VAULT_ENC_KEY (one key for both, the usual move).
 */
const supavisorKey = Effect.gen(function* () {
  const config = yield* AppConfig
  const own = process.env.SUPAVISOR_VAULT_ENC_KEY
  const text = own !== undefined && own.trim() !== "" ? own : config.vaultEncKey && Redacted.value(config.vaultEncKey)
  if (text === undefined) {
    return yield* new ImportError({
      message:
        "Supavisor's VAULT_ENC_KEY is needed to decrypt its users' passwords: set VAULT_ENC_KEY to it (or SUPAVISOR_VAULT_ENC_KEY, when Tidepool's VAULT_ENC_KEY is another key)"
    })
  }
  const key = parseVaultKey(text)
  if (!Buffer.isBuffer(key)) return yield* new ImportError({ message: `Supavisor's key: ${key.message}` })
  return key
})

export interface SupavisorImportOptions {
  readonly databaseUrl: string
  readonly schema?: string | undefined
  readonly dryRun: boolean
  readonly configFile?: string | undefined
}

/** `tidepool import supavisor --database-url URL [--schema S] [--dry-run]`. */
export const importSupavisor = (options: SupavisorImportOptions) =>
  run(
    options.configFile,
    options.dryRun,
    Effect.flatMap(supavisorKey, (vaultKey) =>
      supavisorPlan({ databaseUrl: options.databaseUrl, schema: options.schema, vaultKey })
    )
  )

export interface PgbouncerImportOptions {
  readonly ini: string
  readonly authFile?: string | undefined
  readonly groupBy: "database" | "host"
  readonly dryRun: boolean
  readonly configFile?: string | undefined
}

/** `tidepool import pgbouncer --ini FILE [--auth-file FILE] [--group-by database|host] [--dry-run]`. */
export const importPgbouncer = (options: PgbouncerImportOptions) =>
  run(
    options.configFile,
    options.dryRun,
    pgbouncerPlan({ ini: options.ini, authFile: options.authFile, tenantPerDatabase: options.groupBy === "database" })
  )
