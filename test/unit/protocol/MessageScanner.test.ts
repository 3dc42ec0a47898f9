import { createHash } from "node:crypto"
import fc from "fast-check"
import { describe, expect, it } from "vitest"
import { bodyStartsWith, MessageScanner, ProtocolError } from "../../../src/protocol/index.ts"

interface Msg {
  readonly type: number
  readonly body: Buffer
}

type Seen = [type: number, length: number, body: string | null, start: number, end: number]

// A digest keeps comparisons of large bodies cheap while still checking every byte.
const digest = (buf: Buffer): string => createHash("sha1").update(buf).digest("hex")

const frame = (m: Msg): Buffer => {
  const buf = Buffer.allocUnsafe(5 + m.body.length)
  buf[0] = m.type
  buf.writeInt32BE(m.body.length + 4, 1)
  m.body.copy(buf, 5)
  return buf
}

// Bodies are mostly small, sometimes empty, occasionally large enough to span many chunks.
const bodyArb: fc.Arbitrary<Buffer> = fc.oneof(
  { weight: 6, arbitrary: fc.uint8Array({ maxLength: 64 }).map((a) => Buffer.from(a)) },
  { weight: 1, arbitrary: fc.constant(Buffer.alloc(0)) },
  {
    weight: 1,
    arbitrary: fc.tuple(fc.integer({ min: 1_000, max: 300_000 }), fc.integer({ min: 0, max: 255 })).map(([n, seed]) => {
      const buf = Buffer.allocUnsafe(n)
      for (let i = 0; i < n; i++) buf[i] = (i * 31 + seed) & 0xff
      return buf
    })
  }
)

const msgArb: fc.Arbitrary<Msg> = fc.record({
  type: fc.oneof(fc.constantFrom(...Buffer.from("QPBDCSHFXZEKTDdcf123tnR")), fc.integer({ min: 0, max: 255 })),
  body: bodyArb
})

const inspectArb = fc.constantFrom("ZSEK", "QPBDCSHFX", "", "QPBDCSHFXZEKTDdcf123tnR", "D")

/** Feeds `chunks` and records every callback, with the message's absolute start/end in the stream. */
const run = (chunks: ReadonlyArray<Buffer>, inspect: string, maxMessageSize = 0) => {
  const seen: Array<Seen> = []
  let offset = 0
  const scanner: MessageScanner = new MessageScanner(
    (type, length, body, bodyStart) => {
      const bytes = body === undefined ? null : digest(body.subarray(bodyStart, bodyStart + length))
      const start = scanner.messageStart === -1 ? -1 : offset + scanner.messageStart
      seen.push([type, length, bytes, start, offset + scanner.messageEnd])
    },
    { maxMessageSize, inspect }
  )
  let error: ProtocolError | undefined
  for (const chunk of chunks) {
    error = scanner.feed(chunk)
    if (error !== undefined) break
    offset += chunk.length
  }
  return { seen, error, scanner }
}

const splitAt = (buf: Buffer, points: ReadonlyArray<number>): Array<Buffer> => {
  const cuts = [...new Set(points.map((p) => p % (buf.length + 1)))].sort((a, b) => a - b)
  const chunks: Array<Buffer> = []
  let last = 0
  for (const cut of cuts) {
    chunks.push(buf.subarray(last, cut))
    last = cut
  }
  chunks.push(buf.subarray(last))
  return chunks
}

