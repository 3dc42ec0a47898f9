/**
 * What a piece of client SQL may leave on its server beyond the transaction (docs/session-state.md).
 * The transaction relay reads every Query's text and every Parse's statement text with this, and
 * when something may have changed a server's session state, it asks the server what is there at the
 * next transaction boundary (`SessionProbe`) instead of guessing from the SQL. So the classifier
 * only has to be *safe*: it may flag harmless text (one extra round trip at that boundary), but
 * must not miss text that changes session state. It allocates nothing and reads each byte once.
 *
 * Recognised, outside quotes and comments:
 * - statements that start with `SET`, `RESET`, `DISCARD`, `LISTEN`, `UNLISTEN`, `LOAD` — except
 *   `SET LOCAL` and `SET TRANSACTION`/`SET CONSTRAINTS`, which end with the transaction;
 * - `set_config(…)` unless its last argument is the literal `true` (transaction-local, as PostgREST
 *   uses it for every request);
 * - words naming session advisory locks (`pg_advisory_lock`, `pg_try_advisory_lock_shared`, …; the
 *   `_xact_` ones end with the transaction), `TEMP`/`TEMPORARY` (temporary tables), `HOLD` (`WITH
 *   HOLD` cursors), `PREPARE` (also inside PL/pgSQL `EXECUTE`);
 * - inside string literals and dollar-quoted bodies (function bodies, `DO` blocks, `EXECUTE '…'`),
 *   any of those words anywhere, since the SQL there runs in the same session.
 *
 * `UNPIN` words (`DROP`, `CLOSE`, `DEALLOCATE`, `COMMIT`, unlock functions) matter only to a client
 * that is pinned: they may release what pins it.
 */

/** The text may change session state: probe the server at the next transaction boundary. */
export const PROBE = 1
/** The text may release state that pins a client to its server. */
export const UNPIN = 2
/** The text may start or stop listening (`LISTEN`, `UNLISTEN`). */
export const LISTENS = 4

const NORMAL = 0
const SQUOTE = 1
const DQUOTE = 2
const DOLLAR = 3
const LINE_COMMENT = 4
const BLOCK_COMMENT = 5

const lower = (c: number): number => (c >= 0x41 && c <= 0x5a ? c | 0x20 : c)
const isWordByte = (c: number): boolean =>
  (c >= 0x61 && c <= 0x7a) || (c >= 0x41 && c <= 0x5a) || (c >= 0x30 && c <= 0x39) || c === 0x5f || c >= 0x80

/** Whether `text[start, end)` equals `word` (lower-case ASCII), ignoring case. */
const wordIs = (text: Uint8Array, start: number, end: number, word: string): boolean => {
  if (end - start !== word.length) return false
  for (let i = 0; i < word.length; i++) if (lower(text[start + i]!) !== word.charCodeAt(i)) return false
  return true
}

/** Whether `text[start, end)` contains `word` (lower-case ASCII), ignoring case. */
const wordHas = (text: Uint8Array, start: number, end: number, word: string): boolean => {
  const last = end - word.length
  outer: for (let i = start; i <= last; i++) {
    for (let j = 0; j < word.length; j++) if (lower(text[i + j]!) !== word.charCodeAt(j)) continue outer
    return true
  }
  return false
}

/** Flags for a word that begins a statement (outside quotes). */
const statementWord = (text: Uint8Array, start: number, end: number, next: number, stop: number): number => {
  const first = lower(text[start]!)
  if (first === 0x73 /* s */ && wordIs(text, start, end, "set")) {
    // SET LOCAL / SET TRANSACTION / SET CONSTRAINTS change nothing beyond the transaction.
    const after = nextWord(text, next, stop)
    if (after >= 0) {
      const afterEnd = wordEnd(text, after, stop)
      if (
        wordIs(text, after, afterEnd, "local") ||
        wordIs(text, after, afterEnd, "transaction") ||
        wordIs(text, after, afterEnd, "constraints")
      ) {
        return 0
      }
    }
    return PROBE
  }
  if (first === 0x72 /* r */ && wordIs(text, start, end, "reset")) return PROBE
  // DISCARD ALL also ends the session's LISTENs (LISTENS: the relay reads its text for that).
  if (first === 0x64 /* d */ && wordIs(text, start, end, "discard")) return PROBE | UNPIN | LISTENS
  if (first === 0x6c /* l */) {
    if (wordIs(text, start, end, "listen")) return PROBE | LISTENS
    if (wordIs(text, start, end, "load")) return PROBE
  }
  if (first === 0x75 /* u */ && wordIs(text, start, end, "unlisten")) return PROBE | LISTENS
  return 0
}

