export { PoolRegistry } from "./PoolRegistry.ts"
export {
  type CheckoutCallback,
  makeTenantPool,
  PoolCounters,
  type PoolMode,
  type PoolSettings,
  TenantPool
} from "./TenantPool.ts"
