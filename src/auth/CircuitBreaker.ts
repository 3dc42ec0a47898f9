import { Clock, Effect } from "effect"

/** A sliding-window failure counter that blocks a key for a while once it trips. */
export interface BreakerRule {
  /** Failures within `windowMs` that trip the breaker. */
  readonly failures: number
  readonly windowMs: number
  /** How long a tripped key stays blocked. */
  readonly blockMs: number
}

/** REFERENCE §3.2: 10 wrong passwords per (tenant, client IP) in 150 s block that pair for 120 s. */
export const AUTH_FAILURES: BreakerRule = { failures: 10, windowMs: 150_000, blockMs: 120_000 }
/** REFERENCE §3.2: 5 failed auth_query lookups per tenant in 300 s block the tenant's logins for 30 s. */
export const AUTH_QUERY_FAILURES: BreakerRule = { failures: 5, windowMs: 300_000, blockMs: 30_000 }

export interface Ban {
  readonly address: string
  /** Unix time in milliseconds. */
  readonly until: number
}

class Breaker {
  private readonly failures = new Map<string, Array<number>>()
  private readonly blocked = new Map<string, number>()

  constructor(private readonly rule: BreakerRule) {}

  isBlocked(key: string, now: number): boolean {
    const until = this.blocked.get(key)
    if (until === undefined) return false
    if (until > now) return true
    this.blocked.delete(key)
    return false
  }

  /** Records a failure; true when this failure trips the breaker. */
  fail(key: string, now: number): boolean {
    const since = now - this.rule.windowMs
    const times = (this.failures.get(key) ?? []).filter((t) => t > since)
    times.push(now)
    if (times.length < this.rule.failures) {
      this.failures.set(key, times)
      return false
    }
    this.failures.delete(key)
    this.blocked.set(key, now + this.rule.blockMs)
    return true
  }

  succeed(key: string): void {
    this.failures.delete(key)
  }

  clear(key: string): void {
    this.failures.delete(key)
    this.blocked.delete(key)
  }

  /** Live blocks whose key starts with `prefix`. */
  entries(prefix: string, now: number): Array<[string, number]> {
    const out: Array<[string, number]> = []
    for (const [key, until] of this.blocked) {
      if (until <= now) this.blocked.delete(key)
      else if (key.startsWith(prefix)) out.push([key.slice(prefix.length), until])
    }
    return out
  }

  /** Drops failure histories that can no longer trip anything, so probing from many addresses stays bounded. */
  sweep(now: number): void {
    const since = now - this.rule.windowMs
    for (const [key, times] of this.failures) if (times[times.length - 1]! <= since) this.failures.delete(key)
    for (const [key, until] of this.blocked) if (until <= now) this.blocked.delete(key)
  }
}

const addressKey = (tenant: string, address: string) => `${tenant}\u0000${address}`

/**
 * Authentication circuit breakers (REFERENCE §3.2). Per (tenant, client address): too many wrong
 * passwords block the address (`ECIRCUITBREAKER`), listed and cleared through the `network_bans`
 * API. Per tenant: repeated `auth_query` failures block the tenant's logins briefly so a broken
 * upstream is not hammered. State is per node and in memory, as in Supavisor.
 */
export class CircuitBreaker extends Effect.Service<CircuitBreaker>()("tidepool/CircuitBreaker", {
  scoped: Effect.gen(function* () {
    const auth = new Breaker(AUTH_FAILURES)
    const authQuery = new Breaker(AUTH_QUERY_FAILURES)
    yield* Effect.forkScoped(
      Effect.gen(function* () {
        const now = yield* Clock.currentTimeMillis
        auth.sweep(now)
        authQuery.sweep(now)
      }).pipe(Effect.delay("60 seconds"), Effect.forever)
    )
    const now = Clock.currentTimeMillis
    return {
      /** Whether logins from `address` to `tenant` are blocked right now. */
      isAddressBlocked: (tenant: string, address: string) =>
        Effect.map(now, (t) => auth.isBlocked(addressKey(tenant, address), t)),
      /** A wrong password from `address`; true when it trips the breaker. */
      authFailed: (tenant: string, address: string) =>
        Effect.map(now, (t) => auth.fail(addressKey(tenant, address), t)),
      authSucceeded: (tenant: string, address: string) => Effect.sync(() => auth.succeed(addressKey(tenant, address))),
      /** The addresses currently blocked for `tenant`. */
      bans: (tenant: string) =>
        Effect.map(
          now,
          (t): ReadonlyArray<Ban> =>
            auth.entries(addressKey(tenant, ""), t).map(([address, until]) => ({ address, until }))
        ),
      /** Lifts the blocks of `addresses` for `tenant`. */
      clear: (tenant: string, addresses: ReadonlyArray<string>) =>
        Effect.sync(() => {
          for (const address of addresses) auth.clear(addressKey(tenant, address))
        }),
      isAuthQueryBlocked: (tenant: string) => Effect.map(now, (t) => authQuery.isBlocked(tenant, t)),
      authQueryFailed: (tenant: string) => Effect.map(now, (t) => authQuery.fail(tenant, t)),
      authQuerySucceeded: (tenant: string) => Effect.sync(() => authQuery.succeed(tenant))
    } as const
  })
}) {}
