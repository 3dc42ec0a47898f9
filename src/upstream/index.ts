export { ReadBuffer, writeChunk } from "./ReadBuffer.ts"
export {
  type ConnectOptions,
  connect,
  type PassthroughKeys,
  ServerConnection,
  type ServerHandler,
  type ServerObserver,
  type UpstreamTarget,
  type UpstreamTlsOptions
} from "./ServerConnection.ts"
