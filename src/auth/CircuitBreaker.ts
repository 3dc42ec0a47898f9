import { Clock, Context, Effect, Layer, type Scope } from "effect"

/** A sliding-window failure counter that blocks a key for a while once it trips. */
export interface BreakerRule {
  /** Failures within `windowMs` that trip the breaker. */
  readonly failures: number
  readonly windowMs: number
  /** How long a tripped key stays blocked. */
  readonly blockMs: number
}

/** docs/authentication.md: 10 wrong passwords per (tenant, client IP) in 150 s block that pair for 120 s. */
export const AUTH_FAILURES: BreakerRule = { failures: 10, windowMs: 150_000, blockMs: 120_000 }
/** docs/authentication.md: 5 failed auth_query lookups per tenant in 300 s block the tenant's logins for 30 s. */
export const AUTH_QUERY_FAILURES: BreakerRule = { failures: 5, windowMs: 300_000, blockMs: 30_000 }

export interface Ban {
  readonly address: string
  /** Unix time in milliseconds. */
  readonly until: number
}

/** A key's recent failures, its checks under way, and the attempts waiting for room among them. */
interface KeyState {
  failures: Array<number>
  running: number
  /** Made when an attempt first waits: most keys (one refused login per address) never have one. */
  waiting: Set<() => void> | undefined
}

class Breaker {
  private readonly keys = new Map<string, KeyState>()
  private readonly blocked = new Map<string, number>()

  constructor(
    private readonly rule: BreakerRule,
    private readonly now: () => number
  ) {}

  isBlocked(key: string): boolean {
    const until = this.blocked.get(key)
    if (until === undefined) return false
    if (until > this.now()) return true
    this.blocked.delete(key)
    return false
  }

  private state(key: string): KeyState {
    let state = this.keys.get(key)
    if (state === undefined) {
      state = { failures: [], running: 0, waiting: undefined }
      this.keys.set(key, state)
    }
    return state
  }

  private recentFailures(state: KeyState): number {
    const since = this.now() - this.rule.windowMs
    if (state.failures.length > 0 && state.failures[0]! <= since)
      state.failures = state.failures.filter((t) => t > since)
    return state.failures.length
  }

  /**
   * Starts a check for `key` when failures and checks under way leave room for one more (so no more
   * checks can run than the failures that trip the breaker); "full" when they do not yet.
   */
  tryBegin(key: string): "started" | "blocked" | "full" {
    if (this.isBlocked(key)) return "blocked"
    const state = this.state(key)
    if (this.recentFailures(state) + state.running >= this.rule.failures) return "full"
    state.running++
    return "started"
  }

  /** Calls `wake` when a check of `key` ends or the key is cleared; returns how to stop waiting. */
  waitForRoom(key: string, wake: () => void): () => void {
    const state = this.state(key)
    if (state.waiting === undefined) state.waiting = new Set()
    state.waiting.add(wake)
    return () => {
      state.waiting?.delete(wake)
      this.forgetIfIdle(key, state)
    }
  }

  /** A check begun with `tryBegin` ended; a failed one counts, and true means it tripped the breaker. */
  end(key: string, outcome: "succeeded" | "failed" | "abandoned"): boolean {
    const state = this.state(key)
    state.running--
    const tripped = outcome === "failed" ? this.fail(key) : false
    if (outcome === "succeeded") state.failures = []
    this.wake(key)
    return tripped
  }

  /** Records a failure that was not a check (a refusal before one); true when it trips the breaker. */
  fail(key: string): boolean {
    const state = this.state(key)
    this.recentFailures(state)
    state.failures.push(this.now())
    if (state.failures.length < this.rule.failures) return false
    state.failures = []
    this.blocked.set(key, this.now() + this.rule.blockMs)
    // Attempts waiting for room learn that the address is blocked now.
    this.wake(key)
    return true
  }

  succeed(key: string): void {
    const state = this.keys.get(key)
    if (state === undefined) return
    state.failures = []
    this.wake(key)
  }

