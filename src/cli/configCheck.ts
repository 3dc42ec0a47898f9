import { Console, Effect, Layer } from "effect"
import { AppConfig, ConfigError, checkConfigFile } from "../config/index.ts"
import { DownstreamTls, UpstreamTls } from "../tls/index.ts"

/** Reads the TLS files the settings name, as `serve` will: unreadable or mismatched files are problems. */
const checkTlsFiles = (file: string, settings: AppConfig["Type"]) =>
  Effect.scoped(
    Layer.build(
      Layer.merge(DownstreamTls.Default, UpstreamTls.Default).pipe(Layer.provide(Layer.succeed(AppConfig, settings)))
    )
  ).pipe(Effect.mapError((error) => new ConfigError({ file, problems: error.problems })))

/** `tidepool config check FILE`: exit 0 and a summary, or exit 1 and every problem. */
export const configCheck = (file: string) =>
  checkConfigFile(file).pipe(
    Effect.tap((summary) => checkTlsFiles(file, summary.settings)),
    Effect.flatMap((summary) => Console.log(`${file}: OK\n${summary}`)),
    Effect.catchTag("ConfigError", (e) =>
      Effect.zipRight(
        Console.error(e.message),
        Effect.sync(() => process.exit(1))
      )
    )
  )
