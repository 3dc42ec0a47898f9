import { Buffer } from "node:buffer"
import { cstringEnd, decodeCString, readInt32 } from "./bytes.ts"
import { ProtocolError } from "./ProtocolError.ts"

/*
 * Backend messages: encoders for what the pooler itself says to clients, decoders for what it must
 * understand from an upstream server. Every encoder sizes its Buffer exactly and writes it once.
 */

export interface ErrorFields {
  readonly severity: string
  readonly code: string
  readonly message: string
  readonly detail?: string
  readonly hint?: string
  /** The source routine (R): some drivers act on it, e.g. postgres.js re-prepares on `RevalidateCachedQuery`. */
  readonly routine?: string
}

const header = (type: number, bodyLength: number): Buffer => {
  const buf = Buffer.allocUnsafe(5 + bodyLength)
  buf[0] = type
  buf.writeInt32BE(bodyLength + 4, 1)
  return buf
}

const authentication = (code: number, payload?: Buffer): Buffer => {
  const extra = payload === undefined ? 0 : payload.length
  const buf = header(0x52 /* R */, 4 + extra)
  buf.writeInt32BE(code, 5)
  if (payload !== undefined) payload.copy(buf, 9)
  return buf
}

const asBytes = (data: string | Buffer): Buffer => (typeof data === "string" ? Buffer.from(data, "utf8") : data)

export const authenticationOk = (): Buffer => authentication(0)

export const authenticationCleartextPassword = (): Buffer => authentication(3)

export const authenticationMD5Password = (salt: Buffer): Buffer => authentication(5, salt.subarray(0, 4))

export const authenticationSASL = (mechanisms: ReadonlyArray<string>): Buffer => {
  let size = 1
  for (const m of mechanisms) size += Buffer.byteLength(m) + 1
  const payload = Buffer.alloc(size)
  let at = 0
  for (const m of mechanisms) at += payload.write(m, at) + 1
  return authentication(10, payload)
}

export const authenticationSASLContinue = (data: string | Buffer): Buffer => authentication(11, asBytes(data))

export const authenticationSASLFinal = (data: string | Buffer): Buffer => authentication(12, asBytes(data))

export const parameterStatus = (name: string, value: string): Buffer => {
  const nameLength = Buffer.byteLength(name)
  const valueLength = Buffer.byteLength(value)
  const buf = header(0x53 /* S */, nameLength + valueLength + 2)
  buf.write(name, 5)
  buf[5 + nameLength] = 0
  buf.write(value, 6 + nameLength)
  buf[buf.length - 1] = 0
  return buf
}

/**
 * BackendKeyData. A number is written as the 4-byte key of protocol 3.0 (signed or unsigned 32-bit
 * values both fit); a Buffer is written as-is for protocol 3.2's longer keys.
 */
export const backendKeyData = (processId: number, secretKey: number | Buffer): Buffer => {
  const keyLength = typeof secretKey === "number" ? 4 : secretKey.length
  const buf = header(0x4b /* K */, 4 + keyLength)
  buf.writeInt32BE(processId | 0, 5)
  if (typeof secretKey === "number") buf.writeInt32BE(secretKey | 0, 9)
  else secretKey.copy(buf, 9)
  return buf
}

const READY: Record<"I" | "T" | "E", Buffer> = {
  I: Buffer.from([0x5a, 0, 0, 0, 5, 0x49]),
  T: Buffer.from([0x5a, 0, 0, 0, 5, 0x54]),
  E: Buffer.from([0x5a, 0, 0, 0, 5, 0x45])
}

export const readyForQuery = (status: "I" | "T" | "E"): Buffer => Buffer.from(READY[status])

// A NUL inside a value would end the field early and desync the client's parser.
const noNul = (value: string): string => (value.includes("\0") ? value.replaceAll("\0", "") : value)

