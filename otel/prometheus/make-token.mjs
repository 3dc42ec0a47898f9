// Writes a metrics JWT (HS256, signed with METRICS_JWT_SECRET, valid for TOKEN_TTL, default one year)
// to the file given as the first argument. Run with Tidepool's image, which has `jose`.
import { writeFileSync } from "node:fs"
import { SignJWT } from "jose"

const secret = process.env.METRICS_JWT_SECRET
const file = process.argv[2]
if (!secret || !file) {
  console.error("usage: METRICS_JWT_SECRET=… node make-token.mjs FILE")
  process.exit(2)
}
const token = await new SignJWT({ role: "metrics" })
  .setProtectedHeader({ alg: "HS256", typ: "JWT" })
  .setIssuedAt()
  .setExpirationTime(process.env.TOKEN_TTL ?? "365d")
  .sign(new TextEncoder().encode(secret))
writeFileSync(file, token, { mode: 0o644 })
console.log(`metrics token written to ${file}`)
