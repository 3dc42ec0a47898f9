import { SignJWT } from "jose"
import { type RunningTidepool, TEST_JWT_SECRET } from "./tidepool.ts"

/** A bearer token for the test API secret: HS256, valid for an hour unless `exp` says otherwise. */
export const mintToken = (
  claims: Record<string, unknown> = {},
  options: { readonly alg?: "HS256" | "HS384" | "HS512"; readonly secret?: string; readonly exp?: number | null } = {}
): Promise<string> => {
  const jwt = new SignJWT(claims).setProtectedHeader({ alg: options.alg ?? "HS256" }).setIssuedAt()
  if (options.exp !== null) jwt.setExpirationTime(options.exp ?? Math.floor(Date.now() / 1000) + 3600)
  return jwt.sign(new TextEncoder().encode(options.secret ?? TEST_JWT_SECRET))
}

export interface ApiAnswer {
  readonly status: number
  readonly headers: Headers
  readonly text: string
  // biome-ignore lint/suspicious/noExplicitAny: JSON answers are inspected field by field
  readonly json: any
}

/** One HTTP request to the API of a Tidepool started with `api: true`. */
export const callApi = async (
  tidepool: Pick<RunningTidepool, "apiPort">,
  method: string,
  path: string,
  options: { readonly body?: unknown; readonly token?: string | null } = {}
): Promise<ApiAnswer> => {
  const token = options.token === undefined ? await mintToken() : options.token
  const response = await fetch(`http://127.0.0.1:${tidepool.apiPort}${path}`, {
    method,
    headers: {
      ...(token !== null ? { authorization: `Bearer ${token}` } : {}),
      ...(options.body !== undefined ? { "content-type": "application/json" } : {})
    },
    ...(options.body !== undefined
      ? { body: typeof options.body === "string" ? options.body : JSON.stringify(options.body) }
      : {})
  })
  const text = await response.text()
  let json: unknown
  try {
    json = text === "" ? undefined : JSON.parse(text)
  } catch {
    json = undefined
  }
  return { status: response.status, headers: response.headers, text, json }
}
