import { writeFileSync } from "node:fs"
import { stringify } from "yaml"

export interface ConfigUser {
  readonly db_user: string
  readonly db_password: string
  readonly pool_size?: number
  readonly max_clients?: number
  readonly mode_type?: "transaction" | "session"
}

export interface ConfigTenant {
  readonly external_id: string
  readonly db_host: string
  readonly db_port: number
  readonly db_database?: string
  readonly users: ReadonlyArray<ConfigUser>
  readonly [field: string]: unknown
}

/** Writes a `tidepool serve --config` file (docs/configuration.md) listing `tenants`; returns its path. */
export const writeConfig = (file: string, tenants: ReadonlyArray<ConfigTenant>): string => {
  writeFileSync(file, stringify({ tenants: tenants.map((t) => ({ db_database: "postgres", ...t })) }))
  return file
}
