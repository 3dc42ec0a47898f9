export { type LogFormat, loggerLayer } from "./Logger.ts"
