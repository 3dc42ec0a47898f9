import { randomBytes } from "node:crypto"
import { describe, expect, it } from "@effect/vitest"
import { Effect, Redacted, Schema } from "effect"
import { tenantJson } from "../../../src/api/TenantJson.ts"
import { Tenant } from "../../../src/config/index.ts"
import { decryptCloak, parseVaultKey, Vault, VaultError } from "../../../src/tenants/index.ts"
import { deserializeTenant, serializeTenant } from "../../../src/tenants/TenantStore.ts"

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

  it("accepts Supavisor's form: 32 characters used as the key's bytes, whatever they look like", () => {
    // config/test.exs in Supavisor; the others look like hex or base64 but are 32 characters long.
    for (const text of ["aHD8DZRdk2emnkdktFZRh3E9RNg4aOY7", "0123456789abcdef0123456789abcdef", "A".repeat(32)]) {
      expect(parseVaultKey(text)).toEqual(Buffer.from(text))
    }
    // 32 bytes of UTF-8, as Erlang's :crypto counts them.
    expect(parseVaultKey("é".repeat(16))).toEqual(Buffer.from("é".repeat(16)))
  })

  it("reads a 64-character all-hex string as hex and a 44-character one as base64", () => {
    expect(parseVaultKey("ab".repeat(32))).toEqual(Buffer.alloc(32, 0xab))
    expect(parseVaultKey(Buffer.alloc(32, 7).toString("base64"))).toEqual(Buffer.alloc(32, 7))
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

describe("decryptCloak", () => {
  // Made with Python's `cryptography` (AESGCM), not node:crypto, from Cloak.Ciphers.AES.GCM's
  // layout: 0x01, tag length, "AES.GCM.V1", IV 00..0f (16 bytes), GCM tag, ciphertext; AAD
  // "AES256GCM"; key Supavisor's test key used as raw bytes.
  const key = Buffer.from("aHD8DZRdk2emnkdktFZRh3E9RNg4aOY7")
  const vector = Buffer.from(
    "010a4145532e47434d2e5631000102030405060708090a0b0c0d0e0f658ecc9f5cc3144a278691d623a2d42b375ac0680d837f6c1c2addd5f425e985173c95034e09f7038b",
    "hex"
  )

  it("decrypts a ciphertext in Supavisor's format", () => {
    const plain = decryptCloak(key, vector)
    expect(Redacted.isRedacted(plain)).toBe(true)
    expect(Redacted.value(plain as Redacted.Redacted<string>)).toBe("pässwörd-from-supavisor")
  })

  it("refuses a wrong key, a tampered value, another key tag and garbage, with reasons", () => {
    expect((decryptCloak(Buffer.alloc(32), vector) as VaultError).message).toMatch(/key differs/)
    const tampered = Buffer.from(vector)
    tampered[tampered.length - 1]! ^= 1
    expect(decryptCloak(key, tampered)).toBeInstanceOf(VaultError)
    const otherTag = Buffer.concat([Buffer.from([1, 10]), Buffer.from("AES.CTR.V1"), vector.subarray(12)])
    expect((decryptCloak(key, otherTag) as VaultError).message).toMatch(/key tag "AES.CTR.V1"/)
    for (const bytes of [Buffer.alloc(0), Buffer.from([2, 0]), vector.subarray(0, 30)]) {
      expect(decryptCloak(key, bytes)).toBeInstanceOf(VaultError)
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

describe("stored tenants", () => {
  const vault = new Vault(randomBytes(32))

  it.effect("keep passwords and the JIT JWT key encrypted, and give them back", () =>
    Effect.gen(function* () {
      const tenant = Schema.decodeUnknownSync(Tenant)({
        external_id: "acme",
        db_host: "127.0.0.1",
        db_port: 5432,
        db_database: "app",
        use_jit: true,
        jit_api_url: "https://jit.example/verify",
        jit_jwt_secret: "jwt-signing-key-hunter3",
        users: [{ db_user: "app", db_password: "hunter2" }]
      })
      const text = yield* serializeTenant(tenant, vault)
      expect(text).not.toContain("hunter2")
      expect(text).not.toContain("hunter3")
      const back = yield* deserializeTenant(text, vault)
      expect(Redacted.value(back.jit_jwt_secret!)).toBe("jwt-signing-key-hunter3")
      expect(Redacted.value(back.users[0]!.db_password)).toBe("hunter2")
      expect(JSON.stringify(tenantJson(back))).not.toMatch(/hunter/)
    })
  )
})
