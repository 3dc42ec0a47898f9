/**
 * The Node.js login floor (loginFloor.ts) as a child process, so its CPU time and memory are its
 * own; with an upstream, the pool floor.
 */
import { spawn } from "node:child_process"
import { fileURLToPath } from "node:url"
import { Effect, type Scope } from "effect"
import { freePort } from "../test/support/ports.ts"
import type { Endpoint } from "./pgbench.ts"
import { BenchError, terminate } from "./process.ts"
import { waitUntilServing } from "./ready.ts"

const root = fileURLToPath(new URL("..", import.meta.url))

const upstreamUrl = (endpoint: Endpoint) =>
  `postgres://${encodeURIComponent(endpoint.user)}:${encodeURIComponent(endpoint.password)}@${endpoint.host}:${endpoint.port}/${encodeURIComponent(endpoint.database)}`

/**
 * The floor for the enclosing scope, accepting `user`/`password` as the role (clients log in as
 * they would to PgBouncer). Run by Node itself (it strips the types), not through tsx, whose
 * `__name` wrappers would add to each closure what a compiled Tidepool does not carry.
 */
export const startLoginFloor = (
  user: string,
  password: string,
  database: string,
  failureDelayMs = 500,
  /** `stream`: read logins through 'data' events (see loginFloor.ts). */
  reads: "shared" | "stream" = "shared",
  /** The pool floor: logged-in clients' transactions pooled onto `pool` connections to `endpoint`. */
  upstream?: { readonly endpoint: Endpoint; readonly pool: number },
  /** Node.js flags before the script (`--inspect=…` for `--alloc`). */
  nodeFlags: ReadonlyArray<string> = [],
  /** A command that runs Node.js (valgrind for `bench/instructions.ts`), given longer to start. */
  launcher: ReadonlyArray<string> = []
): Effect.Effect<{ readonly endpoint: Endpoint; readonly pid: number }, BenchError, Scope.Scope> =>
  Effect.gen(function* () {
    const port = yield* Effect.promise(() => freePort())
    const child = yield* Effect.acquireRelease(
      Effect.sync(() =>
        spawn(
          launcher[0] ?? process.execPath,
          [
            ...(launcher.length > 0 ? [...launcher.slice(1), process.execPath] : []),
            ...nodeFlags,
            "bench/loginFloor.ts",
            String(port),
            user,
            password,
            String(failureDelayMs),
            reads
          ],
          {
            cwd: root,
            stdio: ["ignore", "ignore", "pipe"],
            env:
              upstream === undefined
                ? process.env
                : {
                    ...process.env,
                    FLOOR_UPSTREAM: upstreamUrl(upstream.endpoint),
                    FLOOR_POOL: String(upstream.pool)
                  }
          }
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
    const endpoint: Endpoint = { host: "127.0.0.1", port, user, password, database }
    yield* waitUntilServing(
      upstream === undefined ? "the Node.js login floor" : "the Node.js pool floor",
      endpoint,
      exited,
      launcher.length > 0 ? 300_000 : undefined
    ).pipe(Effect.mapError((error) => new BenchError({ message: error.message })))
    return { endpoint, pid: child.pid! }
  })