describe("MessageScanner", () => {
  it("frames any byte split of a valid stream exactly as the whole stream", () => {
    fc.assert(
      fc.property(
        fc.array(msgArb, { maxLength: 25 }),
        inspectArb,
        fc.array(fc.nat(), { maxLength: 40 }),
        (messages, inspect, points) => {
          const stream = Buffer.concat(messages.map(frame))
          const expected: Array<[number, number, string | null]> = messages.map((m) => [
            m.type,
            m.body.length,
            inspect.includes(String.fromCharCode(m.type)) ? digest(m.body) : null
          ])
          const whole = run([stream], inspect)
          const split = run(splitAt(stream, points), inspect)
          expect(whole.error).toBeUndefined()
          expect(split.error).toBeUndefined()
          expect(whole.seen.map(([t, l, b]) => [t, l, b])).toEqual(expected)
          expect(split.seen.map(([t, l, b]) => [t, l, b])).toEqual(expected)
          // Offsets: every message ends where the next begins; a known start is the true start.
          let at = 0
          for (const [, length, , start, end] of split.seen) {
            if (start !== -1) expect(start).toBe(at)
            at += 5 + length
            expect(end).toBe(at)
          }
          expect(split.scanner.atBoundary).toBe(true)
        }
      ),
      { numRuns: 300 }
    )
  })

  it("hands over inspected bodies inside one chunk without copying", () => {
    const chunk = Buffer.concat([
      frame({ type: 0x5a, body: Buffer.from("I") }),
      frame({ type: 0x44, body: Buffer.from("row") })
    ])
    const bodies: Array<Buffer | undefined> = []
    const starts: Array<number> = []
    const scanner = new MessageScanner(
      (_type, _length, body, bodyStart) => {
        bodies.push(body)
        starts.push(bodyStart)
      },
      { maxMessageSize: 0, inspect: "Z" }
    )
    expect(scanner.feed(chunk)).toBeUndefined()
    expect(bodies[0]).toBe(chunk)
    expect(starts[0]).toBe(5)
    expect(bodies[1]).toBeUndefined()
  })

  it("calls back for a skipped body only once its last byte arrives, and never buffers it", () => {
    const big = frame({ type: 0x64, body: Buffer.alloc(1_000_000, 7) })
    const calls: Array<number> = []
    const scanner = new MessageScanner((_t, length, body) => calls.push(body === undefined ? length : -1), {
      maxMessageSize: 0,
      inspect: "Z"
    })
    for (let i = 0; i < big.length - 1; i += 65_536) scanner.feed(big.subarray(i, Math.min(i + 65_536, big.length - 1)))
    expect(calls).toEqual([])
    expect(scanner.atBoundary).toBe(false)
    scanner.feed(big.subarray(big.length - 1))
    expect(calls).toEqual([1_000_000])
    expect(scanner.atBoundary).toBe(true)
  })

  it("reports messageStart -1 and the end offset for a message finished in a later chunk", () => {
    const stream = Buffer.concat([
      frame({ type: 0x51, body: Buffer.from("select 1\0") }),
      frame({ type: 0x53, body: Buffer.alloc(0) })
    ])
    const positions: Array<[number, number]> = []
    const scanner: MessageScanner = new MessageScanner(
      () => positions.push([scanner.messageStart, scanner.messageEnd]),
      {
        maxMessageSize: 0,
        inspect: "Q"
      }
    )
    scanner.feed(stream.subarray(0, 3))
    scanner.feed(stream.subarray(3))
    expect(positions).toEqual([
      [-1, 11],
      [11, 16]
    ])
  })

  it("rejects a length below 4 and poisons the scanner", () => {
    const scanner = new MessageScanner(() => {}, { maxMessageSize: 0, inspect: "" })
    const error = scanner.feed(Buffer.from([0x51, 0, 0, 0, 3]))
    expect(error).toBeInstanceOf(ProtocolError)
    expect(error?.reason).toBe("InvalidMessage")
    expect(scanner.feed(Buffer.from([0x53, 0, 0, 0, 4]))).toBe(error)
    expect(scanner.atBoundary).toBe(false)
  })

  it("rejects a negative length", () => {
    const scanner = new MessageScanner(() => {}, { maxMessageSize: 0, inspect: "" })
    expect(scanner.feed(Buffer.from([0x51, 0xff, 0xff, 0xff, 0xff]))?.reason).toBe("InvalidMessage")
  })

  it("enforces maxMessageSize (counting the length word) as soon as the header is complete", () => {
    const calls: Array<number> = []
    const scanner = new MessageScanner((_t, length) => calls.push(length), { maxMessageSize: 100, inspect: "Q" })
    expect(scanner.feed(frame({ type: 0x51, body: Buffer.alloc(96) }))).toBeUndefined()
    expect(calls).toEqual([96])
    // Header only, split byte by byte: the error comes with the last header byte, no body needed.
    const header = Buffer.from([0x51, 0, 0, 0, 101])
    for (let i = 0; i < 4; i++) expect(scanner.feed(header.subarray(i, i + 1))).toBeUndefined()
    const error = scanner.feed(header.subarray(4))
    expect(error?.reason).toBe("MessageTooLarge")
    expect(error?.size).toBe(101)
    expect(error?.max).toBe(100)
    expect(error?.message).toContain("101")
  })

  it("survives empty chunks everywhere", () => {
    const stream = frame({ type: 0x5a, body: Buffer.from("I") })
    const seen: Array<string> = []
    const scanner = new MessageScanner((_t, l, b, s) => seen.push(b!.toString("latin1", s, s + l)), {
      maxMessageSize: 0,
      inspect: "Z"
    })
    for (const byte of stream) {
      scanner.feed(Buffer.alloc(0))
      scanner.feed(Buffer.from([byte]))
    }
    expect(seen).toEqual(["I"])
  })

  it("returns a result or a ProtocolError for any garbage, never throws", () => {
    fc.assert(
      fc.property(
        fc.uint8Array({ maxLength: 2_000 }),
        fc.array(fc.nat(), { maxLength: 20 }),
        fc.constantFrom(0, 5, 100, 10_000),
        inspectArb,
        (bytes, points, max, inspect) => {
          const buf = Buffer.from(bytes)
          const { error, scanner } = run(splitAt(buf, points), inspect, max)
          if (error !== undefined) {
            expect(error).toBeInstanceOf(ProtocolError)
            expect(["InvalidMessage", "MessageTooLarge"]).toContain(error.reason)
            expect(scanner.feed(buf)).toBe(error)
          }
        }
      ),
      { numRuns: 500 }
    )
  })

  it("bodyStartsWith compares in place", () => {
    const chunk = Buffer.from("xxxxxS_1\0rest")
    expect(bodyStartsWith(chunk, 5, 8, Buffer.from("S_"))).toBe(true)
    expect(bodyStartsWith(chunk, 5, 8, Buffer.from("P_"))).toBe(false)
    expect(bodyStartsWith(chunk, 5, 1, Buffer.from("S_"))).toBe(false)
  })
})
