import { Buffer } from "node:buffer"
import { describe, expect, it } from "vitest"
import { cstringEnd } from "../../../src/protocol/index.ts"

describe("cstringEnd", () => {
  // Short names are scanned byte by byte, long strings by Buffer.indexOf: both must agree at the seam.
  const at = (length: number, pad = 10) =>
    Buffer.concat([Buffer.alloc(3, 0x61), Buffer.alloc(length, 0x62), Buffer.from([0]), Buffer.alloc(pad, 0x63)])

  it("finds the NUL of a short string, of a long one, and at every length around the scan's seam", () => {
    for (const length of [0, 1, 62, 63, 64, 65, 66, 200, 70_000]) {
      const buf = at(length)
      expect(cstringEnd(buf, 3, buf.length)).toBe(3 + length)
    }
  })

  it("answers -1 when the NUL is at or past `end`, or missing", () => {
    for (const length of [5, 63, 64, 65, 1000]) {
      const buf = at(length)
      expect(cstringEnd(buf, 3, 3 + length)).toBe(-1)
      expect(cstringEnd(buf, 3, 2 + length)).toBe(-1)
    }
    const none = Buffer.alloc(300, 0x61)
    expect(cstringEnd(none, 0, none.length)).toBe(-1)
    expect(cstringEnd(none, 300, 300)).toBe(-1)
  })
})
