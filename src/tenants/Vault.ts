import { createCipheriv, createDecipheriv, randomBytes } from "node:crypto"
import { Data, Redacted } from "effect"

export class VaultError extends Data.TaggedError("VaultError")<{ readonly message: string }> {}

/** Ciphertext format version; a future key rotation or algorithm change gets a new prefix. */
const PREFIX = "v1:"

const KEY_BYTES = 32

/**
 * Reads VAULT_ENC_KEY, in one of three forms told apart by length alone (surrounding whitespace
 * ignored), so no string is read two ways:
 * - 64 hexadecimal characters: the key in hex (`openssl rand -hex 32`);
 * - 32 bytes of text (32 ASCII characters): the key's raw bytes, as Supavisor uses its
 *   VAULT_ENC_KEY (Cloak takes the string itself as the AES-256 key), so its key works as it is;
 * - base64, standard or URL-safe, padding optional, decoding to 32 bytes (43 or 44 characters).
 * Anything else is refused rather than stretched or truncated: a short key is a mistake, not a
 * weaker setting. A 32-character string never decodes to 32 bytes as hex (16) or base64 (24),
 * and a 44-character one is never 32 bytes of text, so the order of the checks decides nothing.
 */
export const parseVaultKey = (text: string): Buffer | VaultError => {
  const raw = text.trim()
  if (/^[0-9a-fA-F]{64}$/.test(raw)) return Buffer.from(raw, "hex")
  const bytes = Buffer.from(raw, "utf8")
  if (bytes.length === KEY_BYTES) return bytes
  if (/^[A-Za-z0-9+/_-]+={0,2}$/.test(raw)) {
    const key = Buffer.from(raw.replace(/-/g, "+").replace(/_/g, "/"), "base64")
    if (key.length === KEY_BYTES) return key
    return new VaultError({
      message: `VAULT_ENC_KEY must be 32 bytes (64 hex characters, 44 base64 characters, or 32 characters used as they are); it decodes to ${key.length} bytes`
    })
  }
  return new VaultError({
    message:
      "VAULT_ENC_KEY must be 32 bytes written as 64 hex characters, as base64 (e.g. `openssl rand -base64 32`), or as 32 characters used as they are (Supavisor's form)"
  })
}

/** The key tag Supavisor's vault writes before every ciphertext (`config/runtime.exs`). */
export const SUPAVISOR_CLOAK_TAG = "AES.GCM.V1"

// Cloak.Ciphers.AES.GCM: the AAD is a constant, the IV 16 bytes unless configured otherwise
// (Supavisor does not), and the GCM tag 16 bytes.
const CLOAK_AAD = Buffer.from("AES256GCM")
const CLOAK_IV_BYTES = 16
const CLOAK_TAG_BYTES = 16

/**
 * Decrypts a value Cloak's AES.GCM cipher encrypted (Supavisor's `db_pass_encrypted`):
 * `0x01, length, key tag, IV (16), GCM tag (16), ciphertext`, where a key tag of 128 bytes or more
 * has its length written DER-style (`0x80 + n`, then n length bytes).
 */
export const decryptCloak = (
  key: Buffer,
  value: Uint8Array,
  keyTag: string = SUPAVISOR_CLOAK_TAG
): Redacted.Redacted<string> | VaultError => {
  const data = Buffer.from(value.buffer, value.byteOffset, value.byteLength)
  const malformed = new VaultError({ message: `not a Cloak ${keyTag} ciphertext` })
  if (data.length < 2 || data[0] !== 1) return malformed
  let offset = 2
  let tagLength = data[1]!
  if (tagLength >= 128) {
    const lengthBytes = tagLength - 128
    if (lengthBytes === 0 || lengthBytes > 4 || data.length < 2 + lengthBytes) return malformed
    tagLength = data.readUIntBE(2, lengthBytes)
    offset += lengthBytes
  }
  const tag = data.subarray(offset, offset + tagLength)
  if (tag.toString("latin1") !== keyTag) {
    return new VaultError({
      message: `encrypted with Cloak key tag ${JSON.stringify(tag.toString("latin1"))}, expected ${JSON.stringify(keyTag)}`
    })
  }
  offset += tagLength
  if (data.length < offset + CLOAK_IV_BYTES + CLOAK_TAG_BYTES) return malformed
  const iv = data.subarray(offset, offset + CLOAK_IV_BYTES)
  const authTag = data.subarray(offset + CLOAK_IV_BYTES, offset + CLOAK_IV_BYTES + CLOAK_TAG_BYTES)
  try {
    const decipher = createDecipheriv("aes-256-gcm", key, iv, { authTagLength: CLOAK_TAG_BYTES })
    decipher.setAAD(CLOAK_AAD)
    decipher.setAuthTag(authTag)
    const body = data.subarray(offset + CLOAK_IV_BYTES + CLOAK_TAG_BYTES)
    return Redacted.make(Buffer.concat([decipher.update(body), decipher.final()]).toString("utf8"))
  } catch {
    return new VaultError({ message: "cannot decrypt: the key differs from the one it was encrypted with" })
  }
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
