export { fairShares, Ledger, type LedgerOut } from "./Ledger.ts"
export { type BackendRef, ownerOf, type ToSupervisor, type ToWorker, WORKER_ENV } from "./messages.ts"
export { supervise } from "./Supervisor.ts"
export { workerInbox, workerReady, workerServices, workerStore } from "./WorkerLink.ts"