  clear(key: string): void {
    const state = this.keys.get(key)
    if (state !== undefined) state.failures = []
    this.blocked.delete(key)
    this.wake(key)
  }

  private wake(key: string): void {
    const state = this.keys.get(key)
    if (state === undefined) return
    // Every waiter tries again, oldest first; those that find no room wait again.
    if (state.waiting !== undefined && state.waiting.size > 0) for (const wake of [...state.waiting]) wake()
    this.forgetIfIdle(key, state)
  }

  private forgetIfIdle(key: string, state: KeyState): void {
    if (state.running === 0 && (state.waiting?.size ?? 0) === 0 && state.failures.length === 0) this.keys.delete(key)
  }

  /** Live blocks whose key starts with `prefix`. */
  entries(prefix: string): Array<[string, number]> {
    const now = this.now()
    const out: Array<[string, number]> = []
    for (const [key, until] of this.blocked) {
      if (until <= now) this.blocked.delete(key)
      else if (key.startsWith(prefix)) out.push([key.slice(prefix.length), until])
    }
    return out
  }

  /** Drops failure histories that can no longer trip anything, so probing from many addresses stays bounded. */
  sweep(): void {
    const now = this.now()
    for (const [key, state] of this.keys) {
      this.recentFailures(state)
      this.forgetIfIdle(key, state)
    }
    for (const [key, until] of this.blocked) if (until <= now) this.blocked.delete(key)
  }
}

const addressKey = (tenant: string, address: string) => `${tenant}\u0000${address}`

/** docs/errors.md: the message of an address blocked by the authentication breaker. */
export const ADDRESS_BLOCKED = "too many authentication failures, new connections are temporarily blocked"

/**
 * A password check under way for one (tenant, address). It counts toward the breaker from its start:
 * as a failure if it fails, not at all once it succeeds or ends without a verdict.
 */
export interface AuthAttempt {
  /** The client proved its password: the address's failures are forgotten. */
  readonly succeeded: Effect.Effect<void>
  /** A wrong password (or a role the database does not know); true when it trips the breaker. */
  readonly failed: Effect.Effect<boolean>
}

/**
 * An `AuthAttempt` that its holder ends itself, with no scope: `end` once with a verdict, and
 * `end("abandoned")` whatever happens (a no-op once ended). The login path uses it through
 * `CircuitBreaker.begin`: a scope, its finalizer and an uninterruptible region per login cost more
 * than the check they guard.
 */
export class Check implements AuthAttempt {
  private open = true

  constructor(
    private readonly breaker: Breaker,
    private readonly key: string
  ) {}

  /** Ends the check (once; false afterwards); true when a failure tripped the breaker. */
  end(outcome: "succeeded" | "failed" | "abandoned"): boolean {
    if (!this.open) return false
    this.open = false
    return this.breaker.end(this.key, outcome)
  }

  get succeeded(): Effect.Effect<void> {
    return Effect.sync(() => {
      this.end("succeeded")
    })
  }

  get failed(): Effect.Effect<boolean> {
    return Effect.sync(() => this.end("failed"))
  }
}

/**
 * Authentication circuit breakers (docs/authentication.md). Per (tenant, client address): too many wrong
 * passwords block the address (`ECIRCUITBREAKER`), listed and cleared through the `network_bans`
 * API. A password check counts from the moment it starts, so concurrent attempts cannot outrun the
 * count: at most `failures` checks run at once per key, later ones wait for a verdict (a success
 * frees room at once; failures fill it until the key trips and the waiters are refused). Per tenant:
 * repeated `auth_query` failures block the tenant's logins briefly so a broken upstream is not
 * hammered. State is per node and in memory, as in Supavisor.
 */