const fieldList = (type: number, fields: ErrorFields): Buffer => {
  const entries: Array<[number, string]> = [
    [0x53 /* S */, noNul(fields.severity)],
    // V is the non-localized severity (9.6+); ours is never localized, so the same text.
    [0x56 /* V */, noNul(fields.severity)],
    [0x43 /* C */, noNul(fields.code)],
    [0x4d /* M */, noNul(fields.message)]
  ]
  if (fields.detail !== undefined) entries.push([0x44 /* D */, noNul(fields.detail)])
  if (fields.hint !== undefined) entries.push([0x48 /* H */, noNul(fields.hint)])
  if (fields.routine !== undefined) entries.push([0x52 /* R */, noNul(fields.routine)])
  let size = 1
  for (const [, value] of entries) size += Buffer.byteLength(value) + 2
  const buf = header(type, size)
  let at = 5
  for (const [code, value] of entries) {
    buf[at++] = code
    at += buf.write(value, at)
    buf[at++] = 0
  }
  buf[at] = 0
  return buf
}

export const errorResponse = (fields: ErrorFields): Buffer => fieldList(0x45 /* E */, fields)

export const noticeResponse = (fields: ErrorFields): Buffer => fieldList(0x4e /* N */, fields)

export const negotiateProtocolVersion = (newestMinor: number, unrecognized: ReadonlyArray<string>): Buffer => {
  let size = 8
  for (const name of unrecognized) size += Buffer.byteLength(name) + 1
  const buf = header(0x76 /* v */, size)
  buf.writeInt32BE((3 << 16) | newestMinor, 5)
  buf.writeInt32BE(unrecognized.length, 9)
  let at = 13
  for (const name of unrecognized) {
    at += buf.write(name, at)
    buf[at++] = 0
  }
  return buf
}

/** A result column as the admin console describes it: text-format values of a builtin type. */
export interface ColumnDescription {
  readonly name: string
  /** pg_type OID: 25 text, 20 int8, 23 int4, 16 bool, 1700 numeric. */
  readonly typeOid: number
}

const TYPE_SIZES: Readonly<Record<number, number>> = { 16: 1, 20: 8, 23: 4 }

export const rowDescription = (columns: ReadonlyArray<ColumnDescription>): Buffer => {
  let size = 2
  for (const c of columns) size += Buffer.byteLength(c.name) + 1 + 18
  const buf = header(0x54 /* T */, size)
  buf.writeInt16BE(columns.length, 5)
  let at = 7
  for (const c of columns) {
    at += buf.write(c.name, at)
    buf[at++] = 0
    buf.writeInt32BE(0, at) // table OID
    buf.writeInt16BE(0, at + 4) // column number
    buf.writeInt32BE(c.typeOid, at + 6)
    buf.writeInt16BE(TYPE_SIZES[c.typeOid] ?? -1, at + 10)
    buf.writeInt32BE(-1, at + 12) // type modifier
    buf.writeInt16BE(0, at + 16) // text format
    at += 18
  }
  return buf
}

/** One row in text format; `null` is SQL NULL. */
export const dataRow = (values: ReadonlyArray<string | null>): Buffer => {
  let size = 2
  for (const v of values) size += 4 + (v === null ? 0 : Buffer.byteLength(v))
  const buf = header(0x44 /* D */, size)
  buf.writeInt16BE(values.length, 5)
  let at = 7
  for (const v of values) {
    if (v === null) {
      buf.writeInt32BE(-1, at)
      at += 4
    } else {
      const n = buf.write(v, at + 4)
      buf.writeInt32BE(n, at)
      at += 4 + n
    }
  }
  return buf
}

export const commandComplete = (tag: string): Buffer => {
  const buf = header(0x43 /* C */, Buffer.byteLength(tag) + 1)
  const n = buf.write(tag, 5)
  buf[5 + n] = 0
  return buf
}

export const emptyQueryResponse = (): Buffer => header(0x49 /* I */, 0)

// ---------------------------------------------------------------------------------------------
// Decoders. Each takes the body as (buf, start, end) — exactly what MessageScanner hands over.

/** ErrorResponse/NoticeResponse body → field code → value (e.g. `C` → "28P01"). Tolerates truncation. */
export const decodeErrorFields = (buf: Buffer, start: number, end: number): Record<string, string> => {
  const fields: Record<string, string> = Object.create(null)
  let at = start
  while (at < end && buf[at] !== 0) {
    const code = String.fromCharCode(buf[at])
    const nul = cstringEnd(buf, at + 1, end)
    const valueEnd = nul === -1 ? end : nul
    fields[code] = buf.toString("utf8", at + 1, valueEnd)
    at = valueEnd + 1
  }
  return fields
}

