/**
 * Quoting for the SQL the pooler writes itself (silent queries, the listening connection), where a
 * value or a name may come from a client.
 */

/** A string literal, right whatever `standard_conforming_strings` the session has (E'…', backslashes doubled). */
export const quoteLiteral = (value: string): string => `E'${value.replace(/\\/g, "\\\\").replace(/'/g, "''")}'`

/** A quoted identifier: the exact name, case and all. */
export const quoteIdentifier = (name: string): string => `"${name.replaceAll('"', '""')}"`