/** Flags for any word outside quotes (not only a statement's first). */
const anyWord = (text: Uint8Array, start: number, end: number, next: number, stop: number): number => {
  const length = end - start
  if (length < 4) return 0
  switch (lower(text[start]!)) {
    case 0x74: // t
      return wordIs(text, start, end, "temp") || wordIs(text, start, end, "temporary") ? PROBE : 0
    case 0x68: // h
      return wordIs(text, start, end, "hold") ? PROBE : 0
    case 0x70: // p
      if (wordIs(text, start, end, "prepare")) return PROBE
      // pg_temp.t: a temporary object named without TEMP.
      if (
        length >= 7 &&
        lower(text[start + 1]!) === 0x67 &&
        text[start + 2] === 0x5f &&
        wordHas(text, start, end, "pg_temp")
      ) {
        return PROBE
      }
      // pg_advisory_…, pg_try_advisory_…: look inside only words that start that way.
      if (
        length > 11 &&
        lower(text[start + 1]!) === 0x67 &&
        text[start + 2] === 0x5f &&
        (lower(text[start + 3]!) === 0x61 || lower(text[start + 3]!) === 0x74) &&
        wordHas(text, start, end, "advisory")
      ) {
        if (wordHas(text, start, end, "_xact_")) return 0
        return wordHas(text, start, end, "unlock") ? PROBE | UNPIN : PROBE
      }
      return 0
    case 0x73: // s
      return wordIs(text, start, end, "set_config") && !localSetConfig(text, next, stop) ? PROBE : 0
    case 0x64: // d
      return wordIs(text, start, end, "drop") || wordIs(text, start, end, "deallocate") ? UNPIN : 0
    case 0x63: // c
      return wordIs(text, start, end, "close") || wordIs(text, start, end, "commit") ? UNPIN : 0
    default:
      return 0
  }
}

/** Flags for a word inside a string literal or a dollar-quoted body: SQL that may run in this session. */
const quotedWord = (text: Uint8Array, start: number, end: number): number => {
  switch (lower(text[start]!)) {
    case 0x73: // s
      return wordIs(text, start, end, "set") || wordIs(text, start, end, "set_config") ? PROBE : 0
    case 0x72: // r
      return wordIs(text, start, end, "reset") ? PROBE : 0
    case 0x6c: // l
      return wordIs(text, start, end, "listen") ? PROBE | LISTENS : 0
    case 0x75: // u
      return wordIs(text, start, end, "unlisten") ? PROBE | LISTENS : 0
    case 0x64: // d
      return wordIs(text, start, end, "discard") ? PROBE | UNPIN : 0
    default:
      return end - start >= 4 ? anyWord(text, start, end, end, end) & PROBE : 0
  }
}

const wordEnd = (text: Uint8Array, pos: number, stop: number): number => {
  while (pos < stop && isWordByte(text[pos]!)) pos++
  return pos
}

/** The start of the next word after whitespace (no comments), or -1. */
const nextWord = (text: Uint8Array, pos: number, stop: number): number => {
  while (pos < stop && (text[pos] === 0x20 || (text[pos]! >= 0x09 && text[pos]! <= 0x0d))) pos++
  return pos < stop && isWordByte(text[pos]!) ? pos : -1
}

/**
 * Whether the `set_config` call whose name ends at `pos` has the literal `true` (or `'true'`, `'t'`,
 * `'on'`) as its last argument: a transaction-local setting. Anything unclear counts as not local.
 */
const localSetConfig = (text: Uint8Array, pos: number, stop: number): boolean => {
  while (pos < stop && (text[pos] === 0x20 || (text[pos]! >= 0x09 && text[pos]! <= 0x0d))) pos++
  if (pos >= stop || text[pos] !== 0x28 /* ( */) return false
  let depth = 0
  let lastComma = -1
  let quoted = false
  for (let i = pos; i < stop; i++) {
    const c = text[i]!
    if (quoted) {
      if (c === 0x27) quoted = false
      continue
    }
    if (c === 0x27) quoted = true
    // A comment or a dollar quote ($$, $tag$; not a parameter $1) could hide a comma: not provably local.
    else if (c === 0x2d || c === 0x2f || (c === 0x24 && !(text[i + 1]! >= 0x30 && text[i + 1]! <= 0x39))) return false
    else if (c === 0x28) depth++
    else if (c === 0x29) {
      if (--depth === 0) {
        if (lastComma < 0) return false
        let a = lastComma + 1
        let b = i
        while (a < b && (text[a] === 0x20 || (text[a]! >= 0x09 && text[a]! <= 0x0d))) a++
        while (b > a && (text[b - 1] === 0x20 || (text[b - 1]! >= 0x09 && text[b - 1]! <= 0x0d))) b--
        return (
          wordIs(text, a, b, "true") ||
          wordIs(text, a, b, "'true'") ||
          wordIs(text, a, b, "'t'") ||
          wordIs(text, a, b, "'on'")
        )
      }
    } else if (c === 0x2c && depth === 1) lastComma = i
  }
  return false
}

/**
 * The flags of SQL text `text[start, end)` (a Query's string or a Parse's statement text; a trailing
 * NUL ends it early). Returns 0 for the common case, ordinary DML and queries.
 */
