export { TenantRegistry } from "./TenantRegistry.ts"
