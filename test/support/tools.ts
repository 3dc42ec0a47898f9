import { execFile } from "node:child_process"
import { promisify } from "node:util"

/** Runs a command; rejects on a non-zero exit. */
export const run = promisify(execFile)

/** Whether a client tool (psql, pgbench) runs on this machine; tests that need it skip otherwise. */
export const hasTool = (name: string): Promise<boolean> =>
  run(name, ["--version"]).then(
    () => true,
    () => false
  )
