/**
 * Offset-based readers for message bodies. They take (buf, start, end) rather than a subarray so
 * the scanner's zero-copy bodies (the whole chunk plus an offset) can be read without allocating.
 * None of them throws: out-of-range reads are the caller's bounds to check.
 */

/** Bytes `cstringEnd` looks through itself before asking `Buffer.indexOf`. */
const SHORT_SCAN = 64

/**
 * Index of the NUL ending the C string at `start`, or -1 when there is none before `end`. Names
 * (statements, portals, parameters) are short: a loop over their bytes costs less than
 * `Buffer.indexOf`'s call into C++; a long string (a statement's text) is left to it.
 */
export const cstringEnd = (buf: Buffer, start: number, end: number): number => {
  const stop = Math.min(end, start + SHORT_SCAN)
  for (let i = start; i < stop; i++) if (buf[i] === 0) return i
  if (stop >= end) return -1
  const i = buf.indexOf(0, stop)
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
