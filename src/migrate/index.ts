export { applyPlan, differences, formatReport, type ImportReport, type TenantOutcome } from "./apply.ts"
export { ImportError, type ImportPlan, type Unmapped } from "./ImportPlan.ts"
export { type PgbouncerOptions, pgbouncerPlan } from "./pgbouncer.ts"
export { type SupavisorOptions, supavisorPlan } from "./supavisor.ts"
