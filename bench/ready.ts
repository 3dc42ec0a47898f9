import { Effect } from "effect"
import pg from "pg"
import type { Endpoint } from "./pgbench.ts"
import { BenchError } from "./process.ts"

const selectOne = async (endpoint: Endpoint) => {
  const client = new pg.Client({ ...endpoint, connectionTimeoutMillis: 5_000 })
  client.on("error", () => undefined)
  try {
    await client.connect()
    await client.query("SELECT 1")
  } finally {
    await client.end().catch(() => undefined)
  }
}

/**
 * Waits until `SELECT 1` succeeds through `endpoint` (so listening, authentication and the upstream
 * login all work), for at most `timeoutMs`; `exited` reports a process that died meanwhile.
 */
export const waitUntilServing = (
  name: string,
  endpoint: Endpoint,
  exited: () => string | undefined,
  timeoutMs = 30_000
): Effect.Effect<void, BenchError> =>
  Effect.gen(function* () {
    const deadline = Date.now() + timeoutMs
    let lastError = "no attempt"
    while (Date.now() < deadline) {
      const died = exited()
      if (died !== undefined) return yield* new BenchError({ message: `${name} exited during start-up:\n${died}` })
      const attempt = yield* Effect.promise(() =>
        selectOne(endpoint).then(
          () => undefined,
          (error: Error) => error.message
        )
      )
      if (attempt === undefined) return
      lastError = attempt
      yield* Effect.sleep("200 millis")
    }
    return yield* new BenchError({
      message: `${name} did not serve SELECT 1 on ${endpoint.host}:${endpoint.port} within ${timeoutMs / 1000} s: ${lastError}`
    })
  })
