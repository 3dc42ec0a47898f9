/**
 * `npm run stress -- [--seed S] [--clients N] [--pool P] [--duration D] …`: long differential stress
 * runs on demand (docs/operations.md, "Stress testing"). Runs seeds S, S+1, … until the duration is
 * spent (at least one), stops at the first failure, shrinks it, and prints how to reproduce it.
 */
import { parseArgs } from "node:util"
import { checkSeed, StressEnv } from "./harness.ts"
import { FEATURES, type Feature } from "./script.ts"

const HELP = `npm run stress -- [options]

  --seed S          first seed (default: random); runs S, S+1, … until --duration is spent
  --clients N       clients per run (default 30)
  --pool P          Tidepool pool_size (default 3)
  --duration D      seconds to keep starting runs (default 0: one run)
  --length L        intents per client script, on average (default 12)
  --deadline D      seconds a run may take before its stuck clients are reported (default 120)
  --shrink K        full runs to spend shrinking a failure (default 20; 0: none)
  --path P          replay the shrunk counterexample fast-check printed (with its --seed)
  --cache-size C    Tidepool's per-server prepared-statement cache (default 20)
  --features F,…    also generate the patterns of known, unfixed defects (${FEATURES.join(", ")}, or all;
                    test/stress/differences.ts lists them)
`

const { values } = parseArgs({
  options: {
    seed: { type: "string" },
    clients: { type: "string", default: "30" },
    pool: { type: "string", default: "3" },
    duration: { type: "string", default: "0" },
    length: { type: "string", default: "12" },
    deadline: { type: "string", default: "120" },
    shrink: { type: "string", default: "20" },
    path: { type: "string" },
    "cache-size": { type: "string", default: "20" },
    features: { type: "string", default: "" },
    help: { type: "boolean", default: false }
  }
})

if (values.help) {
  process.stdout.write(HELP)
  process.exit(0)
}

const int = (name: string, value: string | undefined): number => {
  const n = Number(value)
  if (!Number.isInteger(n) || n < 0) {
    process.stderr.write(`--${name} must be a whole number, not ${JSON.stringify(value)}\n\n${HELP}`)
    process.exit(2)
  }
  return n
}

const features = new Set<Feature>()
for (const name of values.features.split(",").filter((f) => f !== "")) {
  if (name === "all") for (const f of FEATURES) features.add(f)
  else if ((FEATURES as ReadonlyArray<string>).includes(name)) features.add(name as Feature)
  else {
    process.stderr.write(`--features: no feature ${JSON.stringify(name)} (${FEATURES.join(", ")}, all)\n\n${HELP}`)
    process.exit(2)
  }
}

const first = values.seed === undefined ? Math.floor(Math.random() * 2 ** 31) : int("seed", values.seed)
const pool = Math.max(1, int("pool", values.pool))
const until = Date.now() + int("duration", values.duration) * 1000
const env = await StressEnv.start({ pools: [pool], cacheSize: Math.max(1, int("cache-size", values["cache-size"])) })
let failed = false
try {
  for (let seed = first; ; seed++) {
    const started = Date.now()
    const outcome = await checkSeed(env, {
      seed,
      clients: Math.max(1, int("clients", values.clients)),
      pool,
      length: Math.max(1, int("length", values.length)),
      deadlineMs: int("deadline", values.deadline) * 1000,
      shrinkRuns: int("shrink", values.shrink),
      features,
      ...(values.path !== undefined ? { path: values.path } : {})
    })
    process.stdout.write(`${outcome.report} (${((Date.now() - started) / 1000).toFixed(1)} s)\n`)
    if (!outcome.ok) {
      failed = true
      break
    }
    if (Date.now() >= until || values.path !== undefined) break
  }
} finally {
  await env.stop()
}
process.exit(failed ? 1 : 0)
