import { describe, expect, it } from "vitest"
import { StatementRegistry } from "../../../src/pool/StatementRegistry.ts"
import { ServerStatementCache } from "../../../src/session/ServerStatementCache.ts"
import { resultTypeKey } from "../../../src/session/StatementMessages.ts"

const setup = (capacity = 3) => {
  const registry = new StatementRegistry()
  const cache = new ServerStatementCache(registry, capacity)
  const table = new Map<string, number>()
  cache.attach(table)
  return { registry, cache, table }
}

/** What `PreparedStatements.prepareOn` does: close a copy in the way, evict, then send. Returns the Closes. */
const prepare = (cache: ServerStatementCache, name: string): Array<string> => {
  const closed: Array<string> = []
  if (cache.replace(name)) closed.push(name)
  for (let oldest = cache.evict(); oldest !== undefined; oldest = cache.evict()) closed.push(oldest)
  cache.sent(name)
  return closed
}

describe("ServerStatementCache", () => {
  it("holds a statement from the moment its Parse is sent, in the server's own table", () => {
    const { cache, table } = setup()
    expect(cache.useCurrent("a")).toBe(false)
    expect(prepare(cache, "a")).toEqual([])
    expect(cache.useCurrent("a")).toBe(true)
    expect(table.has("a")).toBe(true)
    cache.detach()
    // Detached, it reads and changes no server's table.
    expect(cache.useCurrent("a")).toBe(false)
    expect(table.has("a")).toBe(true)
  })

  it("evicts the least recently used when full; only a use, not a look, makes a statement recent", () => {
    const { cache } = setup(3)
    prepare(cache, "a")
    prepare(cache, "b")
    prepare(cache, "c")
    expect(cache.holdsCurrent("a")).toBe(true) // a look: "a" stays the oldest
    expect(prepare(cache, "d")).toEqual(["a"])
    expect(cache.useCurrent("b")).toBe(true) // a use: "c" is now the oldest
    expect(prepare(cache, "e")).toEqual(["c"])
    expect(cache.stampOf("a")).toBeUndefined()
  })

  it("a copy prepared before the statement went stale is not current, and is closed before it is prepared again", () => {
    const { registry, cache } = setup()
    prepare(cache, "a")
    registry.markStale("a")
    expect(cache.holdsCurrent("a")).toBe(false)
    expect(cache.useCurrent("a")).toBe(false)
    expect(prepare(cache, "a")).toEqual(["a"])
    expect(cache.useCurrent("a")).toBe(true)
  })

  it("a failed Parse leaves an unsure entry only where a copy was known; a lost one needs no Close", () => {
    const { cache } = setup()
    cache.failed("never") // its Parse failed and no copy was known: nothing to close
    expect(cache.stampOf("never")).toBeUndefined()
    prepare(cache, "a")
    cache.failed("a")
    expect(cache.stampOf("a")).toBe(-1)
    expect(cache.holdsCurrent("a")).toBe(false)
    expect(prepare(cache, "a")).toEqual(["a"])
    cache.unsure("b") // e.g. the server said 42P05: closed before the next Parse
    expect(prepare(cache, "b")).toEqual(["b"])
    cache.lost("b") // the server said 26000: it has no copy
    expect(prepare(cache, "b")).toEqual([])
    cache.clear()
    expect(cache.stampOf("a")).toBeUndefined()
  })

  it("a copy's description holds for that copy only: prepared again, closed or unsure, it is unknown", () => {
    const ctx = setup()
    const { cache } = ctx
    const params = Buffer.from([0x74, 0, 0, 0, 6, 0, 0])
    prepare(cache, "a")
    expect(cache.describedOf("a")).toBeUndefined()
    cache.described("a", "T1|x:23:-1", params)
    expect(cache.describedOf("a")).toMatchObject({ resultType: "T1|x:23:-1", params })
    prepare(cache, "a") // a fresh copy (the stale one closed first): not described yet
    expect(cache.describedOf("a")).toBeUndefined()
    cache.described("a", "T1|x:25:-1", params)
    cache.unsure("a")
    expect(cache.describedOf("a")).toBeUndefined()
    prepare(cache, "a")
    cache.described("a", "T1|x:25:-1", params)
    // Stale pool-wide after it was described, renewed: current, its description kept.
    const { registry } = ctx
    registry.markStale("a")
    expect(cache.holdsCurrent("a")).toBe(false)
    cache.renew("a")
    expect(cache.holdsCurrent("a")).toBe(true)
    expect(cache.describedOf("a")?.resultType).toBe("T1|x:25:-1")
    cache.unsure("a")
    // Never recorded for a copy the server may not hold.
    expect(cache.described("a", "n", params)).toBeUndefined()
    cache.detach()
    expect(cache.describedOf("a")).toBeUndefined()
  })
})

describe("resultTypeKey", () => {
  const rowDescription = (fields: ReadonlyArray<{ name: string; table: number; type: number; mod: number }>) => {
    const parts = fields.map((f) => {
      const b = Buffer.alloc(Buffer.byteLength(f.name) + 19)
      b.write(f.name, 0)
      const at = Buffer.byteLength(f.name) + 1
      b.writeUInt32BE(f.table, at)
      b.writeInt16BE(1, at + 4)
      b.writeUInt32BE(f.type, at + 6)
      b.writeInt16BE(-1, at + 10)
      b.writeInt32BE(f.mod, at + 12)
      return b
    })
    const body = Buffer.concat([Buffer.from([0, fields.length]), ...parts])
    const head = Buffer.from([0x54, 0, 0, 0, 0])
    head.writeInt32BE(body.length + 4, 1)
    return Buffer.concat([head, body])
  }
  const key = (m: Buffer) => resultTypeKey(m, 0, m.length)

  it("compares what PostgreSQL compares: names, types and modifiers, not the table the columns come from", () => {
    const int = rowDescription([{ name: "x", table: 16384, type: 23, mod: -1 }])
    expect(key(int)).toBe(key(rowDescription([{ name: "x", table: 99999, type: 23, mod: -1 }])))
    expect(key(int)).not.toBe(key(rowDescription([{ name: "x", table: 16384, type: 25, mod: -1 }])))
    expect(key(int)).not.toBe(key(rowDescription([{ name: "y", table: 16384, type: 23, mod: -1 }])))
    expect(key(rowDescription([{ name: "v", table: 1, type: 1043, mod: 14 }]))).not.toBe(
      key(rowDescription([{ name: "v", table: 1, type: 1043, mod: 24 }]))
    )
    expect(key(Buffer.from([0x6e, 0, 0, 0, 4]))).not.toBe(key(rowDescription([])))
  })
})
