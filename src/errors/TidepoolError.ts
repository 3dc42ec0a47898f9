import { Data } from "effect"
import { errorResponse } from "../protocol/index.ts"
import { type Catalog, catalog, type ErrorArgs, type ErrorCode } from "./catalog.ts"

/**
 * The one error type a client or operator sees. `code` is stable (docs/errors.md), `sqlstate` is what
 * the client's driver reports; `message` is the text without the `(CODE)` prefix, so logs stay readable.
 */
export class TidepoolError extends Data.TaggedError("TidepoolError")<{
  readonly code: ErrorCode
  readonly sqlstate: string
  readonly severity: Catalog[ErrorCode]["severity"]
  readonly message: string
  readonly detail?: string | undefined
  readonly hint?: string | undefined
}> {}

export const tidepoolError = <C extends ErrorCode>(code: C, ...args: ErrorArgs<C>): TidepoolError => {
  const e = catalog[code]
  const text = (e.text as (...a: ReadonlyArray<unknown>) => string)(...args)
  return new TidepoolError({ code, sqlstate: e.sqlstate, severity: e.severity, message: text })
}

/** An upstream's own ErrorResponse passed on to the client verbatim (its SQLSTATE, message, detail, hint). */
export const upstreamError = (fields: {
  readonly code?: string | undefined
  readonly message?: string | undefined
  readonly detail?: string | undefined
  readonly hint?: string | undefined
}): TidepoolError =>
  new TidepoolError({
    code: "ECHECKOUTFAILED",
    sqlstate: fields.code ?? "08006",
    severity: "FATAL",
    message: fields.message ?? "upstream error",
    detail: fields.detail,
    hint: fields.hint
  })

/** The `M` field as the client sees it. */
export const clientMessage = (error: TidepoolError): string =>
  catalog[error.code].prefix ? `(${error.code}) ${error.message}` : error.message

/** Renders the wire ErrorResponse. LOG-only codes are never sent, but render as FATAL if asked. */
export const renderErrorResponse = (error: TidepoolError): Buffer =>
  errorResponse({
    severity: error.severity === "LOG" ? "FATAL" : error.severity,
    code: error.sqlstate,
    message: clientMessage(error),
    ...(error.detail !== undefined ? { detail: error.detail } : {}),
    ...(error.hint !== undefined ? { hint: error.hint } : {})
  })
