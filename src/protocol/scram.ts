import {
  createHmac,
  createSecretKey,
  hash,
  type KeyObject,
  pbkdf2Sync,
  randomBytes,
  randomFillSync,
  timingSafeEqual
} from "node:crypto"
import { Data } from "effect"

/*
 * SCRAM-SHA-256 (RFC 5802, RFC 7677) for both sides of the pooler, following PostgreSQL's
 * auth-scram.c where it is stricter or looser than the RFC. Handlers never throw: a malformed
 * message is a "protocol" error (the caller answers 08P01), a wrong proof a "password" error (28P01).
 */

export class ScramError extends Data.TaggedError("ScramError")<{
  readonly reason: "protocol" | "password"
  readonly message: string
}> {}

export const SCRAM_SHA_256 = "SCRAM-SHA-256"
export const SCRAM_SHA_256_PLUS = "SCRAM-SHA-256-PLUS"

/**
 * The two lists a server offers, shared by every exchange: a caller may render each once
 * (`ClientAuth` keeps their AuthenticationSASL messages) and find it by the list's identity.
 */
const PLAIN_MECHANISMS: ReadonlyArray<string> = Object.freeze([SCRAM_SHA_256])
const BINDING_MECHANISMS: ReadonlyArray<string> = Object.freeze([SCRAM_SHA_256_PLUS, SCRAM_SHA_256])

export interface ScramSecret {
  readonly iterations: number
  readonly salt: Buffer
  readonly storedKey: Buffer
  readonly serverKey: Buffer
}

const KEY_LENGTH = 32
// Same as PostgreSQL's SCRAM_RAW_NONCE_LEN.
const RAW_NONCE_LENGTH = 18

// A KeyObject key: on Node 24 `createHmac` given a Buffer first probes whether it is a KeyObject or a
// CryptoKey, and each probe throws and catches a TypeError with a stack trace (about 18 µs per HMAC
// against 4 µs). Keys used more than once are made KeyObjects once (`secretKeys`).
const hmac = (key: Buffer | KeyObject, data: string | Buffer): Buffer =>
  createHmac("sha256", Buffer.isBuffer(key) ? createSecretKey(key) : key)
    .update(data)
    .digest()
// One-shot (`crypto.hash`, Node ≥ 21.7): no Hash object per login, about half the cost of
// `createHash`'s update and digest for the 32 bytes a proof check hashes.
const sha256 = (data: Buffer): Buffer => hash("sha256", data, "buffer")

/** StoredKey and ServerKey of a verifier as KeyObjects, made on its first login and kept with it. */
const keyObjects = new WeakMap<ScramSecret, { readonly storedKey: KeyObject; readonly serverKey: KeyObject }>()
const secretKeys = (secret: ScramSecret) => {
  let keys = keyObjects.get(secret)
  if (keys === undefined) {
    keys = { storedKey: createSecretKey(secret.storedKey), serverKey: createSecretKey(secret.serverKey) }
    keyObjects.set(secret, keys)
  }
  return keys
}

// Nonces come from one random block refilled when used up: one call into the CSPRNG per 256
// nonces rather than per login.
const NONCE_POOL = Buffer.alloc(RAW_NONCE_LENGTH * 256)
let noncePoolAt = NONCE_POOL.length
const randomNonce = (): string => {
  if (noncePoolAt === NONCE_POOL.length) {
    randomFillSync(NONCE_POOL)
    noncePoolAt = 0
  }
  const nonce = NONCE_POOL.toString("base64", noncePoolAt, noncePoolAt + RAW_NONCE_LENGTH)
  noncePoolAt += RAW_NONCE_LENGTH
  return nonce
}

const xor = (a: Buffer, b: Buffer): Buffer => {
  const out = Buffer.allocUnsafe(a.length)
  for (let i = 0; i < a.length; i++) out[i] = a[i] ^ b[i]
  return out
}

const sameBytes = (a: Buffer, b: Buffer): boolean => a.length === b.length && timingSafeEqual(a, b)

// Buffer.from(s, "base64") silently skips junk; SCRAM attributes must be exact base64.
const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/
const fromBase64 = (s: string): Buffer | undefined => (BASE64.test(s) ? Buffer.from(s, "base64") : undefined)

// RFC 5802 "printable": %x21-2B / %x2D-7E (no comma).
const NONCE = /^[\x21-\x2b\x2d-\x7e]+$/
// Optional trailing extensions: PostgreSQL reads and ignores any `,x=value` attributes.
const EXTENSIONS = /^(?:,[A-Za-z]=[^,]*)*$/

