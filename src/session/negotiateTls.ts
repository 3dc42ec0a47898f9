import type { TLSSocket } from "node:tls"
import { type Context, Effect } from "effect"
import { tidepoolError } from "../errors/index.ts"
import { SSL_REQUEST_CODE } from "../protocol/index.ts"
import type { TenantRegistry } from "../tenants/index.ts"
import { ALPN_POSTGRESQL, acceptTls, type DownstreamTls, TLS_HANDSHAKE_RECORD } from "../tls/index.ts"
import type { ClientSocket } from "./ClientSocket.ts"

/** The session span records how the client's TLS was negotiated, its version and SNI. */
const annotateTls = (secure: TLSSocket, negotiation: "direct" | "postgres") =>
  Effect.annotateCurrentSpan({
    "tls.negotiation": negotiation,
    "tls.protocol": secure.getProtocol() ?? "unknown",
    "tls.server_name": typeof secure.servername === "string" ? secure.servername : ""
  })

const SSL_YES = Buffer.from("S")
const SSL_NO = Buffer.from("N")

/**
 * PostgreSQL 17's direct TLS: the connection opens with a ClientHello instead of an SSLRequest.
 * Does nothing for any other first byte. Without a certificate the connection is closed unanswered
 * (a TLS client cannot read a plaintext error), as PostgreSQL does.
 */
export const acceptDirectTls = (client: ClientSocket, downstream: Context.Service.Shape<typeof DownstreamTls>) =>
  Effect.gen(function* () {
    if ((yield* client.peek) !== TLS_HANDSHAKE_RECORD) return
    // A connection accepted without a certificate stays plaintext (`ClientSocket.sharedReads`).
    const context = client.sharedReads ? undefined : downstream.context()
    if (context === undefined) {
      client.socket.destroy()
      return yield* tidepoolError("ESSLHANDSHAKE", "direct TLS connection, but no certificate is configured")
    }
    client.sslRequested = true
    const secure = yield* acceptTls({ socket: client.socket, readAhead: client.detach(), context })
    client.adopt(secure)
    yield* annotateTls(secure, "direct")
    // PostgreSQL 17 insists on ALPN for direct TLS (a cross-protocol attack defence); the refusal
    // goes over the finished TLS channel.
    if (secure.alpnProtocol !== ALPN_POSTGRESQL) {
      return yield* tidepoolError("ESSLHANDSHAKE", "direct TLS connection without ALPN protocol postgresql")
    }
  })

/** Answers an SSLRequest: `S` and the TLS handshake when a certificate is configured, else `N`. */
export const answerSslRequest = (client: ClientSocket, downstream: Context.Service.Shape<typeof DownstreamTls>) =>
  Effect.gen(function* () {
    if (client.sslRequested) {
      return yield* tidepoolError(
        "ESTARTUPMESSAGE",
        `unsupported frontend protocol ${SSL_REQUEST_CODE >>> 16}.${SSL_REQUEST_CODE & 0xffff}: SSL already negotiated`
      )
    }
    client.sslRequested = true
    // Bytes sent before our answer were not encrypted and may have been injected by a man in the
    // middle (CVE-2021-23214): refuse them rather than read them as the client's.
    if (client.readAhead > 0)
      return yield* tidepoolError("ESTARTUPMESSAGE", "received unencrypted data after SSL request")
    // A connection accepted without a certificate stays plaintext (`ClientSocket.sharedReads`).
    const context = client.sharedReads ? undefined : downstream.context()
    if (context === undefined) {
      client.write(SSL_NO)
      return
    }
    client.write(SSL_YES)
    const secure = yield* acceptTls({ socket: client.socket, readAhead: client.detach(), context })
    client.adopt(secure)
    yield* annotateTls(secure, "postgres")
  })

/** docs/tls.md#tenant-rules: a username without a tenant names the tenant whose `sni_hostname` the client sent. */
export const tenantBySni = (
  client: ClientSocket,
  tenants: Context.Service.Shape<typeof TenantRegistry>
): string | undefined => {
  const servername = client.tls?.servername
  return typeof servername === "string" && servername !== "" ? tenants.bySni(servername)?.external_id : undefined
}
