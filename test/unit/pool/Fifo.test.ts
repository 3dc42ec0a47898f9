import { describe, expect, it } from "vitest"
import { Fifo } from "../../../src/pool/Fifo.ts"

/** The pool's checkout queue keeps first-come-first-served order through every way it changes. */
describe("Fifo", () => {
  it("hands items out in order, however far the queue grows and whenever it empties", () => {
    const queue = new Fifo<number>()
    let next = 0
    let expected = 0
    // Bursts larger than the compaction threshold, taken out partly, so the consumed prefix is
    // dropped both when the queue empties and while thousands are still queued.
    for (const [put, take] of [
      [3000, 2500],
      [10, 510],
      [5000, 1],
      [1, 4000],
      [2000, 3000]
    ] as const) {
      for (let i = 0; i < put; i++) queue.push(next++)
      for (let i = 0; i < take; i++) expect(queue.shift()).toBe(expected++)
      expect(queue.length).toBe(next - expected)
      expect(queue.peek()).toBe(next > expected ? expected : undefined)
    }
    expect(queue.shift()).toBeUndefined()
    expect(queue.length).toBe(0)
  })

  it("removes an item from the middle, finds and drains in order", () => {
    const queue = new Fifo<{ id: number; cancelled: boolean }>()
    const items = Array.from({ length: 2000 }, (_, id) => ({ id, cancelled: id < 1500 }))
    for (const item of items) queue.push(item)
    for (let i = 0; i < 1200; i++) queue.shift()
    expect(queue.remove(items[100]!)).toBe(false) // already handed out
    expect(queue.remove(items[1700]!)).toBe(true)
    expect(queue.length).toBe(799)
    expect(queue.find((item) => !item.cancelled)?.id).toBe(1500)
    const drained = queue.drain().map((item) => item.id)
    expect(drained).toEqual([...Array.from({ length: 800 }, (_, i) => 1200 + i)].filter((id) => id !== 1700))
    expect(queue.length).toBe(0)
    queue.push(items[0]!)
    expect(queue.shift()).toBe(items[0])
  })

  it("removes the head and the last item left, and starts over after a drain", () => {
    const queue = new Fifo<string>()
    for (const item of ["a", "b", "c"]) queue.push(item)
    expect(queue.shift()).toBe("a")
    expect(queue.remove("b")).toBe(true) // the head
    expect(queue.peek()).toBe("c")
    expect(queue.remove("c")).toBe(true) // the last one queued
    expect(queue.length).toBe(0)
    expect(queue.shift()).toBeUndefined()
    queue.push("d")
    expect(queue.drain()).toEqual(["d"])
    queue.push("e")
    queue.push("f")
    expect([queue.shift(), queue.shift(), queue.shift()]).toEqual(["e", "f", undefined])
  })
})
