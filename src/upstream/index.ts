export {
  type ConnectOptions,
  connect,
  ServerConnection,
  type ServerHandler,
  type UpstreamTarget
} from "./ServerConnection.ts"
