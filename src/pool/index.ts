export { PoolRegistry } from "./PoolRegistry.ts"
export { type CheckoutCallback, makeTenantPool, type PoolMode, type PoolSettings, TenantPool } from "./TenantPool.ts"
