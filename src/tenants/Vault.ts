import { createCipheriv, createDecipheriv, randomBytes } from "node:crypto"
import { Data, Redacted } from "effect"

export class VaultError extends Data.TaggedError("VaultError")<{ readonly message: string }> {}

/** Ciphertext format version; a future key rotation or algorithm change gets a new prefix. */
const PREFIX = "v1:"

/**
 * Reads VAULT_ENC_KEY: 32 bytes as 64 hexadecimal characters, or as base64 (standard or URL-safe,
 * padding optional). Anything else is refused rather than stretched or truncated: a short key is
 * a mistake, not a weaker setting.
 */
export const parseVaultKey = (text: string): Buffer | VaultError => {
  const raw = text.trim()
  if (/^[0-9a-fA-F]{64}$/.test(raw)) return Buffer.from(raw, "hex")
  if (/^[A-Za-z0-9+/_-]+={0,2}$/.test(raw)) {
    const key = Buffer.from(raw.replace(/-/g, "+").replace(/_/g, "/"), "base64")
    if (key.length === 32) return key
    return new VaultError({
      message: `VAULT_ENC_KEY must be 32 bytes (64 hex characters or 44 base64 characters); it decodes to ${key.length} bytes`
    })
  }
  return new VaultError({
    message: "VAULT_ENC_KEY must be 32 bytes written as 64 hex characters or as base64 (e.g. `openssl rand -base64 32`)"
  })
}

/**
 * User passwords at rest: AES-256-GCM, a fresh 96-bit IV per value, the tenant's external_id and
 * user as associated data so a ciphertext copied onto another user does not decrypt.
 * Stored as `v1:<iv>:<tag>:<ciphertext>` (base64).
 */
export class Vault {
  constructor(private readonly key: Buffer | undefined) {}

  get hasKey(): boolean {
    return this.key !== undefined
  }

  encrypt(plain: Redacted.Redacted<string>, context: string): string | VaultError {
    if (this.key === undefined) {
      return new VaultError({
        message:
          "VAULT_ENC_KEY is not set: it is required to store user passwords (32 bytes as 64 hex characters or base64, e.g. `openssl rand -base64 32`)"
      })
    }
    const iv = randomBytes(12)
    const cipher = createCipheriv("aes-256-gcm", this.key, iv)
    cipher.setAAD(Buffer.from(context))
    const body = Buffer.concat([cipher.update(Redacted.value(plain), "utf8"), cipher.final()])
    return `${PREFIX}${iv.toString("base64")}:${cipher.getAuthTag().toString("base64")}:${body.toString("base64")}`
  }

  decrypt(stored: string, context: string): Redacted.Redacted<string> | VaultError {
    if (this.key === undefined) {
      return new VaultError({ message: "VAULT_ENC_KEY is not set: the store holds encrypted passwords" })
    }
    const parts = stored.startsWith(PREFIX) ? stored.slice(PREFIX.length).split(":") : []
    if (parts.length !== 3) return new VaultError({ message: `a stored password of ${context} is not in vault format` })
    try {
      const [iv, tag, body] = parts.map((p) => Buffer.from(p, "base64")) as [Buffer, Buffer, Buffer]
      const decipher = createDecipheriv("aes-256-gcm", this.key, iv)
      decipher.setAAD(Buffer.from(context))
      decipher.setAuthTag(tag)
      return Redacted.make(Buffer.concat([decipher.update(body), decipher.final()]).toString("utf8"))
    } catch {
      return new VaultError({
        message: `cannot decrypt the stored password of ${context}: VAULT_ENC_KEY differs from the key it was stored with`
      })
    }
  }
}
