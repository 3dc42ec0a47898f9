export {
  ApiListenError,
  ApiServer,
  apiPolicy,
  apiRouter,
  apiRoutes,
  metricsPolicy,
  reportDefects,
  requireToken
} from "./ApiServer.ts"
export { type BearerVerdict, type JwtPolicy, verifyBearer } from "./JwtAuth.ts"
export { openApiDocument, openApiPath } from "./OpenApi.ts"
export { type Route, routes } from "./routes.ts"
