import { Context, Deferred, Effect, Layer } from "effect"

/**
 * What the admin console asks of the process as a whole. SHUTDOWN completes `shutdownRequested`;
 * the listeners start their graceful shutdown on it and `tidepool serve` then exits.
 */
export class AdminControl extends Context.Service<AdminControl>()("tidepool/AdminControl", {
  make: Effect.gen(function* () {
    const requested = yield* Deferred.make<void>()
    return {
      requestShutdown: Deferred.succeed(requested, undefined).pipe(Effect.asVoid),
      shutdownRequested: Deferred.await(requested)
    } as const
  })
}) {
  static readonly layer = Layer.effect(this, this.make)
}
