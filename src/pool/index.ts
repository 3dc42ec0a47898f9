export { LATENCY_BUCKETS_SECONDS, LatencyHistogram } from "./Histogram.ts"
export {
  LISTEN_LINGER_MS,
  type ListenDone,
  ListenHub,
  type ListenSubscriber
} from "./ListenHub.ts"
export { PermitGate, type PoolPermits } from "./PermitGate.ts"
export { PoolRegistry } from "./PoolRegistry.ts"
export { StatementRegistry } from "./StatementRegistry.ts"
export {
  type CheckoutCallback,
  makeTenantPool,
  PoolCounters,
  type PoolMode,
  type PoolSettings,
  type ServerView,
  TenantPool
} from "./TenantPool.ts"
