import { createServer } from "node:net"

/**
 * A TCP port on 127.0.0.1 that was free a moment ago. Another process can still
 * take it before the caller binds, so callers that start servers should retry on
 * EADDRINUSE (startPostgres does).
 */
export const freePort = (): Promise<number> =>
  new Promise((resolve, reject) => {
    const server = createServer()
    server.unref()
    server.once("error", reject)
    server.listen({ host: "127.0.0.1", port: 0, exclusive: true }, () => {
      const address = server.address()
      const port = typeof address === "object" && address !== null ? address.port : 0
      server.close((error) => (error ? reject(error) : port > 0 ? resolve(port) : reject(new Error("no port bound"))))
    })
  })
