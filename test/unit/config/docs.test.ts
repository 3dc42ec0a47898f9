import { readFileSync } from "node:fs"
import { describe, expect, it } from "@effect/vitest"
import { envNames, serverKeys, tenantFieldNames, userFieldNames } from "../../../src/config/index.ts"

const doc = readFileSync(new URL("../../../docs/configuration.md", import.meta.url), "utf8")

// docs/configuration.md is the contract operators read; a setting or field
// added to the code without a row there fails here.
describe("docs/configuration.md", () => {
  it("documents every environment variable AppConfig reads", () => {
    const missing = envNames.filter((name) => !doc.includes(`\`${name}\``))
    expect(missing).toEqual([])
  })

  it("documents every server: key", () => {
    const missing = serverKeys.filter((key) => !doc.includes(`\`${key}\``))
    expect(missing).toEqual([])
  })

  it("documents every tenant and user field", () => {
    const missing = [...tenantFieldNames, ...userFieldNames].filter((field) => !doc.includes(`\`${field}\``))
    expect(missing).toEqual([])
  })
})