// One value for every wrong proof: an Error captures a stack trace when made (some microseconds),
// and a guessed password is the one failure that comes in floods.
const WRONG_PROOF = new ScramError({ reason: "password", message: "SCRAM proof does not match the stored secret" })

const protocolError = (message: string) => new ScramError({ reason: "protocol", message })
const malformed = (detail: string) => protocolError(`malformed SCRAM message: ${detail}`)

const text = (data: string | Buffer): string => (typeof data === "string" ? data : data.toString("utf8"))

// ---------------------------------------------------------------------------------------------
// SASLprep (RFC 4013), the way PostgreSQL applies it: ASCII passes untouched, and a password that
// SASLprep prohibits is used as raw bytes rather than rejected. Bidirectional-text rules are not
// checked (PostgreSQL would fall back to raw bytes for such rare strings; we normalise them).

// Stringprep tables as inclusive [from, to] code point pairs. C.1.2: non-ASCII spaces (→ U+0020).
const NON_ASCII_SPACE = [0xa0, 0xa0, 0x1680, 0x1680, 0x2000, 0x200b, 0x202f, 0x202f, 0x205f, 0x205f, 0x3000, 0x3000]
// B.1: "commonly mapped to nothing" (U+200B is already a space above, as in PostgreSQL).
const MAPPED_TO_NOTHING = [
  0xad, 0xad, 0x34f, 0x34f, 0x1806, 0x1806, 0x180b, 0x180d, 0x200c, 0x200d, 0x2060, 0x2060, 0xfe00, 0xfe0f, 0xfeff,
  0xfeff
]
// C.1.2, C.2.2, C.6, C.7, C.8, C.9 beyond what the general categories below already cover.
const PROHIBITED = [
  0xa0, 0xa0, 0x340, 0x341, 0x6dd, 0x6dd, 0x70f, 0x70f, 0x1680, 0x1680, 0x180e, 0x180e, 0x2000, 0x200f, 0x2028, 0x202f,
  0x205f, 0x2063, 0x206a, 0x206f, 0x2ff0, 0x2ffb, 0x3000, 0x3000, 0xfeff, 0xfeff, 0xfff9, 0xfffd, 0x1d173, 0x1d17a,
  0xe0001, 0xe0001, 0xe0020, 0xe007f
]
// Cc, Co, Cs, Cn: C.2.1/C.2.2 controls, C.3, C.5, C.4 (noncharacters are Cn) and A.1 (unassigned,
// per the engine's Unicode version rather than 3.2).
const PROHIBITED_CATEGORY = /[\p{Cc}\p{Co}\p{Cs}\p{Cn}]/u

const inTable = (cp: number, table: ReadonlyArray<number>): boolean => {
  for (let i = 0; i < table.length; i += 2) if (cp >= table[i] && cp <= table[i + 1]) return true
  return false
}

export const saslprep = (password: string): string => {
  if (/^[\x00-\x7f]*$/.test(password)) return password
  let mapped = ""
  for (const ch of password) {
    const cp = ch.codePointAt(0)!
    if (inTable(cp, NON_ASCII_SPACE)) mapped += " "
    else if (!inTable(cp, MAPPED_TO_NOTHING)) mapped += ch
  }
  const prepared = mapped.normalize("NFKC")
  if (PROHIBITED_CATEGORY.test(prepared)) return password
  for (const ch of prepared) if (inTable(ch.codePointAt(0)!, PROHIBITED)) return password
  return prepared
}

const saltedPassword = (password: string, salt: Buffer, iterations: number): Buffer =>
  pbkdf2Sync(saslprep(password), salt, iterations, KEY_LENGTH, "sha256")

// ---------------------------------------------------------------------------------------------
// Secrets

export const createScramSecret = (password: string, salt: Buffer = randomBytes(16), iterations = 4096): ScramSecret => {
  const salted = saltedPassword(password, salt, iterations)
  return {
    iterations,
    salt,
    storedKey: sha256(hmac(salted, "Client Key")),
    serverKey: hmac(salted, "Server Key")
  }
}

const SECRET = /^SCRAM-SHA-256\$([0-9]{1,10}):([^$:]+)\$([^$:]+):([^$:]+)$/

