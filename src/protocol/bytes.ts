/**
 * Offset-based readers for message bodies. They take (buf, start, end) rather than a subarray so
 * the scanner's zero-copy bodies (the whole chunk plus an offset) can be read without allocating.
 * None of them throws: out-of-range reads are the caller's bounds to check.
 */

/** Index of the NUL ending the C string at `start`, or -1 when there is none before `end`. */
export const cstringEnd = (buf: Buffer, start: number, end: number): number => {
  const i = buf.indexOf(0, start)
  return i === -1 || i >= end ? -1 : i
}

/** The C string at `start`, up to its NUL (or up to `end` when unterminated). */
export const decodeCString = (buf: Buffer, start: number, end: number): string => {
  const nul = cstringEnd(buf, start, end)
  return buf.toString("utf8", start, nul === -1 ? end : nul)
}

/** Signed big-endian int32 without Buffer's bounds-check throw; the caller guarantees 4 bytes. */
export const readInt32 = (buf: Buffer, at: number): number =>
  (buf[at] << 24) | (buf[at + 1] << 16) | (buf[at + 2] << 8) | buf[at + 3]

/** Signed big-endian int16; the caller guarantees 2 bytes. */
export const readInt16 = (buf: Buffer, at: number): number => ((buf[at] << 24) | (buf[at + 1] << 16)) >> 16
