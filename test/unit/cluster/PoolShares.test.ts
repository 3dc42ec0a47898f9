import { describe, expect, it } from "vitest"
import { divide } from "../../../src/cluster/index.ts"

/** The store ledger's rule (docs/scale-out.md#several-hosts), as each runner computes it in a pool's transaction. */
describe("divide", () => {
  it("grants free permits up to each share and lifts every directive once nobody waits", () => {
    const d = divide(10, [
      { held: 0, want: 10, since: 1 },
      { held: 0, want: 10, since: 2 },
      { held: 0, want: 10, since: 3 }
    ])
    expect(d.shares).toEqual([4, 3, 3])
    expect(d.grants).toEqual([4, 3, 3])
    // Each still wants more than its share: everyone is told its share, nobody is pressed.
    expect(d.directives).toEqual([
      { keep: 4, press: false },
      { keep: 3, press: false },
      { keep: 3, press: false }
    ])
    expect(divide(10, [{ held: 4, want: 0, since: 0 }]).directives).toEqual([{ keep: null, press: false }])
  })

  it("presses a holder that wants nothing when another waits, and grants nothing that is not free", () => {
    const d = divide(2, [
      { held: 2, want: 0, since: 0 },
      { held: 0, want: 1, since: 5 }
    ])
    expect(d.grants).toEqual([0, 0])
    expect(d.directives).toEqual([
      { keep: 1, press: true },
      { keep: 1, press: false }
    ])
  })

  it("rotates a pool of 1 among three waiting runners: the one holding nothing goes first", () => {
    const d = divide(1, [
      { held: 1, want: 1, since: 1 },
      { held: 0, want: 1, since: 3 },
      { held: 0, want: 1, since: 2 }
    ])
    // The longest waiting of those holding nothing gets the share; the holder must give it up.
    expect(d.shares).toEqual([0, 0, 1])
    expect(d.directives[0]).toEqual({ keep: 0, press: false })
  })

  it("above its size (a runner back from a reclaim), grants nothing and tells every holder its share", () => {
    const d = divide(4, [
      { held: 4, want: 0, since: 0 },
      { held: 2, want: 0, since: 0 }
    ])
    expect(d.grants).toEqual([0, 0])
    expect(d.directives).toEqual([
      { keep: 2, press: false },
      { keep: 2, press: false }
    ])
    expect(
      divide(4, [
        { held: 4, want: 1, since: 1 },
        { held: 2, want: 0, since: 0 }
      ]).grants
    ).toEqual([0, 0])
  })

  it("never grants beyond the pool, whatever the claims", () => {
    for (let size = 1; size <= 6; size++) {
      for (let a = 0; a <= size; a++) {
        for (let b = 0; a + b <= size; b++) {
          const claims = [
            { held: a, want: 3, since: 1 },
            { held: b, want: 2, since: 2 },
            { held: 0, want: 4, since: 3 }
          ]
          const d = divide(size, claims)
          const total = claims.reduce((s, c, i) => s + c.held + d.grants[i]!, 0)
          expect(total).toBeLessThanOrEqual(size)
          for (const [i, g] of d.grants.entries()) {
            expect(g).toBeLessThanOrEqual(Math.max(0, d.shares[i]! - claims[i]!.held))
          }
        }
      }
    }
  })
})
