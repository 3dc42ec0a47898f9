export { type Catalog, type CatalogEntry, catalog, type ErrorArgs, type ErrorCode, errorCodes } from "./catalog.ts"
export { clientMessage, renderErrorResponse, TidepoolError, tidepoolError, upstreamError } from "./TidepoolError.ts"
