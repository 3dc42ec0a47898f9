/**
 * Caps V8's young generation (docs/operations.md#memory-after-a-burst).
 *
 * A burst of logins grows V8's young generation to its largest size (two semi-spaces of 64 MB on a
 * 64-bit Node 24: 128 MB committed), and V8 keeps it committed while the process idles, with the
 * burst's promoted garbage in the old generation beside it: 9.7 kB resident per idle client at
 * 10 000 clients, 3.5 kB of it live. `--max-semi-space-size` caps it; a small young generation
 * costs more scavenges per login, and promotes a little more of each login's garbage, which V8's
 * ordinary incremental full collections then sweep during the burst rather than after it. Measured
 * in docs/benchmarks.md (#2026-12-06-idle-clients-by-default-a-capped-young-generation).
 *
 * The size of the young generation is fixed when V8 sets up its heap: `v8.setFlagsFromString` after
 * start changes the flag, not the heap (measured on Node 24.21: `new_space` still grew to 128 MB).
 * So it must be on Node's command line, and Tidepool is started by `tidepool serve` (bin/), `npm
 * start`, the Docker image's ENTRYPOINT, `node dist/main.js` and the supervisor's workers alike; the
 * one place all of them pass through is src/main.ts, which re-executes the process with the flag
 * (`process.execve`: same pid, same stdio, same environment — a container's PID 1 stays PID 1)
 * before anything else has run. A `--max-semi-space-size` given by the operator (on the command
 * line or in `NODE_OPTIONS`) wins and nothing is re-executed; workers are forked with the
 * supervisor's `execArgv`, so they start with the flag.
 */

/**
 * The young generation's cap Tidepool starts with: each semi-space at most this many MB. 2, 4 and 8
 * held 10 000 idle clients at 2.6–4.5 kB each; 1 did not (7.5–8.2 kB: a nursery that small
 * promotes more of every login's garbage than the old generation's collections keep up with).
 */
export const DEFAULT_SEMI_SPACE_MB = 2

/** Set in the re-executed process's environment (and removed at once): never re-execute twice. */
export const RELAUNCHED_ENV = "TIDEPOOL_RELAUNCHED"

/** The commands that serve clients; the others (help, config check, import) run as started. */
const SERVING = new Set(["serve", "demo"])

const FLAG = /^--max[-_]semi[-_]space[-_]size(=|$)/

/** Whether Node was given `--max-semi-space-size` (either spelling), on its command line or in NODE_OPTIONS. */
export const hasSemiSpaceFlag = (execArgv: ReadonlyArray<string>, nodeOptions: string | undefined): boolean =>
  execArgv.some((arg) => FLAG.test(arg)) || (nodeOptions ?? "").split(/\s+/).some((arg) => FLAG.test(arg))

export interface Launch {
  /** `process.execPath`. */
  readonly execPath: string
  /** `process.execArgv`: Node's flags (`--import tsx` under `npm start`). */
  readonly execArgv: ReadonlyArray<string>
  /** `process.argv`: the node binary, the entry point, then the command's arguments. */
  readonly argv: ReadonlyArray<string>
  readonly env: Readonly<Record<string, string | undefined>>
}

/**
 * The argv to re-execute with (the binary first, as `execve` wants it), or `undefined` when the
 * process should run as it is: not a serving command, the operator gave the flag, or this is the
 * re-executed process already.
 */
export const relaunchArgv = (
  launch: Launch,
  semiSpaceMb = DEFAULT_SEMI_SPACE_MB
): ReadonlyArray<string> | undefined => {
  if (launch.env[RELAUNCHED_ENV] !== undefined) return undefined
  if (hasSemiSpaceFlag(launch.execArgv, launch.env.NODE_OPTIONS)) return undefined
  const args = launch.argv.slice(2)
  if (!args.some((arg) => SERVING.has(arg))) return undefined
  if (launch.argv[1] === undefined) return undefined
  return [launch.execPath, ...launch.execArgv, `--max-semi-space-size=${semiSpaceMb}`, ...launch.argv.slice(1)]
}

type Execve = (file: string, args?: ReadonlyArray<string>, env?: Record<string, string | undefined>) => never

/**
 * Re-executes this process with the young generation capped, when `relaunchArgv` says so and Node
 * can (`process.execve`: Node ≥ 22.15 on POSIX); otherwise returns and Tidepool runs uncapped. In
 * the re-executed process it only clears the marker.
 */
export const relaunchWithCappedYoungGeneration = (): void => {
  const argv = relaunchArgv({
    execPath: process.execPath,
    execArgv: process.execArgv,
    argv: process.argv,
    env: process.env
  })
  if (argv === undefined) {
    // Not passed on: a process Tidepool starts (a worker, the demo's PostgreSQL) starts afresh.
    delete process.env[RELAUNCHED_ENV]
    return
  }
  // Started with an IPC channel (`node --watch`, a process manager's fork): the channel would not
  // survive the re-execution (Node takes NODE_CHANNEL_FD out of the environment at start), so run
  // uncapped; Tidepool's own workers are forked with the flag and never get here.
  if (process.channel !== undefined) return
  const execve = (process as unknown as { execve?: Execve }).execve
  // Windows and os400 have the function but throw; so does any thread but the main one.
  if (
    typeof execve !== "function" ||
    (process.platform as string) === "win32" ||
    (process.platform as string) === "os400"
  )
    return
  try {
    execve.call(process, argv[0]!, argv, { ...process.env, [RELAUNCHED_ENV]: "1" })
  } catch {
    // Not re-executed: Tidepool runs uncapped, as where execve is missing.
  }
}
