export { type AuthChannel, authenticateScram } from "./ClientAuth.ts"
export { SecretCache } from "./SecretCache.ts"