/** Parses PostgreSQL's `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64 parts). */
export const parseScramSecret = (s: string): ScramSecret | undefined => {
  const m = SECRET.exec(s)
  if (m === null) return undefined
  const iterations = Number(m[1])
  const salt = fromBase64(m[2])
  const storedKey = fromBase64(m[3])
  const serverKey = fromBase64(m[4])
  if (iterations < 1 || iterations > 0x7fffffff) return undefined
  if (salt === undefined || salt.length === 0) return undefined
  if (storedKey?.length !== KEY_LENGTH || serverKey?.length !== KEY_LENGTH) return undefined
  return { iterations, salt, storedKey, serverKey }
}

export const formatScramSecret = (secret: ScramSecret): string =>
  `SCRAM-SHA-256$${secret.iterations}:${secret.salt.toString("base64")}$${secret.storedKey.toString("base64")}:${secret.serverKey.toString("base64")}`

// ---------------------------------------------------------------------------------------------
// Server side: the pooler authenticating a client against a stored secret.

export interface ScramServerOptions {
  /** Offer SCRAM-SHA-256-PLUS; `data` is the tls-server-end-point hash of our certificate. */
  readonly channelBinding?: { readonly type: "tls-server-end-point"; readonly data: Buffer }
  /** Server nonce, for test vectors only; normally random. */
  readonly nonce?: string
}

const INITIAL = 0
const FIRST_DONE = 1
const FINISHED = 2

export class ScramServer {
  /** What to advertise in AuthenticationSASL, most preferred first. */
  readonly mechanisms: ReadonlyArray<string>
  private readonly secret: ScramSecret
  private readonly channelBinding: ScramServerOptions["channelBinding"]
  private readonly serverNonce: string
  private state = INITIAL
  private gs2Header = ""
  private usesChannelBinding = false
  private clientFirstBare = ""
  private serverFirst = ""
  private nonce = ""

  constructor(secret: ScramSecret, options: ScramServerOptions = {}) {
    this.secret = secret
    this.channelBinding = options.channelBinding
    this.serverNonce = options.nonce ?? randomNonce()
    this.mechanisms = options.channelBinding === undefined ? PLAIN_MECHANISMS : BINDING_MECHANISMS
  }

  handleClientFirst(mechanism: string, data: Buffer | string): { readonly serverFirst: string } | ScramError {
    if (this.state !== INITIAL) return protocolError("unexpected SCRAM client-first-message")
    // Any failure ends the exchange; only success moves it on.
    this.state = FINISHED
    const plus = mechanism === SCRAM_SHA_256_PLUS
    if (mechanism !== SCRAM_SHA_256 && !(plus && this.channelBinding !== undefined)) {
      return protocolError("client selected an invalid SASL authentication mechanism")
    }
    const s = text(data)
    if (s.length === 0 || s.includes("\0")) return malformed("invalid client-first-message")
    let p: number
    switch (s[0]) {
      case "n":
      case "y":
        if (plus) {
          return protocolError(
            "the client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not include channel binding data"
          )
        }
        // "y" means the client could bind but thinks we cannot: a downgrade if we offered it.
        if (s[0] === "y" && this.channelBinding !== undefined) {
          return protocolError(
            "SCRAM channel binding negotiation error: the client supports SCRAM channel binding but thinks the server does not, however this server does support channel binding"
          )
        }
        p = 1
        break
      case "p": {
        if (!plus) {
          return protocolError(
            "the client selected SCRAM-SHA-256 without channel binding, but the SCRAM message includes channel binding data"
          )
        }
        const comma = s.indexOf(",", 2)
        if (s[1] !== "=" || comma === -1) return malformed("invalid channel binding flag")
        const type = s.slice(2, comma)
        if (type !== this.channelBinding?.type) return protocolError(`unsupported SCRAM channel-binding type "${type}"`)
        this.usesChannelBinding = true
        p = comma
        break
      }
      default:
        return malformed("unexpected channel-binding flag")
    }
    if (s[p] !== ",") return malformed("comma expected after channel-binding flag")
    p++
    if (s[p] === "a") return protocolError("client uses authorization identity, but it is not supported")
    if (s[p] !== ",") return malformed("unexpected attribute in client-first-message")
    p++
    const bare = s.slice(p)
    if (bare[0] === "m") return protocolError("client requires an unsupported SCRAM extension")
    // The username is ignored, as PostgreSQL does: the startup packet already named the role.
    if (!bare.startsWith("n=")) return malformed('expected attribute "n"')
    const userEnd = bare.indexOf(",", 2)
    if (userEnd === -1 || !bare.startsWith("r=", userEnd + 1)) return malformed('expected attribute "r"')
    const nonceEnd = bare.indexOf(",", userEnd + 3)
    const clientNonce = bare.slice(userEnd + 3, nonceEnd === -1 ? bare.length : nonceEnd)
    if (!NONCE.test(clientNonce)) return malformed("invalid nonce")
    if (nonceEnd !== -1 && !EXTENSIONS.test(bare.slice(nonceEnd))) return malformed("invalid extension")
    this.gs2Header = s.slice(0, p)
    this.clientFirstBare = bare
    this.nonce = clientNonce + this.serverNonce
    this.serverFirst = `r=${this.nonce},s=${this.secret.salt.toString("base64")},i=${this.secret.iterations}`
    this.state = FIRST_DONE
    return { serverFirst: this.serverFirst }
  }

