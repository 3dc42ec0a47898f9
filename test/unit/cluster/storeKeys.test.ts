import { describe, expect, it } from "vitest"
import { MAX_SLOT, SLOT_SHIFT, slotOf } from "../../../src/cluster/index.ts"
import { pickSlot, storeKey } from "../../../src/cluster/StoreRunner.ts"

/** What the store ledger writes and what cluster-mode BackendKeyData carries (docs/scale-out.md#several-hosts-the-ledger-in-the-store). */
describe("store ledger names", () => {
  it("stores a pool key as a JSON array, with no NUL (PostgreSQL text cannot hold one)", () => {
    const key = "acme\u0000app\u0000transaction\u0000postgres"
    expect(storeKey(key)).toBe('["acme","app","transaction","postgres"]')
    expect(storeKey(key)).not.toContain("\u0000")
    expect((JSON.parse(storeKey(key)) as Array<string>).join("\u0000")).toBe(key)
  })

  it("puts the runner slot in bits 20–30 of a positive 32-bit process id", () => {
    expect(MAX_SLOT).toBe(2047)
    for (const slot of [1, 2, 1000, MAX_SLOT]) {
      for (const low of [0, 1, 2 ** SLOT_SHIFT - 1]) {
        const processId = (slot << SLOT_SHIFT) | low
        expect(processId).toBeGreaterThan(0)
        expect(processId).toBeLessThan(2 ** 31)
        expect(slotOf(processId)).toBe(slot)
      }
    }
  })
})

describe("runner slots", () => {
  it("a runner takes its previous slot back while it is free", () => {
    expect(pickSlot(new Set([1, 3]), 2, 9)).toBe(2)
  })

  it("a new runner takes the first free slot after the cursor, not the lowest free one", () => {
    // Slot 2 was freed by a reclaim; its runner may come back for it.
    expect(pickSlot(new Set([1, 3]), 0, 3)).toBe(4)
    expect(pickSlot(new Set([1, 3]), 0, 0)).toBe(2)
  })

  it("wraps around and skips taken slots", () => {
    expect(pickSlot(new Set([5]), 0, 4, 5)).toBe(1)
    expect(pickSlot(new Set([1, 2, 5]), 0, 4, 5)).toBe(3)
    expect(pickSlot(new Set([1, 2, 3]), 2, 7, 3)).toBe(0)
  })
})
