import { Readable } from "node:stream"
import fc from "fast-check"
import { parse, serialize } from "pg-protocol"
import { describe, expect, it } from "vitest"
import {
  authenticationCleartextPassword,
  authenticationMD5Password,
  authenticationOk,
  authenticationSASL,
  authenticationSASLContinue,
  authenticationSASLFinal,
  backendKeyData,
  decodeAuthentication,
  decodeBackendKeyData,
  decodeCString,
  decodeErrorFields,
  decodeNegotiateProtocolVersion,
  decodeParameterStatus,
  decodePasswordMessage,
  decodeSASLInitialResponse,
  errorResponse,
  MessageScanner,
  negotiateProtocolVersion,
  noticeResponse,
  ProtocolError,
  parameterStatus,
  readyForQuery
} from "../../../src/protocol/index.ts"

/** Parses backend bytes with pg-protocol's own parser, an implementation independent of ours. */
const pgParse = async (buf: Buffer): Promise<Array<Record<string, unknown>>> => {
  const messages: Array<Record<string, unknown>> = []
  // Error's `message` is not enumerable, so copy it explicitly.
  await parse(Readable.from([buf]), (msg) => messages.push({ ...msg, message: (msg as { message?: string }).message }))
  return messages
}

/** Frames `buf` with our scanner and returns each body as (buffer, start, end), inspecting everything. */
const bodies = (buf: Buffer): Array<[number, Buffer, number, number]> => {
  const out: Array<[number, Buffer, number, number]> = []
  const all = String.fromCharCode(...Array.from({ length: 256 }, (_, i) => i))
  const scanner = new MessageScanner((type, length, body, start) => out.push([type, body!, start, start + length]), {
    maxMessageSize: 0,
    inspect: all
  })
  expect(scanner.feed(buf)).toBeUndefined()
  return out
}

const only = (buf: Buffer): [Buffer, number, number] => {
  const all = bodies(buf)
  expect(all).toHaveLength(1)
  const [, body, start, end] = all[0]!
  return [body, start, end]
}

describe("backend encoders, checked by pg-protocol's parser", () => {
  it("authentication requests", async () => {
    const salt = Buffer.from([1, 2, 3, 4])
    const messages = await pgParse(
      Buffer.concat([
        authenticationOk(),
        authenticationCleartextPassword(),
        authenticationMD5Password(salt),
        authenticationSASL(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]),
        authenticationSASLContinue("r=abc,s=c2FsdA==,i=4096"),
        authenticationSASLFinal(Buffer.from("v=xyz"))
      ])
    )
    expect(messages.map((m) => m.name)).toEqual([
      "authenticationOk",
      "authenticationCleartextPassword",
      "authenticationMD5Password",
      "authenticationSASL",
      "authenticationSASLContinue",
      "authenticationSASLFinal"
    ])
    expect(messages[2]!.salt).toEqual(salt)
    expect(messages[3]!.mechanisms).toEqual(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])
    expect(messages[4]!.data).toBe("r=abc,s=c2FsdA==,i=4096")
    expect(messages[5]!.data).toBe("v=xyz")
  })

  it("ParameterStatus, BackendKeyData, ReadyForQuery", async () => {
    const messages = await pgParse(
      Buffer.concat([
        parameterStatus("application_name", "tidepool ✓"),
        backendKeyData(4242, 0xdeadbeef),
        readyForQuery("I"),
        readyForQuery("T"),
        readyForQuery("E")
      ])
    )
    expect(messages[0]).toMatchObject({ parameterName: "application_name", parameterValue: "tidepool ✓" })
    expect(messages[1]).toMatchObject({ processID: 4242, secretKey: 0xdeadbeef | 0 })
    expect(messages.slice(2).map((m) => m.status)).toEqual(["I", "T", "E"])
  })

  it("readyForQuery returns a fresh buffer each time", () => {
    const a = readyForQuery("I")
    a[5] = 0
    expect(readyForQuery("I")[5]).toBe(0x49)
  })

  it("ErrorResponse and NoticeResponse with S, V, C, M, D, H", async () => {
    const fields = {
      severity: "FATAL",
      code: "28P01",
      message: 'password authentication failed for user "bob"',
      detail: "détail",
      hint: "hint"
    }
    const [error, notice] = await pgParse(
      Buffer.concat([errorResponse(fields), noticeResponse({ severity: "NOTICE", code: "00000", message: "hi" })])
    )
    expect(error).toMatchObject({
      name: "error",
      severity: "FATAL",
      code: "28P01",
      message: fields.message,
      detail: "détail",
      hint: "hint"
    })
    expect(notice).toMatchObject({ name: "notice", severity: "NOTICE", code: "00000", message: "hi" })
    const [body, start, end] = only(errorResponse(fields))
    expect({ ...decodeErrorFields(body, start, end) }).toEqual({
      S: "FATAL",
      V: "FATAL",
      C: "28P01",
      M: fields.message,
      D: "détail",
      H: "hint"
    })
  })

  it("drops NUL characters from error fields instead of desynchronising the client", () => {
    const [body, start, end] = only(errorResponse({ severity: "ERROR", code: "XX000", message: "a\0b" }))
    expect(decodeErrorFields(body, start, end).M).toBe("ab")
  })

  it("NegotiateProtocolVersion round-trips", () => {
    const buf = negotiateProtocolVersion(0, ["_pq_.a", "_pq_.b"])
    expect(buf[0]).toBe(0x76)
    const [body, start, end] = only(buf)
    expect(decodeNegotiateProtocolVersion(body, start, end)).toEqual({
      newestMinor: 0,
      unrecognized: ["_pq_.a", "_pq_.b"]
    })
  })
})

