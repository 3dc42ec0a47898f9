import { isUtf8 } from "node:buffer"
import { readInt32 } from "./bytes.ts"
import { ProtocolError } from "./ProtocolError.ts"

/** PostgreSQL's MAX_STARTUP_PACKET_LENGTH; longer first packets are refused before being buffered. */
export const MAX_STARTUP_PACKET_SIZE = 10_000

/** The "protocol version" words PostgreSQL reserves for the special untyped packets. */
export const SSL_REQUEST_CODE = 80877103
export const GSSENC_REQUEST_CODE = 80877104
export const CANCEL_REQUEST_CODE = 80877102

/** Newest protocol version the pooler itself speaks; newer minors are answered with NegotiateProtocolVersion. */
export const PROTOCOL_MAJOR = 3
export const PROTOCOL_LATEST_MINOR = 0

/** Protocol 3.2 allows cancel keys up to 256 bytes (PostgreSQL 18). */
const MAX_CANCEL_KEY_LENGTH = 256

export type StartupPacket =
  | { readonly _tag: "SSLRequest" }
  | { readonly _tag: "GSSENCRequest" }
  | { readonly _tag: "CancelRequest"; readonly processId: number; readonly secretKey: Buffer }
  | {
      readonly _tag: "StartupMessage"
      readonly protocolMinor: number
      readonly parameters: Readonly<Record<string, string>>
      readonly protocolOptions: ReadonlyArray<string>
    }

export interface DecodedStartupPacket {
  readonly packet: StartupPacket
  readonly consumed: number
}

const invalid = (message: string, size?: number) =>
  new ProtocolError(
    size === undefined
      ? { reason: "InvalidStartupMessage", message }
      : { reason: "InvalidStartupMessage", message, size }
  )

const SSL_REQUEST: StartupPacket = { _tag: "SSLRequest" }
const GSSENC_REQUEST: StartupPacket = { _tag: "GSSENCRequest" }

/**
 * Decodes the first, untyped packet of a connection from the bytes received so far.
 *
 * Returns `undefined` while more bytes are needed. Length errors are reported as soon as the 4-byte
 * length is known and protocol errors as soon as the version word is, so garbage (an HTTP request,
 * a TLS ClientHello sent without SSLRequest) is refused without waiting for — or buffering — the
 * length it claims. Bytes past `consumed` belong to whatever follows; after SSLRequest or
 * GSSENCRequest the caller must treat any such bytes as a protocol violation (CVE-2021-23214).
 */
export function decodeStartupPacket(
  buf: Buffer,
  maxSize: number = MAX_STARTUP_PACKET_SIZE
): DecodedStartupPacket | ProtocolError | undefined {
  if (buf.length < 4) return undefined
  const length = readInt32(buf, 0)
  if (length < 8) return invalid(`invalid length of startup packet: ${length}`, length)
  if (length > maxSize) {
    return new ProtocolError({
      reason: "StartupPacketTooLarge",
      message: `startup packet too large: ${length} bytes (max ${maxSize} bytes)`,
      size: length,
      max: maxSize
    })
  }
  if (buf.length < 8) return undefined
  const code = readInt32(buf, 4)
  switch (code) {
    case SSL_REQUEST_CODE:
    case GSSENC_REQUEST_CODE:
      // Fixed-size packets: a longer one is not something a real client sends.
      if (length !== 8) return invalid(`invalid length of startup packet: ${length}`, length)
      return { packet: code === SSL_REQUEST_CODE ? SSL_REQUEST : GSSENC_REQUEST, consumed: 8 }
    case CANCEL_REQUEST_CODE: {
      const keyLength = length - 12
      if (keyLength < 1 || keyLength > MAX_CANCEL_KEY_LENGTH) {
        return invalid(`invalid length of cancel request packet: ${length}`, length)
      }
      if (buf.length < length) return undefined
      // Copied so the packet does not pin the socket's read buffer.
      const secretKey = Buffer.from(buf.subarray(12, length))
      return { packet: { _tag: "CancelRequest", processId: readInt32(buf, 8), secretKey }, consumed: length }
    }
  }
  const major = code >>> 16
  const minor = code & 0xffff
  if (major !== PROTOCOL_MAJOR) {
    return new ProtocolError({
      reason: "UnsupportedProtocol",
      message: `unsupported frontend protocol ${major}.${minor}: server supports ${PROTOCOL_MAJOR}.0 to ${PROTOCOL_MAJOR}.${PROTOCOL_LATEST_MINOR}`
    })
  }
  if (buf.length < length) return undefined
  return decodeStartupMessage(buf, length, minor)
}

const decodeStartupMessage = (buf: Buffer, length: number, minor: number): DecodedStartupPacket | ProtocolError => {
  // Same layout rule as PostgreSQL: name/value pairs, then one NUL that is exactly the last byte.
  const last = length - 1
  if (length < 9 || buf[last] !== 0) return invalid("invalid startup packet layout: expected terminator as last byte")
  if (!isUtf8(buf.subarray(8, length))) return invalid("invalid startup packet: parameters are not valid UTF-8")
  const parameters: Record<string, string> = Object.create(null)
  const protocolOptions: Array<string> = []
  let p = 8
  while (p < last) {
    // indexOf cannot run past `last`, which holds a NUL.
    const nameEnd = buf.indexOf(0, p)
    if (nameEnd === p) return invalid("invalid startup packet layout: expected terminator as last byte")
    const name = buf.toString("utf8", p, nameEnd)
    if (nameEnd === last) return invalid(`invalid startup packet layout: missing value for parameter "${name}"`)
    const valueEnd = buf.indexOf(0, nameEnd + 1)
    if (valueEnd === last) return invalid("invalid startup packet layout: expected terminator as last byte")
    if (name.startsWith("_pq_.")) protocolOptions.push(name)
    else parameters[name] = buf.toString("utf8", nameEnd + 1, valueEnd)
    p = valueEnd + 1
  }
  if (!parameters.user) return invalid("no PostgreSQL user name specified in startup packet")
  return { packet: { _tag: "StartupMessage", protocolMinor: minor, parameters, protocolOptions }, consumed: length }
}
