import { Console, Effect, Layer } from "effect"
import {
  AppConfig,
  type AppConfigShape,
  type ConfigCheckSummary,
  ConfigError,
  checkConfigFile
} from "../config/index.ts"
import { DownstreamTls, UpstreamTls } from "../tls/index.ts"

/** Reads the TLS files the settings name, as `serve` will: unreadable or mismatched files are problems. */
const checkTlsFiles = (file: string, settings: AppConfigShape) =>
  Effect.scoped(
    Layer.build(
      Layer.merge(DownstreamTls.layer, UpstreamTls.layer).pipe(Layer.provide(Layer.succeed(AppConfig, settings)))
    )
  ).pipe(Effect.mapError((error) => new ConfigError({ file, problems: error.problems })))

/**
 * `serve` writes every tenant of the file to the tenant store with its users' passwords encrypted,
 * and refuses to start without the key. Only a warning here: the key is a deployment secret, often
 * absent where config files are checked (CI), and the check is about the file.
 */
export const vaultKeyWarning = (summary: ConfigCheckSummary): string | undefined => {
  if (summary.settings.vaultEncKey !== undefined || summary.tenants.length === 0) return undefined
  const users = summary.tenants.reduce((n, t) => n + t.users.length, 0)
  return [
    `warning: VAULT_ENC_KEY is not set, and \`tidepool serve\` will refuse to start with this file: it stores`,
    `  the passwords of its ${users} user(s) encrypted with that key. Make a key once (\`openssl rand -base64 32\`),`,
    "  keep it with the tenant store's backups, and set VAULT_ENC_KEY to it wherever Tidepool runs (every",
    "  restart and every node sharing the store needs the same key)."
  ].join("\n")
}

/** `tidepool config check FILE`: exit 0 and a summary (and warnings), or exit 1 and every problem. */
export const configCheck = (file: string) =>
  checkConfigFile(file).pipe(
    Effect.tap((summary) => checkTlsFiles(file, summary.settings)),
    Effect.flatMap((summary) =>
      Effect.andThen(
        Console.log(`${file}: OK\n${summary}`),
        Effect.suspend(() => {
          const warning = vaultKeyWarning(summary)
          return warning === undefined ? Effect.void : Console.error(warning)
        })
      )
    ),
    Effect.catchTag("ConfigError", (e) =>
      Effect.andThen(
        Console.error(e.message),
        Effect.sync(() => process.exit(1))
      )
    )
  )
