/**
 * `npm run bench:accept -- [--workers N] [--seconds S] [--concurrency C] [--repeat R]`: how fast N
 * worker processes accept new TCP connections on one port, two ways (docs/scale-out.md#one-host-workers):
 *
 * - `reuseport`: every worker listens on the port with `reusePort: true` (SO_REUSEPORT); the kernel
 *   spreads connections;
 * - `handles`: one acceptor process listens and passes each socket to a worker in turn
 *   (`child.send(message, socket)`, what `node:cluster`'s round-robin does).
 *
 * Each worker answers a connection with one byte and closes it; a separate client process opens
 * connections C at a time for S seconds and counts those answered. Runs alternate between the ways,
 * R times each; medians are printed.
 */
import { type ChildProcess, fork } from "node:child_process"
import * as net from "node:net"
import { parseArgs } from "node:util"

const role = process.env.ACCEPT_BENCH_ROLE

const answer = (socket: net.Socket) => {
  socket.on("error", () => undefined)
  socket.end("x")
}

if (role === "worker") {
  const port = Number(process.env.ACCEPT_BENCH_PORT)
  if (port > 0) {
    net.createServer(answer).listen({ host: "127.0.0.1", port, reusePort: true }, () => process.send!("ready"))
  } else {
    process.on("message", (_message, socket) => {
      if (socket instanceof net.Socket) answer(socket)
    })
    process.send!("ready")
  }
} else if (role === "client") {
  const port = Number(process.env.ACCEPT_BENCH_PORT)
  const until = Date.now() + Number(process.env.ACCEPT_BENCH_SECONDS) * 1000
  let done = 0
  let failed = 0
  let running = Number(process.env.ACCEPT_BENCH_CONCURRENCY)
  const one = () => {
    if (Date.now() >= until) {
      if (--running === 0) process.send!({ done, failed }, () => process.exit(0))
      return
    }
    const socket = net.connect({ host: "127.0.0.1", port })
    let answered = false
    socket.on("data", () => {
      answered = true
    })
    socket.on("error", () => undefined)
    socket.on("close", () => {
      if (answered) done++
      else failed++
      one()
    })
  }
  for (let i = running; i > 0; i--) one()
} else {
  const { values } = parseArgs({
    options: {
      workers: { type: "string", default: "2" },
      seconds: { type: "string", default: "5" },
      concurrency: { type: "string", default: "50" },
      repeat: { type: "string", default: "3" }
    }
  })
  const workers = Number(values.workers)
  const self = new URL(import.meta.url).pathname
  const start = (env: Record<string, string>) =>
    new Promise<ChildProcess>((resolve) => {
      const child = fork(self, [], { env: { ...process.env, ...env } })
      child.once("message", () => resolve(child))
    })
  const freePort = () =>
    new Promise<number>((resolve) => {
      const s = net.createServer().listen({ host: "127.0.0.1", port: 0 }, () => {
        const { port } = s.address() as net.AddressInfo
        s.close(() => resolve(port))
      })
    })
  const client = (port: number) =>
    new Promise<{ done: number; failed: number }>((resolve) => {
      const child = fork(self, [], {
        env: {
          ...process.env,
          ACCEPT_BENCH_ROLE: "client",
          ACCEPT_BENCH_PORT: String(port),
          ACCEPT_BENCH_SECONDS: values.seconds,
          ACCEPT_BENCH_CONCURRENCY: values.concurrency
        }
      })
      child.once("message", (m) => resolve(m as { done: number; failed: number }))
    })
  const run = async (way: "reuseport" | "handles") => {
    const port = await freePort()
    const children = await Promise.all(
      Array.from({ length: workers }, () =>
        start({ ACCEPT_BENCH_ROLE: "worker", ACCEPT_BENCH_PORT: way === "reuseport" ? String(port) : "0" })
      )
    )
    let acceptor: net.Server | undefined
    if (way === "handles") {
      let next = 0
      acceptor = net.createServer({ pauseOnConnect: true }, (socket) => {
        children[next++ % children.length]!.send("c", socket)
      })
      await new Promise<void>((resolve) => acceptor!.listen({ host: "127.0.0.1", port }, resolve))
    }
    const result = await client(port)
    acceptor?.close()
    for (const child of children) child.kill()
    return result.done / Number(values.seconds)
  }
  const rates: Record<string, Array<number>> = { reuseport: [], handles: [] }
  for (let r = 0; r < Number(values.repeat); r++) {
    for (const way of r % 2 === 0 ? (["reuseport", "handles"] as const) : (["handles", "reuseport"] as const)) {
      rates[way]!.push(await run(way))
    }
  }
  const median = (xs: Array<number>) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!
  console.log(`${workers} workers, ${values.concurrency} connections at a time, ${values.seconds} s per run:`)
  for (const [way, xs] of Object.entries(rates)) {
    console.log(`  ${way}: median ${Math.round(median(xs))} connections/s (runs: ${xs.map(Math.round).join(", ")})`)
  }
  process.exit(0)
}
