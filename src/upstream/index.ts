export { ReadBuffer, writeChunk } from "./ReadBuffer.ts"
export {
  type CancelTarget,
  type ConnectOptions,
  connect,
  type PassthroughKeys,
  ServerConnection,
  type ServerHandler,
  type ServerObserver,
  sendCancel,
  type UpstreamTarget,
  type UpstreamTlsOptions,
  upstreamScramKeys
} from "./ServerConnection.ts"
