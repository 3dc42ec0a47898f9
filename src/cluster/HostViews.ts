import { Context, type Effect } from "effect"
import type { GatheredPart, WorkerInfo } from "./messages.ts"

/** Every worker's answer to one gather, and the supervisor's view of the workers. */
export interface Gathered {
  readonly parts: ReadonlyArray<GatheredPart>
  readonly workers: ReadonlyArray<WorkerInfo>
}

/**
 * Worker mode only (docs/scale-out.md#views-of-the-whole-host): views of the whole host. A view is
 * asked of every worker through the supervisor; each worker answers from the producer registered
 * under the view's name (`metrics`, `admin`), given the text after the first `:` of `what`.
 * Kept free of imports beyond types, so the admin console and telemetry can depend on it.
 */
export class HostViews extends Context.Service<
  HostViews,
  {
    /** This worker's number, from 1 (the `worker` label and column). */
    readonly worker: number
    /**
     * Asks every worker (this one included); a worker that does not answer within `timeoutMs`
     * (default 2 s; 0: no deadline, only a worker's death ends its wait) has `data` undefined.
     */
    readonly gather: (what: string, timeoutMs?: number) => Effect.Effect<Gathered>
    /** What this worker answers to gathers named `name` (JSON-serialisable, or a promise of it). */
    readonly provide: (name: string, producer: (arg: string) => unknown) => void
  }
>()("tidepool/HostViews") {}
