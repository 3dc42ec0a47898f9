export * from "./AppConfig.ts"
export * from "./ConfigError.ts"
export * from "./ConfigFile.ts"
export * from "./Tenant.ts"
