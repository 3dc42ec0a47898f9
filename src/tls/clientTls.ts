import type * as net from "node:net"
import * as tls from "node:tls"
import { Effect } from "effect"
import { type TidepoolError, tidepoolError } from "../errors/index.ts"
import { tlsServerEndPoint } from "./channelBinding.ts"

/** First byte of a TLS ClientHello record: a client using PostgreSQL 17's direct TLS. */
export const TLS_HANDSHAKE_RECORD = 0x16

/** The ALPN protocol PostgreSQL registers; required for direct TLS. */
export const ALPN_POSTGRESQL = "postgresql"

/**
 * libpq's async API (PQconsumeInput/PQisBusy) can wait on the socket while a decrypted remainder
 * sits in OpenSSL's buffer when a record is larger than its 8 KB input buffer. Smaller records
 * avoid that framing (Supavisor #993, CockroachDB #148222 cap theirs the same way).
 */
export const MAX_TLS_RECORD = 8192

const reasonOf = (error: Error): string => {
  const reason = (error as { reason?: unknown }).reason
  return typeof reason === "string" && reason !== "" ? reason : error.message
}

/**
 * Wraps a client's socket in TLS (server side) and waits for the handshake. `readAhead` holds bytes
 * already read from the socket that belong to the handshake (the ClientHello of a direct TLS
 * connection); they are put back so the TLS layer reads them first. A failed handshake is
 * ESSLHANDSHAKE with the socket already destroyed, so nothing plaintext is written into it.
 */
export const acceptTls = (options: {
  readonly socket: net.Socket
  readonly readAhead: Buffer
  readonly context: tls.SecureContext
}): Effect.Effect<tls.TLSSocket, TidepoolError> =>
  Effect.callback<tls.TLSSocket, TidepoolError>((resume) => {
    const { socket, readAhead } = options
    // Paused, the socket keeps `readAhead` for the TLS layer, which reads it on its first tick.
    socket.pause()
    if (readAhead.length > 0) socket.unshift(readAhead)
    const secure = new tls.TLSSocket(socket, {
      isServer: true,
      secureContext: options.context,
      ALPNProtocols: [ALPN_POSTGRESQL],
      requestCert: false,
      rejectUnauthorized: false
    })
    secure.setMaxSendFragment(MAX_TLS_RECORD)
    const settle = (result: Effect.Effect<tls.TLSSocket, TidepoolError>) => {
      secure.off("secure", onSecure)
      secure.off("error", onError)
      secure.off("close", onClose)
      resume(result)
    }
    const onSecure = () => settle(Effect.succeed(secure))
    // The wrapped socket is destroyed here too: Node destroys it only a tick after the TLS socket, and
    // the session, resumed at once, must already find it unwritable (no plaintext error into TLS).
    const onError = (error: Error) => {
      secure.destroy()
      socket.destroy()
      settle(Effect.fail(tidepoolError("ESSLHANDSHAKE", reasonOf(error))))
    }
    const onClose = () => {
      socket.destroy()
      settle(Effect.fail(tidepoolError("ESSLHANDSHAKE", "client closed the connection")))
    }
    secure.on("secure", onSecure)
    secure.on("error", onError)
    secure.on("close", onClose)
    // Errors after the handshake surface through the session's reader as a close.
    secure.on("error", () => undefined)
    return Effect.sync(() => {
      secure.destroy()
      socket.destroy()
    })
  })

/**
 * The `tls-server-end-point` data of the certificate this connection presented (with an RSA and an
 * ECDSA certificate configured, whichever the handshake chose), or undefined: SCRAM-SHA-256-PLUS is
 * then not offered.
 */
export const channelBindingOf = (socket: tls.TLSSocket): Buffer | undefined => {
  const certificate = socket.getCertificate()
  return certificate !== null && "raw" in certificate && certificate.raw !== undefined
    ? tlsServerEndPoint(certificate.raw)
    : undefined
}