describe("backend decoders", () => {
  it("decodeAuthentication reads every request the pooler can answer", () => {
    const decode = (buf: Buffer) => decodeAuthentication(...only(buf))
    expect(decode(authenticationOk())).toEqual({ _tag: "AuthenticationOk" })
    expect(decode(authenticationCleartextPassword())).toEqual({ _tag: "AuthenticationCleartextPassword" })
    expect(decode(authenticationMD5Password(Buffer.from([9, 8, 7, 6])))).toEqual({
      _tag: "AuthenticationMD5Password",
      salt: Buffer.from([9, 8, 7, 6])
    })
    expect(decode(authenticationSASL(["SCRAM-SHA-256"]))).toEqual({
      _tag: "AuthenticationSASL",
      mechanisms: ["SCRAM-SHA-256"]
    })
    expect(decode(authenticationSASLContinue("abc"))).toEqual({
      _tag: "AuthenticationSASLContinue",
      data: Buffer.from("abc")
    })
    expect(decode(authenticationSASLFinal("v=1"))).toEqual({
      _tag: "AuthenticationSASLFinal",
      data: Buffer.from("v=1")
    })
    const gss = Buffer.from([0x52, 0, 0, 0, 8, 0, 0, 0, 7])
    expect(decode(gss)).toEqual({ _tag: "AuthenticationUnsupported", code: 7 })
    expect(decodeAuthentication(Buffer.from([0, 0]), 0, 2)).toBeInstanceOf(ProtocolError)
    // SASL list without its final terminator.
    expect(decodeAuthentication(Buffer.from([0, 0, 0, 10, 0x41, 0]), 0, 6)).toBeInstanceOf(ProtocolError)
  })

  it("decodeBackendKeyData reads 3.0 and 3.2 keys", () => {
    expect(decodeBackendKeyData(...only(backendKeyData(7, -2)))).toEqual({
      processId: 7,
      secretKey: Buffer.from([0xff, 0xff, 0xff, 0xfe])
    })
    const long = Buffer.alloc(32, 5)
    expect(decodeBackendKeyData(...only(backendKeyData(7, long)))).toEqual({ processId: 7, secretKey: long })
    expect(decodeBackendKeyData(Buffer.alloc(6), 0, 6)).toBeInstanceOf(ProtocolError)
  })

  it("decodeParameterStatus and decodeCString read within bounds", () => {
    expect(decodeParameterStatus(...only(parameterStatus("TimeZone", "UTC")))).toEqual(["TimeZone", "UTC"])
    const buf = Buffer.from("abc\0def")
    expect(decodeCString(buf, 0, 7)).toBe("abc")
    expect(decodeCString(buf, 4, 7)).toBe("def")
    expect(decodeCString(buf, 0, 2)).toBe("ab")
    expect(decodeParameterStatus(buf, 4, 7)).toEqual(["def", ""])
  })

  it("decoders never throw on garbage", () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 64 }), fc.nat(), fc.nat(), (bytes, a, b) => {
        const buf = Buffer.from(bytes)
        const start = Math.min(a, b) % (buf.length + 1)
        const end = start + ((Math.max(a, b) - Math.min(a, b)) % (buf.length - start + 1))
        decodeErrorFields(buf, start, end)
        decodeParameterStatus(buf, start, end)
        decodeAuthentication(buf, start, end)
        decodeBackendKeyData(buf, start, end)
        decodeNegotiateProtocolVersion(buf, start, end)
        decodeSASLInitialResponse(buf, start, end)
        decodePasswordMessage(buf, start, end)
      }),
      { numRuns: 2_000 }
    )
  })
})

describe("frontend decoders, fed by pg-protocol's serializer", () => {
  it("SASLInitialResponse", () => {
    const buf = serialize.sendSASLInitialResponseMessage("SCRAM-SHA-256", "n,,n=,r=abc")
    expect(decodeSASLInitialResponse(...only(buf))).toEqual({
      mechanism: "SCRAM-SHA-256",
      data: Buffer.from("n,,n=,r=abc")
    })
    // Length -1 means no initial response.
    const none = Buffer.from([0x41, 0, 0xff, 0xff, 0xff, 0xff])
    expect(decodeSASLInitialResponse(none, 0, none.length)).toEqual({ mechanism: "A", data: Buffer.alloc(0) })
    const wrong = Buffer.from([0x41, 0, 0, 0, 0, 9, 1])
    expect(decodeSASLInitialResponse(wrong, 0, wrong.length)).toBeInstanceOf(ProtocolError)
  })

  it("PasswordMessage", () => {
    expect(decodePasswordMessage(...only(serialize.password("secret")))).toBe("secret")
    expect(decodePasswordMessage(Buffer.from("abc"), 0, 3)).toBeInstanceOf(ProtocolError)
    expect(decodePasswordMessage(Buffer.from("a\0b\0"), 0, 4)).toBeInstanceOf(ProtocolError)
  })
})
