export { EventCounters, type LabelledCounts } from "./EventCounters.ts"
export { type LogFormat, loggerLayer } from "./Logger.ts"
export { Metrics, PROMETHEUS_CONTENT_TYPE } from "./Metrics.ts"
export { type MetricsAuthorizer, metricsRouter } from "./MetricsHttp.ts"