/** ParameterStatus body → [name, value]; a missing terminator just ends the string at `end`. */
export const decodeParameterStatus = (buf: Buffer, start: number, end: number): [string, string] => {
  const nul = cstringEnd(buf, start, end)
  if (nul === -1) return [buf.toString("utf8", start, end), ""]
  return [buf.toString("utf8", start, nul), decodeCString(buf, nul + 1, end)]
}

export type AuthenticationRequest =
  | { readonly _tag: "AuthenticationOk" }
  | { readonly _tag: "AuthenticationCleartextPassword" }
  | { readonly _tag: "AuthenticationMD5Password"; readonly salt: Buffer }
  | { readonly _tag: "AuthenticationSASL"; readonly mechanisms: ReadonlyArray<string> }
  | { readonly _tag: "AuthenticationSASLContinue"; readonly data: Buffer }
  | { readonly _tag: "AuthenticationSASLFinal"; readonly data: Buffer }
  /** Kerberos, GSS, SSPI…: methods the pooler cannot answer; the caller reports `code`. */
  | { readonly _tag: "AuthenticationUnsupported"; readonly code: number }

const malformed = (what: string) =>
  new ProtocolError({ reason: "InvalidMessage", message: `malformed ${what} message` })

/** Authentication ('R') body from an upstream server. Payloads are copied: they outlive the chunk. */
export const decodeAuthentication = (
  buf: Buffer,
  start: number,
  end: number
): AuthenticationRequest | ProtocolError => {
  if (end - start < 4) return malformed("authentication")
  const code = readInt32(buf, start)
  const at = start + 4
  switch (code) {
    case 0:
      return { _tag: "AuthenticationOk" }
    case 3:
      return { _tag: "AuthenticationCleartextPassword" }
    case 5:
      if (end - at !== 4) return malformed("authentication")
      return { _tag: "AuthenticationMD5Password", salt: Buffer.from(buf.subarray(at, end)) }
    case 10: {
      const mechanisms: Array<string> = []
      let p = at
      while (p < end && buf[p] !== 0) {
        const nul = cstringEnd(buf, p, end)
        if (nul === -1) return malformed("authentication")
        mechanisms.push(buf.toString("utf8", p, nul))
        p = nul + 1
      }
      if (p >= end) return malformed("authentication")
      return { _tag: "AuthenticationSASL", mechanisms }
    }
    case 11:
      return { _tag: "AuthenticationSASLContinue", data: Buffer.from(buf.subarray(at, end)) }
    case 12:
      return { _tag: "AuthenticationSASLFinal", data: Buffer.from(buf.subarray(at, end)) }
    default:
      return { _tag: "AuthenticationUnsupported", code }
  }
}

/** BackendKeyData ('K') body; the key is 4 bytes in protocol 3.0 and up to 256 in 3.2. */
export const decodeBackendKeyData = (
  buf: Buffer,
  start: number,
  end: number
): { readonly processId: number; readonly secretKey: Buffer } | ProtocolError => {
  const keyLength = end - start - 4
  if (keyLength < 4 || keyLength > 256) return malformed("BackendKeyData")
  return { processId: readInt32(buf, start), secretKey: Buffer.from(buf.subarray(start + 4, end)) }
}

/** NegotiateProtocolVersion ('v') body from an upstream server. */
export const decodeNegotiateProtocolVersion = (
  buf: Buffer,
  start: number,
  end: number
): { readonly newestMinor: number; readonly unrecognized: ReadonlyArray<string> } | ProtocolError => {
  if (end - start < 8) return malformed("NegotiateProtocolVersion")
  const version = readInt32(buf, start)
  const count = readInt32(buf, start + 4)
  if (version >>> 16 !== 3 || count < 0) return malformed("NegotiateProtocolVersion")
  const unrecognized: Array<string> = []
  let p = start + 8
  for (let i = 0; i < count; i++) {
    const nul = cstringEnd(buf, p, end)
    if (nul === -1) return malformed("NegotiateProtocolVersion")
    unrecognized.push(buf.toString("utf8", p, nul))
    p = nul + 1
  }
  return { newestMinor: version & 0xffff, unrecognized }
}
