import { createHash } from "node:crypto"
import { describe, expect, it } from "vitest"
import { md5Password } from "../../../src/protocol/index.ts"

describe("md5Password", () => {
  it("matches PostgreSQL's md5(md5(password || user) || salt)", () => {
    const salt = Buffer.from([1, 2, 3, 4])
    const inner = createHash("md5").update("postgrespostgres").digest("hex")
    const outer = createHash("md5")
      .update(Buffer.concat([Buffer.from(inner), salt]))
      .digest("hex")
    expect(md5Password("postgres", "postgres", salt)).toBe(`md5${outer}`)
    // The stored hash PostgreSQL shows for this user and password.
    expect(inner).toBe("3175bce1d3201d16594cebf9d7eb3f9d")
  })

  it("uses the salt bytes verbatim, including non-ASCII values", () => {
    const salt = Buffer.from([0xff, 0x00, 0x80, 0x7f])
    const inner = createHash("md5").update("pwuser").digest("hex")
    const expected = createHash("md5")
      .update(Buffer.concat([Buffer.from(inner), salt]))
      .digest("hex")
    expect(md5Password("user", "pw", salt)).toBe(`md5${expected}`)
  })
})
