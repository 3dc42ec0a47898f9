import { Buffer } from "node:buffer"
import type * as net from "node:net"

/** As large as the reads Node makes for a socket by default. */
const SIZE = 64 * 1024

const ignore = (_chunk: Buffer): void => {}

/** The buffer every `shared` ReadBuffer reads into; what is read there is consumed before the next read. */
let sharedBuffer: Buffer | undefined

/**
 * Reads of a plaintext socket into a reused buffer, through Node's `onread` socket option: no
 * Buffer is allocated and nothing goes through the stream machinery per read (docs/benchmarks.md,
 * "Where the time goes", has the measurements). The chunk handed to `sink` is a view of that
 * buffer, valid only until `sink` returns.
 *
 * - `own()`: a buffer of the socket's own (server connections: few, busy). Whoever keeps a chunk
 *   longer — a write the other socket could not finish at once keeps it queued — calls `retain()`,
 *   and the next read goes to a fresh buffer, the old one staying with its holder.
 * - `shared()`: one buffer for every such socket (client connections: thousands, a 64 KiB buffer
 *   each would be too much). Its chunks are never retained: whatever is kept is copied.
 */
export class ReadBuffer {
  /** Receives every chunk read. */
  sink: (chunk: Buffer) => void = ignore
  private buffer: Buffer | undefined
  private retained = false

  private constructor(readonly shared: boolean) {}

  /**
   * For the `onread` option of `net.connect` or `new net.Socket`, made when asked for: the socket
   * copies what it needs out of it, so no per-client object stays behind for a shared buffer.
   */
  get onread(): net.OnReadOpts {
    const callback = (bytes: number, buffer: Uint8Array): boolean => {
      const chunk = buffer as Buffer
      this.sink(bytes === chunk.length ? chunk : chunk.subarray(0, bytes))
      // `false` would stop reading; flow control goes through pause() and resume() instead.
      return true
    }
    if (this.shared) {
      sharedBuffer ??= Buffer.allocUnsafe(SIZE)
      return { buffer: sharedBuffer, callback }
    }
    return { buffer: () => this.next(), callback }
  }

  static own(): ReadBuffer {
    return new ReadBuffer(false)
  }

  static shared(): ReadBuffer {
    return new ReadBuffer(true)
  }

  /** The current chunk of an `own()` buffer is kept after `sink` returns: it must not be overwritten. */
  retain(): void {
    this.retained = true
  }

  private next(): Buffer {
    if (this.buffer === undefined || this.retained) {
      this.retained = false
      this.buffer = Buffer.allocUnsafe(SIZE)
    }
    return this.buffer
  }
}

/**
 * Writes a chunk that is a view of `reads` (undefined: a chunk of its own, passed as is) through
 * `write`, which writes it (or its edited pieces) to `socket`. A view of a shared buffer is copied;
 * one of an own buffer is copied if `socket` already has bytes queued (the write would queue behind
 * them, and a small chunk would keep a whole read buffer alive), and retained if the write itself
 * left it queued. Returns `write`'s answer. `write` should be made once, not per call (hot path).
 */
export const writeChunk = (
  socket: net.Socket,
  chunk: Buffer,
  reads: ReadBuffer | undefined,
  write: (chunk: Buffer) => boolean
): boolean => {
  if (reads === undefined) return write(chunk)
  if (reads.shared || socket.writableLength > 0) return write(Buffer.from(chunk))
  const ok = write(chunk)
  if (socket.writableLength > 0) reads.retain()
  return ok
}
