#!/usr/bin/env node
import type { Effect as EffectTypes } from "effect"
import { relaunchWithCappedYoungGeneration } from "./telemetry/YoungGeneration.ts"

// First, before anything else is loaded: a serving command re-executes itself here with V8's young
// generation capped (src/telemetry/YoungGeneration.ts, docs/operations.md#memory-after-a-burst). The
// rest is imported only after it, so the process that is replaced has not spent the CLI's start-up
// (about 1 s of CPU for Effect and the pooler's modules) for nothing.
relaunchWithCappedYoungGeneration()

const { parseArgs } = await import("node:util")
const NodeRuntime = await import("@effect/platform-node/NodeRuntime")
const { Cause, Console, Effect, Exit } = await import("effect")
const { configCheck } = await import("./cli/configCheck.ts")
const { demo } = await import("./cli/demo.ts")
const { importPgbouncer, importSupavisor } = await import("./cli/import.ts")
const { serve } = await import("./cli/serve.ts")
const { VERSION } = await import("./version.ts")

const HELP = `tidepool ${VERSION} — multi-tenant PostgreSQL connection pooler

Usage:
  tidepool serve [--config FILE]   run the pooler (config file also from TIDEPOOL_CONFIG)
  tidepool demo                    run the pooler with an embedded PostgreSQL as tenant "demo"
  tidepool config check FILE       validate a config file and list every problem
  tidepool import supavisor --database-url URL [--schema NAME] [--dry-run] [--config FILE]
                                   copy Supavisor's tenants and users (passwords decrypted with
                                   VAULT_ENC_KEY, or SUPAVISOR_VAULT_ENC_KEY) into Tidepool's store
                                   (DATABASE_URL, else TIDEPOOL_DATA_DIR/tidepool.db); schema
                                   _supavisor by default; prints created/updated/unchanged and every
                                   field it could not map; --dry-run writes nothing
  tidepool import pgbouncer --ini FILE [--auth-file FILE] [--group-by database|host] [--dry-run]
                                   the same from a pgbouncer.ini (one tenant per database entry, or
                                   per host:port with --group-by host)
  tidepool --help | --version

Ports: session mode PROXY_PORT_SESSION (5432), transaction mode PROXY_PORT_TRANSACTION (6543),
HTTP API PORT (4000). Every setting: docs/configuration.md. Moving from Supavisor or PgBouncer:
docs/migrating.md.
`

const usage = (message: string) =>
  Effect.andThen(
    Console.error(`${message}\n\n${HELP}`),
    Effect.sync(() => process.exit(2))
  )

const main = Effect.suspend((): EffectTypes.Effect<void, unknown> => {
  const { values, positionals } = parseArgs({
    args: process.argv.slice(2),
    allowPositionals: true,
    strict: false,
    options: {
      config: { type: "string", short: "c" },
      "database-url": { type: "string" },
      schema: { type: "string" },
      "dry-run": { type: "boolean" },
      ini: { type: "string" },
      "auth-file": { type: "string" },
      "group-by": { type: "string" },
      help: { type: "boolean", short: "h" },
      version: { type: "boolean", short: "v" }
    }
  })
  if (values.help) return Console.log(HELP)
  if (values.version) return Console.log(VERSION)
  const [command, ...rest] = positionals
  const configFile = typeof values.config === "string" ? values.config : process.env.TIDEPOOL_CONFIG
  switch (command) {
    case "serve":
      return serve(configFile)
    case "demo":
      return demo
    case "config":
      if (rest[0] === "check" && rest[1] !== undefined) return configCheck(rest[1])
      return usage("usage: tidepool config check FILE")
    case "import": {
      const text = (name: string) => (typeof values[name] === "string" ? (values[name] as string) : undefined)
      const dryRun = values["dry-run"] === true
      if (rest[0] === "supavisor") {
        const databaseUrl = text("database-url")
        if (databaseUrl === undefined) return usage("usage: tidepool import supavisor --database-url URL [--dry-run]")
        return importSupavisor({ databaseUrl, schema: text("schema"), dryRun, configFile })
      }
      if (rest[0] === "pgbouncer") {
        const ini = text("ini")
        const groupBy = text("group-by") ?? "database"
        if (ini === undefined || (groupBy !== "database" && groupBy !== "host")) {
          return usage(
            "usage: tidepool import pgbouncer --ini FILE [--auth-file FILE] [--group-by database|host] [--dry-run]"
          )
        }
        return importPgbouncer({ ini, authFile: text("auth-file"), groupBy, dryRun, configFile })
      }
      return usage("usage: tidepool import supavisor|pgbouncer …")
    }
    case undefined:
      return Console.log(HELP)
    default:
      return usage(`unknown command: ${command}`)
  }
})

/**
 * Whatever stopped a command (an invalid setting, a taken port, a bug) is said in one line on stderr
 * with exit status 1 — never a silent exit, never a stack trace for an operator's mistake.
 */
const reported = main.pipe(
  Effect.catchCause((cause) => {
    if (Cause.hasInterruptsOnly(cause)) return Effect.void
    const error = Cause.squash(cause)
    const text =
      error instanceof Error || (typeof error === "object" && error !== null && "message" in error)
        ? String((error as { message: unknown }).message)
        : String(error)
    return Effect.andThen(
      Console.error(`tidepool: ${text}`),
      Effect.sync(() => process.exit(1))
    )
  })
)

NodeRuntime.runMain(reported, {
  disableErrorReporting: true,
  // A signal's graceful shutdown is a normal stop and exits 0, as `serve` logs it (docs/operations.md);
  // Effect 4's default teardown would exit 130 for the interruption.
  teardown: (exit, onExit) => onExit(Exit.isSuccess(exit) || Cause.hasInterruptsOnly(exit.cause) ? 0 : 1)
})
