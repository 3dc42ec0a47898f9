import { describe, expect, it } from "vitest"
import { HostSeats } from "../../../src/cluster/HostSeats.ts"
import type { SeatsOut } from "../../../src/cluster/index.ts"
import type { SeatHolder } from "../../../src/cluster/StoreRunner.ts"

/**
 * A host's client seats over two levels (docs/scale-out.md#max_clients-across-hosts): the
 * supervisor's SeatLedger shares out what the store granted the host. Workers and the store are
 * simulated by what they would send and hear.
 */
const setup = () => {
  const sent: Array<[number, SeatsOut]> = []
  const store: Array<string> = []
  let holder: SeatHolder | undefined
  const holders: Array<SeatHolder> = []
  const host = new HostSeats(
    (h) => {
      holder = h
      holders.push(h)
      return {
        want: (limit, need) => store.push(`want ${need} of ${limit}`),
        release: (n, reclaimed) => store.push(`release ${n}${reclaimed ? " (reclaimed)" : ""}`)
      }
    },
    2,
    (worker, message) => sent.push([worker, message])
  )
  return {
    host,
    seats: host.ledger,
    store: () => holder!,
    holders,
    take: () => sent.splice(0),
    heard: () => store.splice(0)
  }
}

describe("HostSeats", () => {
  it("grants workers only what the store granted the host, asking the store once the host has none", () => {
    const { host, seats, store, take, heard } = setup()
    seats.want(0, "k", 4, 1)
    expect(take()).toEqual([])
    expect(heard()).toEqual(["want 1 of 4"])
    store().seatsGranted(1, 0)
    expect(take()).toEqual([[0, { t: "seats", key: "k", n: 1, spare: 0 }]])
    expect(host.grantedTo("k")).toBe(1)
  })

  it("asks its other workers for their unused seats before the store, and refuses when the store has none", () => {
    const { seats, store, take, heard } = setup()
    seats.want(1, "k", 4, 2)
    store().seatsGranted(2, 0)
    take()
    heard()
    seats.want(0, "k", 4, 1)
    // (Round 1 was worker 1's first request: nobody else held seats, so it went to the store.)
    expect(take()).toEqual([[1, { t: "seat-reclaim", key: "k", round: 2 }]])
    expect(heard()).toEqual([])
    // Worker 1 uses both: the host asks the store, which has nothing either.
    seats.release(1, "k", 0, true, 2)
    expect(heard()).toEqual(["want 1 of 4"])
    store().seatsGranted(0, 0)
    expect(take()).toEqual([[0, { t: "seats", key: "k", n: 0, spare: 0 }]])
  })

  it("answers the store's reclaim once every worker holding seats has answered", () => {
    const { host, seats, store, take, heard } = setup()
    seats.want(0, "k", 4, 1)
    store().seatsGranted(1, 0)
    seats.want(1, "k", 4, 1)
    seats.release(0, "k", 0, true, 2)
    store().seatsGranted(1, 0)
    expect(take().filter(([, m]) => m.t === "seats")).toEqual([
      [0, { t: "seats", key: "k", n: 1, spare: 0 }],
      [1, { t: "seats", key: "k", n: 1, spare: 0 }]
    ])
    heard()
    store().reclaimSeats()
    expect(take()).toEqual([
      [0, { t: "seat-reclaim", key: "k", round: 3 }],
      [1, { t: "seat-reclaim", key: "k", round: 3 }]
    ])
    // Worker 0's client left: its seat goes back to the store at once; the answer waits for worker 1.
    seats.release(0, "k", 1, true, 3)
    expect(heard()).toEqual(["release 1"])
    seats.release(1, "k", 0, true, 3)
    expect(heard()).toEqual(["release 0 (reclaimed)"])
    expect(host.grantedTo("k")).toBe(1)
  })

  it("once no worker holds seats, gives the store back the spare ones too, forgets the key, and makes it anew on re-use", () => {
    const { host, seats, holders, take, heard } = setup()
    seats.want(0, "k", 8, 1)
    expect(heard()).toEqual(["want 1 of 8"])
    // 8 / (4 × 2 workers): a block of 1 spare seat.
    holders[0]!.seatsGranted(2, 1)
    expect(take()).toEqual([[0, { t: "seats", key: "k", n: 2, spare: 1 }]])
    // A client leaves: the host keeps a spare seat or two for the next login.
    seats.release(0, "k", 1, false)
    expect(heard()).toEqual([])
    expect(host.keys).toBe(1)
    // The worker's pool closes and gives back the rest: nothing is left to keep spare for.
    seats.release(0, "k", 1, false)
    expect(heard()).toEqual(["release 2"])
    expect(seats.has("k")).toBe(false)
    expect(host.keys).toBe(0)
    expect(holders[0]!.isClosed).toBe(true)
    // Used again: a new holder asks the store afresh.
    seats.want(1, "k", 8, 1)
    expect(heard()).toEqual(["want 1 of 8"])
    expect(holders).toHaveLength(2)
    holders[1]!.seatsGranted(1, 1)
    expect(take()).toEqual([[1, { t: "seats", key: "k", n: 1, spare: 1 }]])
    expect(host.grantedTo("k")).toBe(1)
  })

  it("a reclaim the store asks, answered by a worker whose last client left, gives the seat back and forgets the key", () => {
    const { host, seats, holders, take, heard } = setup()
    seats.want(0, "k", 8, 1)
    holders[0]!.seatsGranted(1, 0)
    take()
    heard()
    holders[0]!.reclaimSeats()
    const [[worker, message]] = take() as [[number, SeatsOut]]
    expect([worker, message.t]).toEqual([0, "seat-reclaim"])
    seats.release(0, "k", 1, true, message.t === "seat-reclaim" ? message.round : -1)
    expect(heard()).toEqual(["release 1 (reclaimed)"])
    expect(host.keys).toBe(0)
    expect(holders[0]!.isClosed).toBe(true)
  })
})
