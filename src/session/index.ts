export { clientSession, type LiveSession, type LoginTicket, type SessionSupervisor } from "./ClientSession.ts"
export { IdleSweep } from "./IdleSweep.ts"
export {
  PeerWorkers,
  type RegisteredSession,
  type SessionHandle,
  type SessionInfo,
  type SessionKey,
  SessionRegistry
} from "./SessionRegistry.ts"
export { FORWARDED_PARAMETERS, TRACKED_PARAMETERS } from "./settings.ts"
export { retarget, TenantChanges } from "./TenantChanges.ts"
