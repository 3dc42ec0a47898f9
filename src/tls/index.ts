export * from "./channelBinding.ts"
export * from "./clientTls.ts"
export * from "./DownstreamTls.ts"
export * from "./UpstreamTls.ts"
