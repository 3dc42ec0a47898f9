import { Data } from "effect"
import type { Tenant } from "../config/index.ts"

/**
 * What an importer read from another pooler, before anything is written: the tenants it maps to
 * (passwords already decrypted, as the config file's tenants) and every source field it could not
 * map. An importer never drops a field silently: a field is either in a tenant or in `unmapped`.
 */
export interface ImportPlan {
  /** Which pooler the plan came from, for the report: "supavisor" or "pgbouncer". */
  readonly source: string
  readonly tenants: ReadonlyArray<Tenant>
  readonly unmapped: ReadonlyArray<Unmapped>
}

/** One source field that has no place in Tidepool, with what the operator can do instead. */
export interface Unmapped {
  /** Where it was found, as the source names it: `tenant acme`, `[pgbouncer]`, `[databases] app`. */
  readonly source: string
  readonly field: string
  readonly reason: string
}

/** The source cannot be read (file missing, database unreachable, unknown schema, undecryptable secret). */
export class ImportError extends Data.TaggedError("ImportError")<{ readonly message: string }> {}
