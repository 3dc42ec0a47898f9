/**
 * Gives a burst's memory back to the OS once the process goes quiet (docs/operations.md#memory-after-a-burst).
 *
 * A burst of logins grows V8's heap: the young generation to its largest size (about 100 MB
 * committed on a 64-bit Node 24) and the old generation with the logins' promoted garbage. V8 has
 * the machinery to give that back — its memory reducer runs an incremental, memory-reducing full
 * collection (it shrinks the young generation and releases free pages to the OS) once the
 * allocation rate is low — but it judges the allocation rate from samples taken at collections, and
 * an idle process collects nothing, so it keeps seeing the burst's rate and waits forever (measured:
 * `--trace-memory-reducer` says "high alloc" every 8 s for minutes; 10 000 idle clients held
 * 15–17 kB of resident memory each, 1.5–2× their live heap and young generation).
 *
 * So once a second this looks at the event loop's utilisation and the heap's committed size; when
 * the process is quiet and the committed heap has grown by `growthBytes` since the last reclaim, it
 * runs one young-generation collection (1–50 ms, usually a few). That refreshes V8's view of the
 * allocation rate, and the memory reducer does the rest within its next 8 s period, incrementally.
 * When V8's reducer is not armed (it arms only after a full collection, which a small burst may not
 * have had), the heap has not shrunk `fallbackMs` later and the process is still quiet: then one
 * full collection, which arms it. Nothing runs while the process is busy, nothing per message or
 * per login: one timer, unref'd.
 */
import { performance } from "node:perf_hooks"
import * as v8 from "node:v8"
import * as vm from "node:vm"
import { Effect, Layer } from "effect"
import { AppConfig } from "../config/AppConfig.ts"

export interface MemoryReclaimOptions {
  /** Growth of the committed heap since the last reclaim that makes a quiet process reclaim; 0 = never. */
  readonly growthBytes: number
  /** How often the process is looked at (default 1000 ms). */
  readonly intervalMs?: number
  /** Event-loop utilisation (0–1) over one interval below which the process counts as quiet (default 0.02). */
  readonly quietUtilization?: number
  /** How long after the young-generation collection a heap that has not shrunk gets a full one (default 20 s). */
  readonly fallbackMs?: number
  /** Told of each step, for logs and tests. */
  readonly onStep?: (step: ReclaimStep) => void
}

export interface ReclaimStep {
  /** `minor`: the young-generation collection; `major`: the fallback; `reclaimed`: the heap shrank. */
  readonly kind: "minor" | "major" | "reclaimed"
  /** Committed heap (V8's `total_heap_size`) before the step, or before the reclaim for `reclaimed`. */
  readonly fromBytes: number
  readonly toBytes: number
  /** How long the step's collection blocked the event loop (0 for `reclaimed`, which V8 ran itself). */
  readonly pauseMs: number
}

type Gc = (options?: { readonly type?: "major" | "minor"; readonly execution?: "sync" | "async" }) => unknown

let gcFunction: Gc | undefined

/**
 * V8's `gc` without starting Node with `--expose-gc`: the flag makes V8 put `gc` in contexts created
 * after it is set, so one throwaway context hands it over; the flag is turned off again at once,
 * so no other context (none of the application's) sees a `gc` global. With `--expose-gc` given, the
 * global one.
 */
const exposeGc = (): Gc => {
  if (gcFunction !== undefined) return gcFunction
  const global = (globalThis as { gc?: Gc }).gc
  if (typeof global === "function") {
    gcFunction = global
    return global
  }
  v8.setFlagsFromString("--expose-gc")
  try {
    gcFunction = vm.runInNewContext("gc") as Gc
  } finally {
    v8.setFlagsFromString("--no-expose-gc")
  }
  return gcFunction
}

const committed = () => v8.getHeapStatistics().total_heap_size

