import { Context, Layer } from "effect"
import type { Tenant } from "../config/index.ts"

/**
 * The tenants this node serves, by external_id and SNI hostname. For now they come from the config
 * file; the tenant store (SQLite/PostgreSQL) will feed the same interface.
 */
export class TenantRegistry extends Context.Tag("tidepool/TenantRegistry")<
  TenantRegistry,
  {
    readonly get: (externalId: string) => Tenant | undefined
    readonly bySni: (hostname: string) => Tenant | undefined
    readonly all: () => ReadonlyArray<Tenant>
  }
>() {
  static readonly fromTenants = (tenants: ReadonlyArray<Tenant>): Layer.Layer<TenantRegistry> =>
    Layer.sync(TenantRegistry, () => {
      const byId = new Map(tenants.map((t) => [t.external_id, t]))
      const bySni = new Map(
        tenants.flatMap((t) => (t.sni_hostname !== undefined ? [[t.sni_hostname.toLowerCase(), t] as const] : []))
      )
      return {
        get: (id) => byId.get(id),
        bySni: (host) => bySni.get(host.toLowerCase()),
        all: () => [...byId.values()]
      }
    })
}
