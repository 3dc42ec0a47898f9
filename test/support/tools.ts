import { execFile } from "node:child_process"
import { readFileSync } from "node:fs"
import { promisify } from "node:util"

/** Runs a command; rejects on a non-zero exit. */
export const run = promisify(execFile)

/** Whether a client tool (psql, pgbench) runs on this machine; tests that need it skip otherwise. */
export const hasTool = (name: string): Promise<boolean> =>
  run(name, ["--version"]).then(
    () => true,
    () => false
  )

/**
 * This process's open-files limit (the soft one, which Node raises to the hard one at start): a
 * test that opens thousands of connections sizes itself by it rather than fail on EMFILE.
 */
export const openFilesLimit = (): number => {
  const line = readFileSync("/proc/self/limits", "utf8")
    .split("\n")
    .find((l) => l.startsWith("Max open files"))
  const soft = line?.slice("Max open files".length).trim().split(/\s+/)[0]
  return soft === undefined || soft === "unlimited" ? 1_000_000 : Number(soft)
}

/** `promise`, or a failure naming what still hangs once `ms` have passed (a hang fails the test, not its timeout). */
export const deadline = <A>(promise: Promise<A>, ms: number, what: string): Promise<A> => {
  let timer: ReturnType<typeof setTimeout> | undefined
  const expired = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} after ${ms / 1000} s`)), ms)
  })
  return Promise.race([promise, expired]).finally(() => clearTimeout(timer))
}
