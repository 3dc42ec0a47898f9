/**
 * The floor of a Node.js relay: each client connection is piped to a connection of its own to
 * PostgreSQL — no pooling, no parsing, no state — with the cheapest reads Node offers (`onread`
 * into a reused buffer, each chunk copied once for the write). Whatever a Node.js pooler adds
 * (framing, pooling, bookkeeping) comes on top of what this costs per transaction; the benchmark's
 * `noderelay` target runs it so that Tidepool's and PgBouncer's figures can be read against it.
 *
 * Run as `node --import tsx bench/relayFloor.ts LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT`.
 */
import * as net from "node:net"

const [listenPort, upstreamHost, upstreamPort] = process.argv.slice(2)
const buffer = Buffer.allocUnsafe(64 * 1024)

const server = net.createServer({ noDelay: true, pauseOnConnect: true }, (accepted) => {
  // net.Server has no `onread` option: the accepted handle moves to a socket that has one
  // (as Tidepool's ClientSocket.takeOver does).
  const handle = (accepted as unknown as { _handle: unknown })._handle
  let upstream: net.Socket | undefined
  const client = new net.Socket({
    handle,
    onread: {
      buffer,
      callback: (bytes: number) => {
        upstream?.write(Buffer.from(buffer.subarray(0, bytes)))
        return true
      }
    }
  } as net.SocketConstructorOpts)
  ;(accepted as unknown as { _handle: unknown })._handle = null
  accepted.destroy()
  upstream = net.connect({
    host: upstreamHost,
    port: Number(upstreamPort),
    noDelay: true,
    onread: {
      buffer,
      callback: (bytes: number) => {
        client.write(Buffer.from(buffer.subarray(0, bytes)))
        return true
      }
    }
  })
  const close = () => {
    client.destroy()
    upstream?.destroy()
  }
  client.on("error", close).on("close", close)
  upstream.on("error", close).on("close", close)
})
server.listen(Number(listenPort), "127.0.0.1")
process.on("SIGTERM", () => process.exit(0))
