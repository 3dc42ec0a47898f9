/**
 * Imported first by src/main.ts, so it runs before any other module is evaluated: re-executes the
 * process with V8's young generation capped (./YoungGeneration.ts), or returns at once.
 */
import { relaunchWithCappedYoungGeneration } from "./YoungGeneration.ts"

relaunchWithCappedYoungGeneration()
