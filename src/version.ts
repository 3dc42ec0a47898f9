import { createRequire } from "node:module"

/**
 * Tidepool's version: package.json's, so a release bumps it in one place. Read at run time rather
 * than imported as JSON: package.json sits outside the build's rootDir (src/), and `../package.json`
 * names the same file from src/version.ts (tsx, vitest) and from dist/version.js (`npm run build`).
 */
export const VERSION: string = (createRequire(import.meta.url)("../package.json") as { readonly version: string })
  .version
