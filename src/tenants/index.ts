export { banOf, isBanned, revokedSince } from "./Ban.ts"
export { TenantRegistry } from "./TenantRegistry.ts"
export {
  postgresStore,
  type StoredTenant,
  sqliteStore,
  TenantStore,
  TenantStoreError,
  type TenantStoreShape
} from "./TenantStore.ts"
export { type TenantChange, type TenantListener, Tenants } from "./Tenants.ts"
export { tenantStoreLayer } from "./tenantStoreLayer.ts"
export { decryptCloak, parseVaultKey, SUPAVISOR_CLOAK_TAG, Vault, VaultError } from "./Vault.ts"
