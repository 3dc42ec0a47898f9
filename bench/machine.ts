/** What the numbers were measured on. */
import { execFileSync } from "node:child_process"
import { readFileSync } from "node:fs"
import * as os from "node:os"

const cpuModel = (): string => {
  try {
    const match = readFileSync("/proc/cpuinfo", "utf8").match(/^model name\s*:\s*(.+)$/m)
    return match?.[1]?.trim() ?? os.cpus()[0]?.model ?? "unknown"
  } catch {
    return os.cpus()[0]?.model ?? "unknown"
  }
}

/** The commit Tidepool ran from, and whether src/ differed from it. */
export const tidepoolRevision = (dir?: string): string => {
  const git = (...args: Array<string>) =>
    execFileSync("git", args, {
      cwd: dir ?? new URL("..", import.meta.url),
      encoding: "utf8",
      stdio: ["ignore", "pipe", "ignore"]
    }).trim()
  try {
    const dirty = git("status", "--porcelain", "--", "src") !== ""
    return `Tidepool ${git("rev-parse", "--short", "HEAD")}${dirty ? " with uncommitted changes in src/" : ""}`
  } catch {
    return "Tidepool (not a git checkout)"
  }
}

/** `node --version` of another Node.js binary. */
export const nodeVersion = (node: string): string => {
  try {
    return execFileSync(node, ["--version"], { encoding: "utf8" }).trim()
  } catch {
    return `unknown (${node})`
  }
}

export interface Versions {
  readonly tidepool: string
  readonly postgres: string
  readonly pgbouncer: string | undefined
  readonly pgbench: string
}

/** `load`: the 1-minute load average when the run started and when it ended. */
export const describeMachine = (versions: Versions, load: readonly [number, number]): ReadonlyArray<string> => [
  `${os.availableParallelism()} CPUs (${cpuModel()}), ${Math.round(os.totalmem() / 1024 ** 3)} GiB RAM, ` +
    `Linux ${os.release()}`,
  `${versions.tidepool}; Node ${process.version}; PostgreSQL ${versions.postgres}; ${versions.pgbouncer ?? "PgBouncer not run"}; ${versions.pgbench}`,
  `pgbench, the poolers and PostgreSQL share the machine; 1-minute load average ${load[0].toFixed(1)} before ` +
    `the run (other work on it) and ${load[1].toFixed(1)} at the end (including the benchmark's own)`
]
