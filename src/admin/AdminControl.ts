import { Deferred, Effect } from "effect"

/**
 * What the admin console asks of the process as a whole. SHUTDOWN completes `shutdownRequested`;
 * the listeners start their graceful shutdown on it and `tidepool serve` then exits.
 */
export class AdminControl extends Effect.Service<AdminControl>()("tidepool/AdminControl", {
  effect: Effect.gen(function* () {
    const requested = yield* Deferred.make<void>()
    return {
      requestShutdown: Deferred.succeed(requested, undefined).pipe(Effect.asVoid),
      shutdownRequested: Deferred.await(requested)
    } as const
  })
}) {}
