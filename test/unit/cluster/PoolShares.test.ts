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

  it("keeps the rounding's extra permit with the holder told it while it replaces a server", () => {
    // 10 = 4 + 3 + 3, the 4 told to the first; it closed a server (a lifetime) and waits for another.
    const d = divide(10, [
      { held: 3, want: 3, since: 9, keep: 4 },
      { held: 3, want: 5, since: 1, keep: 3 },
      { held: 3, want: 5, since: 2, keep: 3 }
    ])
    // It gets the free permit back; the others' directives stay as they were (no server closed to
    // open one elsewhere).
    expect(d.shares).toEqual([4, 3, 3])
    expect(d.grants).toEqual([1, 0, 0])
    expect(d.directives.map((x) => x.keep)).toEqual([4, 3, 3])
  })

  it("a steady demand gets the same directives at every transaction; a burst moves capacity", () => {
    const claims = [
      { held: 4, want: 2, since: 1, keep: 4 },
      { held: 3, want: 4, since: 2, keep: 3 },
      { held: 3, want: 1, since: 3, keep: 3 }
    ]
    const steady = divide(10, claims)
    expect(steady.grants).toEqual([0, 0, 0])
    expect(steady.directives).toEqual(claims.map((c) => ({ keep: c.keep, press: false })))
    // The third holder's clients stop waiting, and it holds servers it does not use: it is pressed
    // (its spare servers close) and the first two keep their shares of the rest.
    const quiet = divide(10, [claims[0]!, claims[1]!, { held: 3, want: 0, since: 0, keep: 3 }])
    expect(quiet.directives).toEqual([
      { keep: 4, press: false },
      { keep: 3, press: false },
      { keep: 3, press: true }
    ])
    // Pressed down to one server, its permits went to the others' shares.
    const moved = divide(10, [claims[0]!, claims[1]!, { held: 1, want: 0, since: 0, keep: 3 }])
    expect(moved.shares).toEqual([5, 4, 1])
    expect(moved.grants).toEqual([1, 1, 0])
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