  /**
   * Verifies the client's proof. On success returns server-final and the client's ClientKey
   * (ClientProof XOR ClientSignature), which lets the pooler log in upstream as the client
   * without ever knowing the password (SCRAM pass-through).
   */
  handleClientFinal(data: Buffer | string): { readonly serverFinal: string; readonly clientKey: Buffer } | ScramError {
    if (this.state !== FIRST_DONE) return protocolError("unexpected SCRAM client-final-message")
    this.state = FINISHED
    const s = text(data)
    if (s.includes("\0")) return malformed("invalid client-final-message")
    if (!s.startsWith("c=")) return malformed('expected attribute "c"')
    const cEnd = s.indexOf(",", 2)
    if (cEnd === -1) return malformed('expected attribute "r"')
    const cbind = fromBase64(s.slice(2, cEnd))
    if (cbind === undefined) return malformed("invalid channel binding attribute")
    const gs2 = Buffer.from(this.gs2Header)
    const expected =
      this.usesChannelBinding && this.channelBinding !== undefined
        ? Buffer.concat([gs2, this.channelBinding.data])
        : gs2
    if (!cbind.equals(expected)) {
      return protocolError(
        this.usesChannelBinding
          ? "SCRAM channel binding check failed"
          : "unexpected SCRAM channel-binding attribute in client-final-message"
      )
    }
    if (!s.startsWith("r=", cEnd + 1)) return malformed('expected attribute "r"')
    const rEnd = s.indexOf(",", cEnd + 3)
    if (rEnd === -1) return malformed('expected attribute "p"')
    if (s.slice(cEnd + 3, rEnd) !== this.nonce) return protocolError("SCRAM nonce mismatch")
    const proofAt = s.lastIndexOf(",p=")
    if (proofAt < rEnd || !EXTENSIONS.test(s.slice(rEnd, proofAt))) return malformed('expected attribute "p"')
    const proof = fromBase64(s.slice(proofAt + 3))
    if (proof === undefined || proof.length !== KEY_LENGTH) return malformed("malformed proof in client-final-message")
    const authMessage = `${this.clientFirstBare},${this.serverFirst},${s.slice(0, proofAt)}`
    const keys = secretKeys(this.secret)
    const clientKey = xor(proof, hmac(keys.storedKey, authMessage))
    if (!sameBytes(sha256(clientKey), this.secret.storedKey)) {
      return WRONG_PROOF
    }
    return { serverFinal: `v=${hmac(keys.serverKey, authMessage).toString("base64")}`, clientKey }
  }
}

// ---------------------------------------------------------------------------------------------
// Client side: the pooler logging in to an upstream server.

export type ScramClientCredentials =
  /**
   * `known`: keys an earlier exchange derived from this password (`keys`). Used when the server
   * gives the same salt and iteration count, which PostgreSQL does until the role's password changes:
   * no PBKDF2, whose 4096 iterations block the event loop for a millisecond or more per login.
   */
  | { readonly password: string; readonly known?: ScramKeys | undefined }
  /** SCRAM pass-through: a ClientKey recovered by ScramServer; ServerKey (if known) verifies the server. */
  | { readonly clientKey: Buffer; readonly serverKey?: Buffer }

export interface ScramClientOptions {
  /** Sent in client-first; PostgreSQL ignores it, so libpq sends "". */
  readonly username?: string
  /** Client nonce, for test vectors only; normally random. */
  readonly nonce?: string
  /**
   * Largest iteration count accepted from the server. Key derivation is synchronous, so a server
   * asking for billions of iterations would stall the event loop for every tenant.
   */
  readonly maxIterations?: number
}

/** Keys derived during an exchange; caching them (per salt and iteration count) skips PBKDF2 next time. */
export interface ScramKeys {
  readonly salt: Buffer
  readonly iterations: number
  readonly clientKey: Buffer
  readonly serverKey: Buffer | undefined
}

