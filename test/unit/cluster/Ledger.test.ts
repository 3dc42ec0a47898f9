import { describe, expect, it } from "vitest"
import { fairShares, Ledger, type LedgerOut } from "../../../src/cluster/index.ts"

/**
 * The supervisor's permit ledger on its own (docs/scale-out.md#the-permit-model): workers are
 * simulated by what they would send; each test checks the one limit and where permits go.
 */
const setup = () => {
  const sent: Array<[number, LedgerOut]> = []
  const ledger = new Ledger((worker, message) => sent.push([worker, message]))
  const take = () => sent.splice(0)
  const grants = (messages: Array<[number, LedgerOut]>) =>
    messages.flatMap(([w, m]) => (m.t === "grant" ? [[w, m.n] as const] : []))
  const directives = (messages: Array<[number, LedgerOut]>) =>
    Object.fromEntries(
      messages.flatMap(([w, m]) => (m.t === "directive" ? [[w, { keep: m.keep, press: m.press }]] : []))
    )
  return { ledger, take, grants, directives }
}

describe("fairShares", () => {
  it("splits equally, caps at each demand, and hands the remainder out in priority order", () => {
    expect(fairShares(10, [10, 10, 10], [2, 0, 1])).toEqual([3, 3, 4])
    expect(fairShares(10, [1, 10, 10], [0, 1, 2])).toEqual([1, 5, 4])
    expect(fairShares(1, [1, 1, 1], [1, 0, 2])).toEqual([0, 1, 0])
    expect(fairShares(10, [2, 3], [0, 1])).toEqual([2, 3])
  })
})

describe("Ledger", () => {
  it("grants free permits, never more than the pool size in all", () => {
    const { ledger, take, grants, directives } = setup()
    ledger.want(0, "p", 10, 4)
    expect(grants(take())).toEqual([[0, 4]])
    ledger.want(1, "p", 10, 10)
    expect(grants(take())).toEqual([[1, 6]])
    expect(ledger.total("p")).toBe(10)
    // Nothing is free: worker 2 gets its share as others close servers, never on top.
    ledger.want(2, "p", 10, 10)
    const out = take()
    expect(grants(out)).toEqual([])
    expect(ledger.total("p")).toBe(10)
    expect(directives(out)).toEqual({
      0: { keep: 3, press: true },
      1: { keep: 3, press: false },
      2: { keep: 4, press: false }
    })
  })

  it("when nothing is free, tells each worker its fair share and presses the one that wants nothing", () => {
    const { ledger, take, grants, directives } = setup()
    ledger.want(0, "p", 10, 10)
    take()
    // Worker 0 holds all ten and is satisfied; worker 1 now waits for 6.
    ledger.want(1, "p", 10, 6)
    const out = take()
    expect(grants(out)).toEqual([])
    expect(directives(out)).toEqual({ 0: { keep: 5, press: true }, 1: { keep: 5, press: false } })
    // Worker 0 closes servers down to its share; each freed permit goes to worker 1.
    ledger.release(0, "p", 1)
    expect(grants(take())).toEqual([[1, 1]])
    for (let i = 0; i < 4; i++) ledger.release(0, "p", 1)
    expect(grants(take())).toEqual([
      [1, 1],
      [1, 1],
      [1, 1],
      [1, 1]
    ])
    expect(ledger.heldBy("p")).toEqual(
      new Map([
        [0, 5],
        [1, 5]
      ])
    )
    // Worker 1 stops wanting: every directive is lifted.
    ledger.want(1, "p", 10, 0)
    expect(directives(take())).toEqual({ 0: { keep: null, press: false }, 1: { keep: null, press: false } })
  })

  it("a pool of 1 shared by three busy workers rotates instead of starving one", () => {
    const { ledger, take, grants } = setup()
    ledger.want(0, "p", 1, 1)
    expect(grants(take())).toEqual([[0, 1]])
    ledger.want(1, "p", 1, 1)
    ledger.want(2, "p", 1, 1)
    ledger.want(0, "p", 1, 1)
    take()
    const holders: Array<number> = [0]
    for (let round = 0; round < 6; round++) {
      const holder = holders.at(-1)!
      ledger.release(holder, "p", 1)
      const granted = grants(take())
      expect(granted).toHaveLength(1)
      expect(ledger.total("p")).toBe(1)
      holders.push(granted[0]![0])
      // The old holder's client waits again.
      ledger.want(holder, "p", 1, 1)
      take()
    }
    expect(new Set(holders)).toEqual(new Set([0, 1, 2]))
  })

  it("a forgotten worker's permits go to those waiting", () => {
    const { ledger, take, grants } = setup()
    ledger.want(0, "p", 3, 3)
    ledger.want(1, "p", 3, 2)
    take()
    ledger.forget(0)
    expect(grants(take())).toEqual([[1, 2]])
    expect(ledger.heldBy("p")).toEqual(new Map([[1, 2]]))
  })

  it("keeps no record of a pool once no worker holds, wants or has a directive, and makes it anew on re-use", () => {
    const { ledger, take, grants, directives } = setup()
    ledger.want(0, "p", 1, 1)
    ledger.want(1, "p", 1, 1)
    take()
    // Worker 1 waits: worker 0 is told its share; the record stays while any of that is so.
    ledger.release(0, "p", 1)
    expect(grants(take())).toEqual([[1, 1]])
    ledger.want(0, "p", 1, 0)
    expect(ledger.has("p")).toBe(true)
    ledger.release(1, "p", 1)
    expect(directives(take())).toEqual({})
    expect(ledger.has("p")).toBe(false)
    // A worker's "want 0" at its sweep makes no record.
    ledger.want(0, "p", 1, 0)
    expect(ledger.has("p")).toBe(false)
    ledger.want(0, "p", 1, 1)
    expect(grants(take())).toEqual([[0, 1]])
    expect(ledger.has("p")).toBe(true)
  })
})
