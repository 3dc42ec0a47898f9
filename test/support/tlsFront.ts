import * as net from "node:net"
import { SSL_REQUEST_CODE } from "../../src/protocol/index.ts"

/**
 * A TLS-only front of a PostgreSQL server on loopback: it relays connections that open with an
 * SSLRequest and drops every other one, recording its first packet's code in `refused`. PostgreSQL
 * itself takes a plaintext CancelRequest whatever pg_hba.conf says (cancels are handled before
 * authentication), so only a front like this shows that nothing was sent in plaintext.
 */
export const tlsOnlyFront = async (
  targetPort: number
): Promise<{ readonly server: net.Server; readonly port: number; readonly refused: Array<number> }> => {
  const refused: Array<number> = []
  const server = net.createServer((inbound) => {
    inbound.on("error", () => undefined)
    inbound.once("data", (first: Buffer) => {
      if (first.length < 8 || first.readInt32BE(4) !== SSL_REQUEST_CODE) {
        refused.push(first.length >= 8 ? first.readInt32BE(4) : -1)
        inbound.destroy()
        return
      }
      const outbound = net.connect(targetPort, "127.0.0.1", () => outbound.write(first))
      outbound.on("error", () => inbound.destroy())
      inbound.on("close", () => outbound.destroy())
      outbound.on("close", () => inbound.destroy())
      inbound.pipe(outbound)
      outbound.pipe(inbound)
    })
  })
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve))
  return { server, port: (server.address() as net.AddressInfo).port, refused }
}
