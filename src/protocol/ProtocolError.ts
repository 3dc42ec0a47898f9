import { Data } from "effect"

/**
 * A wire-protocol violation found while decoding bytes from a peer. `message` is safe to show the
 * client (it never echoes more than a number or a short name back), so `errors/` can put it
 * straight into an ErrorResponse.
 */
export class ProtocolError extends Data.TaggedError("ProtocolError")<{
  readonly reason:
    | "StartupPacketTooLarge"
    | "InvalidStartupMessage"
    | "UnsupportedProtocol"
    | "MessageTooLarge"
    | "InvalidMessage"
  readonly message: string
  readonly size?: number
  readonly max?: number
}> {}
