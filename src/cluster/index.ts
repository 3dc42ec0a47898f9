export { advertisedHost, clusterServices } from "./ClusterLink.ts"
export { HostPermits } from "./HostPermits.ts"
export { type Gathered, HostViews } from "./HostViews.ts"
export { fairShares, Ledger, type LedgerOut } from "./Ledger.ts"
export {
  type BackendRef,
  CLUSTER_WORKER_SHIFT,
  clusterOwnerOf,
  type GatheredPart,
  ownerOf,
  type ToSupervisor,
  type ToWorker,
  WORKER_ENV,
  type WorkerInfo
} from "./messages.ts"
export { type Claim, type Directive, type Division, divide } from "./PoolShares.ts"
export { SeatLedger, type SeatsOut } from "./Seats.ts"
export { MAX_SLOT, SLOT_SHIFT, slotOf } from "./StoreRunner.ts"
export { supervise } from "./Supervisor.ts"
export { workerInbox, workerReady, workerServices, workerStore } from "./WorkerLink.ts"
