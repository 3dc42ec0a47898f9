/** Upper bounds (seconds) of the latency buckets: 0.5 ms to a minute, enough for `histogram_quantile`. */
export const LATENCY_BUCKETS_SECONDS: ReadonlyArray<number> = [
  0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60
]

const BOUNDS_MS = Float64Array.from(LATENCY_BUCKETS_SECONDS, (s) => s * 1000)

/**
 * A fixed-bucket latency histogram updated on the hot path: `observe` is a short scan over a
 * preallocated array, no allocation. Buckets hold plain (not cumulative) counts; the exporter sums
 * them into Prometheus' cumulative `le` series. The last slot counts observations above every bound.
 */
export class LatencyHistogram {
  readonly counts = new Float64Array(BOUNDS_MS.length + 1)
  count = 0
  sumMs = 0

  observe(ms: number): void {
    let i = 0
    while (i < BOUNDS_MS.length && ms > BOUNDS_MS[i]!) i++
    this.counts[i]!++
    this.count++
    this.sumMs += ms
  }
}
