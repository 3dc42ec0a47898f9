import { type Context, Deferred, Effect, Exit, Fiber, Scope } from "effect"
import { describe, expect, it } from "vitest"
import { AUTH_FAILURES, type AuthAttempt, CircuitBreaker } from "../../../src/auth/index.ts"

/*
 * Password checks count from their start: at most AUTH_FAILURES.failures run at once per key, the
 * rest wait for a verdict. Fibers stand in for concurrent logins.
 */

const run = <A, E>(effect: Effect.Effect<A, E, CircuitBreaker>) =>
  Effect.runPromise(Effect.provide(effect, CircuitBreaker.layer))

/** Starts `n` attempts of (tenant, address), each in a scope of its own that the test closes. */
const startMany = (breaker: Context.Service.Shape<typeof CircuitBreaker>, n: number) =>
  Effect.forEach(Array.from({ length: n }), () =>
    Effect.gen(function* () {
      const scope = yield* Scope.make()
      const attempt = yield* Scope.provide(breaker.attempt("acme", "10.0.0.1"), scope)
      if (attempt === undefined) throw new Error("blocked too early")
      return { attempt, close: Scope.close(scope, Exit.void) }
    })
  )

/** An attempt in a fiber of its own: it may wait; its outcome (or "blocked") when it starts. */
const waiting = (breaker: Context.Service.Shape<typeof CircuitBreaker>) =>
  Effect.gen(function* () {
    const started = yield* Deferred.make<AuthAttempt | "blocked">()
    const fiber = yield* Effect.forkChild(
      Effect.scoped(
        Effect.flatMap(breaker.attempt("acme", "10.0.0.1"), (a) =>
          Effect.andThen(Deferred.succeed(started, a ?? "blocked"), Effect.never)
        )
      )
    )
    return { started, fiber }
  })

/** Its outcome once it starts; a deadline turns a waiter that is never woken into a failure. */
const startedOf = (started: Deferred.Deferred<AuthAttempt | "blocked">) =>
  Deferred.await(started).pipe(
    Effect.timeoutOrElse({
      duration: "5 seconds",
      orElse: () => Effect.fail(new Error("the waiting attempt was never woken"))
    })
  )

describe("CircuitBreaker attempts", () => {
  it("lets a waiting attempt start when a running one succeeds, and refuses it once failures trip the key", () =>
    run(
      Effect.gen(function* () {
        const breaker = yield* CircuitBreaker
        const running = yield* startMany(breaker, AUTH_FAILURES.failures)
        const next = yield* waiting(breaker)
        expect(yield* Deferred.isDone(next.started)).toBe(false)
        yield* running[0]!.attempt.succeeded
        expect(yield* startedOf(next.started)).not.toBe("blocked")

        const last = yield* waiting(breaker)
        expect(yield* Deferred.isDone(last.started)).toBe(false)
        // Nine more failures plus the one that started in place of the success: the key trips.
        let tripped = false
        for (const { attempt } of running.slice(1)) tripped = yield* attempt.failed
        expect(tripped).toBe(false)
        const started = (yield* startedOf(next.started)) as AuthAttempt
        expect(yield* started.failed).toBe(true)
        expect(yield* startedOf(last.started)).toBe("blocked")
        expect(yield* breaker.isAddressBlocked("acme", "10.0.0.1")).toBe(true)
        yield* Fiber.interrupt(next.fiber)
        yield* Fiber.interrupt(last.fiber)
      })
    ))

  it("stops counting an attempt that ends without a verdict, and frees its place for a waiter", () =>
    run(
      Effect.gen(function* () {
        const breaker = yield* CircuitBreaker
        const running = yield* startMany(breaker, AUTH_FAILURES.failures)
        const next = yield* waiting(breaker)
        yield* running[0]!.close
        const started = yield* startedOf(next.started)
        expect(started).not.toBe("blocked")
        // Ten verdicts-less ends leave nothing behind: ten fresh failures are needed to trip.
        for (const { close } of running.slice(1)) yield* close
        yield* Fiber.interrupt(next.fiber)
        const again = yield* startMany(breaker, AUTH_FAILURES.failures)
        const trips: Array<boolean> = []
        for (const { attempt } of again) trips.push(yield* attempt.failed)
        expect(trips.filter((t) => t)).toHaveLength(1)
        expect(trips.at(-1)).toBe(true)
      })
    ))

  it("wakes the waiters of a key whose block is cleared", () =>
    run(
      Effect.gen(function* () {
        const breaker = yield* CircuitBreaker
        const running = yield* startMany(breaker, AUTH_FAILURES.failures)
        const next = yield* waiting(breaker)
        yield* breaker.clear("acme", ["10.0.0.1"])
        // Clearing forgets failures, not checks under way: still no room until one ends.
        expect(yield* Deferred.isDone(next.started)).toBe(false)
        yield* running[0]!.attempt.failed
        expect(yield* Deferred.isDone(next.started)).toBe(false)
        for (const { close } of running) yield* close
        expect(yield* startedOf(next.started)).not.toBe("blocked")
        yield* Fiber.interrupt(next.fiber)
      })
    ))
})
