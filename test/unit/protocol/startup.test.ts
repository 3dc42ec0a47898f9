import fc from "fast-check"
import { serialize } from "pg-protocol"
import { describe, expect, it } from "vitest"
import {
  cancelRequest,
  decodeStartupPacket,
  gssencRequest,
  MAX_STARTUP_PACKET_SIZE,
  ProtocolError,
  type StartupPacket,
  sslRequest,
  startupMessage
} from "../../../src/protocol/index.ts"

const decodeOk = (buf: Buffer): { packet: StartupPacket; consumed: number } => {
  const result = decodeStartupPacket(buf)
  if (result === undefined || result instanceof ProtocolError)
    throw new Error(`expected a packet, got ${String(result)}`)
  return result
}

const decodeError = (buf: Buffer, maxSize?: number): ProtocolError => {
  const result = decodeStartupPacket(buf, maxSize)
  if (!(result instanceof ProtocolError)) throw new Error(`expected an error, got ${JSON.stringify(result)}`)
  return result
}

/** A StartupMessage of protocol `major.minor` built by hand, with raw pair bytes. */
const rawStartup = (pairs: Buffer, version = 3 << 16): Buffer => {
  const buf = Buffer.alloc(8 + pairs.length)
  buf.writeInt32BE(buf.length, 0)
  buf.writeInt32BE(version, 4)
  pairs.copy(buf, 8)
  return buf
}

/** A StartupMessage padded with an application_name so that it is exactly `size` bytes long. */
const startupOfSize = (size: number): Buffer => {
  const base = startupMessage({ user: "u", application_name: "" }).length
  return startupMessage({ user: "u", application_name: "a".repeat(size - base) })
}

