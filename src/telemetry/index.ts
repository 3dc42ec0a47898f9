export { EventCounters, type LabelledCounts } from "./EventCounters.ts"
export { type LogFormat, loggerLayer } from "./Logger.ts"
