import * as path from "node:path"
import { Effect, Layer, Redacted } from "effect"
import { AppConfig } from "../config/index.ts"
import { postgresStore, sqliteStore, TenantStoreError } from "./TenantStore.ts"
import { parseVaultKey, Vault } from "./Vault.ts"

/**
 * The store AppConfig asks for: PostgreSQL when DATABASE_URL is set (several nodes share it), else
 * SQLite at `<TIDEPOOL_DATA_DIR>/tidepool.db`. The vault key is checked here; whether it is needed
 * is the store's business (any stored password needs it).
 */
export const tenantStoreLayer = Layer.unwrap(
  Effect.gen(function* () {
    const config = yield* AppConfig
    const key = config.vaultEncKey === undefined ? undefined : parseVaultKey(Redacted.value(config.vaultEncKey))
    if (key !== undefined && !Buffer.isBuffer(key)) return yield* new TenantStoreError({ message: key.message })
    const vault = new Vault(key)
    return config.databaseUrl !== undefined
      ? postgresStore(config.databaseUrl, vault)
      : sqliteStore(path.resolve(config.dataDir, "tidepool.db"), vault)
  })
)
