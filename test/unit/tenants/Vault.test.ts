import { randomBytes } from "node:crypto"
import { describe, expect, it } from "@effect/vitest"
import { Redacted } from "effect"
import { parseVaultKey, Vault, VaultError } from "../../../src/tenants/index.ts"

describe("parseVaultKey", () => {
  const key = randomBytes(32)

  it("accepts 32 bytes as 64 hex characters, base64 or base64url", () => {
    for (const text of [
      key.toString("hex"),
      key.toString("base64"),
      key.toString("base64url"),
      ` ${key.toString("hex")}\n`
    ]) {
      expect(parseVaultKey(text)).toEqual(key)
    }
  })

  it("refuses other lengths and encodings with a message that does not echo the key", () => {
    for (const text of ["", "short", randomBytes(16).toString("base64"), "zz".repeat(32), "é".repeat(44)]) {
      const result = parseVaultKey(text)
      expect(result).toBeInstanceOf(VaultError)
      expect((result as VaultError).message).toMatch(/VAULT_ENC_KEY must be 32 bytes/)
      if (text.length > 4) expect((result as VaultError).message).not.toContain(text)
    }
  })
})

describe("Vault", () => {
  const vault = new Vault(randomBytes(32))

  it("round-trips a password; each encryption differs and never contains the plaintext", () => {
    const a = vault.encrypt(Redacted.make("hunter2"), "acme/app") as string
    const b = vault.encrypt(Redacted.make("hunter2"), "acme/app") as string
    expect(a).toMatch(/^v1:/)
    expect(a).not.toBe(b)
    expect(a).not.toContain("hunter2")
    expect(Redacted.value(vault.decrypt(a, "acme/app") as Redacted.Redacted<string>)).toBe("hunter2")
  })

  it("binds a ciphertext to its tenant and user, and to its key", () => {
    const sealed = vault.encrypt(Redacted.make("hunter2"), "acme/app") as string
    expect(vault.decrypt(sealed, "other/app")).toBeInstanceOf(VaultError)
    const other = new Vault(randomBytes(32)).decrypt(sealed, "acme/app")
    expect((other as VaultError).message).toMatch(/VAULT_ENC_KEY differs/)
    expect(vault.decrypt("garbage", "acme/app")).toBeInstanceOf(VaultError)
  })

  it("without a key, refuses to store a password with a clear message", () => {
    const result = new Vault(undefined).encrypt(Redacted.make("x"), "acme/app")
    expect((result as VaultError).message).toMatch(/VAULT_ENC_KEY is not set/)
  })
})
