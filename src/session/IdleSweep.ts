import { Effect, Layer, Schedule } from "effect"
import { TenantRegistry } from "../tenants/index.ts"
import { SessionRegistry } from "./SessionRegistry.ts"

/**
 * Tenants' `client_idle_timeout`: once a second, ends the clients that have sent nothing for that
 * long while outside any transaction with no query running. A sweep rather than a timer per client:
 * nothing on the relay's path, no timer to re-arm per message, and one pass over a map is cheap even
 * with 100k clients. A client is closed between the timeout and the timeout plus a second.
 */
export const IdleSweep = Layer.effectDiscard(
  Effect.gen(function* () {
    const sessions = yield* SessionRegistry
    const tenants = yield* TenantRegistry
    const timeoutOf = (id: string) => tenants.get(id)?.client_idle_timeout ?? 0
    const sweep = Effect.suspend(() => {
      const ended = sessions.sweepIdle(Date.now(), timeoutOf)
      return ended > 0 ? Effect.logInfo(`client_idle_timeout closed ${ended} idle client(s)`) : Effect.void
    })
    yield* Effect.forkScoped(Effect.repeat(sweep, Schedule.spaced("1 second")))
  })
)
