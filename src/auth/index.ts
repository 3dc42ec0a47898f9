export { AUTH_FAILURES, AUTH_QUERY_FAILURES, type Ban, type BreakerRule, CircuitBreaker } from "./CircuitBreaker.ts"
export { type AuthChannel, authenticateScram } from "./ClientAuth.ts"
export { SecretCache } from "./SecretCache.ts"
