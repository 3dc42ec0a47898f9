import * as net from "node:net"
import { Effect } from "effect"

/** A port that was free a moment ago on `host` (the OS picks it). */
export const freePort = (host = "127.0.0.1"): Effect.Effect<number> =>
  Effect.callback<number>((resume) => {
    const server = net.createServer()
    server.listen(0, host, () => {
      const { port } = server.address() as net.AddressInfo
      server.close(() => resume(Effect.succeed(port)))
    })
  })
