/**
 * CPU time of a process from /proc/<pid>/stat (Linux), sampled while a benchmark runs so the
 * cost of connecting clients can be left out of the per-transaction figure.
 */
import { execFileSync } from "node:child_process"
import { readFileSync } from "node:fs"

export interface CpuSample {
  /** Wall clock, ms since the epoch (the clock pgbench stamps its transaction log with). */
  readonly at: number
  /** utime + stime, µs. */
  readonly cpuUs: number
}

const clockTicks = (() => {
  try {
    const ticks = Number(execFileSync("getconf", ["CLK_TCK"], { encoding: "utf8" }).trim())
    return Number.isInteger(ticks) && ticks > 0 ? ticks : 100
  } catch {
    return 100
  }
})()

/**
 * utime + stime of `pid` and its live child processes (a supervisor's workers, TIDEPOOL_WORKERS) in
 * µs; resolution 1/CLK_TCK s (10 ms on most kernels).
 */
export const cpuTimeUs = (pid: number): number => {
  let total = ownCpuTimeUs(pid)
  for (const child of childrenOf(pid)) total += ownCpuTimeUs(child)
  return total
}

/** The live child processes of `pid` (a supervisor's workers), from /proc; none when it has none. */
export const childrenOf = (pid: number): Array<number> => {
  try {
    return readFileSync(`/proc/${pid}/task/${pid}/children`, "utf8")
      .split(" ")
      .filter((p) => p.trim() !== "")
      .map(Number)
  } catch {
    return []
  }
}

const ownCpuTimeUs = (pid: number): number => {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8")
  // The command name (field 2) may contain spaces; the fields after its closing parenthesis do not.
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ")
  // fields[0] is field 3 (state); utime and stime are fields 14 and 15.
  const ticks = Number(fields[11]) + Number(fields[12])
  return (ticks * 1_000_000) / clockTicks
}

export interface CpuSampler {
  /** Stops sampling (taking one last sample) and returns every sample, oldest first. Idempotent. */
  stop(): ReadonlyArray<CpuSample>
}

/**
 * utime + stime of every process below `root` (children, their children…), `root` itself left out,
 * in µs: with `root` the bench process, the whole stack a run exercises — pgbench, PostgreSQL's
 * backends and background processes, the poolers — and nothing of anyone else's on the machine.
 * Processes that exited during the window are not counted (pgbench -C's backends): use it for
 * runs on long-lived connections.
 */
export const treeCpuTimeUs = (root: number): number => {
  let total = 0
  const pending = childrenOf(root)
  while (pending.length > 0) {
    const pid = pending.pop()!
    try {
      total += ownCpuTimeUs(pid)
    } catch {
      continue // exited meanwhile
    }
    pending.push(...childrenOf(pid))
  }
  return total
}

export const sampleCpu = (pid: number, intervalMs = 100, read: (pid: number) => number = cpuTimeUs): CpuSampler => {
  const samples: Array<CpuSample> = []
  let stopped = false
  const take = () => {
    try {
      samples.push({ at: Date.now(), cpuUs: read(pid) })
    } catch {
      // The process is gone; the run will fail on its own.
    }
  }
  take()
  const timer = setInterval(take, intervalMs)
  return {
    stop: () => {
      if (!stopped) {
        stopped = true
        clearInterval(timer)
        take()
      }
      return samples
    }
  }
}
