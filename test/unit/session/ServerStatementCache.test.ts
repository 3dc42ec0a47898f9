import { describe, expect, it } from "vitest"
import { StatementRegistry } from "../../../src/pool/StatementRegistry.ts"
import { ServerStatementCache } from "../../../src/session/ServerStatementCache.ts"

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
})
