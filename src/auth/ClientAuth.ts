import { Effect } from "effect"
import { type TidepoolError, tidepoolError } from "../errors/index.ts"
import {
  authenticationSASL,
  authenticationSASLContinue,
  authenticationSASLFinal,
  type ScramSecret,
  ScramServer
} from "../protocol/index.ts"

/** What authentication needs from the client connection: framed reads and writes. */
export interface AuthChannel {
  readonly readMessage: Effect.Effect<{ readonly type: number; readonly body: Buffer }, TidepoolError>
  readonly write: (data: Buffer) => void
}

const PASSWORD_MESSAGE = 0x70 // 'p'

const expectPasswordMessage = (channel: AuthChannel) =>
  Effect.flatMap(channel.readMessage, (m) =>
    m.type === PASSWORD_MESSAGE
      ? Effect.succeed(m.body)
      : Effect.fail(
          tidepoolError("EAUTHPROTOCOL", `expected a SASL response, got message type '${String.fromCharCode(m.type)}'`)
        )
  )

/**
 * Runs a SCRAM-SHA-256 exchange against `secret`. A wrong proof fails with EWRONGPASSWORD after
 * `failureDelayMs` (slows guessing); malformed messages fail with EAUTHPROTOCOL. Errors go out as an
 * ErrorResponse, never inside server-final (Supavisor #710 broke node-postgres and pgJDBC).
 * Returns the ClientKey recovered from the proof, for SCRAM pass-through upstream.
 * With `channelBinding` (the TLS connection's tls-server-end-point data) SCRAM-SHA-256-PLUS is
 * offered first, so `channel_binding=require` clients can prove there is no man in the middle.
 */
export const authenticateScram = Effect.fn("client.auth.scram")(function* (
  channel: AuthChannel,
  secret: ScramSecret,
  user: string,
  failureDelayMs: number,
  channelBinding?: Buffer
) {
  const wrongPassword = Effect.zipRight(
    Effect.sleep(failureDelayMs),
    Effect.fail(tidepoolError("EWRONGPASSWORD", user))
  )
  const server = new ScramServer(
    secret,
    channelBinding === undefined ? {} : { channelBinding: { type: "tls-server-end-point", data: channelBinding } }
  )
  channel.write(authenticationSASL(server.mechanisms))
  const initial = yield* expectPasswordMessage(channel)
  const nul = initial.indexOf(0)
  if (nul < 0 || initial.length < nul + 5) return yield* tidepoolError("EAUTHPROTOCOL", "malformed SASLInitialResponse")
  const mechanism = initial.toString("utf8", 0, nul)
  const dataLength = initial.readInt32BE(nul + 1)
  const data = dataLength < 0 ? Buffer.alloc(0) : initial.subarray(nul + 5, nul + 5 + dataLength)
  if (!server.mechanisms.includes(mechanism)) {
    return yield* tidepoolError("EAUTHPROTOCOL", `unsupported SASL mechanism ${mechanism}`)
  }
  yield* Effect.annotateCurrentSpan("mechanism", mechanism)
  const first = server.handleClientFirst(mechanism, data)
  if (!("serverFirst" in first)) return yield* tidepoolError("EAUTHPROTOCOL", first.message)
  channel.write(authenticationSASLContinue(first.serverFirst))
  const final = server.handleClientFinal(yield* expectPasswordMessage(channel))
  if (!("serverFinal" in final)) {
    return yield* final.reason === "password" ? wrongPassword : tidepoolError("EAUTHPROTOCOL", final.message)
  }
  channel.write(authenticationSASLFinal(final.serverFinal))
  return final.clientKey
})
