import { readFileSync } from "node:fs"
import { describe, expect, it } from "vitest"
import { catalog, clientMessage, errorCodes, tidepoolError } from "../../../src/errors/index.ts"

describe("error catalog", () => {
  it("docs/errors.md lists every code with its SQLSTATE and nothing else", () => {
    const doc = readFileSync(new URL("../../../docs/errors.md", import.meta.url), "utf8")
    const documented = new Map<string, string>()
    for (const m of doc.matchAll(/^\| `([A-Z0-9]+)`\s*\| `([0-9A-Z]{5})`\s*\|/gm)) documented.set(m[1]!, m[2]!)
    const catalogued = new Map(errorCodes.map((c) => [c, catalog[c].sqlstate]))
    expect(Object.fromEntries(documented)).toEqual(Object.fromEntries(catalogued))
  })

  it("renders REFERENCE texts exactly", () => {
    expect(clientMessage(tidepoolError("ECHECKOUTTIMEOUT", 5000, "Transaction"))).toBe(
      "(ECHECKOUTTIMEOUT) unable to check out connection from the pool after 5000ms in Transaction mode"
    )
    expect(clientMessage(tidepoolError("EWRONGPASSWORD", "bob"))).toBe('password authentication failed for user "bob"')
    expect(clientMessage(tidepoolError("EMAXCONNSESSION", 2))).toBe(
      "(EMAXCONNSESSION) max clients reached in session mode - max clients are limited to pool_size: 2"
    )
    expect(tidepoolError("ESTARTUPPACKETTOOLARGE", 10001, 10000).sqlstate).toBe("08P01")
  })
})
