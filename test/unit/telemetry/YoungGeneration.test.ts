import { execFile, spawn } from "node:child_process"
import { mkdtempSync, readFileSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import * as path from "node:path"
import { fileURLToPath } from "node:url"
import { afterAll, describe, expect, it } from "vitest"
import {
  DEFAULT_SEMI_SPACE_MB,
  hasSemiSpaceFlag,
  RELAUNCHED_ENV,
  relaunchArgv
} from "../../../src/telemetry/YoungGeneration.ts"
import { freePort } from "../../support/ports.ts"

const root = fileURLToPath(new URL("../../..", import.meta.url))
const dir = mkdtempSync(path.join(tmpdir(), "tidepool-young-"))
afterAll(() => rmSync(dir, { recursive: true, force: true }))

const launch = (
  args: ReadonlyArray<string>,
  execArgv: ReadonlyArray<string> = [],
  env: Record<string, string> = {}
) => ({
  execPath: "/usr/bin/node",
  execArgv,
  argv: ["/usr/bin/node", "/app/bin/tidepool.js", ...args],
  env
})

describe("relaunchArgv", () => {
  it("adds the cap for the serving commands, keeping Node's flags and the command line", () => {
    expect(relaunchArgv(launch(["serve", "--config", "t.yaml"], ["--import", "tsx"]))).toEqual([
      "/usr/bin/node",
      "--import",
      "tsx",
      `--max-semi-space-size=${DEFAULT_SEMI_SPACE_MB}`,
      "/app/bin/tidepool.js",
      "serve",
      "--config",
      "t.yaml"
    ])
    expect(relaunchArgv(launch(["demo"]))).toContain(`--max-semi-space-size=${DEFAULT_SEMI_SPACE_MB}`)
  })

  it("leaves the other commands, the operator's own flag and an already re-executed process alone", () => {
    expect(relaunchArgv(launch(["config", "check", "t.yaml"]))).toBeUndefined()
    expect(relaunchArgv(launch(["--version"]))).toBeUndefined()
    expect(relaunchArgv(launch(["serve"], ["--max-semi-space-size=16"]))).toBeUndefined()
    expect(relaunchArgv(launch(["serve"], [], { NODE_OPTIONS: "--enable-source-maps --max_semi_space_size=64" }))).toBe(
      undefined
    )
    expect(relaunchArgv(launch(["serve"], [], { [RELAUNCHED_ENV]: "1" }))).toBeUndefined()
  })

  it("reads both spellings of the flag, and no flag that merely starts alike", () => {
    expect(hasSemiSpaceFlag(["--max-semi-space-size", "8"], undefined)).toBe(true)
    expect(hasSemiSpaceFlag([], "--max_semi_space_size=8")).toBe(true)
    expect(hasSemiSpaceFlag(["--max-semi-space-sizes=8"], "--min-semi-space-size=1")).toBe(false)
  })
})

const cmdlineOf = (pid: number) =>
  readFileSync(`/proc/${pid}/cmdline`, "utf8")
    .split("\0")
    .filter((a) => a !== "")

/** `tidepool serve` as an operator starts it (bin/tidepool.js), until it listens; its command line then. */
const serveAndRead = async (env: Record<string, string>, ipc = false) => {
  const child = spawn(process.execPath, ["bin/tidepool.js", "serve"], {
    cwd: root,
    env: {
      ...process.env,
      TIDEPOOL_LOG_FORMAT: "json",
      TIDEPOOL_DATA_DIR: mkdtempSync(path.join(dir, "data-")),
      VAULT_ENC_KEY: "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
      TIDEPOOL_LISTEN_ADDR: "127.0.0.1",
      PROXY_PORT_SESSION: String(await freePort()),
      PROXY_PORT_TRANSACTION: String(await freePort()),
      PORT: String(await freePort()),
      ...env
    },
    stdio: ipc ? ["ignore", "pipe", "pipe", "ipc"] : ["ignore", "pipe", "pipe"]
  })
  let output = ""
  try {
    await new Promise<void>((resolve, reject) => {
      const onData = (chunk: Buffer) => {
        output += chunk.toString()
        if (/tidepool listening/.test(output)) resolve()
      }
      child.stdout!.on("data", onData)
      child.stderr!.on("data", onData)
      child.once("exit", (code) => reject(new Error(`tidepool serve exited (${code}) before listening:\n${output}`)))
    })
    // The pid the test started: re-executed in place (execve), not a child of it.
    return { cmdline: cmdlineOf(child.pid!) }
  } finally {
    const exited = new Promise((resolve) => child.once("exit", resolve))
    child.kill("SIGTERM")
    await exited
  }
}

describe("the launch path", () => {
  it("runs `tidepool serve` with the young generation capped, in the process that was started", async () => {
    const { cmdline } = await serveAndRead({})
    expect(cmdline).toContain(`--max-semi-space-size=${DEFAULT_SEMI_SPACE_MB}`)
    expect(cmdline.slice(-2)).toEqual([expect.stringMatching(/bin\/tidepool\.js$/), "serve"])
  }, 60_000)

  it("keeps the operator's NODE_OPTIONS cap and re-executes nothing", async () => {
    const { cmdline } = await serveAndRead({ NODE_OPTIONS: "--max-semi-space-size=16" })
    expect(cmdline.filter((arg) => arg.includes("semi-space"))).toEqual([])
  }, 60_000)

  it("runs as started when it has an IPC channel (node --watch, a process manager's fork), which a re-execution would lose", async () => {
    const { cmdline } = await serveAndRead({}, true)
    expect(cmdline.filter((arg) => arg.includes("semi-space"))).toEqual([])
  }, 60_000)

  it("V8 on this Node holds the young generation to the flag's size (so the flag is the lever)", async () => {
    // A burst of short-lived garbage: uncapped, V8 grows the young generation to its largest size.
    const burst = `
      let keep = []
      for (let i = 0; i < 2e6; i++) { keep.push({ i, s: "x" + i }); if (keep.length > 2e5) keep = [] }
      const s = require("node:v8").getHeapSpaceStatistics().find((s) => s.space_name === "new_space")
      console.log(s.space_size)`
    const newSpace = (flags: ReadonlyArray<string>) =>
      new Promise<number>((resolve, reject) =>
        execFile(process.execPath, [...flags, "-e", burst], (error, stdout) =>
          error === null ? resolve(Number(stdout.trim())) : reject(error)
        )
      )
    const [capped, uncapped] = await Promise.all([
      newSpace([`--max-semi-space-size=${DEFAULT_SEMI_SPACE_MB}`]),
      newSpace([])
    ])
    // Both semi-spaces at most DEFAULT_SEMI_SPACE_MB each.
    expect(capped).toBeLessThanOrEqual(2 * DEFAULT_SEMI_SPACE_MB * 1048576)
    expect(uncapped).toBeGreaterThan(4 * capped)
  }, 60_000)
})
