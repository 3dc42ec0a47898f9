/** The Node.js relay floor (relayFloor.ts) as a child process, so its CPU time is its own. */
import { spawn } from "node:child_process"
import { fileURLToPath } from "node:url"
import { Effect, type Scope } from "effect"
import { freePort } from "../test/support/ports.ts"
import type { Endpoint } from "./pgbench.ts"
import { BenchError, terminate } from "./process.ts"
import { waitUntilServing } from "./ready.ts"

const root = fileURLToPath(new URL("..", import.meta.url))

/** The relay in front of `upstream` for the enclosing scope; clients log in as they would directly. */
export const startRelayFloor = (
  upstream: Endpoint
): Effect.Effect<{ readonly endpoint: Endpoint; readonly pid: number }, BenchError, Scope.Scope> =>
  Effect.gen(function* () {
    const port = yield* Effect.promise(() => freePort())
    const child = yield* Effect.acquireRelease(
      Effect.sync(() =>
        spawn(
          process.execPath,
          ["--import", "tsx", "bench/relayFloor.ts", String(port), upstream.host, String(upstream.port)],
          { cwd: root, stdio: ["ignore", "ignore", "pipe"] }
        )
      ),
      (child) => Effect.promise(() => terminate(child))
    )
    let log = ""
    child.stderr?.setEncoding("utf8").on("data", (chunk: string) => {
      log = (log + chunk).slice(-8000)
    })
    const exited = () =>
      child.exitCode !== null || child.signalCode !== null
        ? `exit ${child.exitCode ?? child.signalCode}\n${log}`
        : undefined
    const endpoint: Endpoint = { ...upstream, host: "127.0.0.1", port }
    yield* waitUntilServing("the Node.js relay", endpoint, exited).pipe(
      Effect.mapError((error) => new BenchError({ message: error.message }))
    )
    return { endpoint, pid: child.pid! }
  })
