import { Context, Layer } from "effect"
import type { Tenant } from "../config/index.ts"

/**
 * The tenants this node serves, by external_id and SNI hostname: synchronous reads for the login
 * path. At run time `Tenants.registry` provides it from the tenant cache (kept in line with the
 * store); `fromTenants` is a fixed set, for tests of components that need nothing else.
 */
export class TenantRegistry extends Context.Service<
  TenantRegistry,
  {
    readonly get: (externalId: string) => Tenant | undefined
    readonly bySni: (hostname: string) => Tenant | undefined
    readonly all: () => ReadonlyArray<Tenant>
  }
>()("tidepool/TenantRegistry") {
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