describe("decodeStartupPacket", () => {
  it("decodes SSLRequest and GSSENCRequest (ours and pg-protocol's)", () => {
    expect(decodeOk(sslRequest())).toEqual({ packet: { _tag: "SSLRequest" }, consumed: 8 })
    expect(decodeOk(serialize.requestSsl())).toEqual({ packet: { _tag: "SSLRequest" }, consumed: 8 })
    expect(decodeOk(gssencRequest())).toEqual({ packet: { _tag: "GSSENCRequest" }, consumed: 8 })
  })

  it("reports consumed so bytes sent after SSLRequest can be detected", () => {
    const result = decodeOk(Buffer.concat([sslRequest(), Buffer.from([0x16, 3, 1])]))
    expect(result.consumed).toBe(8)
  })

  it("decodes CancelRequest with a 3.0 key and with a long 3.2 key", () => {
    expect(decodeOk(serialize.cancel(1234, -5))).toEqual({
      packet: { _tag: "CancelRequest", processId: 1234, secretKey: Buffer.from([0xff, 0xff, 0xff, 0xfb]) },
      consumed: 16
    })
    const key = Buffer.alloc(256, 9)
    const packet = decodeOk(cancelRequest(42, key))
    expect(packet.consumed).toBe(268)
    expect(packet.packet).toEqual({ _tag: "CancelRequest", processId: 42, secretKey: key })
    expect(decodeError(cancelRequest(42, Buffer.alloc(257))).reason).toBe("InvalidStartupMessage")
    expect(decodeError(cancelRequest(42, Buffer.alloc(0))).reason).toBe("InvalidStartupMessage")
  })

  it("round-trips a StartupMessage built by pg-protocol", () => {
    const buf = serialize.startup({ user: "app.acme", database: "db", options: "-c reference=acme" })
    const { packet, consumed } = decodeOk(buf)
    expect(consumed).toBe(buf.length)
    expect(packet).toEqual({
      _tag: "StartupMessage",
      protocolMinor: 0,
      parameters: { user: "app.acme", database: "db", options: "-c reference=acme", client_encoding: "UTF8" },
      protocolOptions: []
    })
  })

  it("round-trips arbitrary parameters through startupMessage", () => {
    const name = fc.string({ minLength: 1, maxLength: 20, unit: "grapheme" }).filter((s) => !s.includes("\0"))
    const value = fc.string({ maxLength: 40, unit: "grapheme" }).filter((s) => !s.includes("\0"))
    fc.assert(
      fc.property(fc.dictionary(name, value), fc.string({ minLength: 1, maxLength: 10 }), (extra, user) => {
        fc.pre(!user.includes("\0"))
        const params: Record<string, string> = { ...extra, user }
        const { packet } = decodeOk(startupMessage(params))
        if (packet._tag !== "StartupMessage") throw new Error(packet._tag)
        const plain = Object.fromEntries(Object.entries(params).filter(([k]) => !k.startsWith("_pq_.")))
        expect({ ...packet.parameters }).toEqual(plain)
        expect([...packet.protocolOptions].sort()).toEqual(
          Object.keys(params)
            .filter((k) => k.startsWith("_pq_."))
            .sort()
        )
      })
    )
  })

  it("gives parameters a null prototype", () => {
    const { packet } = decodeOk(startupMessage({ user: "u", __proto__x: "1", constructor: "c" }))
    if (packet._tag !== "StartupMessage") throw new Error(packet._tag)
    expect(Object.getPrototypeOf(packet.parameters)).toBeNull()
    expect(packet.parameters.constructor).toBe("c")
  })

  it("splits _pq_ protocol options out of the parameters", () => {
    const { packet } = decodeOk(startupMessage({ user: "u", _pq_: "x", "_pq_.foo": "1", "_pq_.bar": "2" }))
    if (packet._tag !== "StartupMessage") throw new Error(packet._tag)
    expect(packet.protocolOptions).toEqual(["_pq_.foo", "_pq_.bar"])
    expect(Object.keys(packet.parameters)).toEqual(["user", "_pq_"])
  })

  it("passes a newer minor version through for NegotiateProtocolVersion", () => {
    const { packet } = decodeOk(startupMessage({ user: "u" }, 2))
    expect(packet).toMatchObject({ _tag: "StartupMessage", protocolMinor: 2 })
  })

  it("refuses protocol majors other than 3 with PostgreSQL's wording", () => {
    const v2 = decodeError(rawStartup(Buffer.from("user\0u\0\0"), 2 << 16))
    expect(v2.reason).toBe("UnsupportedProtocol")
    expect(v2.message).toBe("unsupported frontend protocol 2.0: server supports 3.0 to 3.0")
    expect(decodeError(rawStartup(Buffer.from("user\0u\0\0"), (4 << 16) | 1)).message).toBe(
      "unsupported frontend protocol 4.1: server supports 3.0 to 3.0"
    )
  })

  it("accepts a packet of exactly the maximum size and refuses one byte more", () => {
    const max = startupOfSize(MAX_STARTUP_PACKET_SIZE)
    expect(max.length).toBe(10_000)
    expect(decodeOk(max).consumed).toBe(10_000)
    const over = startupOfSize(MAX_STARTUP_PACKET_SIZE + 1)
    const error = decodeError(over)
    expect(error).toMatchObject({ reason: "StartupPacketTooLarge", size: 10_001, max: 10_000 })
  })

  it("refuses an oversized packet as soon as its length is known", () => {
    const error = decodeError(Buffer.from([0, 0, 0x27, 0x11]))
    expect(error).toMatchObject({ reason: "StartupPacketTooLarge", size: 10_001, max: 10_000 })
    // An HTTP request or a TLS ClientHello sent straight away reads as a huge length.
    expect(decodeError(Buffer.from("GET / HTTP/1.1\r\n")).reason).toBe("StartupPacketTooLarge")
    expect(decodeError(Buffer.from([0x16, 3, 1, 2, 0])).reason).toBe("StartupPacketTooLarge")
    expect(decodeError(Buffer.from([0, 0, 4, 1]), 1024)).toMatchObject({ size: 1025, max: 1024 })
  })

  it("refuses lengths below 8", () => {
    for (const length of [0, 3, 7, -1]) {
      const buf = Buffer.alloc(4)
      buf.writeInt32BE(length)
      expect(decodeError(buf).reason).toBe("InvalidStartupMessage")
    }
  })

  it("refuses malformed StartupMessage layouts", () => {
    const cases: Array<[string, string]> = [
      ["user\0u\0", "terminator"], // no final terminator
      ["user\0u\0x", "terminator"],
      ["user\0u\0database\0", "database"], // odd list: name without value
      ["user\0u\0database\0\0", "terminator"], // database="" eats the terminator
      ["user\0", "user"], // the name's NUL is the last byte: value missing
      ["\0user\0u\0\0", "terminator"], // empty name before the end
      ["user\0u", "terminator"],
      ["database\0d\0\0", "no PostgreSQL user name"],
      ["user\0\0\0", "no PostgreSQL user name"]
    ]
    for (const [pairs, text] of cases) {
      const error = decodeError(rawStartup(Buffer.from(pairs, "latin1")))
      expect(error.reason, pairs).toBe("InvalidStartupMessage")
      expect(error.message, pairs).toContain(text)
    }
    expect(decodeError(rawStartup(Buffer.alloc(0))).reason).toBe("InvalidStartupMessage")
  })

  it("refuses invalid UTF-8", () => {
    const pairs = Buffer.concat([Buffer.from("user\0"), Buffer.from([0xc3, 0x28]), Buffer.from("\0\0")])
    expect(decodeError(rawStartup(pairs)).message).toContain("UTF-8")
  })

  it("refuses SSLRequest with a wrong length", () => {
    const buf = Buffer.alloc(12)
    buf.writeInt32BE(12, 0)
    buf.writeInt32BE(80877103, 4)
    expect(decodeError(buf).reason).toBe("InvalidStartupMessage")
  })

  it("needs more bytes for every strict prefix of a valid packet", () => {
    const packets = [
      sslRequest(),
      gssencRequest(),
      cancelRequest(7, 8),
      startupMessage({ user: "u", database: "d" }),
      startupMessage({ user: "u" }, 2)
    ]
    for (const packet of packets) {
      for (let n = 0; n < packet.length; n++) expect(decodeStartupPacket(packet.subarray(0, n))).toBeUndefined()
      expect(decodeOk(packet).consumed).toBe(packet.length)
    }
  })

  it("returns a packet, undefined or a ProtocolError for any garbage, never throws", () => {
    // Garbage behind a plausible header reaches the deeper parsing paths.
    const plausible = fc
      .tuple(
        fc.constantFrom(3 << 16, (3 << 16) | 2, 80877102, 80877103, 80877104, 2 << 16),
        fc.uint8Array({ maxLength: 300 })
      )
      .map(([code, body]) => {
        const buf = Buffer.alloc(8 + body.length)
        buf.writeInt32BE(buf.length, 0)
        buf.writeInt32BE(code, 4)
        Buffer.from(body).copy(buf, 8)
        return buf
      })
    const garbage = fc.oneof(
      fc.uint8Array({ maxLength: 300 }).map((a) => Buffer.from(a)),
      plausible,
      plausible.map((b) => Buffer.concat([b, Buffer.from("user\0x\0\0")]))
    )
    fc.assert(
      fc.property(garbage, fc.integer({ min: 0, max: 20_000 }), (buf, max) => {
        const result = decodeStartupPacket(buf, max)
        if (result === undefined) return
        if (result instanceof ProtocolError) {
          expect(typeof result.message).toBe("string")
          return
        }
        expect(result.consumed).toBeGreaterThanOrEqual(8)
        expect(result.consumed).toBeLessThanOrEqual(buf.length)
      }),
      { numRuns: 2_000 }
    )
  })
})