export const sessionEffects = (text: Uint8Array, start: number, end: number): number => {
  let flags = 0
  let state = NORMAL
  let depth = 0
  // Dollar-quote tag: its bytes are text[tagStart, tagEnd) including both `$`.
  let tagStart = 0
  let tagEnd = 0
  let atStatement = true
  /** The current string literal is an E'…' one: a backslash escapes the next byte. */
  let escapes = false
  let pos = start
  while (pos < end) {
    const c = text[pos]!
    if (c === 0) break
    switch (state) {
      case NORMAL: {
        if (isWordByte(c) && !(c >= 0x30 && c <= 0x39)) {
          const wEnd = wordEnd(text, pos, end)
          if (atStatement) flags |= statementWord(text, pos, wEnd, wEnd, end)
          flags |= anyWord(text, pos, wEnd, wEnd, end)
          atStatement = false
          pos = wEnd
          continue
        }
        if (c === 0x3b /* ; */) atStatement = true
        else if (c === 0x27 /* ' */) {
          state = SQUOTE
          escapes = pos > start && lower(text[pos - 1]!) === 0x65 && (pos - 1 === start || !isWordByte(text[pos - 2]!))
        } else if (c === 0x22 /* " */) {
          state = DQUOTE
          atStatement = false
        } else if (c === 0x2d /* - */ && text[pos + 1] === 0x2d) {
          state = LINE_COMMENT
          pos++
        } else if (c === 0x2f /* / */ && text[pos + 1] === 0x2a) {
          state = BLOCK_COMMENT
          depth = 1
          pos++
        } else if (c === 0x24 /* $ */) {
          // `$tag$` or `$$` opens a dollar quote; `$1` is a parameter.
          let j = pos + 1
          while (j < end && isWordByte(text[j]!) && !(j === pos + 1 && text[j]! >= 0x30 && text[j]! <= 0x39)) j++
          if (j < end && text[j] === 0x24) {
            tagStart = pos
            tagEnd = j + 1
            state = DOLLAR
            pos = j + 1
            continue
          }
        } else if (c > 0x20) atStatement = false
        pos++
        continue
      }
      case SQUOTE:
      case DQUOTE:
      case DOLLAR: {
        // Inside a literal, a quoted name or a dollar-quoted body: first whether it closes here,
        // then its words (SQL that may run in this session, or a name that matters).
        if (state === SQUOTE) {
          if (escapes && c === 0x5c /* \ */) {
            pos += 2
            continue
          }
          if (c === 0x27) {
            state = NORMAL
            pos++
            continue
          }
        } else if (state === DQUOTE) {
          if (c === 0x22) {
            state = NORMAL
            pos++
            continue
          }
        } else if (c === 0x24 && dollarCloses(text, pos, end, tagStart, tagEnd)) {
          pos += tagEnd - tagStart
          state = NORMAL
          continue
        }
        if (isWordByte(c)) {
          const wEnd = wordEnd(text, pos, end)
          // A quoted name ("pg_advisory_lock", pg_temp) counts as a word outside quotes would.
          flags |= state === DQUOTE ? anyWord(text, pos, wEnd, wEnd, end) : quotedWord(text, pos, wEnd)
          pos = wEnd
          continue
        }
        pos++
        continue
      }
      case LINE_COMMENT:
        if (c === 0x0a) state = NORMAL
        pos++
        continue
      default: // BLOCK_COMMENT (PostgreSQL's nest)
        if (c === 0x2a && text[pos + 1] === 0x2f) {
          if (--depth === 0) state = NORMAL
          pos += 2
          continue
        }
        if (c === 0x2f && text[pos + 1] === 0x2a) {
          depth++
          pos += 2
          continue
        }
        pos++
    }
  }
  return flags
}

const dollarCloses = (text: Uint8Array, pos: number, end: number, tagStart: number, tagEnd: number): boolean => {
  const length = tagEnd - tagStart
  if (pos + length > end) return false
  for (let i = 0; i < length; i++) if (text[pos + i] !== text[tagStart + i]) return false
  return true
}

const COMMENTS = /\/\*[\s\S]*?\*\/|--[^\n]*/g
const UNLISTEN = /(?:^|;)\s*(?:unlisten\s+("(?:[^"]|"")+"|\*|[^\s;]+)|discard\s+all\b)/gi

/**
 * The channels `UNLISTEN` statements in `sql` name, folded as PostgreSQL folds identifiers; `"*"`
 * for `UNLISTEN *` and `DISCARD ALL`. Only for text flagged `LISTENS` (rare), so it may allocate.
 */
export const unlistenTargets = (sql: string): Array<string> => {
  const targets: Array<string> = []
  const bare = sql.replace(COMMENTS, " ")
  for (const match of bare.matchAll(UNLISTEN)) {
    const name = match[1]
    if (name === undefined || name === "*")
      targets.push("*") // DISCARD ALL, UNLISTEN *
    else if (name.startsWith('"')) targets.push(name.slice(1, -1).replace(/""/g, '"'))
    else targets.push(name.toLowerCase())
  }
  return targets
}
