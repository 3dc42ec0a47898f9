import { Buffer } from "node:buffer"
import { cstringEnd, readInt32 } from "./bytes.ts"
import { ProtocolError } from "./ProtocolError.ts"
import { CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, PROTOCOL_MAJOR, SSL_REQUEST_CODE } from "./startup.ts"

/*
 * Frontend messages. Most of what the pooler sends upstream comes from pg-protocol's `serialize`;
 * these are the ones it lacks or gets wrong for a pooler: its `startup` always appends
 * client_encoding and speaks only 3.0, and its `cancel` cannot carry a protocol 3.2 key.
 */

const untyped = (length: number, code: number): Buffer => {
  const buf = Buffer.allocUnsafe(length)
  buf.writeInt32BE(length, 0)
  buf.writeInt32BE(code, 4)
  return buf
}

export const sslRequest = (): Buffer => untyped(8, SSL_REQUEST_CODE)

export const gssencRequest = (): Buffer => untyped(8, GSSENC_REQUEST_CODE)

/** CancelRequest; a number is a 3.0 four-byte key, a Buffer is sent as-is (3.2 keys up to 256 bytes). */
export const cancelRequest = (processId: number, secretKey: number | Buffer): Buffer => {
  const keyLength = typeof secretKey === "number" ? 4 : secretKey.length
  const buf = untyped(12 + keyLength, CANCEL_REQUEST_CODE)
  buf.writeInt32BE(processId | 0, 8)
  if (typeof secretKey === "number") buf.writeInt32BE(secretKey | 0, 12)
  else secretKey.copy(buf, 12)
  return buf
}

/** StartupMessage with exactly the given parameters (in insertion order) and protocol 3.<minor>. */
export const startupMessage = (parameters: Readonly<Record<string, string>>, protocolMinor = 0): Buffer => {
  const keys = Object.keys(parameters)
  let length = 9
  for (const key of keys) length += Buffer.byteLength(key) + Buffer.byteLength(parameters[key]!) + 2
  const buf = untyped(length, (PROTOCOL_MAJOR << 16) | protocolMinor)
  let at = 8
  for (const key of keys) {
    at += buf.write(key, at)
    buf[at++] = 0
    at += buf.write(parameters[key]!, at)
    buf[at++] = 0
  }
  buf[at] = 0
  return buf
}

const malformed = (what: string) =>
  new ProtocolError({ reason: "InvalidMessage", message: `malformed ${what} message` })

/**
 * SASLInitialResponse ('p' body): mechanism name, then an Int32-prefixed initial response
 * (-1 = none, given as an empty Buffer). The data is copied: it outlives the chunk.
 */
export const decodeSASLInitialResponse = (
  buf: Buffer,
  start: number,
  end: number
): { readonly mechanism: string; readonly data: Buffer } | ProtocolError => {
  const nul = cstringEnd(buf, start, end)
  if (nul === -1 || end - nul - 1 < 4) return malformed("SASLInitialResponse")
  const mechanism = buf.toString("utf8", start, nul)
  const length = readInt32(buf, nul + 1)
  const dataStart = nul + 5
  if (length === -1 && dataStart === end) return { mechanism, data: Buffer.alloc(0) }
  if (length !== end - dataStart) return malformed("SASLInitialResponse")
  return { mechanism, data: Buffer.from(buf.subarray(dataStart, end)) }
}

/** PasswordMessage ('p' body): one C string that must fill the body exactly. */
export const decodePasswordMessage = (buf: Buffer, start: number, end: number): string | ProtocolError => {
  const nul = cstringEnd(buf, start, end)
  if (nul !== end - 1) return malformed("password")
  return buf.toString("utf8", start, nul)
}
