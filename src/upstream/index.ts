export {
  type ConnectOptions,
  connect,
  type PassthroughKeys,
  ServerConnection,
  type ServerHandler,
  type UpstreamTarget,
  type UpstreamTlsOptions
} from "./ServerConnection.ts"