export class CircuitBreaker extends Context.Service<CircuitBreaker>()("tidepool/CircuitBreaker", {
  make: Effect.gen(function* () {
    const clock = yield* Clock.Clock
    const now = () => clock.currentTimeMillisUnsafe()
    const auth = new Breaker(AUTH_FAILURES, now)
    const authQuery = new Breaker(AUTH_QUERY_FAILURES, now)
    yield* Effect.forkScoped(
      Effect.sync(() => {
        auth.sweep()
        authQuery.sweep()
      }).pipe(Effect.delay("60 seconds"), Effect.forever)
    )

    const waitForRoom = (key: string) =>
      Effect.callback<void>((resume) => {
        const stop = auth.waitForRoom(key, () => {
          stop()
          resume(Effect.void)
        })
        return Effect.sync(stop)
      })

    /**
     * Starts a password check from `address` to `tenant` now if the key has room: the check, "blocked"
     * when the address is blocked, "full" when it must wait (`waitForRoom`, then try again). Checked
     * and taken in one synchronous step, so no other login can slip in between. The caller ends the
     * check, and must make sure it does whatever happens (an uninterruptible region from here to
     * its `onExit`).
     */
    const tryBegin = (tenant: string, address: string): Check | "blocked" | "full" => {
      const key = addressKey(tenant, address)
      const started = auth.tryBegin(key)
      return started === "started" ? new Check(auth, key) : started
    }

    /**
     * Starts a password check from `address` to `tenant`, waiting while the key has no room;
     * undefined when the address is blocked. The check stops counting when the scope closes unless
     * it ended with `succeeded` or `failed` (the client left, broke the protocol, or the upstream
     * failed: no password was judged).
     */
    const attempt = (tenant: string, address: string): Effect.Effect<AuthAttempt | undefined, never, Scope.Scope> =>
      Effect.uninterruptibleMask((restore) =>
        Effect.gen(function* () {
          for (;;) {
            const began = tryBegin(tenant, address)
            if (began === "blocked") return undefined
            if (began !== "full") {
              yield* Effect.addFinalizer(() => Effect.sync(() => began.end("abandoned")))
              return began
            }
            yield* restore(waitForRoom(addressKey(tenant, address)))
          }
        })
      )

    return {
      attempt,
      tryBegin,
      /** Waits until a check of (tenant, address) ends or the key is cleared (`tryBegin` said "full"). */
      waitForRoom: (tenant: string, address: string) => waitForRoom(addressKey(tenant, address)),
      /** Whether logins from `address` to `tenant` are blocked right now. */
      isAddressBlocked: (tenant: string, address: string) =>
        Effect.sync(() => auth.isBlocked(addressKey(tenant, address))),
      /** A failure from `address` that was not a password check (a refusal before one); true when it trips the breaker. */
      authFailed: (tenant: string, address: string) => Effect.sync(() => auth.fail(addressKey(tenant, address))),
      /**
       * `isAddressBlocked` and `authFailed` as plain calls, for the login path's synchronous checks
       * (an unknown tenant's refusal costs no Effect steps).
       */
      addressBlocked: (tenant: string, address: string): boolean => auth.isBlocked(addressKey(tenant, address)),
      addressFailed: (tenant: string, address: string): boolean => auth.fail(addressKey(tenant, address)),
      authSucceeded: (tenant: string, address: string) => Effect.sync(() => auth.succeed(addressKey(tenant, address))),
      /** The addresses currently blocked for `tenant`. */
      bans: (tenant: string) =>
        Effect.sync(
          (): ReadonlyArray<Ban> => auth.entries(addressKey(tenant, "")).map(([address, until]) => ({ address, until }))
        ),
      /** Lifts the blocks of `addresses` for `tenant`. */
      clear: (tenant: string, addresses: ReadonlyArray<string>) =>
        Effect.sync(() => {
          for (const address of addresses) auth.clear(addressKey(tenant, address))
        }),
      isAuthQueryBlocked: (tenant: string) => Effect.sync(() => authQuery.isBlocked(tenant)),
      authQueryFailed: (tenant: string) => Effect.sync(() => authQuery.fail(tenant)),
      authQuerySucceeded: (tenant: string) => Effect.sync(() => authQuery.succeed(tenant))
    } as const
  })
}) {
  static readonly layer = Layer.effect(this, this.make)
}
