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
    /** Asks every worker (this one included); a worker that does not answer within 2 s has `data` undefined. */
    readonly gather: (what: string) => Effect.Effect<Gathered>
    /** What this worker answers to gathers named `name`; JSON-serialisable. */
    readonly provide: (name: string, producer: (arg: string) => unknown) => void
  }
>()("tidepool/HostViews") {}