/** Starts watching; the returned function stops it. With `growthBytes` 0 nothing is started. */
export const startMemoryReclaim = (options: MemoryReclaimOptions): (() => void) => {
  if (options.growthBytes <= 0) return () => undefined
  const gc = exposeGc()
  const quiet = options.quietUtilization ?? 0.02
  const fallbackMs = options.fallbackMs ?? 20_000
  const onStep = options.onStep ?? (() => undefined)
  let last = performance.eventLoopUtilization()
  // The smallest committed heap since the last reclaim: growth is counted from there.
  let floor = committed()
  // After a collection of ours: when it ran and what the heap was then; undefined while watching.
  let stepAt: number | undefined
  let stepBytes = 0
  let fellBack = false
  const collect = (kind: "minor" | "major", before: number) => {
    const start = performance.now()
    gc({ type: kind })
    const pauseMs = performance.now() - start
    stepAt = performance.now()
    stepBytes = before
    onStep({ kind, fromBytes: before, toBytes: committed(), pauseMs })
  }
  const tick = () => {
    const now = performance.eventLoopUtilization()
    const utilization = performance.eventLoopUtilization(now, last).utilization
    last = now
    const heap = committed()
    if (stepAt !== undefined) {
      // Reclaimed (by V8's reducer, or by a collection V8 ran on its own): watch again from here.
      if (heap <= stepBytes - options.growthBytes / 2) {
        onStep({ kind: "reclaimed", fromBytes: stepBytes, toBytes: heap, pauseMs: 0 })
        stepAt = undefined
        fellBack = false
        floor = heap
        return
      }
      if (utilization >= quiet || performance.now() - stepAt < fallbackMs) return
      if (!fellBack) {
        fellBack = true
        collect("major", heap)
        return
      }
      // Even the full collection did not let V8 shrink the heap: what is there is live. Watch
      // again, counting growth from here, so a heap that is simply large is not collected again.
      stepAt = undefined
      fellBack = false
      floor = heap
      return
    }
    if (heap < floor) floor = heap
    if (utilization < quiet && heap - floor >= options.growthBytes) collect("minor", heap)
  }
  const timer = setInterval(tick, options.intervalMs ?? 1000)
  timer.unref()
  return () => clearInterval(timer)
}

const MB = (bytes: number) => (bytes / 1048576).toFixed(1)

/**
 * What the reclaim has done in this process, for the metrics exporter (read at scrape time):
 * steps by kind, and the event loop's total pause in Tidepool's own collections.
 */
export const reclaimTotals = { minor: 0, major: 0, reclaimed: 0, pauseSeconds: 0 }

/**
 * The reclaim for a serving node, from its AppConfig (`TIDEPOOL_MEMORY_RECLAIM`; 0, the default,
 * starts nothing), stopped with the layer. Each step is logged at info: what V8's heap was, what
 * it is, and the event loop's pause for the collections Tidepool ran itself.
 */
export const MemoryReclaimLive: Layer.Layer<never, never, AppConfig> = Layer.effectDiscard(
  Effect.gen(function* () {
    const { memoryReclaimBytes } = yield* AppConfig
    if (memoryReclaimBytes <= 0) return
    const services = yield* Effect.context<never>()
    const log = Effect.runForkWith(services)
    const onStep = (step: ReclaimStep) => {
      reclaimTotals[step.kind]++
      reclaimTotals.pauseSeconds += step.pauseMs / 1000
      log(
        Effect.logInfo(
          step.kind === "reclaimed"
            ? `memory reclaim: V8 gave back its heap, ${MB(step.fromBytes)} -> ${MB(step.toBytes)} MB committed`
            : `memory reclaim: ${step.kind} collection while quiet, ${MB(step.fromBytes)} -> ${MB(step.toBytes)} MB committed, ${step.pauseMs.toFixed(1)} ms pause`
        )
      )
    }
    yield* Effect.acquireRelease(
      Effect.try(() => startMemoryReclaim({ growthBytes: memoryReclaimBytes, onStep })).pipe(
        // A Node that will not hand over `gc` (it is V8's, not a public API) runs without the reclaim.
        Effect.catch((e) =>
          Effect.as(
            Effect.logWarning(`memory reclaim is off: ${e.cause instanceof Error ? e.cause.message : String(e.cause)}`),
            () => undefined
          )
        )
      ),
      (stop) => Effect.sync(stop)
    )
  })
)
