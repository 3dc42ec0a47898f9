export { type Gathered, HostViews } from "./HostViews.ts"
export { fairShares, Ledger, type LedgerOut } from "./Ledger.ts"
export {
  type BackendRef,
  type GatheredPart,
  ownerOf,
  type ToSupervisor,
  type ToWorker,
  WORKER_ENV,
  type WorkerInfo
} from "./messages.ts"
export { SeatLedger, type SeatsOut } from "./Seats.ts"
export { supervise } from "./Supervisor.ts"
export { workerInbox, workerReady, workerServices, workerStore } from "./WorkerLink.ts"
