import { describe, expect, it } from "vitest"
import { SeatLedger, type SeatsOut } from "../../../src/cluster/index.ts"

/**
 * The supervisor's client seats on their own (docs/scale-out.md#max_clients-across-workers): workers
 * are simulated by what they would send. The one rule: seats held over all workers never exceed the
 * limit, and a login is refused only once every unused seat of the host has been asked back.
 */
const setup = (workers: number) => {
  const sent: Array<[number, SeatsOut]> = []
  const seats = new SeatLedger(workers, (worker, message) => sent.push([worker, message]))
  const take = () => sent.splice(0)
  const total = (key: string) => [...seats.heldBy(key).values()].reduce((a, b) => a + b, 0)
  return { seats, take, total }
}

describe("SeatLedger", () => {
  it("hands seats out in blocks, far from the limit: one answer serves the next logins too", () => {
    const { seats, take } = setup(2)
    seats.want(0, "k", 100, 1)
    // 100 / (4 × 2) = 12 spare besides the one asked for.
    expect(take()).toEqual([[0, { t: "seats", key: "k", n: 13, spare: 12 }]])
  })

  it("at the limit, takes unused seats back from the other workers before refusing", () => {
    const { seats, take, total } = setup(2)
    seats.want(0, "k", 4, 1)
    expect(take()).toEqual([[0, { t: "seats", key: "k", n: 1, spare: 0 }]])
    seats.want(1, "k", 4, 3)
    expect(take()).toEqual([[1, { t: "seats", key: "k", n: 3, spare: 0 }]])
    // Worker 0 wants one more: none free; worker 1 is asked, answers with one it does not use.
    seats.want(0, "k", 4, 1)
    expect(take()).toEqual([[1, { t: "seat-reclaim", key: "k", round: 1 }]])
    seats.release(1, "k", 1, true, 1)
    expect(take()).toEqual([[0, { t: "seats", key: "k", n: 1, spare: 0 }]])
    expect(total("k")).toBe(4)
    // Full, and nobody has a seat to spare: refused (0 granted) once worker 0 has answered too.
    seats.want(1, "k", 4, 1)
    expect(take()).toEqual([[0, { t: "seat-reclaim", key: "k", round: 2 }]])
    seats.release(0, "k", 0, true, 2)
    expect(take()).toEqual([[1, { t: "seats", key: "k", n: 0, spare: 0 }]])
    expect(total("k")).toBe(4)
  })

  it("frees a dead worker's seats and stops waiting for its answer", () => {
    const { seats, take, total } = setup(2)
    seats.want(0, "k", 2, 2)
    seats.want(1, "k", 2, 1)
    expect(take()).toEqual([
      [0, { t: "seats", key: "k", n: 2, spare: 0 }],
      [0, { t: "seat-reclaim", key: "k", round: 1 }]
    ])
    seats.forget(0)
    expect(take()).toEqual([[1, { t: "seats", key: "k", n: 1, spare: 0 }]])
    expect(total("k")).toBe(1)
  })

  it("an answer to an earlier reclaim does not end the current one", () => {
    const { seats, take } = setup(3)
    seats.want(1, "k", 4, 2)
    seats.want(2, "k", 4, 2)
    take()
    // Worker 0 asks; 1 and 2 are asked (round 1); worker 0 dies before they answer.
    seats.want(0, "k", 4, 1)
    expect(take().map(([w, m]) => [w, m.t])).toEqual([
      [1, "seat-reclaim"],
      [2, "seat-reclaim"]
    ])
    seats.forget(0)
    // Worker 1 asks now (round 2): only worker 2 holds seats besides it.
    seats.want(1, "k", 4, 1)
    expect(take()).toEqual([[2, { t: "seat-reclaim", key: "k", round: 2 }]])
    // Worker 2's late answer to round 1 (nothing unused then) is not its answer to round 2 ...
    seats.release(2, "k", 0, true, 1)
    expect(take()).toEqual([])
    // ... which gives back the seat of a client that left meanwhile: worker 1 gets it.
    seats.release(2, "k", 1, true, 2)
    expect(take()).toEqual([[1, { t: "seats", key: "k", n: 1, spare: 0 }]])
  })

  it("keeps no record of a pool once no worker holds seats, none waits and no reclaim is under way", () => {
    const { seats, take } = setup(2)
    seats.want(0, "k", 2, 1)
    seats.want(1, "k", 2, 2)
    // At the limit: worker 0 is asked for its unused seats; the record stays until it answers.
    take()
    seats.release(0, "k", 1, true, 1)
    expect(seats.has("k")).toBe(true)
    expect(take()).toEqual([[1, { t: "seats", key: "k", n: 2, spare: 0 }]])
    seats.release(1, "k", 2, false)
    expect(seats.has("k")).toBe(false)
    // A reclaim asked (by the store) where no worker holds seats is answered at once, and makes no record.
    let done = 0
    seats.reclaimAll("k", () => done++)
    expect(done).toBe(1)
    expect(seats.has("k")).toBe(false)
    // Used again: made anew.
    seats.want(1, "k", 2, 1)
    expect(take()).toEqual([[1, { t: "seats", key: "k", n: 1, spare: 0 }]])
    expect(seats.has("k")).toBe(true)
  })
})
