export {
  type ConnectOptions,
  connect,
  type PassthroughKeys,
  ServerConnection,
  type ServerHandler,
  type UpstreamTarget
} from "./ServerConnection.ts"
