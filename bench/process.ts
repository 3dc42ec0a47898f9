/** Child processes as Effects: bounded in time, killed (and awaited) when interrupted. */
import { type ChildProcess, type SpawnOptions, spawn } from "node:child_process"
import * as fs from "node:fs/promises"
import { tmpdir } from "node:os"
import * as path from "node:path"
import { Data, Duration, Effect } from "effect"
import { type PostgresOptions, startPostgres } from "../test/support/postgres.ts"

export class BenchError extends Data.TaggedError("BenchError")<{ readonly message: string }> {}

export interface Finished {
  readonly code: number | null
  readonly signal: NodeJS.Signals | null
  readonly stdout: string
  readonly stderr: string
}

const OUTPUT_LIMIT = 1024 * 1024

/** A fresh directory under the system temp dir, removed with everything in it when the scope closes. */
export const scopedTempDir = (prefix: string) =>
  Effect.acquireRelease(
    Effect.promise(() => fs.mkdtemp(path.join(tmpdir(), prefix))),
    (dir) => Effect.promise(() => fs.rm(dir, { recursive: true, force: true, maxRetries: 3 }))
  )

/** The test harness's PostgreSQL for the enclosing scope, stopped when it closes. */
export const benchPostgres = (options: PostgresOptions) =>
  Effect.acquireRelease(
    Effect.tryPromise({
      try: () => startPostgres(options),
      catch: (error) => new BenchError({ message: `PostgreSQL: ${(error as Error).message}` })
    }),
    (server) => Effect.promise(() => server.stop())
  )

const exited = (child: ChildProcess) => child.exitCode !== null || child.signalCode !== null

/** SIGTERM, then SIGKILL after `graceMs`; resolves once the process has exited. */
export const terminate = (child: ChildProcess, graceMs = 3_000): Promise<void> =>
  new Promise((resolve) => {
    if (child.pid === undefined || exited(child)) return resolve()
    const kill = setTimeout(() => child.kill("SIGKILL"), graceMs)
    // A process that ignores even SIGKILL (D state) must not hang the benchmark's teardown.
    const giveUp = setTimeout(resolve, graceMs + 5_000)
    child.once("exit", () => {
      clearTimeout(kill)
      clearTimeout(giveUp)
      resolve()
    })
    child.kill("SIGTERM")
  })

/** Runs `command` to completion within `limit`; a non-zero exit is not an error here. */
export const runProcess = (
  command: string,
  args: ReadonlyArray<string>,
  options: SpawnOptions & { readonly limit: Duration.Input }
): Effect.Effect<Finished, BenchError> => {
  const { limit, ...spawnOptions } = options
  return Effect.callback<Finished, BenchError>((resume) => {
    let done = false
    const finish = (result: Effect.Effect<Finished, BenchError>) => {
      if (done) return
      done = true
      resume(result)
    }
    const child = spawn(command, args, { ...spawnOptions, stdio: ["ignore", "pipe", "pipe"] })
    let stdout = ""
    let stderr = ""
    child.stdout?.setEncoding("utf8").on("data", (chunk: string) => {
      stdout = (stdout + chunk).slice(-OUTPUT_LIMIT)
    })
    child.stderr?.setEncoding("utf8").on("data", (chunk: string) => {
      stderr = (stderr + chunk).slice(-OUTPUT_LIMIT)
    })
    child.once("error", (error) => finish(Effect.fail(new BenchError({ message: `${command}: ${error.message}` }))))
    child.once("close", (code, signal) => finish(Effect.succeed({ code, signal, stdout, stderr })))
    return Effect.promise(() => terminate(child))
  }).pipe(
    Effect.timeoutOrElse({
      duration: limit,
      orElse: () =>
        Effect.fail(
          new BenchError({
            message: `${command} ${args.join(" ")} did not finish within ${Duration.format(Duration.fromInputUnsafe(limit))}`
          })
        )
    })
  )
}

/** Like runProcess, but a non-zero exit fails with the tail of its output. */
export const runChecked = (
  command: string,
  args: ReadonlyArray<string>,
  options: SpawnOptions & { readonly limit: Duration.Input }
): Effect.Effect<Finished, BenchError> =>
  Effect.filterOrFail(
    runProcess(command, args, options),
    (finished) => finished.code === 0,
    (finished) =>
      new BenchError({
        message: `${command} ${args.join(" ")} failed (${finished.code ?? finished.signal}):\n${(finished.stdout + finished.stderr).slice(-4000)}`
      })
  )
