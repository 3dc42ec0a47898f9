import { spawn } from "node:child_process"
import { fileURLToPath } from "node:url"
import { describe, expect, it } from "vitest"
import { hasTool } from "../support/tools.ts"

const hasPgbench = await hasTool("pgbench")
const hasValgrind = await hasTool("valgrind")
const root = fileURLToPath(new URL("../..", import.meta.url))

/** Runs `npm run bench -- …` as a user would; resolves with its exit code and output. */
const bench = (args: ReadonlyArray<string>, script = "bench/run.ts") =>
  new Promise<{ readonly code: number | null; readonly stdout: string; readonly stderr: string }>((resolve) => {
    const child = spawn(process.execPath, ["--import", "tsx", script, ...args], { cwd: root })
    let stdout = ""
    let stderr = ""
    child.stdout.on("data", (chunk: Buffer) => {
      stdout += chunk.toString()
    })
    child.stderr.on("data", (chunk: Buffer) => {
      stderr += chunk.toString()
    })
    child.on("close", (code) => resolve({ code, stdout, stderr }))
  })

// The benchmark is not part of the suite's timing, but it must keep working: it broke silently
// once (a setting it did not pass). One second per cell, the targets CI has (no PgBouncer there).
describe("npm run bench", () => {
  it.skipIf(!hasPgbench)(
    "runs a smoke cell through Tidepool, the Node relay, the Node pool floor and direct, and reports it",
    async () => {
      const { code, stdout, stderr } = await bench([
        "--duration",
        "1",
        "--clients",
        "2",
        "--protocols",
        "simple",
        "--targets",
        "tidepool,direct,node-relay,pool-floor",
        "--warmup",
        "0",
        "--scale",
        "1"
      ])
      expect(code, stderr).toBe(0)
      for (const target of ["Tidepool", "direct", "Node relay", "Node pool floor"]) {
        const row = stdout.split("\n").find((line) => line.startsWith(`| simple `) && line.includes(`| ${target} `))
        expect(row, `${target} row in:\n${stdout}`).toBeDefined()
        const cells = row!.split("|").map((cell) => cell.trim())
        // TPS above zero, no failed transaction.
        expect(Number(cells[4])).toBeGreaterThan(0)
        expect(cells[8]).toBe("0")
      }
    },
    120_000
  )

  it.skipIf(!hasPgbench)(
    "--connect --alloc reports what a login allocates, sampled over the inspector",
    async () => {
      const { code, stdout, stderr } = await bench([
        "--connect",
        "--targets",
        "tidepool",
        "--alloc",
        "--duration",
        "1",
        "--refused",
        "0",
        "--idle",
        "0",
        "--storm",
        "0",
        "--wave",
        "0"
      ])
      expect(code, stderr).toBe(0)
      const header = stdout.split("\n").find((line) => line.startsWith("| target ") && line.includes("new conn/s"))
      const row = stdout.split("\n").find((line) => line.startsWith("| Tidepool ") && !line.includes("refused"))
      expect(header, stdout).toBeDefined()
      expect(row, stdout).toBeDefined()
      const column = header!
        .split("|")
        .map((cell) => cell.trim())
        .indexOf("kB allocated per connection")
      const kb = Number(row!.split("|").map((cell) => cell.trim())[column])
      // A login allocates tens of kB (docs/login-path.md); the sampler must have seen them.
      expect(kb).toBeGreaterThan(1)
    },
    120_000
  )

  it.skipIf(!hasPgbench || !hasValgrind)(
    "npm run bench:instructions counts a transaction's and a login's instructions under callgrind",
    async () => {
      const { code, stdout, stderr } = await bench(
        ["--runs", "1", "--clients", "4", "--transactions", "25", "--logins", "8", "--top", "3"],
        "bench/instructions.ts"
      )
      expect(code, stderr).toBe(0)
      const row = stdout.split("\n").find((line) => line.startsWith("| Tidepool |"))
      expect(row, stdout).toBeDefined()
      const [perTransaction, perLogin] = row!
        .split("|")
        .slice(2, 4)
        .map((cell) => Number(cell.trim().split(" ")[0]!.replaceAll(",", "")))
      // Thousands per transaction, hundreds of thousands per login (docs/benchmarks.md): counted, not zero.
      expect(perTransaction).toBeGreaterThan(1000)
      expect(perLogin).toBeGreaterThan(perTransaction!)
      expect(stdout).toContain("where a transaction's instructions go")
    },
    600_000
  )
})
