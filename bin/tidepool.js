#!/usr/bin/env node
// Runs the compiled CLI when built (npm run build), else the TypeScript sources through tsx.
import { existsSync } from "node:fs"
import { fileURLToPath } from "node:url"

// Effect 4 and node:sqlite need Node 22.19 or newer; on an older Node the first import would fail
// with an unknown-module error that names neither.
const [major, minor] = process.versions.node.split(".").map(Number)
if (major < 22 || (major === 22 && minor < 19)) {
  process.stderr.write(
    `tidepool needs Node.js 22.19 or newer (24 LTS recommended); this is ${process.version}.\n` +
      "In a checkout, `npx tidepool …` and the npm scripts run the Node 24 that `npm ci` installs.\n"
  )
  process.exit(1)
}

const dist = fileURLToPath(new URL("../dist/main.js", import.meta.url))
if (existsSync(dist)) {
  await import(dist)
} else {
  const { register } = await import("tsx/esm/api")
  register()
  await import("../src/main.ts")
}
