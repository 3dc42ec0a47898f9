#!/usr/bin/env node
// Runs the compiled CLI when built (npm run build), else the TypeScript sources through tsx.
import { existsSync } from "node:fs"
import { fileURLToPath } from "node:url"

const dist = fileURLToPath(new URL("../dist/main.js", import.meta.url))
if (existsSync(dist)) {
  await import(dist)
} else {
  const { register } = await import("tsx/esm/api")
  register()
  await import("../src/main.ts")
}
