import { type ChildProcess, spawn } from "node:child_process"
import { fileURLToPath } from "node:url"

const root = fileURLToPath(new URL("../..", import.meta.url))

export interface CliProcess {
  readonly child: ChildProcess
  /** Everything printed so far (stdout and stderr). */
  output(): string
  /** Resolves with the first match of `pattern` in the output, waiting for more as needed. */
  waitFor(pattern: RegExp): Promise<RegExpMatchArray>
  /** Resolves with the exit code (or signal name). */
  exited: Promise<number | string>
}

/** Runs `tidepool <args>` from the sources, as `npm start` does. */
export const runCli = (args: ReadonlyArray<string>, env: Record<string, string>): CliProcess => {
  const child = spawn(process.execPath, ["--import", "tsx", "src/main.ts", ...args], {
    cwd: root,
    env: { ...process.env, TIDEPOOL_LOG_FORMAT: "json", ...env },
    stdio: ["ignore", "pipe", "pipe"]
  })
  let text = ""
  const waiters = new Set<() => void>()
  const onText = (chunk: Buffer) => {
    text += chunk.toString()
    for (const w of waiters) w()
  }
  child.stdout!.on("data", onText)
  child.stderr!.on("data", onText)
  // 'close', not 'exit': the output is complete then. Set before the waiters are told, so a
  // pattern never printed fails at once.
  let done = false
  const exited = new Promise<number | string>((resolve) => {
    child.on("close", (code, signal) => {
      done = true
      resolve(code ?? signal ?? -1)
      for (const w of waiters) w()
    })
  })
  return {
    child,
    output: () => text,
    exited,
    waitFor: (pattern) =>
      new Promise((resolve, reject) => {
        const check = () => {
          const m = text.match(pattern)
          if (m !== null) {
            waiters.delete(check)
            resolve(m)
          } else if (done) {
            waiters.delete(check)
            reject(new Error(`process exited before printing ${pattern}:\n${text}`))
          }
        }
        waiters.add(check)
        check()
      })
  }
}

/** Peak resident memory of a process in kB (Linux). */
export const peakRssKb = async (pid: number): Promise<number> => {
  const { readFile } = await import("node:fs/promises")
  const status = await readFile(`/proc/${pid}/status`, "utf8")
  return Number(status.match(/VmHWM:\s+(\d+)/)?.[1] ?? Number.NaN)
}
