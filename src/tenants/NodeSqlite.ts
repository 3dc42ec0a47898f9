import { DatabaseSync, type SQLInputValue, type StatementSync } from "node:sqlite"
import { Context, Effect, type Scope, Semaphore, Stream } from "effect"
import type { Reactivity } from "effect/reactivity"
import { SqlClient, type SqlConnection, SqlError, Statement } from "effect/sql"

/**
 * An Effect SQL client for SQLite on Node's own `node:sqlite`, so the embedded tenant store needs no
 * native addon (better-sqlite3 compiled from source on every clean install).
 *
 * Why our own: the official driver, `@effect/sql-sqlite-node`, is built on `node:sqlite` too, but
 * only 4.0.0 pre-releases exist on npm and they import `effect/unstable/sql/*`, which effect 4.1
 * (where those modules graduated to `effect/sql/*`) no longer exports, so they cannot load. This
 * client is assembled from the parts effect 4.1 publishes for SQLite drivers (`SqlClient.make`,
 * `SqlClient.makeSqliteAcquirers`, `Statement.makeCompilerSqlite`, `SqlError.classifySqliteError`)
 * and does only what the tenant store needs; swap it for the official driver once a 4.1 release
 * exists (docs/operations.md#tenant-store).
 *
 * One connection serves every statement in turn (SQLite allows one writer; the store is small and
 * off the hot path). `node:sqlite` is synchronous, so a busy database blocks the event loop for at
 * most `busyTimeoutMs`.
 */
export interface NodeSqliteConfig {
  readonly filename: string
  readonly readonly?: boolean | undefined
  /** WAL (the default, as better-sqlite3's Effect driver had it) lets readers run beside a writer. */
  readonly disableWAL?: boolean | undefined
  readonly busyTimeoutMs?: number | undefined
}

const classify = (cause: unknown, message: string, operation: string) =>
  new SqlError.SqlError({ reason: SqlError.classifySqliteError(cause, { message, operation }) })

// node:sqlite binds only null, numbers, bigints, strings and bytes.
const bindable = (params: ReadonlyArray<unknown>): Array<SQLInputValue> =>
  params.map((p) =>
    p === undefined
      ? null
      : typeof p === "boolean"
        ? p
          ? 1
          : 0
        : p instanceof Date
          ? p.toISOString()
          : (p as SQLInputValue)
  )

// Prepared statements are kept per SQL text; the store issues a handful of distinct statements.
const maxCachedStatements = 100

const makeConnection = (db: DatabaseSync): SqlConnection.Connection => {
  const statements = new Map<string, StatementSync>()
  const prepare = (sql: string): StatementSync => {
    let statement = statements.get(sql)
    if (statement === undefined) {
      if (statements.size >= maxCachedStatements) statements.clear()
      statement = db.prepare(sql)
      statements.set(sql, statement)
    }
    return statement
  }
  const run = (
    statementOf: (sql: string) => StatementSync,
    sql: string,
    params: ReadonlyArray<unknown>,
    mode: "rows" | "raw" | "values"
  ): Effect.Effect<ReadonlyArray<never>, SqlError.SqlError> =>
    // The rows' shape is the caller's (`sql<Row>`); the Connection interface types them loosely.
    Effect.withFiber<ReadonlyArray<never>, SqlError.SqlError>((fiber) => {
      const safeIntegers = Context.get(fiber.context, SqlClient.SafeIntegers)
      try {
        const statement = statementOf(sql)
        statement.setReadBigInts(safeIntegers)
        statement.setReturnArrays(mode === "values")
        const args = bindable(params)
        if (statement.columns().length > 0)
          return Effect.succeed(statement.all(...args) as unknown as ReadonlyArray<never>)
        if (mode !== "raw") {
          statement.run(...args)
          return Effect.succeed([])
        }
        const { changes, lastInsertRowid } = statement.run(...args)
        // executeRaw answers the driver's own result, which for a write is this summary.
        return Effect.succeed({ changes, lastInsertRowid } as unknown as ReadonlyArray<never>)
      } catch (cause) {
        return Effect.fail(classify(cause, "Failed to execute statement", "execute"))
      }
    })
  const unprepared = (sql: string) => db.prepare(sql)
  return {
    execute: (sql, params, transformRows) =>
      transformRows === undefined
        ? run(prepare, sql, params, "rows")
        : Effect.map(run(prepare, sql, params, "rows"), transformRows),
    executeRaw: (sql, params) => run(prepare, sql, params, "raw"),
    executeValues: (sql, params) => run(prepare, sql, params, "values"),
    executeValuesUnprepared: (sql, params) => run(unprepared, sql, params, "values"),
    executeUnprepared: (sql, params, transformRows) =>
      transformRows === undefined
        ? run(unprepared, sql, params, "rows")
        : Effect.map(run(unprepared, sql, params, "rows"), transformRows),
    executeStream: () => Stream.die(new Error("streaming queries are not supported by the node:sqlite client"))
  }
}

/** Opens the database for the life of the current scope. */
export const make = (
  config: NodeSqliteConfig
): Effect.Effect<SqlClient.SqlClient, SqlError.SqlError, Scope.Scope | Reactivity.Reactivity> =>
  Effect.gen(function* () {
    const db = yield* Effect.acquireRelease(
      Effect.try({
        try: () =>
          new DatabaseSync(config.filename, {
            readOnly: config.readonly ?? false,
            timeout: config.busyTimeoutMs ?? 5_000
          }),
        catch: (cause) => classify(cause, `Failed to open ${config.filename}`, "connect")
      }),
      (db) => Effect.sync(() => db.close())
    )
    if (config.disableWAL !== true && config.readonly !== true && config.filename !== ":memory:") {
      yield* Effect.try({
        try: () => db.exec("PRAGMA journal_mode = WAL"),
        catch: (cause) => classify(cause, "Failed to enable WAL", "connect")
      })
    }
    const connection = makeConnection(db)
    const acquirers = SqlClient.makeSqliteAcquirers({
      connection: Effect.succeed(connection),
      semaphore: yield* Semaphore.make(1),
      isTransaction: () => db.isTransaction
    })
    return yield* SqlClient.make({
      ...acquirers,
      compiler: Statement.makeCompilerSqlite(),
      driver: "sqlite",
      spanAttributes: [["db.system.name", "sqlite"]]
    })
  })
