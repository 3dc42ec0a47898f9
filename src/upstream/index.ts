export {
  connect,
  ServerConnection,
  type ServerHandler,
  type UpstreamTarget,
  type UpstreamTlsOptions
} from "./ServerConnection.ts"
