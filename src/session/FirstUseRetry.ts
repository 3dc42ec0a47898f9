/**
 * The one exchange that may be run again (docs/prepared-statements.md, "After DDL"): a client's
 * first Bind or Describe of a statement lands on a shared copy prepared before the client's Parse,
 * so if the objects it names changed in between, the server's `cached plan must not change result
 * type` is not what PostgreSQL would have told this client. From that request to its Sync the
 * client's bytes are kept, so that `PreparedStatements.retry` can write them again on a fresh copy.
 *
 * States: NONE; WATCH (its first request was written, its bytes are kept as they pass); READY (its
 * Sync was written and nothing after it, so running it again reorders nothing). Anything else the
 * client sends, any other outcome of the request, or more than `MAX_BYTES` cancels it.
 */

import { Buffer } from "node:buffer"

export enum RetryState {
  None = 0,
  Watch = 1,
  Ready = 2
}

/** Beyond this, an exchange is not kept for running again. */
const MAX_BYTES = 65_536

export class FirstUseRetry {
  state = RetryState.None
  /** The sequence number (`ExpectationQueue`) of the watched request, -1 until it is written. */
  seq = -1
  /** The exchange is being written again: it is not watched a second time. */
  running = false
  private kept: Array<Buffer> = []
  private bytes = 0

  /** Whether the head of the queue (`shifted` = its sequence number) is the watched request. */
  isHead(shifted: number): boolean {
    return this.seq === shifted && this.state !== RetryState.None
  }

  watch(): void {
    this.state = RetryState.Watch
    this.seq = -1
  }

  /** Keeps a copy of client bytes of the exchange (the chunk is the relay's); gives up beyond `MAX_BYTES`. */
  keep(bytes: Buffer): void {
    this.bytes += bytes.length
    if (this.bytes > MAX_BYTES) this.cancel()
    else this.kept.push(Buffer.from(bytes))
  }

  /** The kept bytes, to write again; the watch ends. */
  take(): Array<Buffer> {
    const kept = this.kept
    this.kept = []
    this.cancel()
    return kept
  }

  cancel(): void {
    this.state = RetryState.None
    this.seq = -1
    while (this.kept.length > 0) this.kept.pop()
    this.bytes = 0
  }
}
