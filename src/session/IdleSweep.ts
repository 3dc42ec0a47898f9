import { Effect, Layer } from "effect"
import { TenantRegistry } from "../tenants/index.ts"
import { SessionRegistry } from "./SessionRegistry.ts"

const SWEEP_MS = 1000

/**
 * Tenants' `client_idle_timeout`: once a second, ends the clients that have sent nothing for that
 * long while outside any transaction with no query running. A sweep rather than a timer per client:
 * nothing on the relay's path, no timer to re-arm per message, and one pass over a map is cheap even
 * with 100k clients. A client is closed between the timeout and the timeout plus a second.
 *
 * A plain unref'd interval, not a fiber: an idle process wakes once a second for it and runs no
 * Effect machinery there (docs/benchmarks.md, idle CPU); an Effect runs only to log what it closed.
 */
export const IdleSweep = Layer.effectDiscard(
  Effect.gen(function* () {
    const sessions = yield* SessionRegistry
    const tenants = yield* TenantRegistry
    const services = yield* Effect.context<never>()
    const log = Effect.runForkWith(services)
    const timeoutOf = (id: string) => tenants.get(id)?.client_idle_timeout ?? 0
    // Most nodes set no client_idle_timeout at all: then the pass over every session is skipped.
    // Safe to resume later: a session's idle time is measured from the last change it shows then.
    const anyTimeout = () => {
      for (const tenant of tenants.all()) if ((tenant.client_idle_timeout ?? 0) > 0) return true
      return false
    }
    const sweep = () => {
      try {
        if (!anyTimeout()) return
        const ended = sessions.sweepIdle(Date.now(), timeoutOf)
        if (ended > 0) log(Effect.logInfo(`client_idle_timeout closed ${ended} idle client(s)`))
      } catch (cause) {
        // A timer's exception would end the process; one failed pass must not.
        log(Effect.logError("idle sweep failed", cause))
      }
    }
    yield* Effect.acquireRelease(
      Effect.sync(() => setInterval(sweep, SWEEP_MS).unref()),
      (timer) => Effect.sync(() => clearInterval(timer))
    )
  })
)
