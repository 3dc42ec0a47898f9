import { Console, Effect } from "effect"
import { checkConfigFile } from "../config/index.ts"

/** `tidepool config check FILE`: exit 0 and a summary, or exit 1 and every problem. */
export const configCheck = (file: string) =>
  checkConfigFile(file).pipe(
    Effect.flatMap((summary) => Console.log(`${file}: OK\n${summary}`)),
    Effect.catchTag("ConfigError", (e) =>
      Effect.zipRight(
        Console.error(e.message),
        Effect.sync(() => process.exit(1))
      )
    )
  )
