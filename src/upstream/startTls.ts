import type * as net from "node:net"
import { isIP } from "node:net"
import * as tls from "node:tls"
import { Effect } from "effect"
import type { TidepoolError } from "../errors/index.ts"
import { sslRequest } from "../protocol/index.ts"

/** TLS to an upstream server (tenant `upstream_ssl`). */
export interface UpstreamTlsOptions {
  /** Verify the certificate chain against `ca` and the host name against `db_host` (verify-full). */
  readonly verify: boolean
  /** PEM certificates trusted when verifying. */
  readonly ca: string | undefined
}

/** Makes the connect failure for `reason`; `transient` when the connection was lost rather than refused. */
export type ConnectFailure = (reason: string, transient: boolean) => TidepoolError

/** Socket errors that mean the connection was lost (worth retrying), not that TLS was refused. */
const LOST = new Set(["ECONNRESET", "EPIPE", "ETIMEDOUT", "ECONNABORTED", "EHOSTUNREACH", "ENETUNREACH"])

/**
 * Upgrades a freshly connected upstream socket: SSLRequest, then the TLS handshake on `S`. Every
 * other outcome fails — `N`, a failed verification, bytes after the answer — and never falls back
 * to plaintext. On failure both sockets are destroyed.
 */
export const startTls = (
  socket: net.Socket,
  host: string,
  options: UpstreamTlsOptions,
  failed: ConnectFailure
): Effect.Effect<tls.TLSSocket, TidepoolError> =>
  Effect.callback<tls.TLSSocket, TidepoolError>((resume) => {
    if (options.verify && options.ca === undefined) {
      socket.destroy()
      resume(
        Effect.fail(
          failed("upstream_verify is peer but no CA is configured (upstream_tls_ca or GLOBAL_UPSTREAM_CA_PATH)", false)
        )
      )
      return
    }
    let secure: tls.TLSSocket | undefined
    let settled = false
    const fail = (reason: string, transient = false) => {
      if (settled) return
      settled = true
      secure?.destroy()
      socket.destroy()
      resume(Effect.fail(failed(reason, transient)))
    }
    const onClose = () => fail("server closed the connection during the SSL negotiation", true)
    const onError = (error: Error) => fail(error.message, true)
    socket.on("close", onClose)
    socket.on("error", onError)
    socket.once("data", (answer: Buffer) => {
      socket.off("close", onClose)
      socket.off("error", onError)
      if (answer[0] === 0x4e) return fail("the server does not accept SSL connections (upstream_ssl is set)")
      if (answer[0] !== 0x53) return fail("invalid answer to SSLRequest")
      // Anything after `S` arrived unencrypted and could be a man in the middle's (CVE-2021-23222).
      if (answer.length > 1) return fail("received unencrypted data after SSL response")
      socket.pause()
      socket.on("error", () => undefined) // the TLS socket reports the connection's errors from here on
      secure = tls.connect({
        socket,
        host,
        ...(isIP(host) === 0 ? { servername: host } : {}),
        ALPNProtocols: ["postgresql"],
        minVersion: "TLSv1.2",
        ...(options.ca !== undefined ? { ca: options.ca } : {}),
        rejectUnauthorized: options.verify,
        ...(options.verify ? {} : { checkServerIdentity: () => undefined })
      })
      const s = secure
      s.once("secureConnect", () => {
        s.off("error", onTlsError)
        settled = true
        resume(Effect.succeed(s))
      })
      const onTlsError = (error: NodeJS.ErrnoException) =>
        fail(
          `SSL handshake failed: ${error.message.replace(/[:\s]+$/, "")}`,
          error.code !== undefined && LOST.has(error.code)
        )
      s.once("error", onTlsError)
    })
    socket.write(sslRequest())
    return Effect.sync(() => {
      secure?.destroy()
      socket.destroy()
    })
  })
