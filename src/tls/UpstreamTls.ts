import { readFileSync } from "node:fs"
import { Context, Effect, Layer } from "effect"
import { AppConfig, ConfigError, settings, type Tenant } from "../config/index.ts"
import type { UpstreamTlsOptions } from "../upstream/index.ts"

/**
 * How each tenant's server connections use TLS: `upstream_ssl` asks for it, `upstream_verify: peer`
 * verifies the chain and the host name against the tenant's `upstream_tls_ca`, or else the
 * `GLOBAL_UPSTREAM_CA_PATH` bundle read at start-up.
 */
export class UpstreamTls extends Context.Service<UpstreamTls>()("tidepool/UpstreamTls", {
  make: Effect.gen(function* () {
    const config = yield* AppConfig
    let globalCa: string | undefined
    if (config.upstreamCaPath !== "") {
      const pems: Array<string> = []
      for (const file of config.upstreamCaPath.split(",")) {
        try {
          pems.push(readFileSync(file, "utf8"))
        } catch (error) {
          return yield* new ConfigError({
            problems: [
              {
                path: settings.upstreamCaPath.env,
                reason: `cannot read ${file}: ${(error as NodeJS.ErrnoException).code ?? error}`
              }
            ]
          })
        }
      }
      globalCa = pems.join("\n")
      if (!globalCa.includes("-----BEGIN CERTIFICATE-----")) {
        return yield* new ConfigError({
          problems: [
            { path: settings.upstreamCaPath.env, reason: "expected PEM certificates (-----BEGIN CERTIFICATE-----)" }
          ]
        })
      }
    }
    return {
      optionsFor: (tenant: Tenant): UpstreamTlsOptions | undefined =>
        tenant.upstream_ssl
          ? { verify: tenant.upstream_verify === "peer", ca: tenant.upstream_tls_ca ?? globalCa }
          : undefined
    }
  })
}) {
  static readonly layer = Layer.effect(this, this.make)
}
