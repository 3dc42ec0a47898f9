export { clientSession, FORWARDED_PARAMETERS } from "./ClientSession.ts"
export { type SessionHandle, type SessionKey, SessionRegistry } from "./SessionRegistry.ts"