const escapeSaslName = (name: string): string => name.replaceAll("=", "=3D").replaceAll(",", "=2C")

export class ScramClient {
  readonly mechanism = SCRAM_SHA_256
  private readonly credentials: ScramClientCredentials
  private readonly clientNonce: string
  private readonly clientFirstBare: string
  private readonly maxIterations: number
  private state = INITIAL
  private expectedServerSignature: Buffer | undefined = undefined
  private derived: ScramKeys | undefined = undefined

  constructor(credentials: ScramClientCredentials, options: ScramClientOptions = {}) {
    this.credentials = credentials
    this.clientNonce = options.nonce ?? randomNonce()
    this.clientFirstBare = `n=${escapeSaslName(options.username ?? "")},r=${this.clientNonce}`
    this.maxIterations = options.maxIterations ?? 1_000_000
  }

  /** The keys used, once handleServerFirst has succeeded (`known` itself when it applied). */
  get keys(): ScramKeys | undefined {
    return this.derived
  }

  /** The SASLInitialResponse data. We never bind to the channel, so the GS2 header is "n,,". */
  clientFirst(): string {
    return `n,,${this.clientFirstBare}`
  }

  /** Checks server-first and returns client-final (the SASLResponse data). */
  handleServerFirst(msg: string | Buffer): string | ScramError {
    if (this.state !== INITIAL) return protocolError("unexpected SCRAM server-first-message")
    this.state = FINISHED
    const s = text(msg)
    if (s[0] === "m") return protocolError("server requires an unsupported SCRAM extension")
    const m = /^r=([^,]*),s=([^,]*),i=([0-9]{1,10})((?:,[A-Za-z]=[^,]*)*)$/.exec(s)
    if (m === null) return malformed("invalid server-first-message")
    const nonce = m[1]
    if (!NONCE.test(nonce) || nonce.length <= this.clientNonce.length || !nonce.startsWith(this.clientNonce)) {
      return protocolError("invalid SCRAM response (nonce mismatch)")
    }
    const salt = fromBase64(m[2])
    if (salt === undefined || salt.length === 0) return malformed("invalid salt")
    const iterations = Number(m[3])
    if (iterations < 1 || iterations > this.maxIterations) return malformed(`unsupported iteration count ${m[3]}`)
    const credentials = this.credentials
    let keys: ScramKeys
    if ("password" in credentials) {
      const known = credentials.known
      if (known !== undefined && known.iterations === iterations && known.salt.equals(salt)) keys = known
      else {
        const salted = saltedPassword(credentials.password, salt, iterations)
        keys = { salt, iterations, clientKey: hmac(salted, "Client Key"), serverKey: hmac(salted, "Server Key") }
      }
    } else keys = { salt, iterations, clientKey: credentials.clientKey, serverKey: credentials.serverKey }
    const { clientKey, serverKey } = keys
    if (clientKey.length !== KEY_LENGTH) return protocolError("invalid SCRAM client key")
    this.derived = keys
    const withoutProof = `c=biws,r=${nonce}`
    const authMessage = `${this.clientFirstBare},${s},${withoutProof}`
    const proof = xor(clientKey, hmac(sha256(clientKey), authMessage))
    if (serverKey !== undefined) this.expectedServerSignature = hmac(serverKey, authMessage)
    this.state = FIRST_DONE
    return `${withoutProof},p=${proof.toString("base64")}`
  }

  /**
   * Checks server-final. Without a ServerKey (pass-through given only a ClientKey) the signature
   * cannot be checked and is accepted: the upstream's AuthenticationOk is then the only evidence.
   */
  verifyServerFinal(msg: string | Buffer): true | ScramError {
    if (this.state !== FIRST_DONE) return protocolError("unexpected SCRAM server-final-message")
    this.state = FINISHED
    const s = text(msg)
    if (s.startsWith("e=")) {
      const error = s.slice(2)
      return new ScramError({
        reason: error === "invalid-proof" ? "password" : "protocol",
        message: `SCRAM authentication failed: ${error}`
      })
    }
    const m = /^v=([^,]*)(?:,[A-Za-z]=[^,]*)*$/.exec(s)
    const signature = m === null ? undefined : fromBase64(m[1])
    if (signature === undefined) return malformed("invalid server-final-message")
    const expected = this.expectedServerSignature
    if (expected !== undefined && !sameBytes(signature, expected)) {
      return protocolError("incorrect server signature")
    }
    return true
  }
}
