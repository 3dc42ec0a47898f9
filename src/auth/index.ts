export { AUTH_QUERY_BLOCKED, AuthQuery, REFETCHES_PER_MINUTE, type UpstreamKeys, USER_NOT_FOUND } from "./AuthQuery.ts"
export {
  AUTH_FAILURES,
  AUTH_QUERY_FAILURES,
  type AuthAttempt,
  type Ban,
  type BreakerRule,
  CircuitBreaker
} from "./CircuitBreaker.ts"
export {
  ADDRESS_BLOCKED,
  type AuthChannel,
  annotateOutcome,
  authenticateClient,
  authenticateScram,
  type ClientCredentials,
  inSpan,
  matchUsers,
  refusalError,
  withoutStack
} from "./ClientAuth.ts"
export { JitApi, looksLikeJwt, looksLikeToken, passwordKeys } from "./Jit.ts"
export { SecretCache } from "./SecretCache.ts"
