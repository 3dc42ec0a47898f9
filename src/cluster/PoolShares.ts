import { fairShares } from "./Ledger.ts"

/**
 * One holder's line in a pool's ledger (a runner's row in the store's `tidepool_permits`): the
 * permits it holds, how many more it wants, and since when it has wanted them (any clock that
 * orders; ties keep the given order).
 */
export interface Claim {
  readonly held: number
  readonly want: number
  readonly since: number
  /** Its directive's `keep` now (null or absent: none): who was given the rounding's extra permit. */
  readonly keep?: number | null
}

export interface Directive {
  /** Hold at most this many servers; null: no limit (nobody waits). */
  readonly keep: number | null
  /** Another holder waits and this one wants nothing: keep no spare idle server. */
  readonly press: boolean
}

export interface Division {
  /** Each claim's fair share of the pool. */
  readonly shares: ReadonlyArray<number>
  /** Free permits each claim may take now (never beyond its share, never more than free in all). */
  readonly grants: ReadonlyArray<number>
  /** What each holder is told, as if every grant above were taken. */
  readonly directives: ReadonlyArray<Directive>
}

const LIFTED: Directive = { keep: null, press: false }

/**
 * The rule of the host's Ledger (docs/scale-out.md#the-permit-model), as a pure function over one
 * pool's claims, for the store ledger, where every runner computes it inside the pool's transaction:
 * shares by water-filling over held + want; the rounding's remainder first to a claim that waits
 * holding nothing (so a pool smaller than the number of busy holders rotates), then to one already
 * holding it or told it (so shares do not flap), then to the longest waiting; free permits granted up to each
 * share in that order; and, while a want stays unmet, each holder's share as its `keep`, with those
 * that want nothing pressed.
 */
export const divide = (size: number, claims: ReadonlyArray<Claim>): Division => {
  const n = claims.length
  const used = claims.reduce((s, c) => s + c.held, 0)
  // Above its size (a runner came back from a reclaim with servers still open): every holder is
  // told its share until it is within, even if nobody waits.
  if (used > size && claims.every((c) => c.want <= 0)) {
    const shares = fairShares(
      size,
      claims.map((c) => c.held),
      claims.map((_, i) => i)
    )
    return { shares, grants: claims.map(() => 0), directives: shares.map((keep) => ({ keep, press: false })) }
  }
  if (claims.every((c) => c.want <= 0)) {
    return { shares: claims.map((c) => c.held), grants: claims.map(() => 0), directives: claims.map(() => LIFTED) }
  }
  const demands = claims.map((c) => c.held + Math.max(0, c.want))
  // "Already holds it" is the share it was told, while it has one, rather than what it holds now: a
  // holder that closed a server (a lifetime, a closed socket) and waits to open another keeps the
  // extra permit, and one still closing servers down to its share does not take it from the holder
  // told it (each move closes a server on one side to open one on the other).
  const above = Math.floor(size / n)
  const rank = (c: Claim) => (c.held === 0 && c.want > 0 ? 0 : (c.keep ?? c.held) > above ? 1 : 2)
  const since = (c: Claim) => (c.want > 0 ? c.since : Number.POSITIVE_INFINITY)
  const priority = claims
    .map((_, i) => i)
    .sort((a, b) => rank(claims[a]!) - rank(claims[b]!) || since(claims[a]!) - since(claims[b]!) || a - b)
  const shares = fairShares(size, demands, priority)
  let free = Math.max(0, size - used)
  const grants = claims.map(() => 0)
  for (const i of priority) {
    const c = claims[i]!
    if (c.want <= 0) continue
    const g = Math.min(free, c.want, Math.max(0, shares[i]! - c.held))
    grants[i] = g
    free -= g
  }
  const unmet = used > size || claims.some((c, i) => c.want - grants[i]! > 0)
  const directives = unmet
    ? claims.map((c, i) => ({ keep: shares[i]!, press: c.want - grants[i]! <= 0 }))
    : claims.map(() => LIFTED)
  return { shares, grants, directives }
}
